"""The server's second factor without a tun: who is held, codes judged, sessions that end and survive."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunvpn.config import default_totp_secret_file, parse_config
from tunvpn.daemon import Options
from tunvpn.keys import derive_public_key, encode_key, generate_private_key
from tunvpn.protocol import control
from tunvpn.protocol.control import AuthCode, AuthMethod, AuthState, AuthStatus
from tunvpn.protocol.device import ControlReceived, HandshakeCompleted
from tunvpn.secondfactor import GUESS_BURST, GUESS_INTERVAL, HOLD_REASON
from tunvpn.server import Server
from tunvpn.totp import encode_secret, generate_secret, totp

SERVER_KEY = generate_private_key()
ALICE, BOB = (derive_public_key(generate_private_key()) for _ in range(2))
SECRET = generate_secret()
START = 1_700_000_000.0
SESSION = 3600


def server_text(alice_totp: bool = True, bob: bool = True) -> str:
    text = (f"[Interface]\nPrivateKey = {encode_key(SERVER_KEY)}\nAddress = 203.0.113.1/24\n"
            f"TOTPSession = {SESSION}\n\n[Peer]\nPublicKey = {encode_key(ALICE)}\n")
    text += "TOTP = yes\n" if alice_totp else ""
    return text + (f"\n[Peer]\nPublicKey = {encode_key(BOB)}\n" if bob else "")


class Harness:
    """A server whose wall clock and outgoing control messages the test holds."""

    def __init__(self, tmp_path: Path, text: str | None = None) -> None:
        self.tmp_path = tmp_path
        self.wall = getattr(type(self), "wall", START)
        self.sent: list[tuple[bytes, object]] = []
        secret_path = Path(default_totp_secret_file(str(tmp_path), "office", ALICE))
        if not secret_path.exists():
            secret_path.parent.mkdir(mode=0o700, exist_ok=True)
            secret_path.write_text(encode_secret(SECRET) + "\n")
            os.chmod(secret_path, 0o600)
        self.server = Server(self.config(text or server_text()), Options(state_dir=tmp_path / "state"))
        self.server.wall_clock = lambda: self.wall
        self.server._sync_second_factor()  # again, on the test's clock
        self.server.device.send_to_peer = self._record

    def config(self, text: str):
        return parse_config(text, str(self.tmp_path / "office.conf"), role="server", resolve=False)

    def _record(self, public_key: bytes, payloads, now: float) -> None:
        self.sent += [(public_key, control.decode(payload)) for payload in payloads]

    def receive(self, public_key: bytes, message, now: float = 0.0) -> list:
        start = len(self.sent)
        self.server.handle_event(ControlReceived(public_key, control.encode(message)), now)
        return [message for _, message in self.sent[start:]]

    def code(self, offset: float = 0.0) -> str:
        return totp(SECRET, self.wall + offset)

    def present(self, code: str, request_id: int = 1, now: float = 0.0) -> AuthStatus:
        [answer] = self.receive(ALICE, AuthCode(request_id, AuthMethod.TOTP, code), now)
        return answer

    def held(self, public_key: bytes = ALICE) -> str | None:
        return self.server.device.peer_stats(public_key).restricted


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_a_totp_peer_is_held_from_the_start_and_others_are_not(harness):
    assert harness.held(ALICE) == HOLD_REASON and harness.held(BOB) is None
    assert harness.server.peer_status_extra(ALICE)["second_factor"] == {"method": "totp", "authorized": False,
                                                                         "until": None}
    assert harness.server.peer_status_extra(BOB)["second_factor"] is None
    assert harness.server.summary().endswith("; 1 waiting for second factor")


def test_a_config_request_gets_the_push_and_where_the_peer_stands(harness):
    push, status = harness.receive(ALICE, control.ConfigRequest(4))
    assert isinstance(push, control.ConfigPush) and status == AuthStatus(4, AuthMethod.TOTP, AuthState.REQUIRED)
    [push] = harness.receive(BOB, control.ConfigRequest(5))
    assert isinstance(push, control.ConfigPush)


def test_a_valid_code_authorizes_for_the_session_and_lifts_the_hold(harness):
    assert harness.present(harness.code()) == AuthStatus(1, AuthMethod.TOTP, AuthState.AUTHORIZED, SESSION)
    assert harness.held() is None
    assert harness.server.peer_status_extra(ALICE)["second_factor"]["until"] == int(START) + SESSION
    assert harness.server.state.second_factor[ALICE].until == int(START) + SESSION


def test_codes_of_the_neighbouring_steps_count_and_farther_ones_do_not(harness):
    assert harness.present(harness.code(-60)).state == AuthState.REFUSED
    assert harness.present(harness.code(+60)).state == AuthState.REFUSED
    assert harness.present(harness.code(-30)).state == AuthState.AUTHORIZED


def test_a_wrong_code_is_refused_and_counted(harness):
    wrong = f"{(int(harness.code()) + 1) % 10**6:06d}"
    for code in (wrong, "abcdef", "1234567"):
        assert harness.present(code).state == AuthState.REFUSED
    assert harness.held() == HOLD_REASON
    assert harness.server.device.peer_stats(ALICE).dropped["second_factor_refused"] == 3


def test_a_code_is_accepted_once_and_so_are_those_of_earlier_steps(harness):
    code, earlier = harness.code(), harness.code(-30)
    assert harness.present(code).state == AuthState.AUTHORIZED
    assert harness.present(code, 2).state == AuthState.REFUSED
    assert harness.present(earlier, 3).state == AuthState.REFUSED
    harness.wall += 30
    assert harness.present(harness.code(), 4).state == AuthState.AUTHORIZED  # the next step's is fresh


def test_guesses_are_limited_per_peer(harness):
    for attempt in range(GUESS_BURST):
        assert harness.present("000000" if harness.code() != "000000" else "111111", attempt + 1).state == \
            AuthState.REFUSED
    limited = harness.present(harness.code(), 9)
    assert limited.state == AuthState.RATE_LIMITED and 0 < limited.seconds <= GUESS_INTERVAL
    assert harness.held() == HOLD_REASON
    assert harness.server.device.peer_stats(ALICE).dropped["second_factor_rate_limited"] == 1
    harness.wall += GUESS_INTERVAL
    assert harness.present(harness.code(), 10, now=GUESS_INTERVAL).state == AuthState.AUTHORIZED


def test_a_peer_without_totp_is_told_it_needs_none(harness):
    [answer] = harness.receive(BOB, AuthCode(1, AuthMethod.TOTP, "123456"))
    assert answer.state == AuthState.NOT_REQUIRED and harness.held(BOB) is None


def test_rekeys_and_new_handshakes_never_ask_again(harness):
    harness.present(harness.code())
    for minute in range(2, 60, 2):  # WireGuard rekeys every two minutes
        harness.wall = START + minute * 60
        harness.server.handle_event(HandshakeCompleted(ALICE, initiator=False), minute * 60.0)
        harness.server.tick(minute * 60.0)
        assert harness.held() is None
    _, status = harness.receive(ALICE, control.ConfigRequest(8), now=3600.0)  # a client that reconnected
    assert status.state == AuthState.AUTHORIZED and status.seconds == int(START) + SESSION - int(harness.wall)


def test_the_session_ends_at_its_deadline_and_the_client_is_told(harness):
    harness.receive(ALICE, control.ConfigRequest(1))
    harness.present(harness.code())
    harness.server.device.has_session = lambda key: True
    assert harness.server.tick(0.0) == pytest.approx(SESSION)
    harness.wall = START + SESSION - 1
    harness.server.tick(SESSION - 1.0)
    assert harness.held() is None
    harness.sent.clear()
    harness.wall = START + SESSION
    harness.server.tick(float(SESSION))
    assert harness.held() == HOLD_REASON
    assert harness.sent == [(ALICE, AuthStatus(0, AuthMethod.TOTP, AuthState.REQUIRED))]
    assert harness.present(harness.code(), 2).state == AuthState.AUTHORIZED  # a fresh code, a new session
    assert harness.held() is None


def test_the_authorization_survives_a_restart(tmp_path):
    first = Harness(tmp_path)
    first.present(first.code())
    first.server.tick(0.0)  # saves (inline before the loop runs)
    again = Harness(tmp_path)
    assert again.held() is None
    assert again.server.peer_status_extra(ALICE)["second_factor"]["until"] == int(START) + SESSION
    assert again.present(first.code()).state == AuthState.REFUSED  # and the spent code stays spent
    Harness.wall = START + SESSION  # a restart after the deadline
    try:
        assert Harness(tmp_path).held() == HOLD_REASON
    finally:
        del Harness.wall


def test_a_removed_key_loses_its_authorization(harness):
    harness.present(harness.code())
    harness.server.apply_reload(harness.config(server_text(bob=True).replace(
        f"PublicKey = {encode_key(ALICE)}\nTOTP = yes\n", f"PublicKey = {encode_key(BOB)}\n", 1).replace(
        f"\n[Peer]\nPublicKey = {encode_key(BOB)}\n", "", 1)), 0.0)
    assert ALICE not in harness.server.state.second_factor
    harness.server.apply_reload(harness.config(server_text()), 1.0)
    assert harness.held() == HOLD_REASON


def test_a_reload_that_turns_totp_on_holds_the_peer_and_tells_it(harness):
    harness.server.apply_reload(harness.config(server_text(alice_totp=False)), 0.0)
    assert harness.held() is None
    harness.receive(ALICE, control.ConfigRequest(1))
    harness.sent.clear()
    harness.server.apply_reload(harness.config(server_text()), 1.0)
    assert harness.held() == HOLD_REASON
    assert (ALICE, AuthStatus(0, AuthMethod.TOTP, AuthState.REQUIRED)) in harness.sent
    harness.sent.clear()
    harness.server.apply_reload(harness.config(server_text(alice_totp=False)), 2.0)
    assert harness.held() is None
    assert harness.sent[-1] == (ALICE, AuthStatus(0, AuthMethod.TOTP, AuthState.NOT_REQUIRED))

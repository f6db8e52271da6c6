"""The server's side of onboarding without a tun: invites, enrollment, stock peers, revocation."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tunvpn.config import parse_config
from tunvpn.daemon import Options
from tunvpn.invites import ENROLL_BURST, USED_GRACE
from tunvpn.keys import derive_public_key, encode_key, generate_preshared_key, generate_private_key
from tunvpn.protocol import control
from tunvpn.protocol.control import EnrollAnswer, EnrollRequest, EnrollState
from tunvpn.protocol.device import ControlReceived
from tunvpn.server import INVITE_HOLD, Server

SERVER_KEY = generate_private_key()
ALICE = derive_public_key(generate_private_key())
START = time.time()  # a restarted server judges the saved invites' deadlines before a test can set its clock


def new_key() -> bytes:
    return derive_public_key(generate_private_key())


class Harness:
    """A server whose wall clock and outgoing control messages the test holds; its state in tmp_path."""

    def __init__(self, tmp_path: Path, wall: float = START, endpoint: str = "Endpoint = vpn.example.net:51820") -> None:
        self.tmp_path = tmp_path
        self.wall = wall
        self.sent: list[tuple[bytes, object]] = []
        text = (f"[Interface]\nPrivateKey = {encode_key(SERVER_KEY)}\nAddress = 203.0.113.1/24\n{endpoint}\n"
                f"PushRoute = 198.51.100.0/24\n\n[Peer]\nName = alice\nPublicKey = {encode_key(ALICE)}\n")
        path = tmp_path / "office.conf"
        path.write_text(text)
        os.chmod(path, 0o600)
        config = parse_config(text, str(path), role="server", resolve=False)
        self.server = Server(config, Options(state_dir=tmp_path / "state"))  # loads invites on the real clock
        self.server.wall_clock = lambda: self.wall
        self.server.device.send_to_peer = self._record

    def _record(self, public_key: bytes, payloads, now: float) -> None:
        self.sent += [(public_key, control.decode(payload)) for payload in payloads]

    def invite(self, name: str = "laptop", uses: int = 1, lifetime: int = 3600) -> bytes:
        key = new_key()
        answer = self.server.handle_request({"command": "invite", "name": name, "uses": uses, "lifetime": lifetime,
                                             "public_key": encode_key(key),
                                             "preshared_key": encode_key(generate_preshared_key())})
        assert "error" not in answer, answer
        return key

    def enroll(self, invite: bytes, key: bytes, request_id: int = 1, now: float = 0.0) -> list:
        start = len(self.sent)
        message = EnrollRequest(request_id, key, generate_preshared_key())
        self.server.handle_event(ControlReceived(invite, control.encode(message)), now)
        return [message for _, message in self.sent[start:]]

    def names(self) -> set[str]:
        return {peer.name for peer in self.server.config.peers}


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def _invite_request(**fields) -> dict:
    return {"command": "invite", "name": "laptop", "public_key": encode_key(new_key()),
            "preshared_key": encode_key(generate_preshared_key()), **fields}


def test_an_invite_carries_the_configured_endpoint_unless_the_request_names_others(harness):
    assert harness.server.handle_request(_invite_request())["endpoints"] == ["vpn.example.net:51820"]
    given = harness.server.handle_request(_invite_request(name="phone", endpoints=["[2001:db8::1]:443"]))
    assert given["endpoints"] == ["[2001:db8::1]:443"]
    stock = {**_invite_request(name="tablet"), "command": "add-peer"}
    assert harness.server.handle_request(stock)["endpoints"] == ["vpn.example.net:51820"]


@pytest.mark.parametrize("command", ["invite", "add-peer"])
def test_without_an_endpoint_anywhere_nothing_is_made(tmp_path, command):
    harness = Harness(tmp_path, endpoint="")
    answer = harness.server.handle_request({**_invite_request(), "command": command})
    assert "--endpoint" in answer["error"] and "Endpoint in the [Interface]" in answer["error"]
    bad = harness.server.handle_request({**_invite_request(endpoints=["vpn.example.net"]), "command": command})
    assert "missing :port" in bad["error"]
    assert harness.server.invites == {} and harness.names() == {"alice"} and harness.server.pool.usage()[4][1] == 0


def test_an_invite_is_a_held_peer_without_allowed_ips(harness):
    invite = harness.invite()
    stats = harness.server.device.peer_stats(invite)
    assert stats.allowed_ips == () and stats.restricted == INVITE_HOLD
    [shown] = harness.server.status_extra()["invites"]
    assert shown["name"] == "laptop" and shown["uses_left"] == 1 and "preshared_key" not in shown


def test_enrolling_adds_the_peer_writes_its_file_and_burns_the_invite(harness, tmp_path):
    invite, laptop = harness.invite(), new_key()
    assert harness.enroll(invite, laptop) == [EnrollAnswer(1, EnrollState.ACCEPTED, "laptop")]
    assert harness.server.device.has_peer(laptop) and "laptop" in harness.names()
    assert harness.server.device.peer_stats(laptop).restricted is None
    path = tmp_path / "state" / "peers.d" / "laptop.conf"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600" and encode_key(laptop) in path.read_text()
    # The answer was lost: the same request is accepted again; another key is refused.
    assert harness.enroll(invite, laptop)[0].state == EnrollState.ACCEPTED
    [refused] = harness.enroll(invite, new_key())
    assert refused.state == EnrollState.REFUSED and "used up" in refused.reason
    # After the grace period the invite's key is no peer at all.
    harness.wall += USED_GRACE + 1
    harness.server.tick(1.0)
    assert not harness.server.device.has_peer(invite) and harness.server.status_extra()["invites"] == []


def test_an_expired_invite_is_gone(harness):
    invite = harness.invite(lifetime=600)
    harness.wall += 601
    harness.server.tick(1.0)
    assert not harness.server.device.has_peer(invite)


def test_an_invite_cannot_enroll_a_key_that_is_already_a_peer(harness):
    [refused] = harness.enroll(harness.invite(), ALICE)
    assert refused.state == EnrollState.REFUSED and "already a peer" in refused.reason
    assert harness.names() == {"alice"}


def test_a_many_use_invite_names_its_peers_in_turn_and_enrollment_is_rate_limited(harness):
    invite = harness.invite(name="lab", uses=ENROLL_BURST + 1)
    names = [harness.enroll(invite, new_key(), now=0.0)[0].name for _ in range(ENROLL_BURST)]
    assert names == ["lab", *(f"lab-{i}" for i in range(2, ENROLL_BURST + 1))]
    [limited] = harness.enroll(invite, new_key(), now=0.0)
    assert limited.state == EnrollState.RATE_LIMITED and limited.seconds > 0
    assert harness.enroll(invite, new_key(), now=float(limited.seconds))[0].state == EnrollState.ACCEPTED


def test_an_invite_may_send_nothing_but_an_enrollment(harness):
    invite = harness.invite()
    harness.server.handle_event(ControlReceived(invite, control.encode(control.ConfigRequest(1))), 0.0)
    assert harness.sent == []
    assert harness.server.device.peer_stats(invite).dropped["unexpected_control_message"] == 1


def test_an_enrollment_request_from_a_configured_peer_is_refused_quietly(harness):
    harness.enroll(ALICE, new_key())
    assert harness.sent == [] and harness.names() == {"alice"}
    assert harness.server.device.peer_stats(ALICE).dropped["unexpected_control_message"] == 1


def test_names_and_keys_cannot_be_taken_twice(harness):
    harness.invite()
    for name in ("laptop", "alice"):
        answer = harness.server.handle_request({"command": "invite", "name": name, "public_key": encode_key(new_key()),
                                                "preshared_key": encode_key(generate_preshared_key())})
        assert "exists already" in answer["error"]
    answer = harness.server.handle_request({"command": "invite", "name": "../x", "public_key": encode_key(new_key()),
                                            "preshared_key": encode_key(generate_preshared_key())})
    assert "name" in answer["error"]


def test_enrolled_peers_and_open_invites_survive_a_restart(harness, tmp_path):
    laptop = new_key()
    harness.enroll(harness.invite(), laptop)
    phone_invite = harness.invite(name="phone")
    again = Harness(tmp_path, wall=harness.wall + 10)
    assert again.server.device.has_peer(laptop) and "laptop" in again.names()
    assert again.server.device.peer_stats(phone_invite).restricted == INVITE_HOLD
    assert again.enroll(phone_invite, new_key())[0].name == "phone"


def test_revoking_an_enrolled_peer_cuts_it_and_removes_its_file(harness, tmp_path):
    laptop = new_key()
    harness.enroll(harness.invite(), laptop)
    assert harness.server.handle_request({"command": "revoke", "peer": "laptop"}) == {"revoked": "peer",
                                                                                     "name": "laptop"}
    assert not harness.server.device.has_peer(laptop)
    assert not (tmp_path / "state" / "peers.d" / "laptop.conf").exists()
    assert not Harness(tmp_path).server.device.has_peer(laptop)


def test_revoking_by_key_an_open_invite_and_refusing_a_main_config_peer(harness):
    invite = harness.invite()
    assert harness.server.handle_request({"command": "revoke", "peer": encode_key(invite)})["revoked"] == "invite"
    assert not harness.server.device.has_peer(invite)
    assert "remove it there" in harness.server.handle_request({"command": "revoke", "peer": "alice"})["error"]


def test_a_stock_peer_gets_a_fixed_pool_address(harness, tmp_path):
    phone = new_key()
    answer = harness.server.handle_request({"command": "add-peer", "name": "phone", "public_key": encode_key(phone),
                                            "preshared_key": encode_key(generate_preshared_key())})
    assert answer["addresses"] == ["203.0.113.2/32"]
    assert answer["routes"] == ["203.0.113.0/24", "198.51.100.0/24"]
    assert [str(n) for n in harness.server.device.peer_stats(phone).allowed_ips] == ["203.0.113.2/32"]
    listed = harness.server.handle_request({"command": "peers"})["enrolled"]
    assert [(p["name"], p["kind"], p["addresses"]) for p in listed] == [("phone", "stock", ["203.0.113.2"])]
    assert "AllowedIPs = 203.0.113.2/32" in (tmp_path / "state" / "peers.d" / "phone.conf").read_text()
    # The next pool client gets another address.
    laptop = new_key()
    harness.enroll(harness.invite(), laptop)
    assert "203.0.113.2" not in str(harness.server._addresses_for(laptop))


def test_a_peer_file_that_clashes_with_the_main_config_is_skipped(tmp_path):
    directory = tmp_path / "state" / "peers.d"
    directory.mkdir(parents=True)
    (directory / "dup.conf").write_text(f"[Peer]\nName = dup\nPublicKey = {encode_key(ALICE)}\n")
    os.chmod(directory / "dup.conf", 0o600)
    assert Harness(tmp_path).names() == {"alice"}


def test_an_invite_past_its_deadline_is_refused_even_before_the_timer_removes_it(harness):
    invite = harness.invite(lifetime=600)
    harness.wall += 600
    [refused] = harness.enroll(invite, new_key())
    assert refused.state == EnrollState.REFUSED and "expired" in refused.reason


class ReadNowApplyLater:
    """A resolver worker that reads the config at once and hands it to the loop only when told."""

    def submit(self, what, run, done=None, key=None) -> bool:
        self.result, self.done = run(), done
        return True

    def deliver(self) -> None:
        self.done(self.result, None)


def test_a_reload_read_before_an_enrollment_or_a_revocation_does_not_undo_it(harness):
    """The reload's file reading runs beside the loop: what the server changed meanwhile stays."""
    laptop, phone = new_key(), new_key()
    harness.enroll(harness.invite(), laptop)
    harness.server.loop = SimpleNamespace(flush=lambda: None)
    harness.server.resolver = worker = ReadNowApplyLater()
    harness.server.reload()  # reads now: laptop, no phone
    harness.enroll(harness.invite(name="phone"), phone)
    harness.server.handle_request({"command": "revoke", "peer": "laptop"})
    worker.deliver()
    assert harness.server.device.has_peer(phone) and not harness.server.device.has_peer(laptop)
    assert harness.names() == {"alice", "phone"}
    harness.server.reload()  # a fresh read agrees
    worker.deliver()
    assert harness.names() == {"alice", "phone"}


def test_a_damaged_invites_file_costs_the_invites_not_the_server(tmp_path, caplog):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "invites.json").write_text('{"version": 1, "invites": {"not a key": {}}}')
    harness = Harness(tmp_path)
    assert harness.server.invites == {} and "skipped a damaged invite entry" in caplog.text
    (tmp_path / "state" / "invites.json").write_text("{trunc")
    assert Harness(tmp_path).server.invites == {} and "cannot read the invites" in caplog.text


def test_a_many_use_invite_whose_last_peer_name_would_be_too_long_is_refused(harness):
    answer = harness.server.handle_request({"command": "invite", "name": "x" * 63, "uses": 10,
                                            "public_key": encode_key(new_key()),
                                            "preshared_key": encode_key(generate_preshared_key())})
    assert "longer than a name may be" in answer["error"]


def test_a_name_the_admin_took_since_the_invite_is_refused_not_duplicated(harness, tmp_path):
    invite = harness.invite(name="lab", uses=2)
    harness.enroll(invite, new_key())
    path = tmp_path / "office.conf"
    path.write_text(path.read_text() + f"\n[Peer]\nName = lab-2\nPublicKey = {encode_key(new_key())}\n")
    harness.server.loop = SimpleNamespace(flush=lambda: None)
    harness.server.reload()
    [refused] = harness.enroll(invite, new_key())
    assert refused.state == EnrollState.REFUSED and "lab-2 is taken" in refused.reason


class DeferredWorker:
    """Holds the server's disk jobs until the test runs them, as the real worker thread would;
    `full` makes it refuse new ones, as a full queue does."""

    def __init__(self) -> None:
        self.jobs: list = []
        self.full = False

    def submit(self, what, run, done=None, key=None) -> bool:
        if self.full:
            return False
        self.jobs.append((run, done))
        return True

    def run_all(self) -> None:
        jobs, self.jobs = self.jobs, []
        for run, done in jobs:
            result, error = None, None
            try:
                result = run()
            except Exception as exc:
                error = exc
            if done is not None:
                done(result, error)


def test_a_name_or_key_whose_file_is_being_written_is_taken(harness, tmp_path):
    harness.server.system = worker = DeferredWorker()
    phone, other = new_key(), new_key()
    first = harness.server.handle_request({**_invite_request(name="phone"), "command": "add-peer",
                                           "public_key": encode_key(phone)})
    assert "error" not in first
    again = harness.server.handle_request({**_invite_request(name="phone"), "command": "add-peer",
                                           "public_key": encode_key(other)})
    assert "exists already" in again["error"]
    assert "exists already" in harness.server.handle_request(_invite_request(name="phone"))["error"]
    # Two invites enrolling the same new key at once: only one gets it.
    one, two, laptop = harness.invite("one"), harness.invite("two"), new_key()
    assert harness.enroll(one, laptop) == []
    [refused] = harness.enroll(two, laptop)
    assert refused.state == EnrollState.REFUSED and "already a peer" in refused.reason
    worker.run_all()
    assert harness.names() == {"alice", "phone", "one"}
    assert [p.public_key for p in harness.server.config.peers].count(laptop) == 1
    assert encode_key(phone) in (tmp_path / "state" / "peers.d" / "phone.conf").read_text()


def test_a_write_the_worker_cannot_take_does_not_leave_the_invite_stuck(harness):
    harness.server.system = worker = DeferredWorker()
    worker.full = True
    invite, laptop = harness.invite(), new_key()
    assert harness.enroll(invite, laptop) == []  # not written, not answered: the client asks again
    worker.full = False
    harness.enroll(invite, laptop)
    worker.run_all()
    assert "laptop" in harness.names() and harness.sent[-1][1].state == EnrollState.ACCEPTED

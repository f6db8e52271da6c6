"""A second factor on a real server: traffic waits for `tunvpn login`, flows after it, stops when the
session ends; wrong, replayed and too many codes are refused; the authorization outlives rekeys,
reconnects and a server restart; a stock WireGuard peer with TOTP = yes never gets through."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from netlab import wait_until
from stockwg import pubkey
from test_server_client import SERVER_TUNNEL, Office, build_office
from tunvpn.secondfactor import GUESS_BURST
from tunvpn.totp import STEP_SECONDS, encode_secret, generate_secret, totp
from tunvpnd import wait_for_ping

SECRET = generate_secret()


def totp_config(office: Office, secrets: Path, session: str) -> str:
    """client1 and the stock peer need a code; the secrets are written beside, mode 0600."""
    text = office.server_config(["client1"]).replace("ClientToClient = no\n",
                                                      f"ClientToClient = no\nTOTPSession = {session}\n")
    for name, key in (("client1", office.client_keys["client1"]), ("stock", office.stock_key)):
        path = secrets / f"{name}.totp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(encode_secret(generate_secret() if name == "stock" else SECRET) + "\n")
        key_line = f"PublicKey = {pubkey(key)}\n"
        text = text.replace(key_line, f"{key_line}TOTP = yes\nTOTPSecretFile = {path}\n")
    return text


def restart_with(office: Office, text: str) -> None:
    assert office.server.stop() == 0
    office.server.write_config(text)
    office.server.start()


def login(office: Office, code: str):
    client = office.clients["client1"]
    return client.host.run([client.python, "-m", "tunvpn", "login", "--control-socket", str(client.control_socket),
                            "--code", code], check=False, timeout=20)


def valid_codes() -> set[str]:
    now = time.time()
    return {totp(SECRET, now + offset) for offset in (-STEP_SECONDS, 0, STEP_SECONDS)}


def wrong_code() -> str:
    return next(code for code in ("000000", "111111", "222222", "333333") if code not in valid_codes())


def client_state(office: Office) -> str | None:
    second_factor = office.clients["client1"].show()["second_factor"]
    return None if second_factor is None else second_factor["state"]


def blocked(office: Office) -> bool:
    return office.client_hosts["client1"].ping(SERVER_TUNNEL, count=2, timeout=2, check=False).returncode != 0


def server_view(office: Office) -> dict:
    return office.server.peer(pubkey(office.client_keys["client1"]))


def test_traffic_waits_for_the_code_flows_after_it_and_stops_when_the_session_ends(lab, tmp_path):
    office = build_office(lab, clients=("client1",), stock=True)
    restart_with(office, totp_config(office, tmp_path, session="12s"))
    client = office.clients["client1"]
    client.wait_log(r"waiting for second factor: the server holds", 15)
    assert client_state(office) == "waiting"
    assert blocked(office)
    assert server_view(office)["dropped"]["second_factor_required"] >= 1
    assert server_view(office)["second_factor"] == {"method": "totp", "authorized": False, "until": None}
    # The stock peer has no way to send a code: never through, and the server says why.
    assert office.stock_host.ping(SERVER_TUNNEL, count=2, timeout=3, check=False).returncode != 0
    # re.escape: a key's first characters may hold '+', which a pattern reads as a repeat.
    office.server.wait_log(rf"peer {re.escape(pubkey(office.stock_key)[:10])}.*a stock WireGuard peer cannot", 10)

    wrong = login(office, wrong_code())
    assert wrong.returncode == 1 and "refused" in wrong.stderr
    assert blocked(office)
    code = totp(SECRET, time.time())
    accepted = login(office, code)
    assert accepted.returncode == 0, accepted.stderr
    assert "second factor accepted; authorized until" in accepted.stdout
    wait_for_ping(office.client_hosts["client1"], SERVER_TUNNEL, timeout=5)
    authorized = server_view(office)["second_factor"]
    assert authorized["authorized"] and authorized["until"] > time.time()
    replayed = login(office, code)
    assert replayed.returncode == 1 and "refused" in replayed.stderr
    assert server_view(office)["dropped"]["second_factor_refused"] == 2
    wait_for_ping(office.client_hosts["client1"], SERVER_TUNNEL, timeout=5)  # a replay takes nothing away

    # The 12 s session ends: blocked again, and the client says so.
    wait_until(lambda: client_state(office) == "waiting", 20, interval=0.5, what="the client to wait again")
    assert blocked(office)
    office.server.wait_log(r"second factor session ended", 5)


def test_guesses_are_rate_limited_per_peer(lab, tmp_path):
    office = build_office(lab, clients=("client1",), stock=True)
    restart_with(office, totp_config(office, tmp_path, session="1h"))
    office.clients["client1"].wait_log(r"waiting for second factor", 15)
    for _ in range(GUESS_BURST):
        assert login(office, wrong_code()).returncode == 1
    limited = login(office, totp(SECRET, time.time()))  # the right code, but one guess too many
    assert limited.returncode == 1 and "too many codes" in limited.stderr
    assert client_state(office) == "rate_limited"
    assert blocked(office)
    dropped = server_view(office)["dropped"]
    assert dropped["second_factor_refused"] == GUESS_BURST and dropped["second_factor_rate_limited"] == 1


def test_the_authorization_outlives_reconnects_and_a_server_restart(lab, tmp_path):
    office = build_office(lab, clients=("client1",), stock=True)
    restart_with(office, totp_config(office, tmp_path, session="1h"))
    office.clients["client1"].wait_log(r"waiting for second factor", 15)
    assert login(office, totp(SECRET, time.time())).returncode == 0
    wait_for_ping(office.client_hosts["client1"], SERVER_TUNNEL, timeout=5)
    until = server_view(office)["second_factor"]["until"]

    client = office.clients["client1"]
    client.stop()  # a new handshake, a new config request: no new code
    client.start().wait_log(r"second factor accepted; authorized until", 15)
    wait_for_ping(office.client_hosts["client1"], SERVER_TUNNEL, timeout=5)

    mark = len(client.lines)
    assert office.server.stop() == 0
    office.server.start()
    client.wait_log(r"applied config from the server|updated config from the server|server said goodbye", 15,
                    after=mark)
    wait_for_ping(office.client_hosts["client1"], SERVER_TUNNEL, timeout=15)
    assert server_view(office)["second_factor"] == {"method": "totp", "authorized": True, "until": until}
    assert client_state(office) == "authorized"
    assert "waiting for second factor" not in "\n".join(client.lines[mark:])

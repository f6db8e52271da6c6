"""The client's second factor without I/O: what the server says shows in status, STATUS= and the log;
`login` over the control socket hands the code on."""

from __future__ import annotations

import logging

import pytest

from tunvpn.client import Client
from tunvpn.config import parse_config
from tunvpn.daemon import Options
from tunvpn.keys import derive_public_key, encode_key, generate_private_key
from tunvpn.protocol import control
from tunvpn.protocol.control import AuthCode, AuthMethod, AuthState, AuthStatus
from tunvpn.protocol.device import ControlReceived

SERVER_PUB = derive_public_key(generate_private_key())
WALL = 1_700_000_000


@pytest.fixture
def client(monkeypatch) -> Client:
    text = (f"[Interface]\nPrivateKey = {encode_key(generate_private_key())}\n\n"
            f"[Peer]\nPublicKey = {encode_key(SERVER_PUB)}\nEndpoint = 192.0.2.1:51820\n")
    client = Client(parse_config(text, "/etc/tunvpn/office.conf", role="client", resolve=False), Options())
    client.wall_clock = lambda: WALL
    client.sent = []
    monkeypatch.setattr(client.device, "send_to_peer", lambda key, payloads, now: client.sent.extend(
        control.decode(p) for p in payloads))
    return client


def tell(client: Client, status: AuthStatus) -> None:
    client.handle_event(ControlReceived(SERVER_PUB, control.encode(status)), now=0.0)


def second_factor(client: Client) -> dict | None:
    return client.status_extra()["second_factor"]


def test_nothing_is_said_until_the_server_asks(client):
    assert second_factor(client) is None and "second factor" not in client.summary()


def test_required_shows_as_waiting_in_status_summary_and_log(client, caplog):
    with caplog.at_level(logging.WARNING, logger="tunvpn"):
        tell(client, AuthStatus(1, AuthMethod.TOTP, AuthState.REQUIRED))
        tell(client, AuthStatus(2, AuthMethod.TOTP, AuthState.REQUIRED))  # said once, not per push
    assert second_factor(client)["state"] == "waiting"
    assert client.summary().endswith("; waiting for second factor (tunvpn login office)")
    assert caplog.text.count("waiting for second factor") == 1 and "tunvpn login office" in caplog.text


def test_login_sends_the_code_and_the_answer_names_its_attempt(client):
    tell(client, AuthStatus(1, AuthMethod.TOTP, AuthState.REQUIRED))
    assert client.handle_request({"command": "login", "code": "123456"}) == {"attempt": 1}
    assert client.sent == [AuthCode(1, AuthMethod.TOTP, "123456")]
    assert second_factor(client)["state"] == "checking"
    tell(client, AuthStatus(9, AuthMethod.TOTP, AuthState.REQUIRED))  # a push's status, overtaken by the code
    assert second_factor(client)["state"] == "checking"
    tell(client, AuthStatus(1, AuthMethod.TOTP, AuthState.AUTHORIZED, 3600))
    assert second_factor(client) == {"state": "authorized", "until": WALL + 3600, "retry_after": None,
                                     "attempt": 1, "answered": 1}
    assert "second factor" not in client.summary()


@pytest.mark.parametrize("state, seconds, shown", [(AuthState.REFUSED, None, "refused"),
                                                   (AuthState.RATE_LIMITED, 25, "rate_limited")])
def test_a_refused_or_limited_code_leaves_the_client_waiting(client, state, seconds, shown):
    client.handle_request({"command": "login", "code": "000000"})
    tell(client, AuthStatus(1, AuthMethod.TOTP, state, seconds))
    assert second_factor(client)["state"] == shown and second_factor(client)["answered"] == 1
    assert second_factor(client)["retry_after"] == seconds
    assert "waiting for second factor" in client.summary()


def test_the_end_of_a_session_asks_again(client):
    tell(client, AuthStatus(1, AuthMethod.TOTP, AuthState.AUTHORIZED, 60))
    tell(client, AuthStatus(0, AuthMethod.TOTP, AuthState.REQUIRED))
    assert second_factor(client)["state"] == "waiting" and second_factor(client)["until"] is None


@pytest.mark.parametrize("login", [{"command": "login"}, {"command": "login", "code": 123456},
                                     {"command": "login", "code": "12 34"}, {"command": "login", "code": ""}])
def test_a_bad_login_request_is_an_error_answer(client, login):
    assert "error" in client.handle_request(login) and client.sent == []


def test_an_unknown_method_is_counted_and_ignored(client):
    tell(client, AuthStatus(1, 77, AuthState.REQUIRED))
    assert second_factor(client) is None
    assert client.device.peer_stats(SERVER_PUB).dropped["ignored_control_message"] == 1

"""The client daemon's decisions (reconnect backoff, re-resolving, config requests), without I/O.

Client() builds its protocol device and peers but touches no tun, socket or netlink until run(),
so its event and timer hooks can be driven directly with simulated time.
"""

from __future__ import annotations

import ipaddress
import logging

import pytest

from tunvpn import client as client_module
from tunvpn.client import RECONNECT_BACKOFF, REQUEST_ATTEMPTS, REQUEST_INTERVAL, STOCK_REQUEST_INTERVAL, Client
from tunvpn.config import parse_config
from tunvpn.daemon import Options
from tunvpn.io.dns import DnsError
from tunvpn.keys import derive_public_key, encode_key, generate_private_key
from tunvpn.protocol import control
from tunvpn.protocol.device import ControlReceived, HandshakeCompleted, HandshakeGaveUp
from tunvpn.protocol.messages import INITIATION_SIZE

SERVER_KEY = generate_private_key()
SERVER_PUB = derive_public_key(SERVER_KEY)


def make_client(endpoint: str = "192.0.2.1:51820", extra: str = "", peer_extra: str = "") -> Client:
    text = (f"[Interface]\nPrivateKey = {encode_key(generate_private_key())}\n{extra}\n"
            f"[Peer]\nPublicKey = {encode_key(SERVER_PUB)}\nEndpoint = {endpoint}\n{peer_extra}\n")
    return Client(parse_config(text, "/etc/tunvpn/office.conf", role="client", resolve=False), Options())


def initiations(client: Client) -> int:
    return sum(1 for data, _ in client.device.datagrams_to_send() if len(data) == INITIATION_SIZE)


def test_reconnect_backoff_is_capped_and_never_ends():
    client = make_client()
    client.device.set_endpoint(SERVER_PUB, ("192.0.2.1", 51820))
    client.handle_event(HandshakeGaveUp(SERVER_PUB), now=0.0)
    now, sent_at = 0.0, []
    while now < 400.0:  # bounded: well past the cap
        deadline = client.tick(now)
        if initiations(client):
            sent_at.append(now)
        now = deadline if deadline is not None and deadline > now else now + 1.0
    gaps = [b - a for a, b in zip(sent_at, sent_at[1:])]
    assert sent_at[0] == pytest.approx(RECONNECT_BACKOFF[0])
    assert gaps[: len(RECONNECT_BACKOFF) - 1] == pytest.approx(list(RECONNECT_BACKOFF[1:]))
    assert max(gaps) == pytest.approx(RECONNECT_BACKOFF[-1])
    assert len(sent_at) >= 8


def test_a_completed_handshake_stops_the_reconnect_loop():
    client = make_client()
    client.device.set_endpoint(SERVER_PUB, ("192.0.2.1", 51820))
    client.handle_event(HandshakeGaveUp(SERVER_PUB), now=0.0)
    client.handle_event(HandshakeCompleted(SERVER_PUB, initiator=True), now=0.5)
    client.device.datagrams_to_send()
    for now in (1.0, 5.0, 20.0):
        client.tick(now)
    assert client._reconnect_at is None


def test_endpoint_name_is_resolved_again_when_handshakes_fail(monkeypatch):
    client = make_client(endpoint="vpn.example:51820")
    client.device.set_endpoint(SERVER_PUB, ("192.0.2.1", 51820))
    looked_up = []

    def fake_resolve(host, port):
        looked_up.append((host, port))
        return ("192.0.2.99", port)

    monkeypatch.setattr(client_module, "resolve_endpoint", fake_resolve)
    client.handle_event(HandshakeGaveUp(SERVER_PUB), now=0.0)
    assert looked_up == [("vpn.example", 51820)]
    assert client.device.peer_stats(SERVER_PUB).endpoint == ("192.0.2.99", 51820)


def test_literal_endpoint_is_not_resolved(monkeypatch):
    client = make_client()
    monkeypatch.setattr(client_module, "resolve_endpoint", lambda *a: pytest.fail("resolved a literal"))
    client.handle_event(HandshakeGaveUp(SERVER_PUB), now=0.0)


def _connected_client_with_a_local_config(monkeypatch, now: float) -> tuple[Client, list]:
    """A client whose handshake just completed, recording (time, message) for what it sends."""
    client = make_client(extra="Address = 203.0.113.9/24", peer_extra="AllowedIPs = 203.0.113.0/24")
    sent: list = []
    monkeypatch.setattr(client.device, "send_to_peer", lambda key, payloads, now: sent.extend(
        (now, control.decode(p)) for p in payloads))
    client.handle_event(HandshakeCompleted(SERVER_PUB, initiator=True), now=now)
    return client, sent


def test_config_request_is_retried_then_the_client_runs_on_its_own_config(monkeypatch, caplog):
    now = 10.0
    client, sent = _connected_client_with_a_local_config(monkeypatch, now)
    with caplog.at_level(logging.INFO, logger="tunvpn"):
        while client.mode == "waiting" and now < 30.0:
            deadline = client.tick(now)
            now = deadline if deadline is not None else now + 1.0
    # REQUEST_ATTEMPTS a second apart; the one after them comes with the fall-back.
    assert [when for when, _ in sent] == pytest.approx([10.0 + i * REQUEST_INTERVAL for i in range(REQUEST_ATTEMPTS + 1)])
    assert all(isinstance(m, control.ConfigRequest) for _, m in sent)
    assert len({m.request_id for _, m in sent}) == 1  # retries of one request, answered idempotently
    assert client.mode == "local"
    assert "did not answer the config request" in caplog.text and "running on the local Address" in caplog.text


def test_unanswered_the_client_goes_on_asking_at_doubling_intervals_up_to_half_a_minute(monkeypatch, caplog):
    """A flooded server may lose five requests in a row: the client must not stop at them."""
    now = 0.0
    client, sent = _connected_client_with_a_local_config(monkeypatch, now)
    with caplog.at_level(logging.INFO, logger="tunvpn"):
        for _ in range(14):  # bounded: one tick per request
            deadline = client.tick(now)
            assert deadline is not None
            now = deadline
    times = [when for when, _ in sent]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == pytest.approx([1.0] * REQUEST_ATTEMPTS + [2.0, 4.0, 8.0, 16.0] + [STOCK_REQUEST_INTERVAL] * 4)
    assert len({m.request_id for _, m in sent}) == 1  # a late answer to any of them is taken
    assert caplog.text.count("did not answer the config request") == 1
    applied = []
    monkeypatch.setattr(client, "_apply_push", applied.append)  # no link here to apply it to
    push = control.ConfigPush(sent[-1][1].request_id, addresses=[ipaddress.ip_interface("203.0.113.9/24")])
    client.handle_event(ControlReceived(SERVER_PUB, control.encode(push)), now=now)
    assert applied == [push] and client.tick(now + 100.0) is None  # answered: no more requests


def test_without_a_local_config_the_client_says_what_it_needs(monkeypatch, caplog):
    client = make_client()
    monkeypatch.setattr(client.device, "send_to_peer", lambda *a: None)
    client.handle_event(HandshakeCompleted(SERVER_PUB, initiator=True), now=0.0)
    with caplog.at_level(logging.ERROR, logger="tunvpn"):
        for step in range(REQUEST_ATTEMPTS + 1):
            client.tick(float(step))
    assert "lacks Address and AllowedIPs" in caplog.text


def test_server_goodbye_drops_the_session_and_reconnects_soon(monkeypatch):
    client = make_client()
    client.mode = "pushed"
    dropped = []
    monkeypatch.setattr(client.device, "drop_sessions", dropped.append)
    goodbye = control.encode(control.Goodbye("server shutting down"))
    client.handle_event(ControlReceived(SERVER_PUB, goodbye), now=100.0)
    assert dropped == [SERVER_PUB]
    assert client.mode == "waiting"
    assert client._reconnect_at == pytest.approx(100.0 + RECONNECT_BACKOFF[0])


def test_a_handshake_the_server_started_makes_the_client_ask_again(monkeypatch):
    """After a server restart the server initiates to us; it may have lost track of us."""
    client = make_client()
    client.mode = "pushed"
    sent = []
    monkeypatch.setattr(client.device, "send_to_peer", lambda key, payloads, now: sent.extend(payloads))
    client.handle_event(HandshakeCompleted(SERVER_PUB, initiator=True), now=0.0)  # our own rekey
    client.tick(0.0)
    assert sent == []
    client.handle_event(HandshakeCompleted(SERVER_PUB, initiator=False), now=1.0)
    client.tick(1.0)
    assert isinstance(control.decode(sent[0]), control.ConfigRequest)


def test_malformed_control_message_is_counted_not_fatal():
    client = make_client()
    client.handle_event(ControlReceived(SERVER_PUB, bytes([control.CONTROL_MARKER, 1, 2, 0, 0, 1, 0xFF, 0xFF])), 0.0)
    assert client.device.peer_stats(SERVER_PUB).dropped["bad_control_message"] == 1


class FailingDns:
    """A DNS helper that worked once and now fails (resolvconf removed, resolved stopped)."""

    def revert(self) -> None:
        raise DnsError("resolvconf -d tv-office exited with 1: no such interface")


def test_a_dns_revert_that_fails_is_logged_not_raised(caplog):
    client = make_client()
    client.dns, client._dns_wanted = FailingDns(), (["198.51.100.53"], ["office.example"])
    with caplog.at_level(logging.WARNING, logger="tunvpn"):
        client._revert_dns()  # as at shutdown, or before a push's new DNS is applied
    assert "could not revert 198.51.100.53, office.example" in caplog.text
    assert client._dns_wanted is None
    client._revert_dns()  # nothing left to revert: quiet


def test_a_chatty_server_cannot_flood_the_log(caplog):
    client = make_client()
    junk = ControlReceived(SERVER_PUB, bytes([control.CONTROL_MARKER, 1, 2, 0, 0, 1, 0xFF, 0xFF]))
    with caplog.at_level(logging.WARNING, logger="tunvpn"):
        for step in range(128):
            client.handle_event(junk, now=step / 1000)
    assert client.device.peer_stats(SERVER_PUB).dropped["bad_control_message"] == 128
    assert caplog.text.count("malformed control message") == client.peer_log.burst

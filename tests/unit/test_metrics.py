"""Prometheus output: what the official parser reads back, under the names dashboards expect."""

from __future__ import annotations

import selectors
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tunvpn.io.metrics import MAX_CONNECTIONS, MetricsServer, write_metrics_file
from tunvpn.metrics import CONTENT_TYPE, render

ALICE = "DKEPqqEMAhT7y4lWDlJYKrWbM4DKnOfzYQ6CEmXmbVk="
BOB = "9x2TDaRn+q4nhDpvhMFkB2vddc3/pn9Ztmb3fVoW5H0="


def server_status() -> dict:
    return {
        "interface": "tv-office", "role": "server", "dropped": {"bad_mac1": 3, "udp_ENOBUFS": 1},
        "refused": {"route 198.51.100.0/24": "EEXIST"}, "internal_errors": {"the X handler: ValueError": 2},
        "pool": {"4": {"size": 253, "leased": 2}, "6": {"size": 1000, "leased": 2}},
        "peers": [
            {"public_key": ALICE, "name": 'lap"top\\', "connected": True, "latest_handshake": 1700000000,
             "rx_bytes": 1843212, "tx_bytes": 20912, "rx_packets": 1402, "tx_packets": 301,
             "dropped": {"source_not_allowed": 7}},
            {"public_key": BOB, "name": None, "connected": False, "latest_handshake": None,
             "rx_bytes": 0, "tx_bytes": 0, "rx_packets": 0, "tx_packets": 0, "dropped": {}},
        ],
    }


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_per_peer_series_use_the_wireguard_exporters_names_and_labels():
    found = samples(render(server_status()))
    alice = (("interface", "tv-office"), ("name", 'lap"top\\'), ("public_key", ALICE))
    bob = (("interface", "tv-office"), ("public_key", BOB))
    assert found[("wireguard_sent_bytes_total", alice)] == 20912
    assert found[("wireguard_received_bytes_total", alice)] == 1843212
    assert found[("wireguard_latest_handshake_seconds", alice)] == 1700000000
    assert found[("wireguard_latest_handshake_seconds", bob)] == 0
    assert found[("tunvpn_peer_connected", alice)] == 1 and found[("tunvpn_peer_connected", bob)] == 0
    assert found[("tunvpn_peer_received_packets_total", alice)] == 1402
    assert found[("tunvpn_peer_dropped_total", (*alice[:2], ("public_key", ALICE), ("reason", "source_not_allowed")))] == 7


def test_device_series():
    found = samples(render(server_status()))
    device = (("interface", "tv-office"),)
    assert found[("tunvpn_peers", device)] == 2 and found[("tunvpn_peers_connected", device)] == 1
    assert found[("tunvpn_dropped_total", (*device, ("reason", "bad_mac1")))] == 3
    assert found[("tunvpn_pool_addresses", (("family", "ipv4"), *device))] == 253
    assert found[("tunvpn_pool_leased", (("family", "ipv6"), *device))] == 2
    assert found[("tunvpn_refused_settings", device)] == 1
    assert found[("tunvpn_internal_errors_total", device)] == 2


def test_a_client_without_pool_or_peers_still_parses():
    text = render({"interface": "tv-home", "peers": [], "dropped": {}})
    assert samples(text)[("tunvpn_peers", (("interface", "tv-home"),))] == 0
    assert "pool" not in text


def test_each_family_has_help_and_type_once():
    text = render(server_status())
    for name in ("wireguard_sent_bytes_total", "tunvpn_peer_dropped_total"):
        assert text.count(f"# TYPE {name} ") == 1 and text.count(f"# HELP {name} ") == 1


# --- the HTTP endpoint ------------------------------------------------------------------------

class Endpoint:
    """A MetricsServer on 127.0.0.1 driven by a selector, as the daemon's loop drives it."""

    def __init__(self) -> None:
        self.server = MetricsServer(("127.0.0.1", 0), lambda: render(server_status()), CONTENT_TYPE)
        self.selector = selectors.DefaultSelector()
        self.server.register(self.selector)

    def turn(self, timeout: float = 0.05) -> None:
        for key, mask in self.selector.select(timeout):
            assert self.server.owns(key)
            self.server.handle(key, mask)

    def ask(self, request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=5) as sock:
            sock.sendall(request)
            sock.setblocking(False)
            answer = b""
            for _ in range(200):  # bounded: a few seconds at most
                self.turn()
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    return answer
                answer += chunk
        raise AssertionError(f"no complete answer: {answer[:200]!r}")

    def close(self) -> None:
        self.server.close()
        self.selector.close()


@pytest.fixture
def endpoint():
    served = Endpoint()
    yield served
    served.close()


def test_get_metrics_answers_the_exposition(endpoint):
    answer = endpoint.ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK") and f"Content-Type: {CONTENT_TYPE}".encode() in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert samples(body.decode())[("tunvpn_peers", (("interface", "tv-office"),))] == 2


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.1\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"hello\r\n\r\n", b"400"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 2000, b"431"),
])
def test_anything_else_gets_a_short_error(endpoint, request_bytes, status):
    assert endpoint.ask(request_bytes).split(b" ")[1] == status


def test_connections_are_bounded_and_idle_ones_closed(endpoint, monkeypatch):
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS + 2):  # silent clients: each is accepted, then held or refused
            idle.append(socket.create_connection(("127.0.0.1", endpoint.server.port), timeout=2))
            endpoint.turn()
        assert len(endpoint.server._clients) == MAX_CONNECTIONS
        assert idle[-1].recv(1) == b""  # the one over the bound was closed at once
        endpoint.server.expire(time.monotonic() + 60)
        assert endpoint.server._clients == {}
    finally:
        for sock in idle:
            sock.close()


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(Exception, match=r"cannot listen for metrics on 127\.0\.0\.1:\d+: Address already in use"):
            MetricsServer(taken.getsockname(), lambda: "", CONTENT_TYPE)


def test_the_file_is_replaced_whole(tmp_path):
    path = tmp_path / "tunvpn.prom"
    write_metrics_file(str(path), render(server_status()))
    write_metrics_file(str(path), "# nothing\n")
    assert path.read_text() == "# nothing\n" and oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["tunvpn.prom"]

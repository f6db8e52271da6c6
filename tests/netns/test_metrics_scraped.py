"""Prometheus metrics from a running server: scraped while traffic flows, they move, parse with the
official parser and say what `tunvpn show --json` says; the textfile-collector file too."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from netlab import transfer, wait_until
from stockwg import pubkey
from test_server_client import SERVER_TUNNEL, build_office
from tunvpnd import Tunvpn, wait_for_ping

MB = 1024 * 1024
SCRAPE = r"""
import sys, urllib.request
with urllib.request.urlopen("http://127.0.0.1:9586/metrics", timeout=5) as answer:
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    sys.stdout.write(answer.read().decode())
"""


def received_bytes(text: str, key: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "wireguard_received_bytes_total" and sample.labels["public_key"] == key:
                assert sample.labels["name"] == "client1" and sample.labels["interface"] == "tv-server"
                return sample.value
    raise AssertionError(f"no wireguard_received_bytes_total for {key}")


def test_metrics_move_with_traffic_and_match_show(lab, tmp_path):
    office = build_office(lab, clients=("client1",), stock=False)
    metrics_file = tmp_path / "tunvpn.prom"
    config = office.server_config(["client1"]).replace(
        "ClientToClient = no\n", f"ClientToClient = no\nMetricsListen = 127.0.0.1:9586\nMetricsFile = {metrics_file}\n"
    ).replace("# client1\n", "Name = client1\n")
    assert office.server.stop() == 0
    server = office.server = Tunvpn(office.server_host, "server", config).start()
    server.wait_log(r"metrics at http://127\.0\.0\.1:9586/metrics", 5)
    client_host, key = office.client_hosts["client1"], pubkey(office.client_keys["client1"])
    wait_for_ping(client_host, SERVER_TUNNEL, timeout=20)

    def scrape() -> str:
        return office.server_host.python(SCRAPE).stdout

    before = received_bytes(scrape(), key)
    result = transfer(client_host, office.server_host, SERVER_TUNNEL, 5 * MB, timeout=60)
    assert result.sent_sha256 == result.received_sha256
    after = received_bytes(scrape(), key)
    assert after - before >= 5 * MB

    def agrees() -> bool:  # a keepalive may land between two reads: retry until show is steady around the scrape
        first, text, second = server.peer(key)["rx_bytes"], scrape(), server.peer(key)["rx_bytes"]
        return first == second == received_bytes(text, key)

    wait_until(agrees, 10, interval=0.2, what="metrics equal to show --json")
    wait_until(lambda: metrics_file.exists() and received_bytes(metrics_file.read_text(), key) >= after, 20,
               interval=0.5, what="the metrics file, current")

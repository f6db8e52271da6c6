"""Each peer's second-factor state in `tunvpn show` and in the metrics (read back by the official parser)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tunvpn.metrics import render
from tunvpn.show import format_status

ALICE = "DKEPqqEMAhT7y4lWDlJYKrWbM4DKnOfzYQ6CEmXmbVk="
BOB = "9x2TDaRn+q4nhDpvhMFkB2vddc3/pn9Ztmb3fVoW5H0="
CAROL = "ZmRkZmRkZmRkZmRkZmRkZmRkZmRkZmRkZmRkZmRkZmQ="
NOW = 1_700_000_000


def peer(key: str, second_factor: dict | None) -> dict:
    return {"public_key": key, "connected": True, "latest_handshake": NOW, "rx_bytes": 0, "tx_bytes": 0,
            "rx_packets": 0, "tx_packets": 0, "dropped": {}, "second_factor": second_factor}


def server_status() -> dict:
    return {"interface": "tv-office", "role": "server", "peers": [
        peer(ALICE, {"method": "totp", "authorized": True, "until": NOW + 3 * 3600 + 60}),
        peer(BOB, {"method": "totp", "authorized": False, "until": None}),
        peer(CAROL, None),
    ]}


def test_show_says_who_is_authorized_until_when_and_who_waits():
    text = format_status(server_status(), now=NOW)
    alice, bob, carol = text.split("\n\npeer: ")[1:]
    assert "second factor: authorized until " in alice and "(3 hours, 1 minute left)" in alice
    assert "second factor: required, not presented: its traffic is dropped until it is" in bob
    assert "second factor" not in carol


def test_a_client_that_waits_says_how_to_log_in():
    status = {"interface": "tv-office", "role": "client", "name": "office", "peers": [],
              "second_factor": {"state": "refused", "until": None, "attempt": 1, "answered": 1}}
    assert "  second factor: waiting for second factor; the last code was refused (tunvpn login office)" in \
        format_status(status, now=NOW)
    status["second_factor"] = {"state": "waiting"}
    assert "second factor: waiting for second factor (tunvpn login office)" in format_status(status, now=NOW)


def test_metrics_give_authorized_and_deadline_for_peers_that_need_a_second_factor():
    found = {}
    for family in text_string_to_metric_families(render(server_status())):
        for sample in family.samples:
            found[(sample.name, sample.labels.get("public_key"))] = sample.value
    assert found[("tunvpn_peer_second_factor_authorized", ALICE)] == 1
    assert found[("tunvpn_peer_second_factor_deadline_seconds", ALICE)] == NOW + 3 * 3600 + 60
    assert found[("tunvpn_peer_second_factor_authorized", BOB)] == 0
    assert found[("tunvpn_peer_second_factor_deadline_seconds", BOB)] == 0
    assert ("tunvpn_peer_second_factor_authorized", CAROL) not in found

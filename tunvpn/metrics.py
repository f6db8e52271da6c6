"""Prometheus metrics, in the text exposition format (version 0.0.4), from a daemon's status.

The per-peer series carry the names and labels of the widely used WireGuard exporters
(`wireguard_sent_bytes_total`, `wireguard_received_bytes_total`,
`wireguard_latest_handshake_seconds`, labelled `interface` and `public_key`), so existing
Grafana dashboards work unchanged; a peer with `Name =` also gets `name`.  tunvpn's own series
(`tunvpn_*`) sit beside them.  Everything is rendered from the same status document that
`tunvpn show --json` prints, so the two never disagree.
"""

from __future__ import annotations

from typing import Any, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> (type, help); the order here is the order of the output.
PEER_SERIES = {
    "wireguard_sent_bytes_total": ("counter", "Bytes sent to the peer (all datagrams, handshakes included)."),
    "wireguard_received_bytes_total": ("counter", "Bytes received from the peer (all datagrams, handshakes included)."),
    "wireguard_latest_handshake_seconds": ("gauge", "Unix time of the latest completed handshake, 0 if none."),
    "tunvpn_peer_sent_packets_total": ("counter", "Transport messages sent to the peer, keepalives included."),
    "tunvpn_peer_received_packets_total": ("counter", "Transport messages received from the peer, keepalives included."),
    "tunvpn_peer_connected": ("gauge", "1 while the peer has a live session."),
    "tunvpn_peer_dropped_total": ("counter", "Packets of this peer dropped, by reason (rate_limit, access_denied, ...)."),
    "tunvpn_peer_rate_limit_bits_per_second": ("gauge", "The peer's rate limit each way, for peers that have one."),
    "tunvpn_peer_second_factor_authorized": ("gauge", "1 while a peer that needs a second factor is authorized, "
                                             "0 while its traffic waits for a code."),
    "tunvpn_peer_second_factor_deadline_seconds": ("gauge", "Unix time its second-factor authorization ends, "
                                                   "0 if it has none."),
}
DEVICE_SERIES = {
    "tunvpn_peers": ("gauge", "Peers configured."),
    "tunvpn_peers_connected": ("gauge", "Peers with a live session."),
    "tunvpn_dropped_total": ("counter", "Datagrams and packets dropped before a peer was known, by reason."),
    "tunvpn_pool_addresses": ("gauge", "Addresses in the server's pool, by IP version."),
    "tunvpn_pool_leased": ("gauge", "Pool addresses leased to clients, by IP version."),
    "tunvpn_refused_settings": ("gauge", "System changes the kernel refused at run time (see tunvpn show)."),
    "tunvpn_internal_errors_total": ("counter", "Exceptions the event loop caught and carried on from (bugs)."),
}


def render(status: dict[str, Any]) -> str:
    """The whole exposition for one daemon: HELP and TYPE once per family, then its samples."""
    interface = {"interface": status.get("interface", "")}
    samples: dict[str, list[str]] = {name: [] for name in (*PEER_SERIES, *DEVICE_SERIES)}
    peers = status.get("peers", [])
    for peer in peers:
        _peer_samples(samples, interface, peer)
    _device_samples(samples, interface, status, peers)
    lines: list[str] = []
    for name, (kind, help_text) in (*PEER_SERIES.items(), *DEVICE_SERIES.items()):
        if samples[name]:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(lines) + "\n"


def _peer_samples(samples: dict[str, list[str]], interface: dict[str, str], peer: dict[str, Any]) -> None:
    labels = {**interface, "public_key": peer["public_key"]}
    if peer.get("name"):
        labels["name"] = peer["name"]
    add = _adder(samples)
    add("wireguard_sent_bytes_total", labels, peer.get("tx_bytes", 0))
    add("wireguard_received_bytes_total", labels, peer.get("rx_bytes", 0))
    add("wireguard_latest_handshake_seconds", labels, peer.get("latest_handshake") or 0)
    add("tunvpn_peer_sent_packets_total", labels, peer.get("tx_packets", 0))
    add("tunvpn_peer_received_packets_total", labels, peer.get("rx_packets", 0))
    add("tunvpn_peer_connected", labels, 1 if peer.get("connected") else 0)
    for reason, count in sorted((peer.get("dropped") or {}).items()):
        add("tunvpn_peer_dropped_total", {**labels, "reason": reason}, count)
    if peer.get("rate_limit"):
        add("tunvpn_peer_rate_limit_bits_per_second", labels, peer["rate_limit"])
    second_factor = peer.get("second_factor")
    if second_factor:
        add("tunvpn_peer_second_factor_authorized", labels, 1 if second_factor.get("authorized") else 0)
        add("tunvpn_peer_second_factor_deadline_seconds", labels, second_factor.get("until") or 0)


def _device_samples(samples: dict[str, list[str]], interface: dict[str, str], status: dict[str, Any],
                    peers: list[dict[str, Any]]) -> None:
    add = _adder(samples)
    add("tunvpn_peers", interface, len(peers))
    add("tunvpn_peers_connected", interface, sum(1 for peer in peers if peer.get("connected")))
    for reason, count in sorted((status.get("dropped") or {}).items()):
        add("tunvpn_dropped_total", {**interface, "reason": reason}, count)
    for version, pool in sorted((status.get("pool") or {}).items()):
        family = {**interface, "family": f"ipv{version}"}
        add("tunvpn_pool_addresses", family, pool["size"])
        add("tunvpn_pool_leased", family, pool["leased"])
    add("tunvpn_refused_settings", interface, len(status.get("refused") or {}))
    add("tunvpn_internal_errors_total", interface, sum((status.get("internal_errors") or {}).values()))


def _adder(samples: dict[str, list[str]]):
    def add(name: str, labels: dict[str, str], value: int | float) -> None:
        samples[name].append(f"{name}{{{_labels(labels.items())}}} {_number(value)}")
    return add


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{key}="{_escape(str(value))}"' for key, value in pairs)


def _escape(value: str) -> str:
    """Label values: backslash, double quote and newline escaped, as the format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: int | float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))

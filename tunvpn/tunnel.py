"""A running tunnel: config -> protocol core -> tun, netlink, UDP, event loop.

This module only wires parts together; the protocol lives in
`tunvpn.protocol`, the I/O in `tunvpn.io`.  Everything it configures on the
system it records, and removes exactly that on exit.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import time
from contextlib import ExitStack

from .config import Config, PeerConfig
from .io.loop import EventLoop
from .io.netlink import LinkSetup
from .io.tun import TunDevice
from .io.udp import UdpTransport
from .keys import encode_key
from .protocol.device import (
    DEFAULT_LOAD_THRESHOLD,
    CookieReceived,
    Device,
    EndpointChanged,
    Event,
    HandshakeCompleted,
    HandshakeGaveUp,
    KeysExpired,
)

log = logging.getLogger("tunvpn")


class StartupError(Exception):
    """The tunnel could not come up; the message says what and why, in one line."""


def short_key(key: bytes) -> str:
    return encode_key(key)[:10] + "…"


def log_event(event: Event) -> None:
    if isinstance(event, HandshakeCompleted):
        role = "initiator" if event.initiator else "responder"
        log.info("peer %s: handshake complete (%s)", short_key(event.public_key), role)
    elif isinstance(event, EndpointChanged):
        log.info("peer %s: endpoint is now %s", short_key(event.public_key), format_endpoint(event.endpoint))
    elif isinstance(event, HandshakeGaveUp):
        log.warning("peer %s: handshake did not complete, giving up until there is traffic", short_key(event.public_key))
    elif isinstance(event, KeysExpired):
        log.info("peer %s: session keys expired and dropped", short_key(event.public_key))
    elif isinstance(event, CookieReceived):
        log.info("peer %s: is under load and sent a cookie; the next handshake carries mac2",
                 short_key(event.public_key))


def log_statistics(device: Device, udp: UdpTransport) -> None:
    """SIGUSR2, as with OpenVPN: one line per peer and one for what was dropped."""
    wall_now = time.time()
    for peer in device.peers.values():
        handshake = "never" if peer.last_handshake_wall is None else f"{wall_now - peer.last_handshake_wall:.0f}s ago"
        log.info(
            "peer %s: endpoint %s, handshake %s, rx %d B / %d pkts, tx %d B / %d pkts, dropped %s",
            short_key(peer.public_key), format_endpoint(peer.endpoint), handshake,
            peer.rx_bytes, peer.rx_packets, peer.tx_bytes, peer.tx_packets, _counts(peer.dropped),
        )
    log.info("device: dropped %s; udp errors %s", _counts(device.dropped), _counts(udp.errors))


def _counts(counter) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "none"


def format_endpoint(endpoint: tuple | None) -> str:
    if endpoint is None:
        return "(none)"
    host, port = endpoint[0], endpoint[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _routes_for(peers: list[PeerConfig]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    routes = []
    for peer in peers:
        for network in peer.allowed_ips:
            if network.prefixlen == 0:
                raise StartupError(
                    f"{network} in AllowedIPs (line {peer.line}): full-tunnel routing is not supported yet"
                )
            routes.append(network)
    return routes


def build_device(config: Config, load_threshold: int = DEFAULT_LOAD_THRESHOLD) -> Device:
    device = Device(config.interface.private_key, mtu=config.interface.mtu, load_threshold=load_threshold)
    device.set_wall_clock(time.time(), time.monotonic())
    for peer in config.peers:
        device.set_peer(
            peer.public_key,
            preshared_key=peer.preshared_key,
            allowed_ips=peer.allowed_ips,
            endpoint=peer.endpoint_address,
            persistent_keepalive=peer.persistent_keepalive,
        )
    return device


def run(config: Config, load_threshold: int = DEFAULT_LOAD_THRESHOLD) -> int:
    """Bring the tunnel up, run until SIGTERM/SIGINT, take down what we set up."""
    interface = config.interface
    routes = _routes_for(config.peers)
    device = build_device(config, load_threshold)
    with ExitStack() as cleanup:
        udp = UdpTransport(interface.listen_port)
        cleanup.callback(udp.close)
        tun = TunDevice(interface.device)
        cleanup.callback(tun.close)
        link = LinkSetup(tun.name)
        cleanup.callback(link.close)
        cleanup.callback(link.undo)
        link.set_mtu(interface.mtu)
        for address in interface.addresses:
            link.add_address(address)
        link.set_up()
        for network in routes:
            link.add_route(network)
        loop = EventLoop(device, tun, udp, on_event=log_event)
        loop.signal_handlers[signal.SIGUSR2] = lambda: log_statistics(device, udp)
        cleanup.callback(loop.close)
        log.info(
            "%s %s up: device %s, UDP port %d, public key %s, %d peer(s)",
            config.role,
            config.name,
            tun.name,
            udp.port,
            encode_key(device.public_key),
            len(config.peers),
        )
        if config.role == "client":
            now = time.monotonic()
            for peer in config.peers:
                if peer.endpoint_address is not None:
                    device.initiate(peer.public_key, now)
        loop.run()
        log.info("stopping on signal %d", loop.stop_signal)
    return 0

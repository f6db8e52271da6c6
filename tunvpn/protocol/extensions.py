"""tunvpn's own additions to WireGuard's receive path, as hooks a daemon installs.

A plain `Device` does what WireGuard does.  Two hooks add what tunvpn needs on top
(`Device.set_control_messages`, `Device.set_forwarding`):

- control messages: an authenticated plaintext whose first byte is CONTROL_MARKER (not an
  IP version) becomes a ControlReceived event instead of a `not_ip` drop;
- client to client: on a server, a packet from one peer to another peer's address is sealed
  straight back out (allowed) or dropped and counted (not allowed), never given to the tun.

Both run outside WireGuard's inner loop: the first only for plaintext that is not IP, the
second once per batch over the packets that passed every check.
"""

from __future__ import annotations

from .control import CONTROL_MARKER
from .devicestate import DeviceState
from .events import ControlReceived
from .peer import Peer
from .send import send_packets


def control_messages(state: DeviceState, peer: Peer, plaintext: bytes) -> bool:
    """A control message becomes an event; anything else that is not IP is not ours."""
    if plaintext[0] != CONTROL_MARKER:
        return False
    state.events.append(ControlReceived(peer.public_key, plaintext))
    return True


def _to_tun_or_peers(state: DeviceState, packets: list[bytes], senders: list[Peer], now: float,
                     allowed: bool) -> list[bytes]:
    lookup_v4 = state.allowed_ips.lookup_v4
    lookup_v6 = state.allowed_ips.lookup_v6
    to_tun: list[bytes] = []
    relayed: list[bytes] = []
    last_destination, target = None, None  # a batch is mostly one flow's: one lookup for it
    for packet, sender in zip(packets, senders):
        destination = packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]
        if destination != last_destination:
            target = lookup_v4(destination) if len(destination) == 4 else lookup_v6(destination)
            last_destination = destination
        if target is None:
            to_tun.append(packet)
        elif allowed:
            relayed.append(packet)
        else:
            sender.dropped["peer_to_peer_blocked"] += 1
    if relayed:
        send_packets(state, relayed, now)
    return to_tun


def relay_between_peers(state: DeviceState, packets: list[bytes], senders: list[Peer], now: float) -> list[bytes]:
    """ClientToClient = yes: packets for another peer go straight to it."""
    return _to_tun_or_peers(state, packets, senders, now, allowed=True)


def block_between_peers(state: DeviceState, packets: list[bytes], senders: list[Peer], now: float) -> list[bytes]:
    """ClientToClient = no: packets for another peer are dropped and counted."""
    return _to_tun_or_peers(state, packets, senders, now, allowed=False)

"""What the device tells its driver: slow-path events only, never one per data packet."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Endpoint = Any  # whatever the shell uses as a socket address; the core only compares them


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """Something happened with the peer of this public key."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class HandshakeCompleted(PeerEvent):
    initiator: bool  # the role this side had


@dataclass(frozen=True, slots=True)
class HandshakeGaveUp(PeerEvent):
    """No answer for REKEY_ATTEMPT_TIME; staged packets were dropped."""


@dataclass(frozen=True, slots=True)
class KeysExpired(PeerEvent):
    """No new handshake for 3 x REJECT_AFTER_TIME; the keys were dropped."""


@dataclass(frozen=True, slots=True)
class CookieReceived(PeerEvent):
    """The peer is under load: our next handshake message to it carries mac2."""


@dataclass(frozen=True, slots=True)
class ControlReceived(PeerEvent):
    """A tunvpn control message from an authenticated peer (see control.py, extensions.py)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class EndpointChanged(PeerEvent):
    """An authenticated message came from a new address: the peer roamed."""

    endpoint: Endpoint


Event = HandshakeCompleted | HandshakeGaveUp | KeysExpired | CookieReceived | ControlReceived | EndpointChanged

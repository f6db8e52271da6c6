"""Peers held to control messages until they prove something over the control extension.

One peer may be held for several reasons at once (a second factor not yet presented, an
enrollment not yet completed); it is let through only when every hold is released.  Each hold
is named by the drop reason its packets count under, so `tunvpn show` says why a peer's traffic
goes nowhere.  The core enforces it (`Device.restrict`); this keeps the bookkeeping by public
key, never by session, so a rekey cannot lift a hold and a new handshake cannot add one.
"""

from __future__ import annotations

from .protocol.device import Device


class PeerGate:
    def __init__(self, device: Device) -> None:
        self.device = device
        self._holds: dict[bytes, list[str]] = {}  # public key -> the reasons, oldest first

    def hold(self, public_key: bytes, reason: str) -> None:
        reasons = self._holds.setdefault(public_key, [])
        if reason not in reasons:
            reasons.append(reason)
            self._apply(public_key)

    def release(self, public_key: bytes, reason: str) -> None:
        reasons = self._holds.get(public_key)
        if reasons is None or reason not in reasons:
            return
        reasons.remove(reason)
        if not reasons:
            del self._holds[public_key]
        self._apply(public_key)

    def forget(self, public_key: bytes) -> None:
        """The peer is gone from the device: nothing to lift."""
        self._holds.pop(public_key, None)

    def is_held(self, public_key: bytes, reason: str | None = None) -> bool:
        reasons = self._holds.get(public_key, ())
        return bool(reasons) if reason is None else reason in reasons

    def _apply(self, public_key: bytes) -> None:
        reasons = self._holds.get(public_key)
        self.device.restrict(public_key, reasons[0] if reasons else None)

"""Session keypairs and the previous/current/next rotation.

The initiator may send as soon as it derived a keypair; the responder must
wait for proof that the initiator has the same keys, so its new keypair
waits in `next` until the first transport message arrives under it.
"""

from __future__ import annotations

from typing import Any

from .crypto import TransportCipher
from .noise import SessionKeys
from .replay import ReplayWindow

REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0


class Keypair:
    __slots__ = (
        "sender",
        "receiver",
        "send_counter",
        "replay",
        "created",
        "is_initiator",
        "local_index",
        "remote_index",
        "peer",
    )

    def __init__(self, keys: SessionKeys, created: float, peer: Any) -> None:
        self.sender = TransportCipher(keys.send)
        self.receiver = TransportCipher(keys.receive)
        self.send_counter = 0
        self.replay = ReplayWindow()
        self.created = created
        self.is_initiator = keys.is_initiator
        self.local_index = keys.local_index
        self.remote_index = keys.remote_index
        self.peer = peer

    def digest(self) -> tuple:
        return (id(self), self.send_counter, self.replay.digest())

    def can_send(self, now: float) -> bool:
        return self.send_counter < REJECT_AFTER_MESSAGES and now - self.created < REJECT_AFTER_TIME

    def can_receive(self, now: float) -> bool:
        return now - self.created < REJECT_AFTER_TIME


class Keypairs:
    """previous / current / next for one peer; every method returns the keypairs it dropped."""

    __slots__ = ("previous", "current", "next")

    def __init__(self) -> None:
        self.previous: Keypair | None = None
        self.current: Keypair | None = None
        self.next: Keypair | None = None

    def install(self, keypair: Keypair) -> list[Keypair]:
        if keypair.is_initiator:
            if self.next is not None:
                dropped = [self.previous, self.current]
                self.previous, self.next = self.next, None
            else:
                dropped = [self.previous]
                self.previous = self.current
            self.current = keypair
        else:
            dropped = [self.next, self.previous]
            self.next, self.previous = keypair, None
        return [k for k in dropped if k is not None]

    def confirm(self, keypair: Keypair) -> list[Keypair]:
        """The peer sent under `next`, so it has the keys: `next` becomes current."""
        if keypair is not self.next:
            return []
        dropped = self.previous
        self.previous, self.current, self.next = self.current, keypair, None
        return [dropped] if dropped is not None else []

    def clear(self) -> list[Keypair]:
        dropped = [k for k in (self.previous, self.current, self.next) if k is not None]
        self.previous = self.current = self.next = None
        return dropped

    def __iter__(self):
        return (k for k in (self.previous, self.current, self.next) if k is not None)

"""Open invites: the one-time credentials `tunvpn invite` makes and `tunvpn join` spends.

An invite is a WireGuard key pair plus a preshared key.  The server keeps only the public key
and the PSK (what it needs to answer the handshake) with a name, a deadline and a use count, in
`invites.json` beside state.json; the private key exists only in the token.  Revoking an
invite deletes its entry, after which no handshake with that key can complete.  An invite used
up keeps answering repeats of its last request for USED_GRACE seconds (the answer may have been
lost), then it is gone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from .config import is_peer_name
from .io.atomicfile import replace_file
from .keys import InvalidKey, decode_key, encode_key

INVITES_FILE = "invites.json"
DEFAULT_LIFETIME = 24 * 3600
MAX_LIFETIME = 30 * 86400
MAX_USES = 1000
MAX_OPEN_INVITES = 256  # each is a device peer that any holder of its token may handshake with
USED_GRACE = 120
ENROLL_BURST = 5  # enrollments the server takes at once ...
ENROLL_INTERVAL = 12.0  # ... and then one per this many seconds (5 a minute)


@dataclass(frozen=True)
class Invite:
    public_key: bytes
    preshared_key: bytes = field(repr=False)
    name: str
    created: int  # wall clock, seconds
    expires: int
    uses: int  # enrollments allowed in all
    enrolled: tuple[bytes, ...] = ()  # the keys enrolled with it, in order
    finished: int | None = None  # when the last use was spent

    @property
    def uses_left(self) -> int:
        return self.uses - len(self.enrolled)

    @property
    def ends(self) -> int:
        """When the server forgets it: at expiry, or USED_GRACE after its last use."""
        return self.expires if self.finished is None else min(self.expires, self.finished + USED_GRACE)

    def peer_name(self, index: int) -> str:
        """The name of the peer enrolled with use `index` (0-based): NAME, then NAME-2, NAME-3, ..."""
        return self.name if index == 0 else f"{self.name}-{index + 1}"

    def spent(self, public_key: bytes, wall: int) -> Invite:
        enrolled = (*self.enrolled, public_key)
        return replace(self, enrolled=enrolled, finished=wall if len(enrolled) >= self.uses else None)


def invite_to_json(invite: Invite) -> dict[str, Any]:
    return {"preshared_key": encode_key(invite.preshared_key), "name": invite.name, "created": invite.created,
            "expires": invite.expires, "uses": invite.uses, "enrolled": [encode_key(k) for k in invite.enrolled],
            "finished": invite.finished}


def invite_from_json(key_text: str, value: dict[str, Any]) -> Invite:
    """KeyError, TypeError or ValueError (InvalidKey is one) for an entry that makes no sense."""
    invite = Invite(decode_key(key_text), decode_key(value["preshared_key"]), str(value["name"]),
                    int(value["created"]), int(value["expires"]), int(value["uses"]),
                    tuple(decode_key(k) for k in value["enrolled"]),
                    None if value.get("finished") is None else int(value["finished"]))
    if not 1 <= invite.uses <= MAX_USES or len(invite.enrolled) > invite.uses:
        raise ValueError("use counts out of range")
    if not is_peer_name(invite.peer_name(invite.uses - 1)):  # it names files in the peers directory
        raise ValueError("not a peer name")
    return invite


def load_invites(directory: str | os.PathLike[str]) -> tuple[dict[bytes, Invite], list[str]]:
    """The saved invites; a damaged file or entry is reported and skipped (an invite can be made again)."""
    path = os.path.join(directory, INVITES_FILE)
    try:
        with open(path, "rb") as file:
            data = json.loads(file.read(1 << 20))
    except FileNotFoundError:
        return {}, []
    except (OSError, ValueError) as exc:
        return {}, [f"{path}: cannot read the invites ({getattr(exc, 'strerror', None) or exc}); they are lost"]
    invites, problems = {}, []
    entries = data.get("invites") if isinstance(data, dict) else None
    for key_text, value in (entries or {}).items() if isinstance(entries, dict) else ():
        try:
            invite = invite_from_json(key_text, value)
        except (KeyError, TypeError, ValueError, InvalidKey):
            problems.append(f"{path}: skipped a damaged invite entry")
            continue
        invites[invite.public_key] = invite
    return invites, problems


def save_invites(directory: str | os.PathLike[str], invites: dict[bytes, Invite]) -> None:
    """Atomically, 0600, as state.json is written (they hold the invites' preshared keys)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    text = json.dumps({"version": 1, "invites": {encode_key(k): invite_to_json(v) for k, v in invites.items()}},
                      indent=1, sort_keys=True)
    replace_file(os.path.join(directory, INVITES_FILE), (text + "\n").encode(), 0o600)


class EnrollmentLimit:
    """A token bucket over every invite at once: a leaked token cannot enroll a crowd quickly."""

    def __init__(self, burst: int = ENROLL_BURST, interval: float = ENROLL_INTERVAL) -> None:
        self.burst = burst
        self.interval = interval
        self._tokens = float(burst)
        self._at: float | None = None

    def take(self, now: float) -> float:
        """0 when an enrollment may go ahead now (a token is spent), else the seconds to wait."""
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) / self.interval)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) * self.interval

"""MAC1/MAC2, cookie replies, the under-load rule and the per-source rate limits.

mac1 proves the sender knows our public key, which makes us answer at all.
Under load, mac2 must also be valid: it is keyed by a cookie we handed to
the sender's address, so it proves the sender can receive there.  Messages
without it get a cookie reply and no further work, and only as many cookie
replies as `CookieReplyBudget` allows: one XChaCha20-Poly1305 seal costs
Python some 35-75 us, so answering every flooded initiation is itself the
denial of service.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections import OrderedDict, deque
from functools import lru_cache
from typing import Callable

from .crypto import MAC_SIZE, XNONCE_SIZE, CryptoError, KeyedMac, hash_, mac, xaead_decrypt, xaead_encrypt
from .messages import COOKIE_SIZE, CookieReply

LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

COOKIE_SECRET_LIFETIME = 120.0  # the replier rotates its secret this often
COOKIE_LIFETIME = 120.0  # the sender uses a cookie for this long

_ZERO_MAC = bytes(MAC_SIZE)
_COOKIE_MEMO_SIZE = 4096  # per-source cookies kept until the secret turns: one MAC saved per message


@lru_cache(maxsize=4096)
def _packed_host(host: str) -> bytes:
    """Parsing with ipaddress costs ~5 us, more than mac1: a flood repeats its few hosts."""
    return ipaddress.ip_address(host.split("%", 1)[0]).packed


def source_bytes(address: tuple) -> bytes:
    """The address a cookie is bound to: packed IP || port (big-endian)."""
    return _packed_host(address[0]) + address[1].to_bytes(2, "big")


class CookieChecker:
    """Receiving side: verifies mac1/mac2 on messages sent to us and makes cookie replies."""

    def __init__(self, local_public: bytes, random_bytes: Callable[[int], bytes]) -> None:
        self._mac1_key = hash_(LABEL_MAC1, local_public)
        self._mac1 = KeyedMac(self._mac1_key)
        self._cookie_key = hash_(LABEL_COOKIE, local_public)
        self._random_bytes = random_bytes
        self._secret = b""
        self._secret_born = float("-inf")
        self._cookies: dict[bytes, bytes] = {}  # source -> cookie under the current secret
        self._mac2s: dict[bytes, KeyedMac] = {}  # source -> MAC keyed with its cookie

    def mac1_valid(self, msg: bytes, mac1_offset: int) -> bool:
        # Constant-time compares (as wireguard-go's hmac.Equal): no timing oracle for forging MACs.
        return hmac.compare_digest(self._mac1(msg[:mac1_offset]), msg[mac1_offset : mac1_offset + MAC_SIZE])

    def _cookie(self, source: bytes, now: float) -> bytes:
        cookies = self._cookies
        if now - self._secret_born >= COOKIE_SECRET_LIFETIME:
            self._secret = self._random_bytes(32)
            self._secret_born = now
            cookies.clear()
            self._mac2s.clear()
        cookie = cookies.get(source)
        if cookie is None:
            if len(cookies) >= _COOKIE_MEMO_SIZE:
                cookies.clear()
                self._mac2s.clear()
            cookie = cookies[source] = mac(self._secret, source)
        return cookie

    def mac2_valid(self, msg: bytes, mac1_offset: int, source: bytes, now: float) -> bool:
        mac2_offset = mac1_offset + MAC_SIZE
        received = msg[mac2_offset : mac2_offset + MAC_SIZE]
        if received == _ZERO_MAC:  # "I hold no cookie": no MAC of ours is all zeros but by chance
            return False
        cookie = self._cookie(source, now)  # first: it clears both memos when the secret turns
        keyed = self._mac2s.get(source)
        if keyed is None:
            keyed = self._mac2s[source] = KeyedMac(cookie)
        return hmac.compare_digest(keyed(msg[:mac2_offset]), received)

    def create_reply(self, msg: bytes, sender_index: int, mac1_offset: int, source: bytes, now: float) -> bytes:
        """The cookie reply to a handshake message that arrived while we were under load."""
        nonce = self._random_bytes(XNONCE_SIZE)
        mac1 = msg[mac1_offset : mac1_offset + MAC_SIZE]
        encrypted = xaead_encrypt(self._cookie_key, nonce, self._cookie(source, now), mac1)
        return CookieReply(sender_index, nonce, encrypted).pack()


class CookieJar:
    """Sending side, one per peer: adds mac1/mac2 and keeps the cookie the peer gave us."""

    __slots__ = ("_mac1_key", "_cookie_key", "_cookie", "_cookie_at", "_last_mac1")

    def __init__(self, remote_public: bytes) -> None:
        self._mac1_key = hash_(LABEL_MAC1, remote_public)
        self._cookie_key = hash_(LABEL_COOKIE, remote_public)
        self._cookie = b""
        self._cookie_at = float("-inf")
        self._last_mac1: bytes | None = None

    def digest(self) -> tuple:
        return (self._cookie, self._cookie_at, self._last_mac1)

    def add_macs(self, msg: bytes, now: float) -> bytes:
        """Fill in the last 32 bytes (mac1, mac2) of a packed handshake message."""
        mac1_offset = len(msg) - 2 * MAC_SIZE
        body = msg[:mac1_offset]
        mac1 = mac(self._mac1_key, body)
        self._last_mac1 = mac1
        if self._cookie and now - self._cookie_at < COOKIE_LIFETIME:
            mac2 = mac(self._cookie, body + mac1)
        else:
            mac2 = _ZERO_MAC
        return body + mac1 + mac2

    def consume_reply(self, reply: CookieReply, now: float) -> bool:
        """Store the cookie if the reply answers the last message we sent."""
        if self._last_mac1 is None:
            return False
        try:
            cookie = xaead_decrypt(self._cookie_key, reply.nonce, reply.encrypted_cookie, self._last_mac1)
        except CryptoError:
            return False
        if len(cookie) != COOKIE_SIZE:
            return False
        self._cookie, self._cookie_at = cookie, now
        self._last_mac1 = None  # one reply per message: a replayed reply changes nothing
        return True


class LoadMonitor:
    """The under-load rule.

    Under load means: more than `threshold` handshake messages with a valid
    mac1 arrived within one second (a sliding window: the arrival times of
    the last threshold + 1 messages), and for one second after that.
    (wireguard-go asks how full its handshake queue is; a single-threaded
    event loop has no queue, so the rate is the measure.)  `force` lets
    tests and operators hold the device under load.
    """

    WINDOW = 1.0
    HOLD = 1.0

    def __init__(self, threshold: int) -> None:
        self._threshold = threshold
        self.force = False
        self._recent: deque[float] = deque(maxlen=threshold + 1)  # arrival times, oldest first
        self._until = float("-inf")

    @property
    def threshold(self) -> int:
        """Fixed at construction: the sliding window is sized from it."""
        return self._threshold

    def record(self, now: float) -> None:
        recent = self._recent
        recent.append(now)
        if len(recent) == recent.maxlen and now - recent[0] < self.WINDOW:
            self._until = now + self.HOLD

    def under_load(self, now: float) -> bool:
        return self.force or now < self._until


class RateLimiter:
    """Token bucket per source IP: for handshakes that passed mac2 under load
    (20 a second, as wireguard-go), and for the cookie replies we make.

    The table is capped and evicts the source seen least recently, so the
    memory it takes stays bounded and an exhausted flooder stays exhausted
    while it uses fewer than MAX_ENTRIES addresses (past that, its evicted
    addresses come back with a full burst, and only a global cap holds).
    IPv6 sources are grouped by /64, since one host usually owns a whole /64.
    """

    RATE = 20.0  # handshakes per second per source
    BURST = 5.0
    MAX_ENTRIES = 8192

    def __init__(self, rate: float = RATE, burst: float = BURST) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: OrderedDict[bytes, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: bytes, now: float) -> bool:
        key = source[:-2] if len(source) == 6 else source[:8]
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.MAX_ENTRIES:
                self._buckets.popitem(last=False)
            self._buckets[key] = [self._burst - 1.0, now]
            return True
        self._buckets.move_to_end(key)
        tokens = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True


class CookieReplyBudget:
    """How many cookie replies we make: a few a second per source IP, and a cap for all.

    A legitimate sender needs one reply per handshake attempt (one per REKEY_TIMEOUT, 5 s);
    a flooder from one host gets its burst and then a reply every half second, and one from
    many hosts shares the global cap, so cookie replies never take more than a small share
    of the loop (~1000 x 35-75 us a second).  A message over budget is dropped, which a
    WireGuard sender takes as a lost datagram: it retries.  wireguard-go needs no such
    budget: its bounded handshake queue drops the excess before any work.
    """

    PER_SOURCE_RATE = 2.0  # replies per second per source IP (per /64 for IPv6)
    PER_SOURCE_BURST = 5.0
    GLOBAL_RATE = 1000.0
    GLOBAL_BURST = 1000.0

    def __init__(self) -> None:
        self._per_source = RateLimiter(self.PER_SOURCE_RATE, self.PER_SOURCE_BURST)
        self._tokens = self.GLOBAL_BURST
        self._at = float("-inf")

    def __len__(self) -> int:
        return len(self._per_source)

    def allow(self, source: bytes, now: float) -> bool:
        """The global cap first: a reply it refuses must not cost the source one of its own."""
        tokens = min(self.GLOBAL_BURST, self._tokens + (now - self._at) * self.GLOBAL_RATE)
        self._at = now
        self._tokens = tokens
        if tokens < 1.0 or not self._per_source.allow(source, now):
            return False
        self._tokens = tokens - 1.0
        return True

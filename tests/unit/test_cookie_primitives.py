"""mac1/mac2, cookie replies, the under-load rule and the per-source rate limit.

Time is simulated: every call takes `now`, so no test sleeps.
"""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc

import pytest

from tunvpn.protocol.cookie import (
    COOKIE_LIFETIME,
    COOKIE_SECRET_LIFETIME,
    CookieChecker,
    CookieJar,
    CookieReplyBudget,
    LoadMonitor,
    RateLimiter,
    source_bytes,
)
from tunvpn.protocol.crypto import StaticKey, xaead_decrypt
from tunvpn.protocol.messages import (
    INITIATION_MAC1_OFFSET,
    RESPONSE_MAC1_OFFSET,
    CookieReply,
    Initiation,
    Response,
)

SOURCE = source_bytes(("192.0.2.10", 51820))
OTHER_SOURCE = source_bytes(("192.0.2.11", 51820))


class RecordingRandom:
    """A reproducible random source that remembers what it handed out (to learn the secret)."""

    def __init__(self, seed: int = 1) -> None:
        self._rng = random.Random(seed)
        self.draws: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        value = self._rng.getrandbits(8 * n).to_bytes(n, "little")
        self.draws.append(value)
        return value


def _blake2s(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


def _initiation(sender: int = 0x11223344) -> bytes:
    return Initiation(sender, os.urandom(32), os.urandom(48), os.urandom(28)).pack()


def _response() -> bytes:
    return Response(0x55667788, 0x11223344, os.urandom(32), os.urandom(16)).pack()


@pytest.fixture
def responder() -> StaticKey:
    return StaticKey(os.urandom(32))


@pytest.fixture
def rng() -> RecordingRandom:
    return RecordingRandom()


@pytest.fixture
def checker(responder: StaticKey, rng: RecordingRandom) -> CookieChecker:
    return CookieChecker(responder.public, rng)


@pytest.fixture
def jar(responder: StaticKey) -> CookieJar:
    return CookieJar(responder.public)


# --- mac1 --------------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "offset"), [(_initiation, INITIATION_MAC1_OFFSET), (_response, RESPONSE_MAC1_OFFSET)])
def test_mac1_is_keyed_by_the_receivers_public_key(responder, checker, jar, make, offset: int) -> None:
    msg = jar.add_macs(make(), now=0.0)
    mac1_key = _blake2s(b"mac1----" + responder.public)
    assert msg[offset : offset + 16] == _mac(mac1_key, msg[:offset])
    assert msg[offset + 16 :] == bytes(16)  # no cookie yet: mac2 is zero
    assert checker.mac1_valid(msg, offset)


def test_mac1_fails_on_any_changed_byte_it_covers(checker, jar) -> None:
    msg = jar.add_macs(_initiation(), now=0.0)
    for position in range(INITIATION_MAC1_OFFSET + 16):
        tampered = bytearray(msg)
        tampered[position] ^= 0x04
        assert not checker.mac1_valid(bytes(tampered), INITIATION_MAC1_OFFSET), position
    tampered = bytearray(msg)
    tampered[-1] ^= 0x04  # mac2 is not covered by mac1
    assert checker.mac1_valid(bytes(tampered), INITIATION_MAC1_OFFSET)


def test_mac1_for_another_key_is_invalid(checker) -> None:
    other_jar = CookieJar(StaticKey(os.urandom(32)).public)
    assert not checker.mac1_valid(other_jar.add_macs(_initiation(), 0.0), INITIATION_MAC1_OFFSET)


# --- cookie reply round trip ----------------------------------------------------------------


def _cookie_round(checker: CookieChecker, jar: CookieJar, now: float, source: bytes = SOURCE) -> bytes:
    """The initiator sends, the loaded responder answers with a cookie, the initiator stores it."""
    msg = jar.add_macs(_initiation(), now)
    reply = checker.create_reply(msg, 0x11223344, INITIATION_MAC1_OFFSET, source, now)
    assert jar.consume_reply(CookieReply.parse(reply), now)
    return reply


def test_reply_layout_and_cookie_by_definition(responder, rng, checker, jar) -> None:
    msg = jar.add_macs(_initiation(sender=0xCAFEF00D), 5.0)
    assert not checker.mac2_valid(msg, INITIATION_MAC1_OFFSET, SOURCE, 5.0)
    reply = CookieReply.parse(checker.create_reply(msg, 0xCAFEF00D, INITIATION_MAC1_OFFSET, SOURCE, 5.0))
    assert reply.receiver == 0xCAFEF00D
    secret = next(d for d in rng.draws if len(d) == 32)
    cookie_key = _blake2s(b"cookie--" + responder.public)
    mac1 = msg[INITIATION_MAC1_OFFSET : INITIATION_MAC1_OFFSET + 16]
    cookie = xaead_decrypt(cookie_key, reply.nonce, reply.encrypted_cookie, mac1)
    assert cookie == _mac(secret, SOURCE)
    assert reply.nonce in rng.draws  # a fresh random nonce per reply


@pytest.mark.parametrize(("make", "offset"), [(_initiation, INITIATION_MAC1_OFFSET), (_response, RESPONSE_MAC1_OFFSET)])
def test_cookie_round_trip_gives_a_valid_mac2(checker, jar, make, offset: int) -> None:
    msg = jar.add_macs(make(), 1.0)
    reply = checker.create_reply(msg, 7, offset, SOURCE, 1.0)
    assert jar.consume_reply(CookieReply.parse(reply), 1.5)
    msg = jar.add_macs(make(), 2.0)
    assert msg[offset + 16 :] != bytes(16)
    assert checker.mac1_valid(msg, offset)
    assert checker.mac2_valid(msg, offset, SOURCE, 2.0)
    assert not checker.mac2_valid(msg, offset, OTHER_SOURCE, 2.0)  # the cookie is bound to the address
    assert not checker.mac2_valid(msg, offset, source_bytes(("192.0.2.10", 51821)), 2.0)  # and port


def test_mac2_by_definition(rng, checker, jar) -> None:
    _cookie_round(checker, jar, 0.0)
    secret = next(d for d in rng.draws if len(d) == 32)
    msg = jar.add_macs(_initiation(), 1.0)
    assert msg[132:] == _mac(_mac(secret, SOURCE), msg[:132])


def test_mac2_fails_on_any_changed_byte(checker, jar) -> None:
    _cookie_round(checker, jar, 0.0)
    msg = jar.add_macs(_initiation(), 1.0)
    for position in range(len(msg)):
        tampered = bytearray(msg)
        tampered[position] ^= 0x10
        assert not checker.mac2_valid(bytes(tampered), INITIATION_MAC1_OFFSET, SOURCE, 1.0), position


def test_reply_is_accepted_once(checker, jar) -> None:
    reply = _cookie_round(checker, jar, 0.0)
    assert not jar.consume_reply(CookieReply.parse(reply), 0.1)


def test_reply_only_for_the_last_message_sent(checker, jar) -> None:
    first = jar.add_macs(_initiation(), 0.0)
    second = jar.add_macs(_initiation(), 0.1)
    reply_to_first = checker.create_reply(first, 1, INITIATION_MAC1_OFFSET, SOURCE, 0.2)
    reply_to_second = checker.create_reply(second, 1, INITIATION_MAC1_OFFSET, SOURCE, 0.2)
    assert not jar.consume_reply(CookieReply.parse(reply_to_first), 0.3)
    assert jar.consume_reply(CookieReply.parse(reply_to_second), 0.3)


def test_reply_before_any_message_is_refused(checker, jar) -> None:
    msg = CookieJar(os.urandom(32)).add_macs(_initiation(), 0.0)
    reply = checker.create_reply(msg, 1, INITIATION_MAC1_OFFSET, SOURCE, 0.0)
    assert not jar.consume_reply(CookieReply.parse(reply), 0.0)


def test_forged_or_foreign_replies_are_refused(responder, checker, jar) -> None:
    msg = jar.add_macs(_initiation(), 0.0)
    genuine = checker.create_reply(msg, 1, INITIATION_MAC1_OFFSET, SOURCE, 0.0)
    for position in range(8, 64):  # nonce and encrypted cookie
        tampered = bytearray(genuine)
        tampered[position] ^= 0x01
        assert not jar.consume_reply(CookieReply.parse(bytes(tampered)), 0.0), position
    stranger = CookieChecker(StaticKey(os.urandom(32)).public, os.urandom)
    foreign = stranger.create_reply(msg, 1, INITIATION_MAC1_OFFSET, SOURCE, 0.0)
    assert not jar.consume_reply(CookieReply.parse(foreign), 0.0)
    assert jar.consume_reply(CookieReply.parse(genuine), 0.0)  # refusals left the jar waiting


def test_secret_rotates_every_120_seconds(checker, jar) -> None:
    assert COOKIE_SECRET_LIFETIME == 120.0
    _cookie_round(checker, jar, 0.0)
    _cookie_round(checker, jar, 100.0)  # secret from t=0: the jar now holds a cookie fresh until 220
    msg = jar.add_macs(_initiation(), 119.9)
    assert checker.mac2_valid(msg, INITIATION_MAC1_OFFSET, SOURCE, 119.9)
    msg = jar.add_macs(_initiation(), 120.0)
    assert msg[132:] != bytes(16)  # the jar still uses its cookie...
    assert not checker.mac2_valid(msg, INITIATION_MAC1_OFFSET, SOURCE, 120.0)  # ...but the secret rotated
    _cookie_round(checker, jar, 120.5)
    msg = jar.add_macs(_initiation(), 121.0)
    assert checker.mac2_valid(msg, INITIATION_MAC1_OFFSET, SOURCE, 121.0)


def test_cookie_is_used_only_while_fresh(checker, jar) -> None:
    assert COOKIE_LIFETIME == 120.0
    _cookie_round(checker, jar, 10.0)
    assert jar.add_macs(_initiation(), 129.99)[132:] != bytes(16)
    assert jar.add_macs(_initiation(), 130.0)[132:] == bytes(16)
    assert jar.add_macs(_initiation(), 1000.0)[132:] == bytes(16)


def test_source_bytes() -> None:
    assert source_bytes(("192.0.2.1", 51820)) == bytes([192, 0, 2, 1]) + (51820).to_bytes(2, "big")
    v6 = source_bytes(("2001:db8::1", 443, 0, 0))
    assert v6 == bytes.fromhex("20010db8000000000000000000000001") + (443).to_bytes(2, "big")
    assert source_bytes(("fe80::1%eth0", 1, 0, 2)) == bytes.fromhex("fe800000000000000000000000000001") + b"\x00\x01"


# --- under load -----------------------------------------------------------------------------


def test_load_threshold_and_hold() -> None:
    monitor = LoadMonitor(threshold=10)
    assert monitor.threshold == 10
    for _ in range(10):
        monitor.record(5.0)
    assert not monitor.under_load(5.0)
    monitor.record(5.0)  # the 11th within one second
    assert monitor.under_load(5.0)
    assert monitor.under_load(5.999)
    assert not monitor.under_load(6.0)  # held for exactly one second after the last excess


def test_load_counts_a_sliding_second() -> None:
    """threshold + 1 messages within any one second trigger, even across a second boundary."""
    monitor = LoadMonitor(threshold=10)
    monitor.record(0.0)
    for _ in range(5):
        monitor.record(0.995)
    assert not monitor.under_load(0.995)
    for _ in range(5):
        monitor.record(1.0)
    assert not monitor.under_load(1.0)  # 11 messages, but the first is exactly one second old
    monitor.record(1.001)
    assert monitor.under_load(1.001)  # 11 within (0.001, 1.001]


def test_load_spread_over_more_than_a_second_is_not_load() -> None:
    monitor = LoadMonitor(threshold=10)
    interval = 1.001 / 10  # a steady 10 per second, just under the threshold
    for i in range(200):
        monitor.record(i * interval)
        assert not monitor.under_load(i * interval), i


def test_sustained_flood_stays_under_load_then_recovers() -> None:
    monitor = LoadMonitor(threshold=5)
    now = 0.0
    for _ in range(1000):
        now += 0.01  # 100 per second
        monitor.record(now)
    assert monitor.under_load(now)
    assert monitor.under_load(now + 0.99)
    assert not monitor.under_load(now + 1.0)


def test_force_holds_the_load() -> None:
    monitor = LoadMonitor(threshold=100)
    assert not monitor.under_load(0.0)
    monitor.force = True
    assert monitor.under_load(0.0)
    assert monitor.under_load(1e9)
    monitor.force = False
    assert not monitor.under_load(1e9)


# --- rate limit -----------------------------------------------------------------------------


def test_burst_of_five_then_refused() -> None:
    limiter = RateLimiter()
    assert [limiter.allow(SOURCE, 0.0) for _ in range(7)] == [True] * 5 + [False] * 2


def test_refill_at_20_per_second() -> None:
    limiter = RateLimiter()
    for _ in range(5):
        assert limiter.allow(SOURCE, 0.0)
    assert not limiter.allow(SOURCE, 0.0)
    assert not limiter.allow(SOURCE, 0.049)
    assert limiter.allow(SOURCE, 0.051)  # one token every 50 ms
    assert not limiter.allow(SOURCE, 0.052)
    assert [limiter.allow(SOURCE, 10.0) for _ in range(6)] == [True] * 5 + [False]  # capped at the burst


def test_steady_rate_is_20_per_second() -> None:
    limiter = RateLimiter()
    allowed = sum(limiter.allow(SOURCE, i * 0.001) for i in range(10_000))  # 1000/s for 10 s
    assert 5 + 20 * 10 - 2 <= allowed <= 5 + 20 * 10 + 1


def test_ports_share_a_bucket_and_addresses_do_not() -> None:
    limiter = RateLimiter()
    for port in range(5):
        assert limiter.allow(source_bytes(("198.51.100.7", 1000 + port)), 0.0)
    assert not limiter.allow(source_bytes(("198.51.100.7", 2000)), 0.0)
    assert limiter.allow(source_bytes(("198.51.100.8", 1000)), 0.0)


def test_ipv6_sources_are_grouped_by_64() -> None:
    limiter = RateLimiter()
    same_64 = ["2001:db8:1::1", "2001:db8:1::2", "2001:db8:1:0:ffff::1", "2001:db8:1::abcd", "2001:db8:1::9"]
    for address in same_64:
        assert limiter.allow(source_bytes((address, 51820, 0, 0)), 0.0)
    assert not limiter.allow(source_bytes(("2001:db8:1:0:1234::1", 1, 0, 0)), 0.0)
    assert limiter.allow(source_bytes(("2001:db8:1:1::1", 51820, 0, 0)), 0.0)  # the next /64
    assert limiter.allow(source_bytes(("192.0.2.1", 51820)), 0.0)


def _flood_source(i: int) -> bytes:
    """A distinct /64 per i, packed as source_bytes packs an IPv6 source."""
    return b"\x20\x01\x0d\xb8" + i.to_bytes(4, "big") + bytes(8) + (51820).to_bytes(2, "big")


def test_table_is_capped_under_a_flood_of_distinct_sources() -> None:
    limiter = RateLimiter()
    cap = RateLimiter.MAX_ENTRIES
    tracemalloc.start()
    try:
        for i in range(2 * cap):  # full, and the dict has reached its working size
            assert limiter.allow(_flood_source(i), 0.0)
        settled, _ = tracemalloc.get_traced_memory()
        for i in range(2 * cap, 10 * cap):
            assert limiter.allow(_flood_source(i), 0.0)
            assert len(limiter) <= cap
        flooded, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(limiter) == cap
    assert flooded < settled * 1.05


def test_active_sources_survive_the_flood_longest() -> None:
    """Eviction takes the least recently seen source, so an exhausted attacker stays exhausted."""
    limiter = RateLimiter()
    for _ in range(5):
        assert limiter.allow(SOURCE, 0.0)
    for i in range(RateLimiter.MAX_ENTRIES - 1):
        limiter.allow(_flood_source(i), 0.0)
    assert not limiter.allow(SOURCE, 0.0)  # still tracked, still out of tokens
    assert len(limiter) == RateLimiter.MAX_ENTRIES


# --- cookie-reply budget ------------------------------------------------------------------


def test_cookie_replies_per_source_burst_then_two_a_second() -> None:
    budget = CookieReplyBudget()
    assert [budget.allow(SOURCE, 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert budget.allow(OTHER_SOURCE, 0.0)  # another address has its own budget
    allowed = sum(budget.allow(source_bytes(("192.0.2.10", 1024 + i % 4096)), 1.0 + i * 0.0001)
                  for i in range(100_000))  # 10k a second for 10 s, from thousands of ports
    assert 2 * 10 - 1 <= allowed <= 2 * 10 + 1


def test_cookie_replies_are_capped_for_all_sources_together() -> None:
    budget = CookieReplyBudget()
    sources = [_flood_source(i) for i in range(3000)]
    assert sum(budget.allow(source, 0.0) for source in sources) == CookieReplyBudget.GLOBAL_BURST
    allowed = sum(budget.allow(sources[i % 3000], 10.0 + i / 10_000) for i in range(20_000))  # 2 s
    assert allowed <= CookieReplyBudget.GLOBAL_BURST + 2 * CookieReplyBudget.GLOBAL_RATE + 1
    assert len(budget) <= RateLimiter.MAX_ENTRIES


def test_a_reply_the_global_cap_refuses_costs_its_source_nothing() -> None:
    budget = CookieReplyBudget()
    flood = [_flood_source(i) for i in range(int(CookieReplyBudget.GLOBAL_BURST))]
    assert all(budget.allow(source, 0.0) for source in flood)  # the global tokens are gone
    assert not any(budget.allow(SOURCE, 0.0) for _ in range(10))  # refused by the cap, all of them
    later = 1.0 / CookieReplyBudget.GLOBAL_RATE * CookieReplyBudget.PER_SOURCE_BURST  # tokens for 5
    assert [budget.allow(SOURCE, later) for _ in range(5)] == [True] * 5  # its own burst is whole


def test_an_all_zero_mac2_is_never_valid_and_the_cookie_memo_stays_bounded() -> None:
    checker = CookieChecker(StaticKey(os.urandom(32)).public, RecordingRandom())
    body = bytes(INITIATION_MAC1_OFFSET)
    assert not checker.mac2_valid(body + bytes(32), INITIATION_MAC1_OFFSET, SOURCE, 0.0)
    for i in range(10_000):
        checker.mac2_valid(body + bytes(16) + b"\x01" * 16, INITIATION_MAC1_OFFSET, _flood_source(i), 0.0)
    assert len(checker._cookies) <= 4096

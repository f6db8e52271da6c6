"""The per-peer log limit: a burst per window, and a table that sheds only expired windows."""

from __future__ import annotations

from tunvpn.daemon import PeerLogLimit


def key(n: int) -> bytes:
    return n.to_bytes(32, "big")


def test_a_burst_per_window_then_a_new_window():
    limit = PeerLogLimit(burst=2, window=10.0)
    assert [limit.allow(key(1), "x", t) for t in (0.0, 1.0, 2.0)] == [True, True, False]
    assert limit.allow(key(1), "x", 10.5)


def test_the_table_drops_expired_windows_only_and_keeps_live_counts():
    limit = PeerLogLimit(burst=1, window=10.0)
    half = limit.MAX_TRACKED // 2
    for n in range(limit.MAX_TRACKED):
        limit.allow(key(n), "x", 0.0 if n < half else 5.0)
    limit.allow(key(1), "x", 12.0)  # renewed: its new window is the youngest
    limit.allow(key(10**6), "x", 12.0)  # the table is full: the windows from 0.0 go, but key 1's
    assert len(limit._windows) == half + 2
    assert not limit.allow(key(half), "x", 12.0)  # started at 5.0, still live, its line used
    assert not limit.allow(key(1), "x", 12.5)
    assert limit.allow(key(0), "x", 12.5)  # forgotten: a fresh window


def test_thousands_of_live_windows_are_all_kept():
    limit = PeerLogLimit(burst=1, window=60.0)
    count = limit.MAX_TRACKED + 3000
    assert all(limit.allow(key(n), "x", n / 1000) for n in range(count))
    assert len(limit._windows) == count
    assert not any(limit.allow(key(n), "x", 10.0) for n in range(count))

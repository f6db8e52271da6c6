"""A tunvpn daemon on a fast clock: the test entry that lets a test outlast the protocol's
minutes-long timers (REJECT_AFTER_TIME 180 s, REKEY_ATTEMPT_TIME 90 s, the client's 60 s
reconnect backoff) in a fraction of the time.

    python tests/scaledclock.py server -c office.conf ...    (with TUNVPN_TEST_TIME_SCALE=6)

Only this entry reads TUNVPN_TEST_TIME_SCALE; tunvpn itself has no such knob.  The core is
untouched: it is pure and takes `now` from its caller, so a daemon whose monotonic clock runs
SCALE times as fast drives every protocol timer SCALE times as fast.  The event loop's waits
are divided by SCALE to match, so a deadline 5 (scaled) seconds away is 5 / SCALE real seconds
away.  The wall clock stays real: TAI64N timestamps, leases and the state file are as in
production.
"""

from __future__ import annotations

import os
import selectors
import sys
import time

SCALE_VARIABLE = "TUNVPN_TEST_TIME_SCALE"


def install(scale: float) -> None:
    """From now on, time.monotonic() runs `scale` times as fast, and selector waits shrink."""
    real = time.monotonic
    origin = real()
    time.monotonic = lambda: origin + (real() - origin) * scale
    selector = selectors.DefaultSelector
    real_select = selector.select

    def select(self, timeout=None):
        return real_select(self, None if timeout is None else timeout / scale)

    selector.select = select


def main() -> int:
    scale = float(os.environ[SCALE_VARIABLE])
    if not scale >= 1.0:
        raise SystemExit(f"{SCALE_VARIABLE} must be at least 1, not {scale}")
    install(scale)
    from tunvpn.cli import main as tunvpn_main

    return tunvpn_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())

"""tunvpn's control extension, carried inside authenticated transport messages.

A control message starts with CONTROL_MARKER, whose high nibble (7) is
neither 4 nor 6, so a stock WireGuard peer drops it as "not an IP packet".
"""

from __future__ import annotations

CONTROL_MARKER = 0x7A

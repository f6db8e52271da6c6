"""tunvpn: a hardened VPN in Python that speaks the WireGuard wire protocol."""

__version__ = "0.1.0"

"""The WireGuard protocol core: pure state machines, no sockets, no clock, no root."""

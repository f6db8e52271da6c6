"""Filters the role needs that ansible-core lacks (ansible.utils.ipaddr is a collection)."""

from __future__ import annotations

import ipaddress


def tunvpn_network(interface: str) -> str:
    """'203.0.113.1/24' -> '203.0.113.0/24': the subnet an address with prefix length lies in."""
    return str(ipaddress.ip_interface(interface).network)


class FilterModule:
    def filters(self) -> dict:
        return {"tunvpn_network": tunvpn_network}

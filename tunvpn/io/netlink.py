"""Configure the daemon's own tun device over rtnetlink: MTU, addresses, link up, routes.

Everything this module adds is remembered so that `undo()` removes exactly that and nothing
the administrator or the kernel put there.  It only needs `IPRoute()` in the calling process's
own network namespace, which pyroute2 0.7.x (Debian) and 0.9.x (PyPI) both provide.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network, ip_address
from typing import Any, Callable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as _PyrouteNetlinkError

IPInterface = IPv4Interface | IPv6Interface
IPNetwork = IPv4Network | IPv6Network

IFA_F_NODAD = 0x02
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
RTN_UNICAST = 1
# What the kernel uses when a route is added without a metric (IPv4 has no default, IPv6 1024).
_DEFAULT_METRIC = {4: 0, 6: 1024}

_ADDRESS_GONE = frozenset({errno.ENODEV, errno.EADDRNOTAVAIL})
_ROUTE_GONE = frozenset({errno.ENODEV, errno.ESRCH})


class NetlinkError(Exception):
    """A netlink operation failed; the message is one line naming the operation and object."""


def _error_code(exc: BaseException) -> int | None:
    code = exc.code if isinstance(exc, _PyrouteNetlinkError) else getattr(exc, "errno", None)
    return code if isinstance(code, int) else None


def _describe(exc: BaseException) -> str:
    """One line: the errno's text and symbol when there is one."""
    code = _error_code(exc)
    if code is not None and code > 0:
        return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class _Undo:
    """One change to revert: what it was (for messages), how to revert it, which errors mean 'already gone'."""

    description: str
    revert: Callable[[], Any]
    gone_codes: frozenset[int]


class LinkSetup:
    """Configures one network device and remembers what it added."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        try:
            self._ipr: IPRoute | None = IPRoute()
        except OSError as exc:
            raise NetlinkError(f"cannot open a netlink socket: {_describe(exc)}") from exc
        try:
            indices = self._ipr.link_lookup(ifname=ifname)
        except (_PyrouteNetlinkError, OSError) as exc:
            self.close()
            raise NetlinkError(f"cannot look up network device {ifname!r}: {_describe(exc)}") from exc
        if not indices:
            self.close()
            raise NetlinkError(f"no network device named {ifname!r}")
        self.index: int = indices[0]
        self._undo_stack: list[_Undo] = []

    def _netlink(self) -> IPRoute:
        if self._ipr is None:
            raise NetlinkError(f"netlink configuration of {self.ifname!r} is closed")
        return self._ipr

    def _call(self, operation: str, request: Callable[[], Any]) -> None:
        """Run one request; turn any failure into a NetlinkError that names `operation`."""
        try:
            request()
        except (_PyrouteNetlinkError, OSError) as exc:
            raise NetlinkError(f"cannot {operation}: {_describe(exc)}") from exc

    def set_mtu(self, mtu: int) -> None:
        ipr = self._netlink()
        self._call(f"set MTU {mtu} on {self.ifname}", lambda: ipr.link("set", index=self.index, mtu=mtu))

    def set_up(self) -> None:
        ipr = self._netlink()
        self._call(f"bring {self.ifname} up", lambda: ipr.link("set", index=self.index, state="up"))

    def add_address(self, iface: IPInterface) -> None:
        """Add an address; IPv6 without duplicate address detection, so it is usable at once.

        An identical address already on the device is left alone and not remembered: it is
        not ours to remove.
        """
        ipr = self._netlink()
        fields = dict(index=self.index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        flags = IFA_F_NODAD if iface.version == 6 else 0
        try:
            ipr.addr("add", flags=flags, **fields)
        except (_PyrouteNetlinkError, OSError) as exc:
            if _error_code(exc) == errno.EEXIST:
                return
            raise NetlinkError(f"cannot add address {iface} to {self.ifname}: {_describe(exc)}") from exc
        self._undo_stack.append(_Undo(f"remove address {iface} from {self.ifname}",
                                      lambda: ipr.addr("del", **fields), _ADDRESS_GONE))

    def add_route(self, network: IPNetwork, metric: int | None = None) -> None:
        """Route `network` into the device (main table).

        When the kernel already routes exactly that network into this device, typically the
        prefix route of an address added here, nothing is added and nothing is remembered.
        Routes need the device up (the kernel answers ENETDOWN otherwise).
        """
        ipr = self._netlink()
        used_metric = _DEFAULT_METRIC[network.version] if metric is None else metric
        if self._has_route(network, metric):
            return
        fields: dict[str, Any] = dict(dst=str(network), oif=self.index, table=RT_TABLE_MAIN, priority=used_metric)
        if network.version == 4:
            fields["scope"] = RT_SCOPE_LINK  # as `ip route add NET dev IF` does
        self._call(f"add route {network} via {self.ifname}", lambda: ipr.route("add", **fields))
        # Delete with the very same fields: IPv4 matches the scope too, and a mismatch would
        # look like "already gone" (ESRCH) and leave the route behind.
        self._undo_stack.append(_Undo(f"remove route {network} via {self.ifname}",
                                      lambda: ipr.route("del", **fields), _ROUTE_GONE))

    def _has_route(self, network: IPNetwork, metric: int | None) -> bool:
        """Whether the main table already routes exactly `network` into this device."""
        ipr = self._netlink()
        family = socket.AF_INET if network.version == 4 else socket.AF_INET6
        routes: list[Any] = []
        self._call(f"list routes of {self.ifname}", lambda: routes.extend(ipr.get_routes(family=family)))
        for route in routes:
            table = route.get_attr("RTA_TABLE") or route["table"]
            destination = route.get_attr("RTA_DST")  # absent for a default route
            if (
                table == RT_TABLE_MAIN
                and route["type"] == RTN_UNICAST
                and route.get_attr("RTA_OIF") == self.index
                and route["dst_len"] == network.prefixlen
                and (destination is None or ip_address(destination) == network.network_address)
                and (metric is None or (route.get_attr("RTA_PRIORITY") or 0) == metric)
            ):
                return True
        return False

    def undo(self) -> None:
        """Remove what this object added, newest first.

        Things already gone (the device vanished with its tun descriptor, an administrator
        removed an address) are fine; every other failure is reported after all were tried.
        """
        if self._undo_stack:
            self._netlink()  # fail clearly when closed with changes left to revert
        failures: list[str] = []
        while self._undo_stack:
            change = self._undo_stack.pop()
            try:
                change.revert()
            except (_PyrouteNetlinkError, OSError) as exc:
                if _error_code(exc) not in change.gone_codes:
                    failures.append(f"cannot {change.description}: {_describe(exc)}")
        if failures:
            raise NetlinkError("; ".join(failures))

    def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    def __enter__(self) -> LinkSetup:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""Configure the daemon's own tun device over rtnetlink: MTU, addresses, link up, routes,
and the policy routing of a full tunnel.

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
from pathlib import Path
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
_RULE_GONE = frozenset({errno.ENOENT})

# Full tunnel.
FIB_RULE_INVERT = 0x2  # `ip rule add not ...`
# Just before the main table's rule (32766), the suppressing rule first: where wg-quick's rules
# land on a system without other rules.  Fixed numbers let undo() delete exactly our rules.
SUPPRESS_RULE_PRIORITY = 32764
UNMARKED_RULE_PRIORITY = 32765
SRC_VALID_MARK = Path("/proc/sys/net/ipv4/conf/all/src_valid_mark")
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
_DEFAULT_DESTINATION = {4: "0.0.0.0/0", 6: "::/0"}


class NetlinkError(Exception):
    """A netlink operation failed; the message is one line naming the operation and object."""

    @property
    def code(self) -> int | None:
        """The kernel's errno behind it, so callers can say what the admin can do about it."""
        return None if self.__cause__ is None else _error_code(self.__cause__)


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
    key: tuple = ()  # what remove_address/remove_route look it up by


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
                                      lambda: ipr.addr("del", **fields), _ADDRESS_GONE, ("address", iface)))

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
                                      lambda: ipr.route("del", **fields), _ROUTE_GONE, ("route", network)))

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

    def add_full_tunnel(self, version: int, table: int, fwmark: int) -> None:
        """Send all IPv4 (`version` 4) or IPv6 (6) traffic into the device, except packets marked `fwmark`.

        A default route in the main table would also capture the encrypted datagrams to the
        server.  So, as wg-quick does: the default route goes into its own `table`; the rule
        `not fwmark FWMARK lookup TABLE` sends every unmarked packet there, while the UDP
        socket's packets (SO_MARK = `fwmark`) fall through to the main table and leave by the
        underlay; a rule before it, `lookup main suppress_prefixlength 0`, lets every
        main-table route except default routes win first (the LAN, the tunnel subnet).  For
        IPv4 `net.ipv4.conf.all.src_valid_mark` becomes 1 (this namespace only), as wg-quick
        sets it: reverse-path filtering then looks at a packet's mark.  That helps only once
        the server's replies carry the mark, which takes a connmark rule in the firewall
        (wg-quick adds one with nft; this module does not).  Without it, strict reverse-path
        filtering (rp_filter=1) drops replies from a server reached by the default route,
        since the unmarked reverse lookup points into the tun; loose (2, the default of
        Debian's and Ubuntu's systemd) and off (0) are fine.

        A rule identical to one of ours found in place (left by a crashed run) is taken over:
        kept, and removed by `undo()` like one we added.  A default route already in `table`
        is an error: some other tunnel uses that table.  The device must be up.
        """
        if version not in _FAMILIES:
            raise ValueError(f"IP version must be 4 or 6, not {version!r}")
        if not fwmark:
            raise NetlinkError(f"full tunnel on {self.ifname} needs a non-zero fwmark on the UDP socket")
        if version == 4:
            self._enable_src_valid_mark()
        self._add_table_default_route(version, table)
        family = _FAMILIES[version]
        self._add_rule(f"IPv{version} rule 'lookup main suppress_prefixlength 0'",
                       dict(family=family, priority=SUPPRESS_RULE_PRIORITY, table=RT_TABLE_MAIN,
                            suppress_prefixlen=0))
        self._add_rule(f"IPv{version} rule 'not fwmark {fwmark:#x} lookup {table}'",
                       dict(family=family, priority=UNMARKED_RULE_PRIORITY, table=table, fwmark=fwmark,
                            flags=FIB_RULE_INVERT))

    def _add_table_default_route(self, version: int, table: int) -> None:
        ipr = self._netlink()
        fields: dict[str, Any] = dict(dst=_DEFAULT_DESTINATION[version], oif=self.index, table=table,
                                      priority=_DEFAULT_METRIC[version], family=_FAMILIES[version])
        if version == 4:
            fields["scope"] = RT_SCOPE_LINK
        what = f"IPv{version} default route via {self.ifname} in table {table}"
        try:
            ipr.route("add", **fields)
        except (_PyrouteNetlinkError, OSError) as exc:
            if _error_code(exc) == errno.EEXIST:
                raise NetlinkError(f"cannot add {what}: the table already has one "
                                   f"(another tunnel uses table {table}?)") from exc
            raise NetlinkError(f"cannot add {what}: {_describe(exc)}") from exc
        self._undo_stack.append(_Undo(f"remove {what}", lambda: ipr.route("del", **fields), _ROUTE_GONE))

    def _add_rule(self, what: str, fields: dict[str, Any]) -> None:
        """Add a routing rule (or take over an identical stale one) and remember to delete it.

        Deleting with every field, priority included, removes this rule and no look-alike.
        """
        ipr = self._netlink()
        try:
            ipr.rule("add", **fields)
        except (_PyrouteNetlinkError, OSError) as exc:
            if _error_code(exc) != errno.EEXIST:
                raise NetlinkError(f"cannot add {what}: {_describe(exc)}") from exc
        self._undo_stack.append(_Undo(f"remove {what}", lambda: ipr.rule("del", **fields), _RULE_GONE))

    def _enable_src_valid_mark(self) -> None:
        try:
            previous = SRC_VALID_MARK.read_text().strip()
            if previous == "1":
                return
            SRC_VALID_MARK.write_text("1")
        except OSError as exc:
            raise NetlinkError(f"cannot set net.ipv4.conf.all.src_valid_mark=1: {_describe(exc)}") from exc
        self._undo_stack.append(_Undo(f"restore net.ipv4.conf.all.src_valid_mark={previous}",
                                      lambda: self._restore_src_valid_mark(previous), frozenset()))

    def _restore_src_valid_mark(self, previous: str) -> None:
        """Put the old value back, unless another fwmark rule (another tunnel) still relies on marks.

        Runs after our own rules are gone: undo() reverts newest first.
        """
        if not any(rule.get_attr("FRA_FWMARK") for rule in self._netlink().get_rules(family=socket.AF_INET)):
            SRC_VALID_MARK.write_text(previous)

    def remove_address(self, iface: IPInterface) -> bool:
        """Take back an address this object added (False if it did not add it)."""
        return self._revert_now(("address", iface))

    def remove_route(self, network: IPNetwork) -> bool:
        """Take back a route this object added (False if it did not add it)."""
        return self._revert_now(("route", network))

    def _revert_now(self, key: tuple) -> bool:
        for position, change in enumerate(self._undo_stack):
            if change.key == key:
                del self._undo_stack[position]
                try:
                    change.revert()
                except (_PyrouteNetlinkError, OSError) as exc:
                    if _error_code(exc) not in change.gone_codes:
                        raise NetlinkError(f"cannot {change.description}: {_describe(exc)}") from exc
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

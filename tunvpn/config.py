"""wg-quick style configuration files, with every error reported as `FILE:LINE: KEY: reason`.

configparser loses repeated [Peer] sections and line numbers, so this is a small parser of our
own. Each section has a declarative table of keys (value parser, default, whether it repeats):
a new key is one `Key` entry plus the dataclass field it fills, and the roles (server, client)
it means something in; a key of the other role is an error, never silently ignored. Keys that
only wg-quick implements are refused by name for the same reason: nobody should believe a
PostUp ran.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
import socket
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, TypeVar

from .invitetoken import MAX_ENDPOINTS
from .keys import decode_key, derive_public_key, encode_key
from .protocol.control import MAX_DNS_SERVERS, MAX_ROUTES, MAX_SEARCH_DOMAINS, ConfigPush, ControlError, encode
from .protocol.device import DEFAULT_MTU
from .totp import decode_secret

T = TypeVar("T")
ROLES = ("server", "client")
DEFAULT_SERVER_PORT = 51820
MIN_MTU = 576
MIN_IPV6_MTU = 1280
MAX_MTU = 65535
DEVICE_PREFIX = "tv-"
MAX_DEVICE_NAME_BYTES = 15  # IFNAMSIZ - 1
MAX_CONFIG_BYTES = 1 << 20
MAX_KEY_FILE_BYTES = 4096
REDACTED = "(redacted)"
DEFAULT_STATE_ROOT = "/var/lib/tunvpn"
DEFAULT_PUSH_KEEPALIVE = 25
DEFAULT_TOTP_SESSION = 12 * 3600
MAX_TOTP_SESSION = 366 * 86400

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- public results -----------------------------------------------------------------------------

@dataclass(frozen=True)
class InterfaceConfig:
    """[Interface]. Server-only fields are empty/None in a client config, and the other way round."""

    private_key: bytes = field(repr=False)  # never in logs
    listen_port: int | None
    addresses: list[IPInterface]
    mtu: int
    device: str
    # server: client addresses by IP version (4, 6) -> (first, last), both inclusive. The server's
    # own address may lie inside (the pool skips it). Without a Pool line: every usable address of
    # the first Address subnet of that version with room for clients.
    pools: dict[int, tuple[IPAddress, IPAddress]] = field(default_factory=dict)
    push_routes: list[IPNetwork] = field(default_factory=list)
    push_dns: list[IPAddress] = field(default_factory=list)
    push_dns_search: list[str] = field(default_factory=list)
    client_to_client: bool | None = None
    state_directory: str | None = None
    push_keepalive: int | None = None
    # client: the DNS line, split the wg-quick way into servers and search domains
    dns: list[IPAddress] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    # whether the MTU line was written: a client lets a pushed MTU replace only the default
    mtu_configured: bool = False
    # server: the rate limit (bits a second, 0 for none) and access rules of peers without their own
    default_rate_limit: int | None = None
    default_access: list[IPNetwork] = field(default_factory=list)
    # Prometheus metrics: served over HTTP at this (address, port), and/or written to this file
    metrics_listen: tuple[str, int] | None = None
    metrics_file: str | None = None
    # server: how long an accepted second factor authorizes a peer without its own TOTPSession
    totp_session: int | None = None
    # server: where clients reach it ("host:port", "[v6]:port"), what `tunvpn invite` hands out
    public_endpoints: list[str] = field(default_factory=list)

    def pool_subnet(self, version: int) -> IPInterface | None:
        """The server Address whose subnet holds the pool: pushed addresses take its prefix length."""
        pool = self.pools.get(version)
        if pool is None:
            return None
        return next((address for address in self.addresses if _holds(address.network, *pool)), None)


@dataclass(frozen=True)
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = field(repr=False)
    allowed_ips: list[IPNetwork]
    endpoint: tuple[str, int] | None  # as written: host unresolved, IPv6 without brackets
    endpoint_address: tuple | None  # socket address, when resolved at load
    persistent_keepalive: int
    line: int  # the [Peer] header, so later errors can point at it
    name: str | None = None  # for people and dashboards (show, metrics labels)
    rate_limit: int | None = None  # server: bits a second each way; 0 lifts DefaultRateLimit; None: the default
    access: list[IPNetwork] = field(default_factory=list)  # server: where the client may go; []: DefaultAccess
    totp: bool = False  # server: the peer's traffic waits for a TOTP code (a second factor)
    totp_secret_file: str | None = None  # server: where its secret is (TOTPSecretFile, or the default)
    totp_session: int | None = None  # server: seconds a code authorizes it; None: the [Interface]'s
    totp_secret: bytes | None = field(default=None, repr=False)  # read from totp_secret_file at load
    source: str | None = None  # server: the peers-directory file it came from; None: the main config


@dataclass(frozen=True)
class Config:
    path: str
    name: str
    role: str
    interface: InterfaceConfig
    peers: list[PeerConfig]


class Identity(NamedTuple):
    """Who the daemon runs as: whose files it trusts besides root's, and which group may read its keys."""

    uid: int
    gid: int


def running_identity() -> Identity:
    """This process's effective user and group: the daemon's, when the daemon loads its config."""
    return Identity(os.geteuid(), os.getegid())


class ConfigError(Exception):
    """A bad config, as one line: `FILE:LINE: KEY: reason` (LINE 0 = the whole file, KEY optional)."""

    def __init__(self, path: str, line: int, key: str | None, reason: str) -> None:
        key = None if key is None else redact(key)
        reason = redact(reason)
        super().__init__(path, line, key, reason)
        self.path = path
        self.line = line
        self.key = key
        self.reason = reason

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        text = f"{where}: {self.key}: {self.reason}" if self.key else f"{where}: {self.reason}"
        return one_line(text)


class ConfigErrors(ConfigError):
    """Every error found in one file, as a compiler reports them; `errors` lists each as found.

    Where one line must do (a daemon's log) the first stands for all and says how many follow.
    """

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        first = self.errors[0]
        super().__init__(first.path, first.line, first.key, first.reason)

    def __str__(self) -> str:
        text = super().__str__()
        more = len(self.errors) - 1
        return f"{text} (and {more} more; `tunvpn check-config {self.path}` lists them all)" if more else text


def _collecting(errors: list[ConfigError], check: Callable[..., T], *args: Any) -> T | None:
    """Run one check; a ConfigError joins `errors` and the next check still runs."""
    try:
        return check(*args)
    except ConfigErrors as exc:
        errors.extend(exc.errors)
    except ConfigError as exc:
        errors.append(exc)
    return None


def _raise_any(errors: list[ConfigError]) -> None:
    if errors:
        raise ConfigErrors(errors) if len(errors) > 1 else errors[0]


# A 32-byte key is 43 base64 characters and a '='. Any run of 43 or more base64 characters and '='
# is taken for one: that also covers keys glued to each other or to other text, and a key cut from
# its '=' where a line was split there.
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/=]{43,}")


def _is_key_shaped(run: str) -> bool:
    """A random key mixes upper and lower case (all but 4 in 10^10 do); the long runs of file paths
    and DNS names that are not keys mostly do not, and stay readable."""
    return any(ch.isupper() for ch in run) and any(ch.islower() for ch in run)


def redact(text: str) -> str:
    """`text` with every key-shaped run replaced: no message may carry a private key or PSK."""
    return _BASE64_RUN.sub(lambda match: REDACTED if _is_key_shaped(match[0]) else match[0], text)


def one_line(text: str) -> str:
    """Escape control and separator characters so a hostile value cannot forge log lines."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


# --- parsing context and key tables -------------------------------------------------------------

@dataclass(frozen=True)
class _Context:
    path: str
    name: str
    role: str
    config_dir: str
    identity: Identity  # the files are judged for a daemon running as this user and group
    secrets_refused: str | None  # why the config file may not hold inline keys; None if it may or unchecked
    totp_secrets: bool = True  # read TOTP secret files (not when `tunvpn totp-secret` is about to write one)


class _Required:
    """Default of a key that must be set: the section is incomplete without it."""


REQUIRED = _Required()


@dataclass(frozen=True)
class Key:
    """One config key. Keys that fill the same `attr` are alternatives (PrivateKey/PrivateKeyFile)."""

    name: str
    attr: str
    parse: Callable[[str, _Context], Any]  # raises ValueError(reason)
    default: Any = None  # a value, a function of the context, or REQUIRED; repeating keys start at []
    repeats: bool = False  # each line adds to a list (AllowedIPs, Address), as in wg-quick
    secret: bool = False  # inline secrets make the config file itself a secret
    roles: tuple[str, ...] = ROLES  # where the key means something; elsewhere it is an error
    wrong_role_hint: str = ""  # appended to the wrong-role error: what to write instead

    def wrong_role_reason(self, role: str) -> str:
        reason = f"is a {' and '.join(self.roles)} setting, not for a {role}"
        return f"{reason}; {self.wrong_role_hint}" if self.wrong_role_hint else reason


# wg-quick keys tunvpn does not implement: refused by name so nobody thinks they took effect.
WG_QUICK_ONLY_KEYS = ("PreUp", "PostUp", "PreDown", "PostDown", "Table", "SaveConfig", "FwMark")


# --- value parsers ------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _parse_int(text: str, low: int, high: int) -> int:
    if not re.fullmatch(r"[0-9]{1,10}", text) or not low <= int(text) <= high:
        raise ValueError(f"'{text}' is not a number in {low}-{high}")
    return int(text)


def _parse_port(value: str, ctx: _Context) -> int:
    return _parse_int(value, 1, 65535)


def _parse_mtu(value: str, ctx: _Context) -> int:
    return _parse_int(value, MIN_MTU, MAX_MTU)


def _parse_keepalive(value: str, ctx: _Context) -> int:
    if value.lower() == "off":
        return 0
    if not re.fullmatch(r"[0-9]{1,10}", value) or int(value) > 65535:
        raise ValueError(f"'{value}' is neither off nor 0-65535 seconds")
    return int(value)


def _parse_key(value: str, ctx: _Context) -> bytes:
    return decode_key(value)  # its InvalidKey is a ValueError and never quotes the secret


def _parse_key_file(value: str, ctx: _Context) -> bytes:
    if not value:
        raise ValueError("empty file name")
    path = os.path.join(ctx.config_dir, value)
    text = _read_secret_file(path, ctx.identity)
    try:
        return decode_key(text)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def _access(bits: int) -> str:
    """'readable and writable' for the r, w, x bits of one class (shifted to the low three bits)."""
    words = [word for bit, word in ((4, "readable"), (2, "writable"), (1, "executable")) if bits & bit]
    return " and ".join(words)


def _owner_problem(status: os.stat_result, path: str, identity: Identity) -> str | None:
    """Whoever owns a file may rewrite it or its mode: only root and the daemon's own user may."""
    if status.st_uid in (0, identity.uid):
        return None
    allowed = "root" if identity.uid == 0 else f"root or {_user_name(identity.uid)}, the user this daemon runs as"
    return f"is owned by {_user_name(status.st_uid)}, not by {allowed}; chown root {path}"


def _mode_problem(status: os.stat_result, path: str, refused: int, exposures: list[str]) -> str:
    """The exposures, and the chmod that takes the `refused` bits away and keeps the rest."""
    mode = stat.S_IMODE(status.st_mode)
    return f"is {', '.join(exposures)} (mode {mode:04o}); chmod {mode & ~refused:o} {path}"


def _secret_mode_problem(status: os.stat_result, path: str, identity: Identity) -> str | None:
    """A secret is for its owner and, read-only, for the group the daemon runs as (root:tunvpn 0640)."""
    mode = stat.S_IMODE(status.st_mode)
    foreign_group = status.st_gid != identity.gid
    refused = stat.S_IRWXO | stat.S_IWGRP | (stat.S_IRGRP if foreign_group else 0)
    exposures = []
    if mode & stat.S_IRWXO:
        exposures.append(f"{_access(mode & stat.S_IRWXO)} by others")
    if mode & stat.S_IWGRP:
        exposures.append(f"writable by group {_group_name(status.st_gid)}")
    if mode & stat.S_IRGRP and foreign_group:
        exposures.append(f"readable by group {_group_name(status.st_gid)}, which this daemon does not run as")
    return _mode_problem(status, path, refused, exposures) if exposures else None


def _config_file_problem(status: os.stat_result, path: str, identity: Identity) -> str | None:
    """Who may write the config may add peers and routes: root and the daemon's own user only."""
    group_others_write = stat.S_IWGRP | stat.S_IWOTH
    owner = _owner_problem(status, path, identity)
    if owner or not status.st_mode & group_others_write:
        return owner
    writers = [who for bit, who in ((stat.S_IWGRP, f"group {_group_name(status.st_gid)}"), (stat.S_IWOTH, "others"))
               if status.st_mode & bit]
    return _mode_problem(status, path, group_others_write,
                         [f"writable by {' and '.join(writers)}, who could add peers and routes"])


def _read_secret_file(path: str, identity: Identity) -> str:
    """Read a small regular file only its owner and the daemon's group can read (fstat: symlinks count as
    their target)."""
    try:
        # O_NONBLOCK: a FIFO given as key file fails the regular-file check instead of hanging.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot open {path}: {getattr(exc, 'strerror', None) or exc}") from exc
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError(f"{path} is not a regular file")
        problem = _owner_problem(status, path, identity) or _secret_mode_problem(status, path, identity)
        if problem:
            raise ValueError(f"{path} {problem}")
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} is too large to hold a key")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} does not hold a base64 key") from exc


def _list_items(value: str, separator: str) -> list[str]:
    if not value:
        return []  # an empty AllowedIPs/Address line adds nothing, as in wg and wg-quick
    items = [item.strip() for item in re.split(separator, value)]
    if "" in items:
        raise ValueError(f"'{value}' has an empty entry")
    return items


def _parse_prefix(item: str) -> tuple[IPAddress, int]:
    """ADDRESS[/LENGTH] with a decimal length (no netmasks, no scope ids); bare = host prefix."""
    address_text, slash, length_text = item.partition("/")
    if "%" in address_text:
        raise ValueError(f"{item}: scoped addresses are not supported")
    try:
        address = ipaddress.ip_address(address_text)
    except ValueError:
        raise ValueError(f"{item} is not an IPv4 or IPv6 address") from None
    if not slash:
        return address, address.max_prefixlen
    if not re.fullmatch(r"[0-9]{1,3}", length_text) or int(length_text) > address.max_prefixlen:
        raise ValueError(f"{item}: prefix length must be 0-{address.max_prefixlen}")
    return address, int(length_text)


def _parse_addresses(value: str, ctx: _Context) -> list[IPInterface]:
    # wg-quick splits Address on commas and whitespace alike.
    interfaces = []
    for item in _list_items(value, r"[,\s]+"):
        address, length = _parse_prefix(item)
        interface = ipaddress.ip_interface(f"{address}/{length}")
        _check_interface_address(interface, item)
        interfaces.append(interface)
    return interfaces


def _check_interface_address(interface: IPInterface, item: str) -> None:
    """Refuse addresses no tun device should hold: with them the host routes wrongly, or not at all."""
    ip = interface.ip
    for wrong, kind in ((ip.is_unspecified, "the unspecified address"), (ip.is_multicast, "a multicast address"),
                        (ip.is_loopback, "a loopback address")):
        if wrong:
            raise ValueError(f"{ip} is {kind}, not one an interface can have")
    if interface.network.prefixlen == 0:
        raise ValueError(f"{item}: prefix length 0 would put every address on this link; "
                         "give the tunnel subnet's length")


def _parse_allowed_ips(value: str, ctx: _Context) -> list[IPNetwork]:
    return _parse_networks(_list_items(value, ","))


def _parse_push_routes(value: str, ctx: _Context) -> list[IPNetwork]:
    return _parse_networks(_list_items(value, r"[,\s]+"))


def _parse_networks(items: list[str]) -> list[IPNetwork]:
    networks = []
    for item in items:
        address, length = _parse_prefix(item)
        network = ipaddress.ip_network(f"{address}/{length}", strict=False)
        if network.network_address != address:
            raise ValueError(f"{item} has host bits set (the network is {network})")
        networks.append(network)
    return networks


def _parse_address(item: str) -> IPAddress:
    """One bare address; scope ids are refused (ipaddress would keep them on IPv6)."""
    if "%" in item:
        raise ValueError(f"{item}: scoped addresses are not supported")
    try:
        return ipaddress.ip_address(item)
    except ValueError:
        raise ValueError(f"'{item}' is not an IPv4 or IPv6 address") from None


def _parse_pool(value: str, ctx: _Context) -> list[tuple[IPAddress, IPAddress]]:
    ends = value.split("-")
    if len(ends) != 2 or not all(end.strip() for end in ends):
        raise ValueError(f"'{value}': expected FIRST-LAST, like 203.0.113.10-203.0.113.200")
    first, last = (_parse_address(end.strip()) for end in ends)
    if first.version != last.version:
        raise ValueError(f"'{value}': FIRST and LAST must both be IPv4 or both IPv6")
    if first > last:
        raise ValueError(f"'{value}': FIRST is above LAST")
    return [(first, last)]


def _parse_dns(value: str, ctx: _Context) -> list[IPAddress | str]:
    """wg-quick's DNS syntax: addresses are name servers, any other word is a search domain."""
    entries: list[IPAddress | str] = []
    for item in _list_items(value, r"[,\s]+"):
        try:
            address = _parse_address(item)
        except ValueError:
            if "%" in item:
                raise
            if not _is_dns_name(item):
                raise ValueError(f"'{item}' is neither an IP address nor a DNS search domain") from None
            entries.append(item)
            continue
        _check_dns_server(address, item)
        entries.append(address)
    return entries


def _check_dns_server(address: IPAddress, item: str) -> None:
    """Queries to these would go nowhere, or to every host on the link."""
    if address.is_unspecified or address.is_multicast:
        raise ValueError(f"{item} cannot be a DNS server")


_BOOLEANS = {"yes": True, "true": True, "on": True, "1": True, "no": False, "false": False, "off": False, "0": False}


def _parse_bool(value: str, ctx: _Context) -> bool:
    try:
        return _BOOLEANS[value.lower()]
    except KeyError:
        raise ValueError(f"'{value}' is not yes or no (true/false, on/off and 1/0 work too)") from None


def _parse_state_directory(value: str, ctx: _Context) -> str:
    if not value.startswith("/"):
        raise ValueError(f"'{value}' is not an absolute path")
    if "\0" in value:
        raise ValueError("a path cannot contain a NUL character")
    return value


def _parse_metrics_file(value: str, ctx: _Context) -> str:
    path = _parse_state_directory(value, ctx)
    if path.endswith("/"):
        raise ValueError(f"'{value}' names a directory; give the file, like /var/lib/prometheus/node-exporter/tunvpn.prom")
    return path


def _parse_metrics_listen(value: str, ctx: _Context) -> tuple[str, int]:
    """IP:PORT or [IPV6]:PORT: an address literal, so binding never waits for DNS."""
    host, port = _parse_endpoint(value, ctx)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value}: give an IP address to listen on, like 127.0.0.1:9586") from None
    return host, port


_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(kbit|mbit|gbit)", re.IGNORECASE)
_RATE_UNITS = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
MIN_RATE = 8_000  # bits a second; less cannot carry one full-size packet a second or so


def _parse_rate(value: str, ctx: _Context) -> int:
    """`20mbit` (kbit, mbit, gbit: powers of ten, as tc counts) in bits a second; `off` is 0."""
    if value.lower() in ("off", "none"):
        return 0
    match = _RATE.fullmatch(value)
    if not match:
        raise ValueError(f"'{value}' is not a rate like 20mbit (kbit, mbit, gbit) or off")
    bits = int(float(match.group(1)) * _RATE_UNITS[match.group(2).lower()])
    if bits < MIN_RATE:
        raise ValueError(f"'{value}' is below the least rate, 8kbit")
    return bits


_DURATION_PART = re.compile(r"([0-9]{1,9})([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration(value: str, ctx: _Context) -> int:
    """`12h`, `90m`, `1d12h`, or plain seconds; 1 second to 366 days."""
    text = value.lower().replace(" ", "")
    if re.fullmatch(r"[0-9]{1,9}", text):
        seconds = int(text)
    elif text and re.fullmatch(rf"(?:{_DURATION_PART.pattern})+", text):
        seconds = sum(int(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text))
    else:
        raise ValueError(f"'{value}' is not a duration like 12h, 90m, 1d12h or seconds")
    if not 1 <= seconds <= MAX_TOTP_SESSION:
        raise ValueError(f"'{value}' is not between 1 second and 366 days")
    return seconds


def parse_duration(text: str) -> int:
    """A duration as config files write it (for command-line options): ValueError saying why not."""
    return _parse_duration(text, None)  # type: ignore[arg-type]  # it reads no context


def _parse_path(value: str, ctx: _Context) -> str:
    if not value or "\0" in value:
        raise ValueError("not a file name")
    return value


def default_totp_secret_file(config_dir: str, name: str, public_key: bytes) -> str:
    """`NAME.totp/KEY` beside the config, the key's base64 made file-name safe ('/' -> '_', '+' -> '-')."""
    safe = encode_key(public_key).replace("/", "_").replace("+", "-")
    return os.path.join(config_dir, f"{name}.totp", safe)


_PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")


def is_peer_name(text: object) -> bool:
    """A [Peer]'s Name: also the file name of an enrolled peer, so nothing path-like passes."""
    return isinstance(text, str) and _PEER_NAME.fullmatch(text) is not None


def _parse_name(value: str, ctx: _Context) -> str:
    if not _PEER_NAME.fullmatch(value):
        raise ValueError(f"'{value}' is not a name: up to 64 letters, digits and . _ @ + -, starting with a "
                         "letter or digit")
    return value


def _is_dns_name(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    labels = name.split(".")
    # An all-numeric last label is a mistyped IPv4 address, never a DNS name (RFC 3696, 2).
    return len(name) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def _check_host(host: str, endpoint: str) -> None:
    try:
        ipaddress.IPv4Address(host)
        return
    except ValueError:
        pass
    if not _is_dns_name(host):
        raise ValueError(f"{endpoint}: '{host}' is neither an IPv4 address nor a DNS name")


def _parse_public_endpoints(value: str, ctx: _Context) -> list[str]:
    """A server's Endpoint: HOST:PORT entries, each checked as a client's Endpoint is, kept as text."""
    return [public_endpoint(item) for item in _list_items(value, r"[,\s]+")]


def public_endpoint(value: str) -> str:
    """HOST:PORT or [IPV6]:PORT as an invite carries it; ValueError saying what is wrong."""
    host, port = _parse_endpoint(value, None)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_endpoint(value: str, ctx: _Context | None) -> tuple[str, int]:
    """HOST:PORT or [IPV6]:PORT; the host stays unresolved here."""
    if not value:
        raise ValueError("empty; expected host:port")
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket:
            raise ValueError(f"{value}: missing ']' after the IPv6 address")
        if not host:
            raise ValueError(f"{value}: empty host")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value}: brackets hold an IPv6 address, '{host}' is not one") from None
        if not rest.startswith(":"):
            raise ValueError(f"{value}: missing :port")
        port_text = rest[1:]
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            raise ValueError(f"{value}: missing :port")
        if ":" in host:
            raise ValueError(f"{value}: an IPv6 address needs brackets, like [2001:db8::1]:51820")
        if not host:
            raise ValueError(f"{value}: empty host")
        _check_host(host, value)
    if not port_text:
        raise ValueError(f"{value}: missing port after ':'")
    if not re.fullmatch(r"[0-9]{1,10}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value}: port must be 1-65535")
    return host, int(port_text)


def _valid_device_name(name: str) -> str:
    """The kernel's dev_valid_name(), plus '%', which TUNSETIFF would expand as a number template."""
    if not name:
        raise ValueError("empty interface name")
    if name in (".", ".."):
        raise ValueError(f"'{name}' is not a valid interface name")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_DEVICE_NAME_BYTES:
        raise ValueError(f"'{name}' is longer than {MAX_DEVICE_NAME_BYTES} bytes")
    for ch in name:
        if ch in "/:%" or ch.isspace() or not ch.isprintable():
            raise ValueError(f"'{name}': an interface name cannot contain {ch!r}")
    return name


def _parse_device(value: str, ctx: _Context) -> str:
    return _valid_device_name(value)


def _default_device(ctx: _Context) -> str:
    name = (DEVICE_PREFIX + ctx.name)[:MAX_DEVICE_NAME_BYTES]
    try:
        return _valid_device_name(name)
    except ValueError as exc:
        raise ValueError(f"the default from the file name does not work ({exc}); set Device") from exc


def _default_listen_port(ctx: _Context) -> int | None:
    """A server listens where clients expect it; a client takes an ephemeral port."""
    return DEFAULT_SERVER_PORT if ctx.role == "server" else None


def _server_default(value: Any) -> Callable[[_Context], Any]:
    """A default for a server-only key: a client config keeps None there."""
    return lambda ctx: value if ctx.role == "server" else None


def _default_state_directory(ctx: _Context) -> str | None:
    if ctx.role != "server":
        return None
    if ctx.name in ("", ".", ".."):
        raise ValueError(f"the default from the file name does not work ('{ctx.name}'); set StateDirectory")
    return f"{DEFAULT_STATE_ROOT}/{ctx.name}"


SERVER = ("server",)
CLIENT = ("client",)

INTERFACE_KEYS: tuple[Key, ...] = (
    Key("PrivateKey", "private_key", _parse_key, default=REQUIRED, secret=True),
    Key("PrivateKeyFile", "private_key", _parse_key_file, default=REQUIRED),
    Key("ListenPort", "listen_port", _parse_port, default=_default_listen_port),
    Key("Address", "addresses", _parse_addresses, repeats=True),
    Key("MTU", "mtu", _parse_mtu, default=DEFAULT_MTU),
    Key("Device", "device", _parse_device, default=_default_device),
    Key("Pool", "pools", _parse_pool, repeats=True, roles=SERVER,
        wrong_role_hint="a client takes its address from the server, or from Address"),
    Key("PushRoute", "push_routes", _parse_push_routes, repeats=True, roles=SERVER,
        wrong_role_hint="a client routes what its [Peer] lists in AllowedIPs"),
    Key("PushDNS", "push_dns", _parse_dns, repeats=True, roles=SERVER, wrong_role_hint="use DNS"),
    Key("ClientToClient", "client_to_client", _parse_bool, default=_server_default(False), roles=SERVER),
    Key("StateDirectory", "state_directory", _parse_state_directory, default=_default_state_directory,
        roles=SERVER),
    Key("PushKeepalive", "push_keepalive", _parse_keepalive, default=_server_default(DEFAULT_PUSH_KEEPALIVE),
        roles=SERVER, wrong_role_hint="set PersistentKeepalive in the [Peer]"),
    Key("DNS", "dns", _parse_dns, repeats=True, roles=CLIENT,
        wrong_role_hint="use PushDNS to give clients DNS servers"),
    Key("DefaultRateLimit", "default_rate_limit", _parse_rate, roles=SERVER),
    Key("DefaultAccess", "default_access", _parse_allowed_ips, repeats=True, roles=SERVER),
    Key("MetricsListen", "metrics_listen", _parse_metrics_listen),
    Key("MetricsFile", "metrics_file", _parse_metrics_file),
    Key("TOTPSession", "totp_session", _parse_duration, default=_server_default(DEFAULT_TOTP_SESSION), roles=SERVER),
    Key("Endpoint", "public_endpoints", _parse_public_endpoints, repeats=True, roles=SERVER,
        wrong_role_hint="a client's Endpoint goes in its [Peer]"),
)

PEER_KEYS: tuple[Key, ...] = (
    Key("PublicKey", "public_key", _parse_key, default=REQUIRED),
    Key("PresharedKey", "preshared_key", _parse_key, secret=True),
    Key("PresharedKeyFile", "preshared_key", _parse_key_file),
    Key("AllowedIPs", "allowed_ips", _parse_allowed_ips, repeats=True),
    Key("Endpoint", "endpoint", _parse_endpoint),
    Key("PersistentKeepalive", "persistent_keepalive", _parse_keepalive, default=0),
    Key("Name", "name", _parse_name),
    Key("RateLimit", "rate_limit", _parse_rate, roles=SERVER,
        wrong_role_hint="the server limits its clients; set RateLimit in the server's [Peer] for this client"),
    Key("Access", "access", _parse_allowed_ips, repeats=True, roles=SERVER,
        wrong_role_hint="the server decides where its clients may go"),
    Key("TOTP", "totp", _parse_bool, default=False, roles=SERVER,
        wrong_role_hint="the server asks for the code; run `tunvpn login` on the client"),
    Key("TOTPSecretFile", "totp_secret_file", _parse_path, roles=SERVER),
    Key("TOTPSession", "totp_session", _parse_duration, roles=SERVER),
)


@dataclass(frozen=True)
class _SectionSpec:
    name: str
    keys: tuple[Key, ...]
    refused: tuple[str, ...]  # known elsewhere, not implemented by tunvpn

    def lookup(self, written: str) -> Key | None:
        return next((key for key in self.keys if key.name.lower() == written.lower() and written.isascii()), None)

    def alternatives(self, attr: str) -> str:
        return " or ".join(key.name for key in self.keys if key.attr == attr)


INTERFACE = _SectionSpec("Interface", INTERFACE_KEYS, WG_QUICK_ONLY_KEYS)
PEER = _SectionSpec("Peer", PEER_KEYS, ())
SECTIONS = (INTERFACE, PEER)
_KEY_NAMES = {key.name.lower() for spec in SECTIONS for key in spec.keys}
_SECRET_KEY_NAMES = tuple(key.name for spec in SECTIONS for key in spec.keys if key.secret)


def _mangled_secret_key(written: str) -> str | None:
    """The secret key a line starts with but does not write as `Name = value`: in `PrivateKey <key>`
    the parser's split at the key's own '=' leaves the key in what would be quoted as the key name."""
    if written.lower() in _KEY_NAMES:
        return None
    return next((name for name in _SECRET_KEY_NAMES if written.lower().startswith(name.lower())), None)


# --- reading lines into sections ----------------------------------------------------------------

@dataclass
class _Entry:
    key: str  # as written, for messages
    line: int
    value: Any


@dataclass
class _Section:
    spec: _SectionSpec
    line: int
    entries: dict[str, list[_Entry]] = field(default_factory=dict)  # by attr, in file order

    def where(self, attr: str) -> tuple[int, str]:
        """Line and key to blame for `attr`: its first line, else the section header."""
        entries = self.entries.get(attr)
        if entries:
            return entries[0].line, entries[0].key
        return self.line, self.spec.alternatives(attr)

    def add(self, written: str, value: str, line: int, ctx: _Context) -> None:
        key = self.spec.lookup(written)
        if key is None:
            raise ConfigError(ctx.path, line, written, self._unknown_key_reason(written))
        if ctx.role not in key.roles:
            raise ConfigError(ctx.path, line, written, key.wrong_role_reason(ctx.role))
        earlier = self.entries.get(key.attr)
        if earlier and not key.repeats:
            first = earlier[0]
            if first.key.lower() == written.lower():
                reason = f"repeated; already set on line {first.line}"
            else:
                reason = f"conflicts with {first.key} on line {first.line}; set only one"
            raise ConfigError(ctx.path, line, written, reason)
        if key.secret and ctx.secrets_refused:
            raise ConfigError(ctx.path, line, written, f"{ctx.path} {ctx.secrets_refused}")
        try:
            parsed = key.parse(value, ctx)
        except ValueError as exc:
            raise ConfigError(ctx.path, line, written, str(exc)) from None
        self.entries.setdefault(key.attr, []).append(_Entry(written, line, parsed))

    def _unknown_key_reason(self, written: str) -> str:
        if any(written.lower() == refused.lower() for refused in self.spec.refused):
            return "tunvpn does not support this wg-quick key; remove it"
        for other in SECTIONS:
            if other is not self.spec and other.lookup(written):
                return f"belongs in [{other.name}], not [{self.spec.name}]"
        return f"unknown key in [{self.spec.name}]"

    def values(self, ctx: _Context) -> dict[str, Any]:
        """Every attr of the section, from its lines or its default."""
        values: dict[str, Any] = {}
        for key in self.spec.keys:
            if key.attr in values:
                continue  # an alternative of a key already handled
            entries = self.entries.get(key.attr, [])
            if key.repeats:
                values[key.attr] = [item for entry in entries for item in entry.value]
            elif entries:
                values[key.attr] = entries[0].value
            elif key.default is REQUIRED:
                names = self.spec.alternatives(key.attr)
                raise ConfigError(ctx.path, self.line, key.name, f"missing; [{self.spec.name}] needs {names}")
            elif callable(key.default):
                try:
                    values[key.attr] = key.default(ctx)
                except ValueError as exc:
                    raise ConfigError(ctx.path, self.line, key.name, str(exc)) from None
            else:
                values[key.attr] = key.default
        return values


def _open_section(header: str, line: int, ctx: _Context) -> _Section:
    if not header.endswith("]"):
        raise ConfigError(ctx.path, line, None, f"'{header}': a section header is [Interface] or [Peer]")
    name = header[1:-1].strip()
    spec = next((spec for spec in SECTIONS if spec.name.lower() == name.lower() and name.isascii()), None)
    if spec is None:
        raise ConfigError(ctx.path, line, None, f"unknown section [{name}]; expected [Interface] or [Peer]")
    return _Section(spec, line)


def _read_sections(text: str, ctx: _Context) -> list[_Section]:
    """Every line into its section; each broken line is an error of its own, and reading goes on."""
    sections: list[_Section] = []
    errors: list[ConfigError] = []
    state = _Reading()
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            _collecting(errors, _read_line, line, number, ctx, state, sections)
    _raise_any(errors)
    return sections


@dataclass
class _Reading:
    current: _Section | None = None
    in_broken_section: bool = False  # after a bad header: its lines are not blamed on anything else
    interface_line: int = 0


def _read_line(line: str, number: int, ctx: _Context, state: _Reading, sections: list[_Section]) -> None:
    if line.startswith("["):
        _read_header(line, number, ctx, state, sections)
        return
    key, equals, value = line.partition("=")
    key = key.strip()
    if not equals or not key:
        raise ConfigError(ctx.path, number, None, "expected 'Key = Value' or a [Section] header")
    secret = _mangled_secret_key(key)
    if secret:
        raise ConfigError(ctx.path, number, secret,
                          f"expected '{secret} = KEY'; the rest of the line is not shown, as it may be the key")
    if state.in_broken_section:
        return
    if state.current is None:
        raise ConfigError(ctx.path, number, key, "comes before any section; put it under [Interface] or [Peer]")
    state.current.add(key, value.strip(), number, ctx)


def _read_header(line: str, number: int, ctx: _Context, state: _Reading, sections: list[_Section]) -> None:
    state.current, state.in_broken_section = None, True
    section = _open_section(line, number, ctx)
    if section.spec is INTERFACE:
        if state.interface_line:
            raise ConfigError(ctx.path, number, None, f"a second [Interface]; the first is on line {state.interface_line}")
        state.interface_line = number
    state.current, state.in_broken_section = section, False
    sections.append(section)


# --- whole-config rules -------------------------------------------------------------------------

def _items(section: _Section, attr: str) -> Iterator[tuple[Any, _Entry]]:
    """Every item of a repeating key, with the entry (line, key as written) it came from."""
    for entry in section.entries.get(attr, []):
        for item in entry.value:
            yield item, entry


def _usable_range(subnet: IPNetwork) -> tuple[IPAddress, IPAddress]:
    """Addresses a host may have in `subnet`: not IPv4's network and broadcast addresses, nor
    IPv6's subnet-router anycast address; point-to-point /31 and /127 (RFC 3021, 6164) and
    single addresses keep all."""
    if subnet.max_prefixlen - subnet.prefixlen <= 1:
        return subnet[0], subnet[-1]
    return subnet[1], (subnet[-2] if subnet.version == 4 else subnet[-1])


def _reserved_name(subnet: IPNetwork, address: IPAddress) -> str:
    if subnet.version == 6:
        return "subnet-router anycast"
    return "network" if address == subnet.network_address else "broadcast"


def _holds(subnet: IPNetwork, first: IPAddress, last: IPAddress) -> bool:
    return subnet.version == first.version and subnet.network_address <= first and last <= subnet.broadcast_address


def _check_pool(first: IPAddress, last: IPAddress, addresses: list[IPInterface]) -> None:
    """Raise ValueError(reason) unless the range is usable client addresses of one Address subnet."""
    family = f"IPv{first.version}"
    candidates = [address for address in addresses if address.version == first.version]
    if not candidates:
        raise ValueError(f"an {family} Pool needs an {family} Address whose subnet holds it")
    home = next((address for address in candidates if _holds(address.network, first, last)), None)
    if home is None:
        subnets = ", ".join(str(address.network) for address in candidates)
        raise ValueError(f"{first}-{last} is not inside the subnet of an {family} Address ({subnets})")
    low, high = _usable_range(home.network)
    reserved = first if first < low else last if last > high else None
    if reserved is not None:
        raise ValueError(f"{first}-{last} includes {reserved}, the {_reserved_name(home.network, reserved)} "
                         f"address of {home.network}")
    if first == last == home.ip:
        raise ValueError(f"{first}-{last} holds only the server's own address")


def _default_pool(addresses: list[IPInterface], version: int) -> tuple[IPAddress, IPAddress] | None:
    for address in addresses:
        if address.version == version:
            low, high = _usable_range(address.network)
            if low != high:  # a subnet that holds more than the server itself
                return low, high
    return None


def _build_pools(section: _Section, ctx: _Context) -> dict[int, tuple[IPAddress, IPAddress]]:
    if ctx.role != "server":
        return {}
    addresses = [address for address, _ in _items(section, "addresses")]
    pools: dict[int, tuple[IPAddress, IPAddress]] = {}
    pool_lines: dict[int, int] = {}
    for (first, last), entry in _items(section, "pools"):
        if first.version in pool_lines:
            reason = f"a second IPv{first.version} Pool; the first is on line {pool_lines[first.version]}"
            raise ConfigError(ctx.path, entry.line, entry.key, reason)
        try:
            _check_pool(first, last, addresses)
        except ValueError as exc:
            raise ConfigError(ctx.path, entry.line, entry.key, str(exc)) from None
        pools[first.version] = (first, last)
        pool_lines[first.version] = entry.line
    for version in (4, 6):
        default = None if version in pools else _default_pool(addresses, version)
        if default:
            pools[version] = default
    return pools


def _check_unique(section: _Section, attr: str, ctx: _Context) -> None:
    """A repeated route or DNS entry is a typo more often than not; the admin should see it."""
    first_lines: dict[Any, int] = {}
    for item, entry in _items(section, attr):
        identity = item.lower().rstrip(".") if isinstance(item, str) else item
        if identity in first_lines:
            reason = f"{item} is listed twice (first on line {first_lines[identity]})"
            raise ConfigError(ctx.path, entry.line, entry.key, reason)
        first_lines[identity] = entry.line


def _check_count(section: _Section, attr: str, kind: type | tuple[type, ...], limit: int, what: str,
                 ctx: _Context) -> None:
    """Refuse more than the control extension can push, at the line that goes over."""
    count = 0
    for item, entry in _items(section, attr):
        count += isinstance(item, kind)
        if count > limit:
            raise ConfigError(ctx.path, entry.line, entry.key, f"more than {limit} {what}")


def _split_dns(entries: list[IPAddress | str]) -> tuple[list[IPAddress], list[str]]:
    servers = [entry for entry in entries if not isinstance(entry, str)]
    return servers, [entry for entry in entries if isinstance(entry, str)]


def _build_interface(section: _Section, ctx: _Context) -> InterfaceConfig:
    values = section.values(ctx)
    try:
        _check_ipv6_mtu(values["mtu"], values["addresses"])
    except ValueError as exc:
        line, key = section.where("mtu")
        raise ConfigError(ctx.path, line, key, str(exc)) from None
    values["pools"] = _build_pools(section, ctx)
    for attr in ("push_routes", "push_dns", "dns", "public_endpoints"):
        _check_unique(section, attr, ctx)
    _check_count(section, "public_endpoints", str, MAX_ENDPOINTS, "Endpoint entries; an invite carries that many",
                 ctx)
    # The server's own subnets travel as routes too, so they count against the push's route limit.
    subnet_count = len(server_subnets(values["addresses"])) if ctx.role == "server" else 0
    _check_count(section, "push_routes", object, MAX_ROUTES - subnet_count,
                 f"PushRoute networks; a config push carries {MAX_ROUTES} routes and the server's Address "
                 f"subnets take {subnet_count}", ctx)
    _check_count(section, "push_dns", (ipaddress.IPv4Address, ipaddress.IPv6Address), MAX_DNS_SERVERS,
                 "PushDNS servers; a config push carries that many", ctx)
    _check_count(section, "push_dns", str, MAX_SEARCH_DOMAINS,
                 "PushDNS search domains; a config push carries that many", ctx)
    values["push_dns"], values["push_dns_search"] = _split_dns(values["push_dns"])
    values["dns"], values["dns_search"] = _split_dns(values["dns"])
    values["mtu_configured"] = "mtu" in section.entries
    interface = InterfaceConfig(**values)
    if ctx.role == "server":
        _check_push_fits(interface, section, ctx)
    return interface


def _check_ipv6_mtu(mtu: int, addresses: list[IPInterface]) -> None:
    """Below 1280 the kernel turns IPv6 off on the device (RFC 8200 needs 1280)."""
    if mtu < MIN_IPV6_MTU and any(address.version == 6 for address in addresses):
        raise ValueError(f"{mtu} is below {MIN_IPV6_MTU}, the minimum with an IPv6 Address")


def validate_push(push: ConfigPush, interface: InterfaceConfig) -> list[str]:
    """Why a client with `interface` may not apply `push`: what a config file with its values
    would be refused for, the MTU judged with the client's own addresses and MTU line as well.

    Every reason, not just the first, so one log line tells the server's admin all there is to
    fix; [] when the push is fine. Routes are not checked here: the control codec already refuses
    all that PushRoute refuses (a malformed network, host bits set, too many).
    """
    reasons = []
    for address in push.addresses:
        reasons += _reasons("Address", _check_interface_address, address, str(address))
    pushed_mtu = [] if push.mtu is None else _reasons("MTU", _parse_int, str(push.mtu), MIN_MTU, MAX_MTU)
    mtu = push.mtu if push.mtu is not None and not interface.mtu_configured else interface.mtu
    reasons += pushed_mtu or _reasons("MTU", _check_ipv6_mtu, mtu, [*interface.addresses, *push.addresses])
    for server in push.dns:
        reasons += _reasons("DNS", _check_dns_server, server, str(server))
    reasons += [f"DNS: {domain!r} is not a DNS search domain" for domain in push.search if not _is_dns_name(domain)]
    return reasons


def _reasons(key: str, check: Callable[..., Any], *args: Any) -> list[str]:
    """The config check's refusal, if any, as one reason naming the config key it stands for."""
    try:
        check(*args)
    except ValueError as exc:
        return [f"{key}: {exc}"]
    return []


def server_subnets(addresses: list[IPInterface]) -> list[IPNetwork]:
    """The networks of the server's Addresses, once each: pushed to clients as routes."""
    return list(dict.fromkeys(address.network for address in addresses))


def _check_push_fits(interface: InterfaceConfig, section: _Section, ctx: _Context) -> None:
    """The largest CONFIG_PUSH this server can send must fit in one control message.

    Built up in file order from what every push carries (one address per pool, a route per
    Address subnet, MTU, keepalive), so the error names the line that makes it overflow.
    """
    pool_subnets = [interface.pool_subnet(version) for version in sorted(interface.pools)]
    push = ConfigPush(0, addresses=list(pool_subnets), routes=server_subnets(interface.addresses),
                      mtu=interface.mtu, keepalive=interface.push_keepalive)
    destinations = {"push_routes": push.routes, "push_dns": push.dns}
    added = sorted(((item, entry, attr) for attr in destinations for item, entry in _items(section, attr)),
                   key=lambda added_item: added_item[1].line)
    for item, entry, attr in added:
        (push.search if isinstance(item, str) else destinations[attr]).append(item)
        try:
            encode(push)
        except ControlError as exc:
            raise ConfigError(ctx.path, entry.line, entry.key, f"{item} does not fit in a config push ({exc})") from None


def _build_peer(section: _Section, ctx: _Context) -> PeerConfig:
    values = section.values(ctx)
    if ctx.role == "client" and values["endpoint"] is None:
        raise ConfigError(ctx.path, section.line, "Endpoint", "missing; a client initiates, so every [Peer] needs one")
    peer = PeerConfig(**values, endpoint_address=None, line=section.line)
    return _with_totp_secret(peer, section, ctx) if ctx.role == "server" else peer


def _with_totp_secret(peer: PeerConfig, section: _Section, ctx: _Context) -> PeerConfig:
    """TOTP = yes: the secret read from TOTPSecretFile, or from NAME.totp/KEY beside the config."""
    if not peer.totp:
        for attr in ("totp_secret_file", "totp_session"):
            if attr in section.entries:
                line, key = section.where(attr)
                raise ConfigError(ctx.path, line, key, "has no effect without TOTP = yes in this [Peer]")
        return peer
    line, key = section.where("totp_secret_file" if "totp_secret_file" in section.entries else "totp")
    path = (os.path.join(ctx.config_dir, peer.totp_secret_file) if peer.totp_secret_file
            else default_totp_secret_file(ctx.config_dir, ctx.name, peer.public_key))
    if not ctx.totp_secrets:
        return replace(peer, totp_secret_file=path)
    try:
        secret = decode_secret(_read_secret_file(path, ctx.identity))
    except ValueError as exc:
        reason = str(exc) if str(exc).startswith(("cannot", path)) else f"{path} {exc}"
        hint = "" if os.path.exists(path) else f"; make one with `tunvpn totp-secret {ctx.name} --peer KEY`"
        raise ConfigError(ctx.path, line, key, reason + hint) from None
    return replace(peer, totp_secret_file=path, totp_secret=secret)


def _check_peer_keys(interface: InterfaceConfig, peers: list[tuple[PeerConfig, _Section]], ctx: _Context) -> None:
    own = derive_public_key(interface.private_key)
    first_seen: dict[bytes, int] = {}
    for peer, section in peers:
        line, key = section.where("public_key")
        if peer.public_key == own:
            raise ConfigError(ctx.path, line, key, "is this [Interface]'s own public key; a peer cannot be itself")
        if peer.public_key in first_seen:
            raise ConfigError(ctx.path, line, key, f"same peer as the PublicKey on line {first_seen[peer.public_key]}")
        first_seen[peer.public_key] = line


class _Span(NamedTuple):
    version: int
    first: int
    last: int
    owner: int  # index of the peer
    line: int
    key: str
    network: IPNetwork

    def contains(self, other: _Span) -> bool:
        return self.version == other.version and self.first <= other.first and other.last <= self.last


def _check_overlaps(peer_sections: list[_Section], ctx: _Context) -> None:
    """Two peers claiming one address make routing depend on line order: refuse it.

    CIDR blocks either nest or are disjoint, so after sorting by start (widest first) a block
    overlaps an earlier one exactly when it lies inside the innermost still-open block.
    """
    spans = sorted(
        (
            _Span(net.version, int(net.network_address), int(net.broadcast_address), owner, entry.line, entry.key, net)
            for owner, section in enumerate(peer_sections)
            for entry in section.entries.get("allowed_ips", [])
            for net in entry.value
        ),
        key=lambda span: (span.version, span.first, -span.last),
    )
    open_blocks: list[_Span] = []  # nested, all of one peer: a second peer would have raised
    for span in spans:
        while open_blocks and not open_blocks[-1].contains(span):
            open_blocks.pop()
        if open_blocks and open_blocks[-1].owner != span.owner:
            earlier, later = sorted((open_blocks[-1], span), key=lambda s: s.line)
            raise ConfigError(
                ctx.path, later.line, later.key,
                f"{later.network} overlaps {earlier.network} of another peer on line {earlier.line}",
            )
        open_blocks.append(span)


def _server_address_conflict(network: IPNetwork, own: IPInterface) -> str | None:
    """Why a server peer may not have `network`: the server's own address must stay the server's.

    CIDR blocks nest or are disjoint, so a block overlapping the server's subnet either lies
    inside it or covers all of it (and with it the server's address).
    """
    if network.version != own.version or not network.overlaps(own.network):
        return None
    if network.prefixlen != network.max_prefixlen:
        return f"{network} covers the server's own address {own.ip}" if own.ip in network else None
    host = network.network_address
    if host == own.ip:
        return f"{host} is the server's own address"
    low, high = _usable_range(own.network)
    if not low <= host <= high:
        return f"{host} is the {_reserved_name(own.network, host)} address of {own.network}, not a client address"
    return None


def _check_server_peer_addresses(interface_section: _Section, peer_sections: list[_Section], ctx: _Context) -> None:
    own_addresses = list(_items(interface_section, "addresses"))
    for section in peer_sections:
        for network, entry in _items(section, "allowed_ips"):
            for own, own_entry in own_addresses:
                reason = _server_address_conflict(network, own)
                if reason:
                    raise ConfigError(ctx.path, entry.line, entry.key, f"{reason} (Address on line {own_entry.line})")


def resolve_endpoint(host: str, port: int) -> tuple:
    """The first UDP socket address for host:port, as wg(8) picks it: (ip, port) or (ip, port, flow, scope).

    Raises OSError (socket.gaierror included) when the name does not resolve.
    """
    for family, _, _, _, address in socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM, socket.IPPROTO_UDP):
        if family in (socket.AF_INET, socket.AF_INET6):
            return address
    raise OSError(f"no IPv4 or IPv6 address for {host}")


def _resolve(peer: PeerConfig, section: _Section, ctx: _Context) -> PeerConfig:
    if peer.endpoint is None:
        return peer
    host, port = peer.endpoint
    try:
        address = resolve_endpoint(host, port)
    except (OSError, UnicodeError) as exc:
        line, key = section.where("endpoint")
        raise ConfigError(ctx.path, line, key, f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}") from None
    return replace(peer, endpoint_address=address)


def _parse(text: str, path: str, role: str, resolve: bool, identity: Identity, secrets_refused: str | None,
           totp_secrets: bool = True) -> Config:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")  # a caller's bug, not bad input
    ctx = _Context(path, Path(path).stem, role, os.path.dirname(path), identity, secrets_refused, totp_secrets)
    sections = _read_sections(text.removeprefix("\ufeff"), ctx)
    interface_section = next((section for section in sections if section.spec is INTERFACE), None)
    if interface_section is None:
        raise ConfigError(path, 0, None, "no [Interface] section")
    peer_sections = [section for section in sections if section.spec is PEER]
    # Each section on its own, then the rules across sections, then names: every error of a
    # stage is reported; a later stage only runs on what the earlier ones accepted.
    errors: list[ConfigError] = []
    interface = _collecting(errors, _build_interface, interface_section, ctx)
    peers = [(_collecting(errors, _build_peer, section, ctx), section) for section in peer_sections]
    if role == "client" and not peer_sections:
        errors.append(ConfigError(path, 0, None, "no [Peer] section: a client needs its server as its first [Peer]"))
    _raise_any(errors)
    _collecting(errors, _check_peer_keys, interface, peers, ctx)
    _collecting(errors, _check_overlaps, peer_sections, ctx)
    if role == "server":
        _collecting(errors, _check_server_peer_addresses, interface_section, peer_sections, ctx)
    _raise_any(errors)
    if resolve:
        peers = [(_collecting(errors, _resolve, peer, section, ctx), section) for peer, section in peers]
        _raise_any(errors)
    return Config(path, ctx.name, role, interface, [peer for peer, _ in peers])


def parse_config(text: str, path: str, role: str, resolve: bool = True, identity: Identity | None = None) -> Config:
    """Parse config text named `path` (for messages, the default Device and relative *File keys).

    The config's own file mode is not checked here; key files named by *File keys still are, for a
    daemon running as `identity` (default: this process).
    """
    return _parse(text, os.fspath(path), role, resolve, identity or running_identity(), secrets_refused=None)


def load_config(path: str | os.PathLike[str], role: str, resolve: bool = True,
                identity: Identity | None = None, totp_secrets: bool = True) -> Config:
    """Read and parse a config file that only root or the daemon's user can change; inline secrets
    in a file others can read are refused. The daemon is `identity` (default: this process).
    Without `totp_secrets` the TOTP secret files are located but not read."""
    path = os.fspath(path)
    identity = identity or running_identity()
    text, status = _read_config_file(path, identity)
    return _parse(text, path, role, resolve, identity, secrets_refused=_secret_mode_problem(status, path, identity),
                  totp_secrets=totp_secrets)


def _read_config_file(path: str, identity: Identity) -> tuple[str, os.stat_result]:
    try:
        with open(path, "rb") as file:
            status = os.fstat(file.fileno())  # of the target when path is a symlink
            data = file.read(MAX_CONFIG_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise ConfigError(path, 0, None, f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    problem = _config_file_problem(status, path, identity)
    if problem:
        raise ConfigError(path, 0, None, problem)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(path, 0, None, f"larger than {MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        return data.decode("utf-8"), status
    except UnicodeDecodeError as exc:
        raise ConfigError(path, data.count(b"\n", 0, exc.start) + 1, None, "not UTF-8 text") from None


def load_peer_file(path: str | os.PathLike[str], identity: Identity | None = None) -> list[PeerConfig]:
    """A server's file of [Peer] sections only (an enrolled peer in its peers directory), read with
    the config file's rules: the same keys, owner and mode checks, errors naming file and line."""
    path = os.fspath(path)
    identity = identity or running_identity()
    text, status = _read_config_file(path, identity)
    ctx = _Context(path, Path(path).stem, "server", os.path.dirname(path), identity,
                   _secret_mode_problem(status, path, identity))
    sections = _read_sections(text.removeprefix("\ufeff"), ctx)
    for section in sections:
        if section.spec is not PEER:
            raise ConfigError(path, section.line, None, "a peer file holds [Peer] sections only")
    errors: list[ConfigError] = []
    peers = [_collecting(errors, _build_peer, section, ctx) for section in sections]
    _raise_any(errors)
    _collecting(errors, _check_overlaps, sections, ctx)
    _raise_any(errors)
    return [replace(peer, source=path) for peer in peers if peer is not None]


def guess_role(text: str) -> str:
    """The role a config is most likely for, when nobody said (`tunvpn check-config` without --role).

    A server-only key in [Interface] (Pool, PushRoute, ...) means server; else a client-only key
    (DNS) means client; else ListenPort means server, as in wg-quick files where only the side
    others connect to fixes its port; else client. Lenient: a broken file gets a role, and the
    real parse then reports what is broken.
    """
    names: set[str] = set()
    in_interface = False
    for raw in text.removeprefix("\ufeff").split("\n"):
        line = raw.split("#", 1)[0].strip()
        if line.startswith("["):
            in_interface = line.rstrip("]").lstrip("[").strip().lower() == "interface"
        elif in_interface and "=" in line:
            names.add(line.partition("=")[0].strip().lower())
    keys = [key for key in INTERFACE_KEYS if key.name.lower() in names]
    if any(key.roles == SERVER for key in keys):
        return "server"
    if any(key.roles == CLIENT for key in keys):
        return "client"
    return "server" if "listenport" in names else "client"

"""The server's state directory: address leases, last endpoints and second-factor
authorizations, per peer public key.

One file, `state.json`, replaced atomically (temp file in the same directory, fsync, rename,
fsync of the directory), so a crash leaves either the old or the new file, never a mix. Losing
it would move every pool client to a new address, so reading it is forgiving: a damaged file
never stops the server; each problem is reported as one line, the file is moved aside for the
admin, and every entry that still makes sense is kept. The file is written one entry per line,
which lets a truncated or partly overwritten file be salvaged line by line.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .io.atomicfile import TEMP_SUFFIX, replace_file, temp_prefix, unlink_quietly
from .keys import decode_key, encode_key
from .pool import Lease
from .secondfactor import Authorization

STATE_FILE = "state.json"
FORMAT_VERSION = 1
MAX_STATE_BYTES = 64 << 20  # ~400k peers; anything larger is not ours
MAX_REPORTED_PROBLEMS = 20  # a wrecked file must not flood the log
DIRECTORY_MODE = 0o700
FILE_MODE = 0o600
_MAX_ASIDE_NAMES = 100
_SHOWN_TEXT = 60  # characters of a bad value quoted in a problem line

Endpoint = tuple  # a socket address: (host, port) or (host, port, flowinfo, scope_id)


@dataclass
class State:
    """What survives a restart. Endpoints are kept as text (endpoint_to_text), as the file has them."""

    leases: dict[bytes, Lease] = field(default_factory=dict)
    endpoints: dict[bytes, str] = field(default_factory=dict)
    second_factor: dict[bytes, Authorization] = field(default_factory=dict)


# --- endpoints as text ---------------------------------------------------------------------------

def endpoint_to_text(address: Endpoint) -> str:
    """A socket address as `192.0.2.2:40000` or `[2001:db8::2]:40000` (`[fe80::1%3]:...` with a scope)."""
    if len(address) == 2:
        host, port = address
        _check_ip(host, 4)
        return f"{host}:{_checked_port(port)}"
    if len(address) == 4:
        host, port, _flowinfo, scope_id = address
        if isinstance(host, str):
            host = host.split("%", 1)[0]  # some APIs already append the scope to the host
        _check_ip(host, 6)
        scope = f"%{scope_id}" if scope_id else ""
        return f"[{host}{scope}]:{_checked_port(port)}"
    raise ValueError(f"{address!r} is not an IPv4 or IPv6 socket address")


def endpoint_from_text(text: str) -> Endpoint:
    """The inverse of endpoint_to_text: the tuple a UDP socket takes and recvfrom returns."""
    if not isinstance(text, str):
        raise ValueError(f"{_quote(text)} is not text")
    if text.startswith("["):
        inside, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{_quote(text)} is not [IPV6]:PORT")
        host, percent, scope = inside.partition("%")
        if percent and not re.fullmatch(r"[0-9]{1,10}", scope):
            raise ValueError(f"{_quote(text)}: the scope must be an interface index")
        _check_ip(host, 6, text)
        return (host, _parse_port(rest[1:], text), 0, int(scope) if percent else 0)
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise ValueError(f"{_quote(text)} is not HOST:PORT")
    _check_ip(host, 4, text)
    return (host, _parse_port(port_text, text))


def _check_ip(host: Any, version: int, context: Any = None) -> None:
    """inet_pton: exactly the literals a socket takes, and fast enough for a big state file."""
    try:
        socket.inet_pton(socket.AF_INET if version == 4 else socket.AF_INET6, host)
    except (OSError, TypeError, ValueError):
        raise ValueError(f"{_quote(context if context is not None else host)}: not an IPv{version} address") from None


def _checked_port(port: Any) -> int:
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"port {_quote(port)} is not 1-65535")
    return port


def _parse_port(text: str, context: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"{_quote(context)}: the port must be 1-65535")
    return int(text)


def _quote(value: Any) -> str:
    """A bad value for a problem line: shortened, with control characters escaped by repr."""
    text = value if isinstance(value, str) else json.dumps(value) if _jsonable(value) else repr(value)
    return repr(text[:_SHOWN_TEXT] + ("..." if len(text) > _SHOWN_TEXT else ""))


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


# --- entries: one lease or endpoint at a time ----------------------------------------------------

def _lease_to_json(lease: Lease) -> dict[str, str]:
    return {f"ipv{address.version}": str(address) for address in lease.addresses}


def _lease_from_json(value: Any) -> Lease:
    if not isinstance(value, dict):
        raise ValueError(f"{_quote(value)} is not an object like {{\"ipv4\": ..., \"ipv6\": ...}}")
    unknown = set(value) - {"ipv4", "ipv6"}
    if unknown:
        raise ValueError(f"unknown field {_quote(sorted(unknown)[0])}")
    ipv4 = _interface_from_json(value.get("ipv4"), 4)
    ipv6 = _interface_from_json(value.get("ipv6"), 6)
    if ipv4 is None and ipv6 is None:
        raise ValueError("holds no address")
    return Lease(ipv4, ipv6)  # type: ignore[arg-type]


def _interface_from_json(value: Any, version: int) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    if value is None:
        return None
    try:
        if not isinstance(value, str) or "%" in value:
            raise ValueError
        return ipaddress.IPv4Interface(value) if version == 4 else ipaddress.IPv6Interface(value)
    except ValueError:
        raise ValueError(f"ipv{version} {_quote(value)} is not an IPv{version} address") from None


@dataclass(frozen=True)
class _Section:
    name: str
    decode: Callable[[Any], Any]
    encode: Callable[[Any], Any]

    def read_entry(self, key_text: Any, value: Any, into: dict[bytes, Any], problems: list[str]) -> None:
        try:
            if not isinstance(key_text, str):
                raise ValueError("not text")
            public_key = decode_key(key_text)
        except ValueError as exc:
            problems.append(f"{self.name}: dropped the entry for {_quote(key_text)}: not a public key ({exc})")
            return
        try:
            into[public_key] = self.decode(value)
        except ValueError as exc:
            problems.append(f"{self.name}: dropped the entry for peer {key_text}: {exc}")


def _checked_endpoint(text: Any) -> str:
    return endpoint_to_text(endpoint_from_text(text))


def _authorization_to_json(authorization: Authorization) -> dict[str, int]:
    return {"until": authorization.until, "step": authorization.step}


def _authorization_from_json(value: Any) -> Authorization:
    if not isinstance(value, dict) or set(value) != {"until", "step"}:
        raise ValueError(f"{_quote(value)} is not an object like {{\"until\": ..., \"step\": ...}}")
    for name in ("until", "step"):
        if type(value[name]) is not int or value[name] < 0:
            raise ValueError(f"{name} {_quote(value[name])} is not a whole number of 0 or more")
    return Authorization(value["until"], value["step"])


LEASES = _Section("leases", _lease_from_json, _lease_to_json)
ENDPOINTS = _Section("endpoints", _checked_endpoint, _checked_endpoint)
SECOND_FACTOR = _Section("second_factor", _authorization_from_json, _authorization_to_json)
SECTIONS = (LEASES, ENDPOINTS, SECOND_FACTOR)


def _entries(state: State, section: _Section) -> dict[bytes, Any]:
    if section is LEASES:
        return state.leases
    return state.endpoints if section is ENDPOINTS else state.second_factor


# --- the whole file ------------------------------------------------------------------------------

class _EntryLines:
    """Each entry's line, kept while its value stays the same object or an equal one.

    The daemon saves whenever a client roams; formatting addresses is the expensive part, so a
    save re-formats only the entries that changed.
    """

    def __init__(self) -> None:
        self._cache: dict[str, dict[bytes, tuple[Any, str]]] = {section.name: {} for section in SECTIONS}

    def lines(self, section: _Section, entries: dict[bytes, Any]) -> list[str]:
        """Sorted by key (each line starts with its quoted key), without separators."""
        old = self._cache[section.name]
        new = {}
        for public_key, value in entries.items():
            cached = old.get(public_key)
            if cached is None or (cached[0] is not value and cached[0] != value):
                cached = (value, f"{json.dumps(encode_key(public_key))}: {json.dumps(section.encode(value))}")
            new[public_key] = cached
        self._cache[section.name] = new
        return sorted(line for _, line in new.values())


def serialize(state: State, entry_lines: _EntryLines | None = None) -> bytes:
    """Valid JSON with one entry per line, sorted by key: stable bytes and salvageable lines."""
    entry_lines = entry_lines or _EntryLines()
    out = ["{", f'  "version": {FORMAT_VERSION},']
    for number, section in enumerate(SECTIONS):
        out.append(f'  "{section.name}": {{')
        out.append(",\n".join(f"    {line}" for line in entry_lines.lines(section, _entries(state, section))))
        out.append("  }," if number < len(SECTIONS) - 1 else "  }")
    out.append("}")
    return "\n".join(line for line in out if line).encode("ascii") + b"\n"


def _decode(data: bytes) -> tuple[State, list[str]]:
    """Every well-formed entry of `data`, and one line per thing that was wrong."""
    state, problems = State(), []
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        skipped = _salvage_lines(data.decode("utf-8", errors="replace"), state, problems)
        summary = (f"not valid JSON ({_first_line(exc)}); read line by line: kept {len(state.leases)} leases "
                   f"and {len(state.endpoints)} endpoints, skipped {skipped} unreadable lines")
        return state, [summary, *problems]
    if not isinstance(document, dict):
        return state, [f"holds a JSON {type(document).__name__}, not an object; nothing to read"]
    if not _version_readable(document.get("version"), problems):
        return state, problems
    for name in sorted(set(document) - {"version"} - {section.name for section in SECTIONS}):
        problems.append(f"ignored the unknown field {_quote(name)}")
    for section in SECTIONS:
        entries = document.get(section.name, {})
        if not isinstance(entries, dict):
            problems.append(f"{section.name}: {_quote(entries)} is not an object; none read")
            continue
        for key_text, value in entries.items():
            section.read_entry(key_text, value, _entries(state, section), problems)
    return state, problems


def _version_readable(version: Any, problems: list[str]) -> bool:
    """A different version number means entries we cannot interpret; a damaged one is just damage."""
    if version == FORMAT_VERSION and type(version) is int:
        return True
    if type(version) is int:
        problems.append(f"format version {version}, this tunvpn reads version {FORMAT_VERSION}; nothing read")
        return False
    problems.append(f"the format version is {_quote(version) if version is not None else 'missing'}; "
                    f"reading it as version {FORMAT_VERSION}")
    return True


_SECTION_HEADER = re.compile(r'"(\w+)"\s*:\s*\{')
_VERSION_LINE = re.compile(r'"version"\s*:\s*(.*?)\s*,?')


def _salvage_lines(text: str, state: State, problems: list[str]) -> int:
    """Read back what `serialize` wrote, one line at a time; the number of lines that did not parse."""
    section: _Section | None = None
    skipped = 0
    for line in text.splitlines():
        line = line.strip()
        header = _SECTION_HEADER.fullmatch(line)
        version = _VERSION_LINE.fullmatch(line)
        if line in ("", "{", "}", "},"):
            if line.startswith("}"):
                section = None
        elif header:
            section = next((s for s in SECTIONS if s.name == header.group(1)), None)
        elif version:
            try:
                number = json.loads(version.group(1))
            except ValueError:
                number = version.group(1)
            if not _version_readable(number, problems):
                for section in SECTIONS:
                    _entries(state, section).clear()
                return skipped
        elif section is not None and (entry := _one_entry(line)) is not None:
            section.read_entry(*entry, _entries(state, section), problems)
        else:
            skipped += 1
    return skipped


def _one_entry(line: str) -> tuple[Any, Any] | None:
    try:
        entry = json.loads("{" + line.removesuffix(",") + "}")
    except ValueError:
        return None
    if not isinstance(entry, dict) or len(entry) != 1:
        return None
    return next(iter(entry.items()))


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --- the directory -------------------------------------------------------------------------------

class StateStore:
    """Loads and saves one state directory; remembers what it last wrote so unchanged saves are free."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, STATE_FILE)
        self._last_written: bytes | None = None
        self._entry_lines = _EntryLines()
        self.problems: list[str] = []  # what the last load had to repair, one log line each

    def load(self) -> State:
        """The saved state; never raises. A damaged file is moved aside and rewritten from what was kept.

        Afterwards `problems` says what was wrong (empty for a good or missing file).
        """
        self._remove_stale_temp_files()
        self.problems = []
        try:
            data = self._read()
        except FileNotFoundError:
            return State()
        except OSError as exc:
            state, problems = State(), [f"cannot read: {exc.strerror or exc}"]
        else:
            state, problems = _decode(data)
        if not problems:
            self._last_written = serialize(state, self._entry_lines)
            return state
        self._last_written = None
        self.problems = [f"{self.path}: {line}" for line in _capped(problems)]
        self.problems.extend(self._replace_damaged_file(state))
        return state

    def save(self, state: State) -> bool:
        """Write `state` atomically unless it is what the file already holds; True if written.

        Raises OSError when the directory cannot be written; the file then keeps its last state.
        """
        data = serialize(state, self._entry_lines)
        if data == self._last_written:
            return False
        self._ensure_directory()
        replace_file(self.path, data, FILE_MODE)
        self._last_written = data
        return True

    def _read(self) -> bytes:
        # O_NONBLOCK: a FIFO in place of the file is refused instead of blocking the daemon.
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError("not a regular file")
            chunks, size = [], 0
            for _ in range(MAX_STATE_BYTES // (1 << 20) + 2):  # bounded: at most one chunk past the limit
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_STATE_BYTES:
                    raise OSError(f"larger than {MAX_STATE_BYTES} bytes; not a tunvpn state file")
            return b"".join(chunks)
        finally:
            os.close(fd)

    def _replace_damaged_file(self, state: State) -> list[str]:
        """Keep the damaged file for the admin, then write the repaired state in its place."""
        lines = []
        aside = self._aside_path()
        try:
            if aside is None:
                raise OSError(f"no free name for {self.path}.corrupt-*")
            os.rename(self.path, aside)
            lines.append(f"{self.path}: moved the damaged file to {aside}")
        except OSError as exc:
            return [f"{self.path}: cannot move the damaged file aside: {exc.strerror or exc}"]
        try:
            self.save(state)
        except OSError as exc:
            lines.append(f"{self.path}: cannot write the repaired state: {exc.strerror or exc}")
        return lines

    def _aside_path(self) -> str | None:
        base = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        for attempt in range(_MAX_ASIDE_NAMES):
            candidate = base if attempt == 0 else f"{base}-{attempt}"
            if not os.path.lexists(candidate):
                return candidate
        return None

    def _remove_stale_temp_files(self) -> None:
        """Temp files of a save that crashed before its rename: never the state, so garbage."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.startswith(temp_prefix(self.path)) and name.endswith(TEMP_SUFFIX):
                unlink_quietly(os.path.join(self.directory, name))

    def _ensure_directory(self) -> None:
        if not os.path.isdir(self.directory):
            os.makedirs(self.directory, mode=DIRECTORY_MODE, exist_ok=True)
            os.chmod(self.directory, DIRECTORY_MODE)  # the umask must not decide



def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_REPORTED_PROBLEMS:
        return problems
    hidden = len(problems) - MAX_REPORTED_PROBLEMS
    return problems[:MAX_REPORTED_PROBLEMS - 1] + [f"... and {hidden + 1} more problems"]

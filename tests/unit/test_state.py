"""The state directory: atomic saves, cheap unchanged saves, and loads that survive any damage."""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import time
from pathlib import Path

import pytest

import tunvpn.state as state_module
from tunvpn.keys import decode_key, encode_key
from tunvpn.pool import AddressPool, Lease
from tunvpn.secondfactor import Authorization
from tunvpn.state import (
    MAX_REPORTED_PROBLEMS,
    State,
    StateStore,
    endpoint_from_text,
    endpoint_to_text,
    serialize,
)

iface = ipaddress.ip_interface


def key(number: int) -> bytes:
    return number.to_bytes(32, "big")


def k64(number: int) -> str:
    return encode_key(key(number))


def sample_state() -> State:
    return State(
        leases={
            key(1): Lease(iface("203.0.113.2/24"), iface("2001:db8:100::2/64")),
            key(2): Lease(iface("203.0.113.3/24"), None),
            key(3): Lease(None, iface("2001:db8:100::4/64")),
        },
        endpoints={key(1): "192.0.2.2:40000", key(2): "[2001:db8::2]:51820", key(3): "[fe80::2%7]:1"},
        second_factor={key(1): Authorization(1_700_043_200, 56_666_666), key(3): Authorization(0, 56_600_000)},
    )


def aside_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("state.json.corrupt-*"))


def load_fresh(directory: Path) -> tuple[State, list[str]]:
    """A new store each time, as after a daemon restart: what it loaded and its problems."""
    store = StateStore(directory)
    return store.load(), store.problems


# --- endpoints as text ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    "address, text",
    [
        (("192.0.2.2", 40000), "192.0.2.2:40000"),
        (("2001:db8::2", 40000, 0, 0), "[2001:db8::2]:40000"),
        (("fe80::1", 51820, 0, 3), "[fe80::1%3]:51820"),
        (("::ffff:192.0.2.2", 65535, 0, 0), "[::ffff:192.0.2.2]:65535"),
    ],
)
def test_endpoint_text_round_trip(address: tuple, text: str) -> None:
    assert endpoint_to_text(address) == text
    assert endpoint_from_text(text) == address


def test_endpoint_to_text_ignores_flowinfo_and_a_scope_already_in_the_host() -> None:
    assert endpoint_to_text(("fe80::1%3", 51820, 9, 3)) == "[fe80::1%3]:51820"


@pytest.mark.parametrize("address", [("2001:db8::2", 1), ("192.0.2.2", 1, 0, 0), ("192.0.2.2", 0),
                                     ("192.0.2.2", 65536), ("vpn.example", 1), ("192.0.2.2", "1"), ("192.0.2.2",)])
def test_endpoint_to_text_refuses_what_is_not_a_socket_address(address: tuple) -> None:
    with pytest.raises(ValueError):
        endpoint_to_text(address)


@pytest.mark.parametrize("text", ["192.0.2.2", "192.0.2.2:0", "192.0.2.2:65536", "2001:db8::2:1", "[192.0.2.2]:1",
                                  "[2001:db8::2]", "[2001:db8::2]1", "[fe80::1%eth0]:1", "vpn.example:1",
                                  "192.0.2.2:+1", "192.0.2.2: 1", ""])
def test_endpoint_from_text_refuses_bad_text(text: str) -> None:
    with pytest.raises(ValueError):
        endpoint_from_text(text)


# --- saving and loading --------------------------------------------------------------------------

def test_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "office")
    assert store.save(sample_state()) is True
    loaded, problems = load_fresh(tmp_path / "office")
    assert loaded == sample_state()
    assert problems == []


def test_file_is_the_documented_json(tmp_path: Path) -> None:
    StateStore(tmp_path).save(sample_state())
    document = json.loads((tmp_path / "state.json").read_text())
    assert document == {
        "version": 1,
        "leases": {
            k64(1): {"ipv4": "203.0.113.2/24", "ipv6": "2001:db8:100::2/64"},
            k64(2): {"ipv4": "203.0.113.3/24"},
            k64(3): {"ipv6": "2001:db8:100::4/64"},
        },
        "endpoints": {k64(1): "192.0.2.2:40000", k64(2): "[2001:db8::2]:51820", k64(3): "[fe80::2%7]:1"},
        "second_factor": {k64(1): {"until": 1_700_043_200, "step": 56_666_666},
                          k64(3): {"until": 0, "step": 56_600_000}},
    }


def test_missing_directory_and_file_give_an_empty_state_and_create_nothing(tmp_path: Path) -> None:
    assert load_fresh(tmp_path / "absent") == (State(), [])
    assert not (tmp_path / "absent").exists()
    assert load_fresh(tmp_path) == (State(), [])


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_modes_directory_0700_file_0600(tmp_path: Path, umask: int) -> None:
    directory = tmp_path / "lib" / "tunvpn" / "office"
    old = os.umask(umask)
    try:
        StateStore(directory).save(sample_state())
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "state.json").stat().st_mode) == 0o600
    assert [p.name for p in directory.iterdir()] == ["state.json"]


def test_unchanged_state_is_not_written_again(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    state = sample_state()
    assert store.save(state) is True
    inode = (tmp_path / "state.json").stat().st_ino
    assert store.save(state) is False
    assert store.save(sample_state()) is False  # equal content, another object
    assert (tmp_path / "state.json").stat().st_ino == inode
    state.endpoints[key(1)] = "192.0.2.9:40001"  # a client roamed
    assert store.save(state) is True
    assert (tmp_path / "state.json").stat().st_ino != inode
    assert load_fresh(tmp_path)[0].endpoints[key(1)] == "192.0.2.9:40001"


def test_reused_lines_never_go_stale(tmp_path: Path) -> None:
    """Saves after changes, removals and re-additions write what a fresh serialization writes."""
    store = StateStore(tmp_path)
    state = sample_state()
    changes = [
        lambda: state.endpoints.update({key(2): "[2001:db8::9]:1"}),
        lambda: state.leases.update({key(1): Lease(iface("203.0.113.9/24"), None)}),
        lambda: state.leases.pop(key(3)),
        lambda: state.leases.update({key(3): Lease(None, iface("2001:db8:100::4/64"))}),
        lambda: state.endpoints.clear(),
        lambda: state.endpoints.update({key(4): "192.0.2.4:4"}),
    ]
    for change in changes:
        change()
        assert store.save(state) is True
        assert (tmp_path / "state.json").read_bytes() == serialize(state)
        assert load_fresh(tmp_path) == (state, [])


def test_problems_belong_to_the_last_load(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_bytes(b"junk")
    store = StateStore(tmp_path)
    store.load()
    assert store.problems
    assert store.load() == State()
    assert store.problems == []


def test_saving_a_bad_endpoint_is_a_caller_bug(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        StateStore(tmp_path).save(State(endpoints={key(1): "vpn.example:51820"}))
    assert not (tmp_path / "state.json").exists()


def test_a_clean_load_counts_as_written(tmp_path: Path) -> None:
    StateStore(tmp_path).save(sample_state())
    store = StateStore(tmp_path)
    loaded = store.load()
    assert store.save(loaded) is False
    loaded.leases.pop(key(3))
    assert store.save(loaded) is True


def test_save_fsyncs_the_file_and_the_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    StateStore(tmp_path).save(sample_state())
    assert synced == ["file", "dir"]


def test_failed_rename_leaves_the_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    store.save(sample_state())
    before = (tmp_path / "state.json").read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    changed = sample_state()
    changed.leases.clear()
    with pytest.raises(OSError):
        store.save(changed)
    monkeypatch.undo()
    assert (tmp_path / "state.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # the temp file is gone
    assert store.save(changed) is True  # not mistaken for already written
    assert load_fresh(tmp_path)[0].leases == {}


def test_temp_file_left_by_a_killed_save_is_ignored_and_removed(tmp_path: Path) -> None:
    StateStore(tmp_path).save(sample_state())
    leftover = tmp_path / ".state.json.k1ll3d.tmp"
    leftover.write_text('{"version": 1, "leases": {}, "endpoints": {}}\n')
    assert load_fresh(tmp_path) == (sample_state(), [])
    assert not leftover.exists()


def test_save_raises_when_the_directory_cannot_exist(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        StateStore(tmp_path / "file" / "office").save(sample_state())


def test_saved_leases_feed_the_pool_after_a_restart(tmp_path: Path) -> None:
    pool = AddressPool([iface("203.0.113.1/24"), iface("2001:db8:100::1/64")])
    first = {n: pool.lease(key(n)) for n in range(1, 6)}
    pool.release(key(2))
    StateStore(tmp_path).save(State(leases=pool.leases()))
    restarted = AddressPool([iface("203.0.113.1/24"), iface("2001:db8:100::1/64")])
    assert restarted.restore(load_fresh(tmp_path)[0].leases) == []
    assert {n: restarted.lease(key(n)) for n in (1, 3, 4, 5)} == {n: first[n] for n in (1, 3, 4, 5)}
    assert restarted.lease(key(9)) == first[2]  # the released address is the lowest free one


# --- damaged files -------------------------------------------------------------------------------

GOOD_LEASE = {"ipv4": "203.0.113.2/24", "ipv6": "2001:db8:100::2/64"}


def document(leases: object = None, endpoints: object = None, **extra: object) -> dict:
    return {"version": 1, "leases": leases if leases is not None else {k64(1): GOOD_LEASE},
            "endpoints": endpoints if endpoints is not None else {k64(1): "192.0.2.2:40000"}, **extra}


def as_bytes(value: object) -> bytes:
    return json.dumps(value).encode()


DAMAGED = {
    # name: (file content, leases kept, endpoints kept)
    "garbage": (b"\x00\xff garbage \x89PNG\r\n", 0, 0),
    "empty": (b"", 0, 0),
    "list": (as_bytes([1, 2, 3]), 0, 0),
    "string": (as_bytes("leases"), 0, 0),
    "leases not an object": (as_bytes(document(leases=[GOOD_LEASE])), 0, 1),
    "endpoints not an object": (as_bytes(document(endpoints="192.0.2.2:1")), 1, 0),
    "newer version": (as_bytes({**document(), "version": 2}), 0, 0),
    "version missing": (as_bytes({k: v for k, v in document().items() if k != "version"}), 1, 1),
    "version garbage": (as_bytes({**document(), "version": "one"}), 1, 1),
    "unknown field": (as_bytes(document(comment="hi")), 1, 1),
    "bad keys": (as_bytes(document(
        leases={k64(1): GOOD_LEASE, "short": GOOD_LEASE, encode_key(bytes(16)): GOOD_LEASE,
                k64(2)[:-2] + "x=": GOOD_LEASE, "\x1b[31mred": GOOD_LEASE},
        endpoints={k64(1): "192.0.2.2:40000", "": "192.0.2.3:1"})), 1, 1),
    "bad addresses": (as_bytes(document(leases={
        k64(1): GOOD_LEASE,
        k64(2): {"ipv4": "2001:db8:100::3/64"},
        k64(3): {"ipv4": "203.0.113.300/24"},
        k64(4): {},
        k64(5): {"ipv4": None, "ipv6": None},
        k64(6): {"ipv4": 7},
        k64(7): "203.0.113.8",
        k64(8): {"ipv4": "203.0.113.9/24", "mac": "x"},
        k64(9): {"ipv6": "fe80::1%eth0/64"},
        k64(10): {"ipv4": "203.0.113.11"},  # a bare address is fine
    })), 2, 1),
    "bad endpoints": (as_bytes(document(endpoints={
        k64(1): "192.0.2.2:40000", k64(2): "192.0.2.2", k64(3): ["192.0.2.2", 1], k64(4): "[2001:db8::2]:0",
        k64(5): "vpn.example:51820", k64(6): None})), 1, 1),
    "garbage line in the middle": (
        serialize(sample_state()).replace(f'"{k64(2)}": {{'.encode(), b"\x00\xde\xad", 1), 2, 3),
}


@pytest.mark.parametrize("name", list(DAMAGED))
def test_damaged_file_never_raises_keeps_good_entries_and_is_moved_aside(tmp_path: Path, name: str) -> None:
    content, leases_kept, endpoints_kept = DAMAGED[name]
    (tmp_path / "state.json").write_bytes(content)
    loaded, problems = load_fresh(tmp_path)
    assert len(loaded.leases) == leases_kept
    assert len(loaded.endpoints) == endpoints_kept
    assert problems and all("\n" not in line and "\x1b" not in line for line in problems)
    assert any("moved the damaged file" in line for line in problems)
    [aside] = aside_files(tmp_path)
    assert aside.read_bytes() == content
    # What was kept is on disk again, in a clean file that loads without problems.
    assert load_fresh(tmp_path) == (loaded, [])
    assert len(aside_files(tmp_path)) == 1
    assert len(aside_files(tmp_path)) == 1


def test_kept_entries_are_the_right_ones(tmp_path: Path) -> None:
    content, _, _ = DAMAGED["bad addresses"]
    (tmp_path / "state.json").write_bytes(content)
    loaded, problems = load_fresh(tmp_path)
    assert loaded.leases == {key(1): Lease(iface("203.0.113.2/24"), iface("2001:db8:100::2/64")),
                             key(10): Lease(iface("203.0.113.11/32"), None)}
    assert sum(f"peer {k64(n)}" in "\n".join(problems) for n in range(2, 10)) == 8


def test_truncated_anywhere_keeps_exactly_the_complete_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut the file at every byte: never raise, never invent, keep every entry whose line is whole."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # hundreds of repairs; durability is tested elsewhere
    original = sample_state()
    data = serialize(original)
    for cut in range(len(data)):
        (tmp_path / "state.json").write_bytes(data[:cut])
        loaded, _ = load_fresh(tmp_path)
        whole = whole_entries(data, cut)
        assert loaded.leases == {k: v for k, v in original.leases.items() if k in whole["leases"]}, cut
        assert loaded.endpoints == {k: v for k, v in original.endpoints.items() if k in whole["endpoints"]}, cut
        assert loaded.second_factor == {k: v for k, v in original.second_factor.items()
                                        if k in whole["second_factor"]}, cut
        for aside in aside_files(tmp_path):
            aside.unlink()
        (tmp_path / "state.json").unlink()


def whole_entries(data: bytes, cut: int) -> dict[str, set[bytes]]:
    """Per section, the keys whose entry line (but perhaps not its trailing comma) ends before `cut`."""
    whole: dict[str, set[bytes]] = {"leases": set(), "endpoints": set(), "second_factor": set()}
    section, position = None, 0
    for line in data.decode("ascii").splitlines(keepends=True):
        body = line.strip().removesuffix(",")
        if body.endswith("{") and body != "{":
            section = json.loads(body.split(":")[0])
        elif body.startswith("}"):
            section = None
        elif section and position + len(line.rstrip("\n").removesuffix(",")) <= cut:
            [key_text] = json.loads("{" + body + "}")
            whole[section].add(decode_key(key_text))
        position += len(line)
    return whole


def test_bad_second_factor_entries_are_dropped_and_the_good_kept(tmp_path: Path) -> None:
    good = {"until": 1_700_000_000, "step": 5}
    entries = {k64(1): good, k64(2): {"until": -1, "step": 5}, k64(3): {"until": True, "step": 5},
               k64(4): {"until": 1}, k64(5): [1, 2], k64(6): {"until": 1, "step": 2, "extra": 3},
               k64(7): {"until": "soon", "step": 1}}
    (tmp_path / "state.json").write_bytes(as_bytes(document(second_factor=entries)))
    loaded, problems = load_fresh(tmp_path)
    assert loaded.second_factor == {key(1): Authorization(1_700_000_000, 5)}
    assert sum(f"second_factor: dropped the entry for peer {k64(n)}" in "\n".join(problems) for n in range(2, 8)) == 6


def test_problem_lines_are_capped(tmp_path: Path) -> None:
    leases = {f"bad{n}": GOOD_LEASE for n in range(200)}
    (tmp_path / "state.json").write_bytes(as_bytes(document(leases={**leases, k64(1): GOOD_LEASE})))
    loaded, problems = load_fresh(tmp_path)
    assert len(loaded.leases) == 1
    assert len(problems) == MAX_REPORTED_PROBLEMS + 1  # the capped lines, then where the file went
    assert "181 more problems" in problems[MAX_REPORTED_PROBLEMS - 1]


def test_two_damaged_loads_keep_both_files(tmp_path: Path) -> None:
    for content in (b"first", b"second"):
        (tmp_path / "state.json").write_bytes(content)
        load_fresh(tmp_path)
    assert sorted(p.read_bytes() for p in aside_files(tmp_path)) == [b"first", b"second"]


def test_a_directory_in_place_of_the_file(tmp_path: Path) -> None:
    (tmp_path / "state.json").mkdir()
    loaded, problems = load_fresh(tmp_path)
    assert loaded == State() and "not a regular file" in problems[0]
    assert len(aside_files(tmp_path)) == 1
    assert (tmp_path / "state.json").is_file()


def test_a_fifo_in_place_of_the_file_does_not_hang(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "state.json")
    started = time.monotonic()
    loaded, problems = load_fresh(tmp_path)
    assert time.monotonic() - started < 5
    assert loaded == State() and "not a regular file" in problems[0]


def test_an_oversized_file_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "MAX_STATE_BYTES", 100)
    (tmp_path / "state.json").write_bytes(serialize(sample_state()))
    loaded, problems = load_fresh(tmp_path)
    assert loaded == State() and "larger than 100 bytes" in problems[0]


def test_a_damaged_file_that_cannot_be_moved_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "state.json").write_bytes(b"junk")

    def refuse(src: str, dst: str) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(os, "rename", refuse)
    loaded, problems = load_fresh(tmp_path)
    assert loaded == State()
    assert "cannot move the damaged file aside: Read-only file system" in problems[-1]
    assert (tmp_path / "state.json").read_bytes() == b"junk"

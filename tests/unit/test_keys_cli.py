"""`tunvpn genkey|pubkey|genpsk` behave like `wg genkey|pubkey|genpsk`.

`wg` (wireguard-tools) is the reference: `make test` installs it, and its absence is a
failure here, never a skip.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from tunvpn.keys import InvalidKey, decode_key, encode_key, generate_preshared_key, generate_private_key

REPO_ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 30

# RFC 7748 section 6.1 (Alice): a key pair with a published public half.
ALICE_PRIVATE = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")


def tunvpn(*args: str, stdin: bytes = b"", stdout: int | IO[bytes] = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    # As under a UTF-8 user locale: Python's text stdin is then strict (under C.UTF-8 it is
    # surrogateescape), which is where undecodable input used to end in a traceback.
    env["PYTHONIOENCODING"] = "utf-8:strict"
    return subprocess.run(
        [sys.executable, "-m", "tunvpn", *args],
        input=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=TIMEOUT,
        env=env,
        cwd=REPO_ROOT,
        check=False,
    )


def wg(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    path = shutil.which("wg")
    if path is None:
        pytest.fail("`wg` (wireguard-tools) is missing: `sudo make test` installs it")
    return subprocess.run([path, *args], input=stdin, capture_output=True, timeout=TIMEOUT, check=False)


def _single_key_line(result: subprocess.CompletedProcess[bytes]) -> bytes:
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    text = result.stdout.decode("ascii")
    assert text.endswith("\n") and text.count("\n") == 1
    line = text.rstrip("\n")
    assert len(line) == 44 and line.endswith("=")
    raw = base64.b64decode(line, validate=True)
    assert len(raw) == 32
    return raw


def _is_clamped(raw: bytes) -> bool:
    return raw[0] & 0b0000_0111 == 0 and raw[31] & 0b1000_0000 == 0 and raw[31] & 0b0100_0000 != 0


def test_genkey_prints_base64_of_32_clamped_bytes() -> None:
    keys = {_single_key_line(tunvpn("genkey")) for _ in range(3)}
    assert len(keys) == 3
    assert all(_is_clamped(key) for key in keys)


def test_genpsk_prints_base64_of_32_random_bytes() -> None:
    keys = {_single_key_line(tunvpn("genpsk")) for _ in range(3)}
    assert len(keys) == 3


@pytest.mark.parametrize("command", ["genkey", "genpsk"])
def test_a_key_written_to_a_file_others_can_open_gets_a_warning(command: str, tmp_path: Path) -> None:
    """As from `wg genkey`: the key is written all the same, and the warning goes to stderr."""
    for mode, warned in ((0o644, True), (0o604, True), (0o602, True), (0o640, False), (0o600, False)):
        path = tmp_path / f"{mode:o}.key"
        path.touch()
        path.chmod(mode)
        with open(path, "wb") as file:
            result = tunvpn(command, stdout=file)
        assert result.returncode == 0
        assert len(base64.b64decode(path.read_bytes().strip(), validate=True)) == 32
        warning = (f"tunvpn {command}: warning: the key goes to a file other users can open (mode {mode:04o}); "
                   "set the umask to 077 and make a new key\n").encode()
        assert result.stderr == (warning if warned else b"")


def test_pubkey_of_the_rfc7748_key() -> None:
    result = tunvpn("pubkey", stdin=encode_key(ALICE_PRIVATE).encode() + b"\n")
    assert _single_key_line(result) == ALICE_PUBLIC


def test_pubkey_matches_wg_pubkey() -> None:
    # A fresh wg key, a fresh tunvpn key, and unclamped random bytes (both clamp internally).
    privates = [
        wg("genkey").stdout,
        tunvpn("genkey").stdout,
        encode_key(os.urandom(32)).encode() + b"\n",
        encode_key(b"\xff" * 32).encode(),  # no newline at all
    ]
    for private in privates:
        reference = wg("pubkey", stdin=private)
        assert reference.returncode == 0, reference.stderr
        ours = tunvpn("pubkey", stdin=private)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == reference.stdout


def test_genkey_output_is_accepted_by_wg() -> None:
    private = tunvpn("genkey").stdout
    assert wg("pubkey", stdin=private).returncode == 0


def _non_canonical(key: bytes) -> bytes:
    """The same 32 bytes, spelled with a stray low bit in the character before '='."""
    text = encode_key(key)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet[alphabet.index(text[42]) | 1]
    return (text[:42] + last + "=").encode()


BAD_INPUTS = {
    "empty": b"",
    "newline only": b"\n",
    "not base64": b"this is not a key at all!!!!!!!!!!!!!!!!!!!\n",
    "31 bytes": base64.b64encode(bytes(31)) + b"\n",
    "33 bytes": base64.b64encode(bytes(33)) + b"\n",
    "64 bytes": base64.b64encode(bytes(64)) + b"\n",
    "not ascii": b"\xff\xfe\xfd\n",
    "utf-8 text": "clé privée".encode() + b"\n",
    "trailing garbage": encode_key(bytes(32)).encode() + b" x\n",
    "two keys": (encode_key(bytes(32)) + "\n" + encode_key(bytes(32)) + "\n").encode(),
    "missing padding": encode_key(bytes(32)).encode()[:43] + b"\n",
    "non-canonical": _non_canonical(os.urandom(32)) + b"\n",
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_pubkey_bad_input_exits_2_with_one_line(name: str) -> None:
    result = tunvpn("pubkey", stdin=BAD_INPUTS[name])
    assert result.returncode == 2
    assert result.stdout == b""
    message = result.stderr.decode("utf-8", errors="replace")
    assert "Traceback" not in message
    assert message.startswith("tunvpn pubkey: ") and message.endswith("\n") and message.count("\n") == 1
    assert wg("pubkey", stdin=BAD_INPUTS[name]).returncode != 0  # wg refuses it too


def test_error_messages_never_quote_the_input() -> None:
    """config.py relays these messages; a near-miss key may still be a secret."""
    secretish = base64.b64encode(b"s3cret-material-" * 2 + b"x").decode()
    with pytest.raises(InvalidKey) as caught:
        decode_key(secretish)
    assert secretish not in str(caught.value)
    with pytest.raises(InvalidKey) as caught:
        decode_key(_non_canonical(b"s3cret-material-" * 2).decode())
    assert "s3cret" not in str(caught.value) and "czNj" not in str(caught.value)


def test_decode_encode_round_trip() -> None:
    for raw in (bytes(32), b"\xff" * 32, os.urandom(32), generate_private_key(), generate_preshared_key()):
        assert decode_key(encode_key(raw)) == raw
        assert decode_key("  " + encode_key(raw) + "\n") == raw
    assert issubclass(InvalidKey, ValueError)


def test_generated_private_keys_are_clamped() -> None:
    assert all(_is_clamped(generate_private_key()) for _ in range(100))


def test_no_subcommand_is_a_usage_error() -> None:
    result = tunvpn()
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr

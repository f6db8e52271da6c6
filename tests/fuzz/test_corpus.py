"""Every fuzz target on its seeds, its corpus and seeded mutations of them, in-process and cheap,
under both interpreters (the campaign itself needs atheris, a venv package).  Also the
regression tests for what the campaign found."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from targets import NAMES, target

CORPUS = Path(__file__).resolve().parent / "corpus"
MUTATIONS_PER_TARGET = 300


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(4)
        if choice == 0 and out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:
            del out[rng.randrange(len(out)):]
        elif choice == 2:
            out[rng.randint(0, len(out)):rng.randint(0, len(out))] = rng.randbytes(rng.randint(1, 8))
        elif out:
            out[rng.randrange(len(out))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF))
    return bytes(out)


@pytest.mark.parametrize("name", NAMES)
def test_target_takes_its_seeds_corpus_and_mutations(name):
    fuzz_target = target(name)
    inputs = fuzz_target.seeds() + [path.read_bytes() for path in sorted((CORPUS / name).glob("*"))]
    assert len(inputs) >= 3
    rng = random.Random(name)
    inputs += [_mutate(rng, rng.choice(inputs)) for _ in range(MUTATIONS_PER_TARGET)]
    for data in inputs:
        fuzz_target.run(data)


def test_the_canary_sings():
    """The one target that must fail, so the harness can be seen to catch an exception."""
    with pytest.raises(RuntimeError):
        target("canary").run(b"FUZZ")

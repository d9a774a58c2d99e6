"""Fuzz the network-facing decoders (issue 15): N inputs per target, and what they did.

Targets (bench/fuzz_targets.py): connect (CONNECT codec), fgh1 (stream header), mux (frames),
http1 (HTTP/1.1 reader), dns (query parsing and answering), config (YAML documents through
schema validation). A crash is any exception but the target's documented error type, an input
that runs over `HANG` (1 s; SIGALRM interrupts it), or a MemoryError; crashing inputs are
saved under `--crash-dir`. Each target prints inputs run, exec/s, crashes, peak RSS and the
most frequent (documented) errors seen.

The engine is a structure-aware mutation fuzzer seeded from valid encodings (bit flips,
interesting bytes, inserted/deleted/duplicated ranges, splices of two inputs, the target's
tokens such as `\\r\\n` or a 5000-digit number); an input that produced an outcome not seen
before joins the corpus (a cheap stand-in for coverage feedback). It needs nothing installed,
so tests/bench/test_fuzz_smoke.py runs it in CI. Why not atheris: it installs (3.0 has Python
3.11 wheels), but instrumenting what the targets import (~10 500 functions) had not finished
after 2.5 minutes on the shared 2-core machine, and per input it runs the same Python code.

    .venv/bin/python bench/fuzz.py [--target dns ...] [--inputs 1000000] [--seconds 1800]
        [--seed 1]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import random
import re
import resource
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fuzz_targets import TARGETS, Target

HANG = 1.0  # seconds one input may take before it counts as a hang
MAX_LEN = 12_000  # bytes: above every bound a decoder enforces (CONNECT head: 8192)
MAX_CORPUS = 512
MAX_SHAPES = 1000  # distinct error messages counted one by one
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x0A, 0x0D, 0x3A, 0xC0)


class HangError(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise HangError(f"input ran over {HANG} s")


@dataclass
class Stats:
    target: str
    inputs: int = 0
    crashes: int = 0
    seconds: float = 0.0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    crash_kinds: collections.Counter[str] = field(default_factory=collections.Counter)

    def count(self, shape: str) -> None:
        # Bounded, so that the harness's own memory stays flat and peak RSS means the decoder's:
        # messages that quote peer bytes unquoted would otherwise make a million shapes.
        if shape in self.errors or len(self.errors) < MAX_SHAPES:
            self.errors[shape] += 1
        else:
            self.errors["(other messages)"] += 1

    def line(self) -> str:
        rate = self.inputs / self.seconds if self.seconds else 0.0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        top = "; ".join(f"{n}x {m}" for m, n in self.errors.most_common(4)) or "-"
        crashes = "; ".join(f"{n}x {m}" for m, n in self.crash_kinds.most_common(3))
        return (
            f"{self.target}: {self.inputs} inputs in {self.seconds:.0f} s ({rate:.0f}/s), "
            f"{self.crashes} crashes{f' ({crashes})' if crashes else ''}, "
            f"peak RSS {peak:.0f} MiB; errors seen: {top}"
        )


_DIGITS = re.compile(r"\d+")


def _shape(e: BaseException) -> str:
    # Group messages by shape: the same error with other numbers or quoted bytes is one kind.
    text = _DIGITS.sub("N", str(e).split("'")[0].split('"')[0])[:70]
    return f"{type(e).__name__}: {text}"


def check(target: Target, data: bytes, stats: Stats, crash_dir: Path | None) -> str | None:
    """Run one input; the error's shape (None if it decoded), a crash recorded in `stats`."""
    stats.inputs += 1
    signal.setitimer(signal.ITIMER_REAL, HANG)
    try:
        outcome = target.run(data)
        if outcome is not None:
            outcome = _DIGITS.sub("N", outcome.split("'")[0].split('"')[0])[:70]
            stats.count(outcome)
        return outcome
    except target.expected as e:
        shape = _shape(e)
        stats.count(shape)
        return shape
    except (Exception, HangError) as e:  # a crash; MemoryError and RecursionError included
        shape = f"CRASH {_shape(e)}"
        stats.crashes += 1
        stats.crash_kinds[shape] += 1
        if crash_dir is not None and stats.crash_kinds[shape] <= 3:
            crash_dir.mkdir(parents=True, exist_ok=True)
            name = f"{target.name}-{hashlib.sha256(data).hexdigest()[:16]}"
            (crash_dir / name).write_bytes(data)
        return shape
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


# --- the mutate engine ---------------------------------------------------------------------------


def mutate(
    rng: random.Random, data: bytes, corpus: list[bytes], tokens: tuple[bytes, ...]
) -> bytes:
    buf = bytearray(data)
    for _ in range(1 + int(rng.expovariate(0.7))):
        op = rng.randrange(9)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:  # flip a bit
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # an interesting byte
            buf[min(pos, len(buf) - 1)] = rng.choice(INTERESTING)
        elif op == 2:  # random bytes in
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif op == 3 and buf:  # a range out
            del buf[pos : pos + rng.randrange(1, 33)]
        elif op == 4 and buf:  # a range repeated
            start = rng.randrange(len(buf))
            piece = buf[start : start + rng.randrange(1, 65)]
            buf[pos:pos] = piece * rng.randrange(1, 5)
        elif op == 5 and tokens:
            buf[pos:pos] = rng.choice(tokens)
        elif op == 6:  # splice: this input's head, another's tail
            other = rng.choice(corpus)
            buf = buf[:pos] + other[rng.randrange(len(other) + 1) :]
        elif op == 7 and buf:  # truncate
            del buf[pos:]
        elif op == 8 and len(buf) >= 2:  # a 16-bit field set to an edge value
            i = min(pos, len(buf) - 2)
            buf[i : i + 2] = rng.choice((0, 1, 0x7FFF, 0x8000, 0xFFFF, 4096, 4097)).to_bytes(2)
    return bytes(buf[:MAX_LEN])


def run_mutate(
    target: Target, inputs: int, seconds: float, seed: int, crash_dir: Path | None
) -> Stats:
    rng = random.Random(seed)
    corpus = list(target.seeds)
    stats = Stats(target.name)
    seen: set[str | None] = set()
    started = time.monotonic()
    deadline = started + seconds
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for data in _inputs(target, rng, corpus, inputs):
            shape = check(target, data, stats, crash_dir)
            # A new behaviour is worth mutating further; `seen` is bounded like the tally.
            if shape not in seen and len(seen) < 10 * MAX_SHAPES:
                seen.add(shape)
                corpus.append(data)
                del corpus[: max(0, len(corpus) - MAX_CORPUS)]
            if stats.inputs % 1024 == 0 and time.monotonic() > deadline:
                break
    finally:
        signal.signal(signal.SIGALRM, previous)
    stats.seconds = time.monotonic() - started
    return stats


def _inputs(target: Target, rng: random.Random, corpus: list[bytes], n: int) -> Iterator[bytes]:
    yield from target.seeds[:n]
    for _ in range(n - len(target.seeds[:n])):
        yield mutate(rng, rng.choice(corpus), corpus, target.tokens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS))
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per target")
    parser.add_argument("--seconds", type=float, default=1800.0, help="time cap per target")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--crash-dir", type=Path, default=Path("bench/results/fuzz-crashes"))
    args = parser.parse_args()
    crashes = 0
    for name in args.target or list(TARGETS):
        stats = run_mutate(TARGETS[name], args.inputs, args.seconds, args.seed, args.crash_dir)
        print(stats.line(), flush=True)
        crashes += stats.crashes
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())

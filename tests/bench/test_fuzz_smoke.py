"""A short run of bench/fuzz.py's mutation fuzzer over every network-facing decoder.

The million-input runs are outside CI time (docs/operations.md, "Fuzzing"); this keeps the
harness working and catches a decoder that starts raising what it does not promise.
"""

from __future__ import annotations

import pytest

from bench.fuzz import run_mutate
from bench.fuzz_targets import TARGETS

INPUTS = {"config": 600}  # YAML and schema validation: ~2500 inputs/s; the others ~15 000/s


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_decoder_survives_mutated_inputs(name: str) -> None:
    stats = run_mutate(TARGETS[name], INPUTS.get(name, 3000), 20.0, seed=15, crash_dir=None)
    assert stats.crashes == 0, stats.line()
    assert stats.inputs == INPUTS.get(name, 3000)
    # The mutations reached the decoder's refusals, not just its happy path.
    assert len(stats.errors) >= 3, stats.line()

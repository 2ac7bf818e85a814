"""The teacher-student adapters give the values pinned in tests/fixtures/teacher_pins.safetensors,
recorded before CoTTA, ViDA and VDP moved onto one shared base (see tests/teacher_pins.py)."""

from __future__ import annotations

import pytest
import torch

from teacher_pins import CASES, FIXTURE, run_case


@pytest.fixture(scope="module")
def pinned() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURE))


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_state_match_the_pinned_values(case, pinned):
    got = run_case(case)
    want = {k: v for k, v in pinned.items() if k.startswith(f"{case}.")}
    assert want and set(got) == set(want), sorted(set(got) ^ set(want))
    for key, value in want.items():
        # The same code on this machine reproduces the file bit for bit; the tolerance only leaves
        # room for another CPU's float rounding.
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=key)

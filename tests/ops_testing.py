"""Shared helpers of the op tests: tolerance table, device list, skip reasons."""

from __future__ import annotations

import pytest
import torch

import tta.ops

#: (rtol, atol) per dtype, kornia-style: outputs are computed in fp32 and rounded once, so the
#: low-precision tolerances are one unit in the last place of the output dtype.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

requires_compiled = pytest.mark.skipif(
    tta.ops.backend() == "torch",
    reason=f"tta._C is not built/loaded ({tta.ops.LOAD_ERROR}); tests/test_build.py covers the build",
)

_cuda_reason = (
    "no CUDA GPU visible" if not torch.cuda.is_available() else "tta._C was built without CUDA kernels"
)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(
                not (torch.cuda.is_available() and tta.ops.backend() == "cpp+cuda"), reason=_cuda_reason
            ),
        ],
    ),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol, msg=msg or None)

"""Small real models and streams shared by the engine, frame, multi-stream and CLI tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tta.streams.base import TensorStream


@pytest.fixture
def single_thread():
    """Tiny models gain nothing from intra-op threads; on a loaded 2-core box they stall on them."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cnn(num_classes: int = 10, in_chans: int = 3, seed: int = 1) -> nn.Module:
    """A 2-conv BatchNorm CNN with non-trivial source statistics (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(in_chans, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def domain_data(n: int, shift: float, seed: int, num_classes: int = 10, size: int = 8, labeled: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, size, size, generator=g) * 0.5 + shift).clamp(0, 1)
    y = torch.randint(0, num_classes, (n,), generator=g) if labeled else None
    return x, y


def tensor_stream(sizes: dict[str, int] | list[tuple[str, int]], batch_size: int, labeled: bool = True) -> TensorStream:
    items = list(sizes.items()) if isinstance(sizes, dict) else list(sizes)
    segments = []
    for i, (name, n) in enumerate(items):
        x, y = domain_data(n, shift=0.15 * i, seed=100 + i, labeled=labeled)
        segments.append((name, x, y))
    return TensorStream(segments, batch_size)


def model_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def bench_script(name: str):
    """A script of `bench/` imported as a module (``bench_script("long_streams")``), for its functions."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

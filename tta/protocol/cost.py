"""What an adapter costs beside the source model: time per image and peak memory of a step.

Time (`step_cost`): the adapter's predict-and-adapt step and the source model's forward (eval mode,
inference mode) are timed in pairs on the same batch, one right after the other, over the batches of a
stream; the cost is the sum of the step times over the sum of the source times (so load drifts hit both
alike and the ratio reflects the stream's mix of batches: CoTTA's views run only on unconfident ones).

Memory (`step_memory`): what a deployment holds and allocates, counted in tensor bytes by PyTorch's
allocator, independent of the Python heap and of the C allocator's caching:
- resident: every distinct tensor storage the module owns (model weights and buffers; for an adapter
  also its teacher/anchor copies, optimizer state, memory bank, prompts: everything its `state_dict`
  holds), measured after one warm-up step (lazily created optimizer state included);
- transient peak: the largest increase of live tensor bytes during one call (a source forward under
  inference mode; one adaptation step), from the torch profiler's memory timeline (allocations and
  frees in order);
- the figure a table shows: (adapter resident + step peak) / (source resident + forward peak), on the
  same batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


def _storages(obj: Any, seen: dict[int, int]) -> None:
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "meta" and obj.numel() > 0:
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _storages(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, seen)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of the distinct tensor storages `module` owns: parameters, buffers and everything its
    `state_dict` holds (nested dicts such as optimizer state included)."""
    seen: dict[int, int] = {}
    _storages(list(module.parameters()), seen)
    _storages(list(module.buffers()), seen)
    _storages(module.state_dict(keep_vars=True), seen)
    return sum(seen.values())


def transient_peak_bytes(fn: Callable[[], Any]) -> int:
    """The largest increase of live tensor bytes while `fn()` runs (torch profiler memory timeline).
    Tensors that existed before count only through their frees (which lower the running total)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return int(peak)


def step_memory(adapter: nn.Module, source: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    """Resident and transient bytes of `adapter` (one warm-up step, then one measured step) and of a
    `source` forward (eval, inference mode) on batch `x`, and the ratio of the totals."""
    source.eval()

    def forward() -> None:
        with torch.inference_mode():
            source(x)

    forward()  # warm-up (lazy initialisation in the first call)
    source_peak = transient_peak_bytes(forward)
    source_resident = resident_bytes(source)
    adapter(x)  # warm-up step: optimizer state and other lazily created state exist afterwards
    step_peak = transient_peak_bytes(lambda: adapter(x))
    adapter_resident = resident_bytes(adapter)
    source_total = source_resident + source_peak
    adapter_total = adapter_resident + step_peak
    return {
        "source_resident_bytes": source_resident, "source_forward_peak_bytes": source_peak,
        "adapter_resident_bytes": adapter_resident, "step_peak_bytes": step_peak,
        "ratio": adapter_total / source_total if source_total else None,
        "batch": list(x.shape),
    }


def step_cost(adapter: nn.Module, source: nn.Module, batches: Iterable[torch.Tensor], warmup: int = 1) -> dict[str, Any]:
    """Paired timing over `batches`: adapter step, then source forward (eval, inference mode) on the
    same batch; the first `warmup` pairs are not counted. Returns the sums, the ratio and per-pair
    ratios."""
    source.eval()
    step_s: list[float] = []
    source_s: list[float] = []
    images = 0
    for i, x in enumerate(batches):
        t0 = time.perf_counter()
        adapter(x).argmax(1).tolist()  # the prediction read back, as a caller does
        t1 = time.perf_counter()
        with torch.inference_mode():
            source(x).argmax(1).tolist()
        t2 = time.perf_counter()
        if i >= warmup:
            step_s.append(t1 - t0)
            source_s.append(t2 - t1)
            images += int(x.shape[0])
    if not step_s:
        raise ValueError(f"step_cost needs more than {warmup} batch(es)")
    pairs = sorted(a / b for a, b in zip(step_s, source_s))
    return {
        "ratio": sum(step_s) / sum(source_s),
        "step_ms_per_image": 1e3 * sum(step_s) / images,
        "source_ms_per_image": 1e3 * sum(source_s) / images,
        "pair_ratio_min": pairs[0], "pair_ratio_median": pairs[len(pairs) // 2], "pair_ratio_max": pairs[-1],
        "batches": len(step_s), "images": images,
    }


__all__ = ["resident_bytes", "step_cost", "step_memory", "transient_peak_bytes"]

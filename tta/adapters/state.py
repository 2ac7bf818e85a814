"""Adapter state files: atomic writes, an integrity digest, and validation before anything is applied.

A state file is the adapter's `state_dict()` written with `torch.save` (read back with
``weights_only=True``). Its header (``_extra_state``) carries the adapter name, the model signature and
a SHA-256 digest over every other entry (`state_digest`), added by `seal` when the file is written.

Loading follows one rule, for `Adapter.load` / `Adapter.load_state_dict` and `StreamPool.load` alike
(`check_state`): the whole state is checked first and only then applied, so a rejected file leaves
the adapter exactly as it was. Checked: the header (adapter, model signature), the digest (a state
that carries one: every saved file), the set of keys, every tensor's shape and kind, non-finite
values where the adapter's own tensor is finite, the frozen source tensors (equal to the adapter's:
a state adapted from other source weights is refused), and the optimizer, counter, seed and
generator entries of the header (`Adapter.check_extra_state`).

Writes go to a temporary file beside the target (created with the process umask, so the file gets
the permissions any other file would), are flushed and fsynced, then renamed over the target and
the folder is fsynced. A writer killed mid-write leaves only its temporary file; the next save of the
same target removes temporaries whose writing process no longer exists.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tta.errors import StateMismatchError
from tta.fileio import write_durable

FORMAT = "tta-adapter-state/2"
DIGEST_KEY = "digest"


# ---------------------------------------------------------------------- digest
def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 over the canonical content of `state` (keys, tensor dtypes/shapes/bytes, values).

    The header's own ``digest`` entry is left out, so a sealed state verifies against itself.
    """
    h = hashlib.sha256()
    extra = state.get("_extra_state")
    if isinstance(extra, Mapping) and DIGEST_KEY in extra:
        state = {**state, "_extra_state": {k: v for k, v in extra.items() if k != DIGEST_KEY}}
    _feed(h, state)
    return h.hexdigest()


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with the format and its digest written into the header (a new dict; tensors shared)."""
    extra = dict(state["_extra_state"])
    extra.setdefault("format", FORMAT)
    extra.pop(DIGEST_KEY, None)
    sealed = {**state, "_extra_state": extra}
    extra[DIGEST_KEY] = state_digest(sealed)
    return sealed


def verify_digest(state: Mapping[str, Any], where: str) -> None:
    extra = state["_extra_state"]
    stored = extra.get(DIGEST_KEY)
    if not isinstance(stored, str):
        raise StateMismatchError(f"{where}: the state carries no integrity digest; it was not written by Adapter.save()")
    if state_digest(state) != stored:
        raise StateMismatchError(f"{where}: integrity check failed (SHA-256 digest mismatch): the file was changed or "
                                 "corrupted after it was saved")


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for item in obj:
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


# ---------------------------------------------------------------------- files
def save_state(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """`torch.save` through `tta.fileio.write_durable`: temporary file, fsync, atomic rename, fsync of
    the folder; stale temporaries of killed writers are removed, the target is only ever replaced whole."""
    return write_durable(path, lambda f: torch.save(dict(state), f))


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an adapter state file (weights-only unpickling); the content is checked on load."""
    path = Path(path)
    if not path.is_file():
        raise StateMismatchError(f"no adapter state file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, forbidden pickle opcode...
        raise StateMismatchError(f"{path} is not a readable adapter state: {exc}") from exc
    if not isinstance(state, dict) or not isinstance(state.get("_extra_state"), dict):
        raise StateMismatchError(f"{path} does not hold an adapter state (a dict with an _extra_state header)")
    return state


# ---------------------------------------------------------------------- validation helpers
def check_tensors(where: str, state: Mapping[str, Any], live: Mapping[str, Any], frozen: set[int],
                  strict: bool = True) -> None:
    """Keys, shapes, kinds, non-finite values and frozen tensors of `state` against `live`."""
    keys = set(state) - {"_extra_state"}
    expected = set(live) - {"_extra_state"}
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if unexpected or (strict and missing):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}"
                         f"{', ...' if len(unexpected) > 3 else ''})")
        raise StateMismatchError(f"{where}: the state's entries do not match this adapter: {'; '.join(parts)}")
    for key in sorted(keys):
        new, cur = state[key], live[key]
        if not isinstance(new, torch.Tensor):
            raise StateMismatchError(f"{where}: entry {key!r} is a {type(new).__name__}, expected a tensor")
        cur = cur.detach()
        if new.shape != cur.shape:
            raise StateMismatchError(f"{where}: entry {key!r} has shape {tuple(new.shape)}, this adapter's has "
                                     f"{tuple(cur.shape)}")
        if new.is_floating_point() != cur.is_floating_point() or (not cur.is_floating_point() and new.dtype != cur.dtype):
            raise StateMismatchError(f"{where}: entry {key!r} has dtype {new.dtype}, this adapter's is {cur.dtype}")
        if new.is_floating_point() and not bool(torch.isfinite(new).all()) and bool(torch.isfinite(cur).all()):
            raise StateMismatchError(f"{where}: entry {key!r} contains NaN/Inf values")
        if id(live[key]) in frozen and not torch.equal(new.to(cur.device, cur.dtype), cur):
            raise StateMismatchError(
                f"{where}: frozen tensor {key!r} differs from this adapter's source model; the state was adapted "
                "from other source weights (adaptation never changes frozen tensors)"
            )


def check_optimizer_state(where: str, state: Any, optimizer: torch.optim.Optimizer | None) -> None:
    """The ``optimizer`` header entry against this adapter's optimizer (structure, shapes, finiteness)."""
    if optimizer is None:
        if state is not None:
            raise StateMismatchError(f"{where}: the state holds optimizer state but this adapter has no optimizer")
        return
    if state is None:
        return  # saved before the first step: nothing to restore beyond the fresh optimizer
    if not isinstance(state, Mapping) or not isinstance(state.get("state"), Mapping) \
            or not isinstance(state.get("param_groups"), list):
        raise StateMismatchError(f"{where}: the optimizer entry is not an optimizer state dict")
    groups = state["param_groups"]
    ours = optimizer.param_groups
    sizes = [len(g.get("params", ())) if isinstance(g, Mapping) else -1 for g in groups]
    if sizes != [len(g["params"]) for g in ours]:
        raise StateMismatchError(f"{where}: the optimizer state has parameter groups of sizes {sizes}, this "
                                 f"adapter's optimizer {[len(g['params']) for g in ours]}")
    for i, group in enumerate(groups):
        for name, value in group.items():
            if name != "params" and not _finite_value(value):
                raise StateMismatchError(f"{where}: optimizer group {i} has a non-finite or invalid {name!r}: {value!r}")
    params = [p for g in ours for p in g["params"]]
    index = {pid: params[j] for j, pid in enumerate(pid for g in groups for pid in g["params"])}
    for pid, entry in state["state"].items():
        if pid not in index or not isinstance(entry, Mapping):
            raise StateMismatchError(f"{where}: optimizer state entry {pid!r} names no parameter of this adapter")
        p = index[pid]
        for name, value in entry.items():
            if name == "step":
                step = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
                if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step < 0:
                    raise StateMismatchError(f"{where}: optimizer step count {value!r} is invalid")
                continue
            if not isinstance(value, torch.Tensor) or value.shape != p.shape:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise StateMismatchError(f"{where}: optimizer entry {name!r} of parameter {pid} is {shape}, expected a "
                                         f"tensor of shape {tuple(p.shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise StateMismatchError(f"{where}: optimizer entry {name!r} of parameter {pid} contains NaN/Inf")


def check_counters(where: str, counters: Any) -> None:
    if not isinstance(counters, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in counters.items()
    ):
        raise StateMismatchError(f"{where}: counters must map names to non-negative integers, got {counters!r:.120}")


def check_generators(where: str, seed: Any, generators: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise StateMismatchError(f"{where}: the seed must be a non-negative integer, got {seed!r}")
    if not isinstance(generators, Mapping):
        raise StateMismatchError(f"{where}: generators must map devices to generator states")
    for key, gen_state in generators.items():
        try:
            device = torch.device(key)
        except (RuntimeError, TypeError):
            raise StateMismatchError(f"{where}: generator key {key!r} is not a device") from None
        if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8:
            raise StateMismatchError(f"{where}: the generator state of {key!r} is not a uint8 tensor")
        if not device_available(device):
            continue  # dropped on load (Adapter.set_extra_state); reseeded if the adapter moves there
        try:
            torch.Generator(device=device).set_state(gen_state)
        except (RuntimeError, ValueError) as exc:
            raise StateMismatchError(f"{where}: the generator state of {key!r} is invalid: {exc}") from None


def device_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return False


def _finite_value(value: Any) -> bool:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return True
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, (list, tuple)):
        return all(_finite_value(v) for v in value)
    return False


__all__ = [
    "FORMAT",
    "check_counters",
    "check_generators",
    "check_optimizer_state",
    "check_tensors",
    "device_available",
    "read_state",
    "remove_stale_temporaries",
    "save_state",
    "seal",
    "state_digest",
    "verify_digest",
]

"""Safe checkpoint I/O: safetensors, or torch files read with `weights_only=True` (never a full unpickle).

`torch.load(weights_only=True)` uses a restricted unpickler that only rebuilds tensors and plain
containers; a pickle carrying code (a `__reduce__` calling `os.system`, ...) is refused before the
payload can run.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tta.errors import DataNotFoundError, StateMismatchError

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# Wrappers used by common training scripts / RobustBench: {"state_dict": {...}}, {"model": {...}}.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise StateMismatchError(
            f"checksum mismatch for checkpoint {path}: expected sha256 {expected}, file has {actual}; "
            "the file is corrupt or was replaced - restore it or retrain and update the card"
        )


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> str:
    """Write a safetensors file (contiguous CPU tensors) and return its SHA-256."""
    path = Path(path)
    if path.suffix not in SAFETENSORS_SUFFIXES:
        raise ValueError(f"checkpoints are written as .safetensors, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata=metadata)
    return sha256_file(path)


def load_state_dict(path: str | os.PathLike[str], sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or weights-only torch file, checking `sha256` first.

    Wrapper dicts ({"state_dict": ...}) are unwrapped and a DataParallel `module.` prefix is
    stripped, so RobustBench-style checkpoints load as-is.
    """
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"checkpoint file {path} does not exist")
    if sha256:
        verify_sha256(path, sha256)
    if path.suffix in SAFETENSORS_SUFFIXES:
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataNotFoundError(f"{path} is not a valid safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise StateMismatchError(
                f"refused to load {path}: it is not a weights-only checkpoint (it asks the unpickler for "
                f"code or objects beyond tensors and containers, and was not executed). Details: {exc}"
            ) from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise DataNotFoundError(f"{path} is not a readable torch checkpoint ({exc})") from exc
    return _as_flat_state(state, path)


def _as_flat_state(state: object, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, Mapping) and not _is_tensor_map(state):
        inner = next((state[k] for k in _WRAPPER_KEYS if k in state and isinstance(state[k], Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping) or not _is_tensor_map(state):
        raise StateMismatchError(f"{path} does not hold a state dict of tensors")
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _is_tensor_map(state: Mapping) -> bool:
    return len(state) > 0 and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike[str]) -> None:
    """`model.load_state_dict(state, strict=True)` with an error naming the file and the bad keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if wrong:
            parts.append("shape mismatch: " + few([f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong]))
        raise StateMismatchError(f"checkpoint {source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)

"""Write a "-C" set of any image dataset in the CIFAR-10-C layout (`tta make-c`).

Output folder:
- ``<corruption>.npy``: uint8 (S*N, H, W, 3), the S requested severities stacked in increasing order
  (severity block k is rows [k*N, (k+1)*N)); with all five severities this is exactly CIFAR-10-C.
- ``labels.npy``: the N labels repeated S times (uint8 when they fit, else int64).
- ``meta.json``: {"severities": [...], "n": N, "seed": ..., ...}; loaders read the severities
  present from it (a folder without meta.json is read as CIFAR-10-C: severities 1..5).
Resumable: a corruption file already present with the right shape is kept. Atomic: every file is
written to ``<file>.tmp`` and moved into place with `os.replace` once complete, so an interrupt
never leaves a truncated ``.npy`` under its final name (a stale ``.tmp`` is overwritten next time).
Determinism: chunk k of corruption c at severity s is corrupted with the seed
``SeedSequence(seed, spawn_key=(index of c in CORRUPTIONS, s, k))``, independent of what else is
generated or resumed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tta.errors import ConfigError
from tta.streams.corruptions import CORRUPTIONS, corrupt
from tta.streams.datasets import META_FILE

CHUNK = 1000  # images corrupted per call (bounds memory; part of the seed derivation)


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _complete(path: Path, shape: tuple[int, ...]) -> bool:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return arr.dtype == np.uint8 and arr.shape == shape


def make_c(
    images: np.ndarray,
    labels: np.ndarray,
    out: str | os.PathLike[str],
    *,
    corruptions: Sequence[str] = CORRUPTIONS[:15],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    dataset: str = "",
    progress: bool = True,
) -> dict[str, str]:
    """Generate the set into `out`; returns {corruption: "written" | "kept"}."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ConfigError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if len(labels) != len(images):
        raise ConfigError(f"{len(images)} images but {len(labels)} labels")
    severities = sorted({int(s) for s in severities})
    if not severities or any(s not in range(1, 6) for s in severities):
        raise ConfigError(f"severities must be in 1..5, got {severities}")
    unknown = [c for c in corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown corruptions {unknown}; known: {', '.join(CORRUPTIONS)}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape[:3]
    meta = {
        "format": "cifar-c",
        "dataset": dataset,
        "n": int(n),
        "height": int(h),
        "width": int(w),
        "severities": severities,
        "seed": int(seed),
        "chunk": CHUNK,
        "generator": "tta.streams.corruptions (CIFAR-10-C constants for images <= 64 px)",
    }
    old = _read_existing_meta(root)
    if old is not None and _holds_superset(root, old, meta, corruptions):
        # Generation is deterministic per (seed, corruption, severity, chunk): a complete set with more
        # severities already contains exactly the requested data, and loaders select by meta.json.
        return {c: "kept" for c in corruptions}
    if old is not None:
        keys = ("n", "height", "width", "severities", "seed", "chunk")
        present = {p.stem for p in root.glob("*.npy")} - {"labels"}
        extending = (set(old.get("severities") or []) < set(severities) and present <= set(corruptions)
                     and all(old.get(k) == meta[k] for k in keys if k != "severities"))
        if extending:  # more severities for every corruption of the folder: regenerated (deterministic)
            pass
        elif any(old.get(k) != meta[k] for k in keys):
            raise ConfigError(
                f"{root} already holds a set made with {{{', '.join(f'{k}: {old.get(k)}' for k in keys)}}}, "
                f"not {{{', '.join(f'{k}: {meta[k]}' for k in keys)}}}; choose another --out or delete that folder"
            )
    _atomic_json(root / META_FILE, meta)
    label_dtype = np.uint8 if labels.min() >= 0 and labels.max() < 256 else np.int64
    stacked_labels = np.tile(np.asarray(labels).astype(label_dtype), len(severities))
    labels_path = root / "labels.npy"
    if not (labels_path.is_file() and np.array_equal(np.load(labels_path, allow_pickle=False), stacked_labels)):
        _atomic_save(labels_path, stacked_labels)

    shape = (len(severities) * n, h, w, 3)
    todo = [c for c in corruptions if not _complete(root / f"{c}.npy", shape)]
    status = {c: "kept" for c in corruptions if c not in todo}
    chunks = [(c, s, k) for c in todo for s in severities for k in range(0, n, CHUNK)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(chunks) * 1, unit="chunk", desc="make-c", dynamic_ncols=True)
    try:
        for c in todo:
            out_arr = np.empty(shape, dtype=np.uint8)
            for b, s in enumerate(severities):
                for k in range(0, n, CHUNK):
                    ss = np.random.SeedSequence(seed, spawn_key=(CORRUPTIONS.index(c), s, k // CHUNK))
                    out_arr[b * n + k : b * n + min(k + CHUNK, n)] = corrupt(images[k : k + CHUNK], c, s, seed=ss)
                    if bar is not None:
                        bar.set_postfix_str(f"{c} s{s}")
                        bar.update(1)
            _atomic_save(root / f"{c}.npy", out_arr)
            status[c] = "written"
    finally:
        if bar is not None:
            bar.close()
    return status


def _holds_superset(root: Path, old: dict, meta: dict, corruptions: Sequence[str]) -> bool:
    if any(old.get(k) != meta[k] for k in ("n", "height", "width", "seed", "chunk")):
        return False
    present = list(old.get("severities") or [])
    if not set(meta["severities"]) <= set(present):
        return False
    shape = (len(present) * meta["n"], meta["height"], meta["width"], 3)
    return all(_complete(root / f"{c}.npy", shape) for c in corruptions)


def _read_existing_meta(root: Path) -> dict | None:
    path = root / META_FILE
    if not path.is_file():
        if any(root.glob("*.npy")):
            raise ConfigError(f"{root} holds .npy files but no {META_FILE}; it is not a set made by make-c "
                              f"(choose another --out)")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is unreadable ({exc}); delete the folder and generate again") from exc

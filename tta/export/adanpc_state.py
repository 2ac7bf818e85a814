"""Move an AdaNPC memory between the PyTorch adapter and the edge runtime (both directions).

The edge state file (safetensors, see `tta.edge.adanpc`) holds the same rows, labels, insertion
stamps and counters as the adapter's `KnnMemory`, so a stream can be started on a workstation and
continued on a device (or back) with identical predictions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from tta.edge.adanpc import STATE_FORMAT, EdgeAdaNPCConfig, read_edge_state, save_edge_state
from tta.edge.adapters import check_state_path
from tta.errors import ConfigError, StateMismatchError
from tta.export.onnx_export import read_metadata


def _edge_config(adapter) -> EdgeAdaNPCConfig:  # noqa: ANN001 - tta.adapters.adanpc.AdaNPC
    cfg = adapter.config
    if cfg.class_balanced:
        raise ConfigError("the edge AdaNPC memory evicts FIFO only; this adapter uses class_balanced eviction")
    if cfg.feature_bn or not cfg.extend_memory:
        raise ConfigError("the edge AdaNPC runs the plain variant (extend_memory=True, no feature_bn); this adapter "
                          f"has feature_bn={cfg.feature_bn}, extend_memory={cfg.extend_memory}")
    return EdgeAdaNPCConfig(k=cfg.k, temperature=cfg.temperature, beta=cfg.beta, capacity=cfg.capacity,
                            storage_dtype=cfg.storage_dtype, softmax_confidence=cfg.softmax_confidence)


def _check_export(adapter, features_onnx: str | os.PathLike[str]) -> str:  # noqa: ANN001
    meta = read_metadata(features_onnx)
    if meta.mode != "features":
        raise ConfigError(f"{features_onnx} is a {meta.mode!r} export; AdaNPC runs on a 'features' export")
    norm = adapter.config.norm
    want = None if norm == "source" else (0.0 if norm == "bn" else adapter.config.source_weight)
    if (meta.source_weight is None) != (want is None) or (want is not None and abs(meta.source_weight - want) > 1e-9):
        raise ConfigError(f"the adapter normalises features with norm={norm!r} (source_weight {want}); {features_onnx} "
                          f"was exported with source_weight {meta.source_weight} (`tta export onnx --mode features "
                          "--source-weight ...`)")
    return meta.weights_sha256


def adanpc_state_to_edge(adapter, path: str | os.PathLike[str],  # noqa: ANN001
                         features_onnx: str | os.PathLike[str] | None = None) -> Path:
    """Write the adapter's memory as an edge state file (checked against `features_onnx` when given)."""
    path = check_state_path(path)
    memory = adapter._require_memory()
    sha = _check_export(adapter, features_onnx) if features_onnx is not None else ""
    state = memory.state()
    arrays = {"features": state["features"].cpu().numpy(), "labels": state["labels"].cpu().numpy(),
              "stamps": state["stamps"].cpu().numpy()}
    counters = {"batches": adapter.counters.get("batches", 0), "small_batches": adapter.counters.get("small_batches", 0)}
    header = {"format": STATE_FORMAT, "adapter": "adanpc", "num_source": str(state["num_source"]),
              "next_stamp": str(state["next_stamp"]), "num_classes": str(state["num_classes"]),
              "weights_sha256": sha, "config": json.dumps(_edge_config(adapter).__dict__),
              "counters": json.dumps(counters)}
    save_edge_state(path, arrays, header)
    return path


def load_edge_state_into(adapter, path: str | os.PathLike[str]) -> None:  # noqa: ANN001
    """Replace the adapter's memory with an edge state file's (config must agree)."""
    arrays, header = read_edge_state(check_state_path(path))
    saved = EdgeAdaNPCConfig(**json.loads(header["config"]))
    if saved != _edge_config(adapter):
        raise StateMismatchError(f"{path} was saved with AdaNPC config {saved}; this adapter has {_edge_config(adapter)}")
    num_source, num_classes = int(header["num_source"]), int(header["num_classes"])
    feats = torch.from_numpy(np.ascontiguousarray(arrays["features"])).float()
    labels = torch.from_numpy(arrays["labels"].astype(np.int64))
    adapter.set_source_memory(feats[:num_source], labels[:num_source], num_classes)
    adapter.memory.load_state({"features": feats, "labels": labels,
                               "stamps": torch.from_numpy(arrays["stamps"].astype(np.int64)),
                               "num_source": num_source, "next_stamp": int(header["next_stamp"])})

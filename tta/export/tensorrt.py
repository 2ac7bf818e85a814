"""TensorRT engine building from an exported ONNX file (TensorRT 10.x and 11.x Python API).

`tensorrt` is imported only when an engine is built; without it `TensorRTNotInstalledError` says
how to install it (``pip install 'tta-runtime[trt]'``, on a machine with an NVIDIA GPU).

Version differences handled here:
- precision: TensorRT 10 builds weakly typed networks and takes ``BuilderFlag.FP16``; TensorRT 11
  removed the weak-typing flags, so fp16 means a float16 graph (`convert_to_fp16`) parsed into a
  strongly typed network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, accepted by 10.x too).
- network creation: explicit batch is the only mode since 10.0 (``create_network(flags)``, no
  ``EXPLICIT_BATCH`` flag needed).
A dynamic batch axis gets one optimisation profile with min/opt/max batch sizes.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from tta.errors import ConfigError, TTAError
from tta.export.fp16 import convert_to_fp16
from tta.export.onnx_export import ExportError, read_metadata

INSTALL_HINT = ("TensorRT is not installed: `pip install 'tta-runtime[trt]'` (the `tensorrt` wheels, Linux/Windows "
                "x86_64 or aarch64 with an NVIDIA driver), or use the NVIDIA TensorRT container")


class TensorRTNotInstalledError(TTAError, ImportError):
    """`tensorrt` cannot be imported."""


def import_tensorrt() -> Any:
    try:
        return importlib.import_module("tensorrt")
    except ImportError as exc:
        raise TensorRTNotInstalledError(f"{INSTALL_HINT} ({exc})") from exc


def tensorrt_major(trt: Any) -> int:
    try:
        return int(str(trt.__version__).split(".")[0])
    except (AttributeError, ValueError) as exc:
        raise TensorRTNotInstalledError(f"cannot read the TensorRT version ({exc})") from exc


@dataclass
class EngineReport:
    path: Path
    tensorrt_version: str
    precision: str  # "fp32", "fp16 (builder flag)" or "fp16 (strongly typed graph)"
    profile: tuple[int, int, int] | None  # min/opt/max batch of the dynamic axis


def build_trt_engine(
    onnx_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fp16: bool = False,
    min_batch: int = 1,
    opt_batch: int = 64,
    max_batch: int = 256,
    workspace_bytes: int = 1 << 30,
) -> EngineReport:
    """Build and serialise a TensorRT engine for an ONNX file written by `tta export onnx`.

    min/opt/max_batch: optimisation profile of the dynamic batch axis (ignored for a fixed batch).
    """
    onnx_path, out = Path(onnx_path), Path(out)
    meta = read_metadata(onnx_path)  # also rejects files that are not tta exports
    if meta.dynamic_batch and not 1 <= min_batch <= opt_batch <= max_batch:
        raise ConfigError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}/{opt_batch}/{max_batch}")
    trt = import_tensorrt()
    major = tensorrt_major(trt)
    if major < 10:
        raise TensorRTNotInstalledError(f"TensorRT {trt.__version__} is too old; tta needs TensorRT >= 10")
    strongly_typed = fp16 and (major >= 11 or not hasattr(trt.BuilderFlag, "FP16"))
    payload = onnx_path.read_bytes()
    if strongly_typed:
        payload = convert_to_fp16(onnx.load_from_string(payload)).SerializeToString()

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(payload):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    precision = "fp32"
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
        precision = "fp16 (builder flag)"
    elif strongly_typed:
        precision = "fp16 (strongly typed graph)"
    profile_shape = None
    if meta.dynamic_batch:
        chw = tuple(meta.input_shape[1:])
        profile = builder.create_optimization_profile()
        profile.set_shape(meta.input_name, (min_batch, *chw), (opt_batch, *chw), (max_batch, *chw))
        config.add_optimization_profile(profile)
        profile_shape = (min_batch, opt_batch, max_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    os.replace(tmp, out)
    return EngineReport(out, str(trt.__version__), precision, profile_shape)

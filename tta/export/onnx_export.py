"""ONNX export of a source model in three modes, verified against PyTorch with onnxruntime.

Exporter: torch's `torch.export`-based exporter (``torch.onnx.export(..., dynamo=True)``), the
default since torch 2.9. With torch 2.14 it writes clean graphs (eval-mode BatchNorm folded into the
convolutions by its optimiser, no Identity chains) at opset 18+; the TorchScript exporter is
deprecated ("will be removed") and leaves Identity nodes behind. The dynamo exporter cannot write
opset 17 (it converts down and fails), so the supported opsets are 18-20, all inside TensorRT 10's
parser range (9-20).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from tta.edge.errors import MetadataError
from tta.edge.integrity import graph_sha256
from tta.edge.metadata import ADAPTERS_BY_MODE, MODES, ExportMetadata
from tta.errors import ConfigError, TTAError
from tta.export.modules import FeatureExtractor, prepared_copy, to_alpha_bn, to_source_batchnorm
from tta.export.ops import SUPPORTED_OPSETS, op_histogram, training_mode_batchnorms, unsupported_ops
from tta.fileio import write_durable
from tta.layers import replace_batchnorms

DEFAULT_OPSET = 18
MAX_DYNAMIC_BATCH = 4096
#: |onnxruntime - torch| <= ATOL + RTOL * max|torch| (fp32; kornia-style tolerance table)
ATOL, RTOL = 1e-4, 1e-4


class ExportError(TTAError, RuntimeError):
    """The exported graph failed a check (onnx.checker, operator set, comparison with PyTorch)."""


@dataclass
class ExportReport:
    """What `export_onnx` wrote and how it was checked."""

    path: Path
    metadata: ExportMetadata
    ops: dict[str, int]
    checks: list[dict[str, Any]] = field(default_factory=list)  # one per comparison input

    @property
    def max_abs_diff(self) -> float:
        return max((c["max_abs_diff"] for c in self.checks), default=float("nan"))

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.path.stat().st_size / 1e6:.2f} MB): mode={self.metadata.mode}, "
                 f"input={list(self.metadata.input_shape)}, opset={self.metadata.opset}, "
                 f"{sum(self.ops.values())} nodes ({', '.join(f'{k} {v}' for k, v in sorted(self.ops.items()))})"]
        for c in self.checks:
            lines.append(f"  onnxruntime vs torch on {c['input']} (batch {c['batch']}): max |diff| "
                         f"{c['max_abs_diff']:.2e} (tolerance {c['tolerance']:.2e}), argmax agreement "
                         f"{c['argmax_agreement']:.4f}")
        return "\n".join(lines)


def weights_sha256(model: nn.Module) -> str:
    """Hash of the state dict (names, dtypes, shapes, values): identifies the exported weights."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _resolve(model_or_card: nn.Module | str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    if isinstance(model_or_card, nn.Module):
        return model_or_card, None
    from tta import models

    card = models.get_card(model_or_card)
    return models.load(card), card


def _normalization(model: nn.Module, card: Any) -> dict[str, list[float]] | None:
    from tta.models.normalize import Normalized

    if isinstance(model, Normalized):
        return {"mean": model.mean.flatten().tolist(), "std": model.std.flatten().tolist()}
    if card is not None and card.mean is not None:
        return {"mean": list(card.mean), "std": list(card.std)}
    return None


def _input_chw(model: nn.Module, card: Any, input_size: tuple[int, int, int] | None) -> tuple[int, int, int]:
    if input_size is not None:
        return tuple(int(v) for v in input_size)  # type: ignore[return-value]
    if card is not None and all(card.input_size):
        return tuple(card.input_size)
    inner = getattr(model, "model", model)
    cfg = getattr(inner, "pretrained_cfg", None) or getattr(inner, "default_cfg", None)
    if cfg and cfg.get("input_size"):
        return tuple(cfg["input_size"])
    raise ConfigError(f"cannot tell the input size of {type(model).__name__}; pass input_size=(C, H, W)")


def _reference(model: nn.Module, mode: str, source_weight: float | None) -> nn.Module:
    """The PyTorch runtime's own computation the export must reproduce (not the export module)."""
    ref = prepared_copy(model)
    if mode == "alpha-bn" or (mode == "features" and source_weight is not None):
        replace_batchnorms(ref, float(source_weight))  # tta.layers.CalibratedBatchNorm, as the adapter runs
    if mode == "features":
        ref = FeatureExtractor(ref)
    return ref


def _export_module(model: nn.Module, mode: str, source_weight: float | None) -> nn.Module:
    module = prepared_copy(model)
    if mode == "alpha-bn" or (mode == "features" and source_weight is not None):
        to_alpha_bn(module, float(source_weight))
    else:
        to_source_batchnorm(module)
    if mode == "features":
        module = FeatureExtractor(module)
    return module


def _run_reference(ref: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    with torch.no_grad():
        if x.shape[0] < 2 and mode != "frozen":
            from tta.layers import source_statistics  # small_batch="source": one image uses source statistics

            with source_statistics(ref):
                return ref(x)
        return ref(x)


def export_onnx(
    model_or_card: nn.Module | str | os.PathLike[str],
    out: str | os.PathLike[str],
    mode: Literal["frozen", "alpha-bn", "features"] = "frozen",
    batch: Literal["dynamic"] | int = "dynamic",
    opset: int = DEFAULT_OPSET,
    source_weight: float | None = None,
    *,
    input_size: tuple[int, int, int] | None = None,
    real_inputs: torch.Tensor | None = None,
    verify: bool = True,
) -> ExportReport:
    """Export `model_or_card` (a model card name/path, or an nn.Module taking [0, 1] NCHW input).

    mode: ``frozen`` (source model, BatchNorm folded into the convolutions), ``alpha-bn`` (the whole
        alpha-BN model, `source_weight` default 0.9 as the `alpha-bn` adapter; batch statistics
        in-graph) or ``features`` (pooled penultimate features; alpha-BN features when
        `source_weight` is given).
    batch: ``"dynamic"`` (symbolic batch axis) or a fixed batch size.
    real_inputs: images to compare on besides random ones (e.g. a Fashion-MNIST test batch).
    verify: run `onnx.checker`, the TensorRT operator whitelist and the onnxruntime-vs-torch
        comparison (|diff| <= 1e-4 + 1e-4 * max|torch|); any failure raises `ExportError` and
        removes the file.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown export mode {mode!r}; use one of {', '.join(MODES)}")
    if opset not in SUPPORTED_OPSETS:
        raise ConfigError(f"opset {opset} is not supported: the exporter writes opset "
                          f"{SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} (TensorRT 10 parses 9-20)")
    if batch != "dynamic" and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise ConfigError(f"batch must be 'dynamic' or a positive int, got {batch!r}")
    if mode == "alpha-bn":
        source_weight = 0.9 if source_weight is None else source_weight
    elif mode == "frozen" and source_weight is not None:
        raise ConfigError("source_weight applies to the alpha-bn and features modes, not frozen")
    if source_weight is not None and not 0.0 <= float(source_weight) < 1.0:
        raise ConfigError(f"source_weight must be in [0, 1) (1 is the frozen export), got {source_weight}")

    model, card = _resolve(model_or_card)
    chw = _input_chw(model, card, input_size)
    module = _export_module(model, mode, source_weight)
    ref = _reference(model, mode, source_weight)
    example_batch = 2 if batch == "dynamic" else batch
    example = torch.rand(example_batch, *chw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probe = ref(example) if example_batch > 1 else _run_reference(ref, example, mode)
        logits = prepared_copy(model)(example) if mode == "features" else probe
    output_name = "features" if mode == "features" else "logits"

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _torch_export(module, example, out, opset, batch, output_name)
    proto = onnx.load(str(out))
    meta = ExportMetadata(
        mode=mode, input_name="input", output_name=output_name,
        input_shape=(None if batch == "dynamic" else int(batch), *chw),
        num_classes=int(logits.shape[-1]), output_dim=int(probe.shape[-1]), opset=opset,
        normalization=_normalization(model, card),
        source_weight=None if source_weight is None else float(source_weight),
        card=card.name if card is not None else "", card_sha256=(card.sha256 or "") if card is not None else "",
        weights_sha256=weights_sha256(model), adapters=ADAPTERS_BY_MODE[mode],
        exporter=f"torch.onnx dynamo (torch {torch.__version__.split('+')[0]}, onnx {onnx.__version__})",
    )
    proto.doc_string = f"tta {mode} export" + (f" of model card {card.name}" if card is not None else "")
    meta = dataclasses.replace(meta, graph_sha256=graph_sha256(proto.SerializeToString()))
    onnx.helper.set_model_props(proto, meta.to_props())
    write_durable(out, proto.SerializeToString())  # whole file or none; fsync; the umask's mode
    if graph_sha256(out.read_bytes()) != meta.graph_sha256:  # the edge recomputes it from the file
        out.unlink(missing_ok=True)
        raise ExportError(f"{out}: the saved graph does not hash to the recorded graph_sha256 (non-deterministic "
                          "serialization?)")
    report = ExportReport(out, meta, dict(op_histogram(proto)))
    if verify:
        try:
            _check_graph(proto, opset)
            inputs = [("random", example)]
            if batch == "dynamic":
                inputs.append(("random", torch.rand(5, *chw, generator=torch.Generator().manual_seed(1))))
                if mode != "frozen":
                    inputs.append(("random", torch.rand(1, *chw, generator=torch.Generator().manual_seed(2))))
            if real_inputs is not None:
                real = real_inputs.float()
                if batch != "dynamic":
                    real = real[:batch]
                inputs.append(("real", real))
            report.checks = [_compare(out, ref, mode, name, x) for name, x in inputs]
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    return report


def _torch_export(module: nn.Module, example: torch.Tensor, out: Path, opset: int, batch: Any, output_name: str) -> None:
    kwargs: dict[str, Any] = {}
    if batch == "dynamic":
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=MAX_DYNAMIC_BATCH)},)
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (example,), str(out), input_names=["input"], output_names=[output_name],
                              opset_version=opset, dynamo=True, external_data=False, optimize=True,
                              verbose=False, **kwargs)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed for {type(module).__name__}: {exc}") from exc


def _check_graph(proto: onnx.ModelProto, opset: int) -> None:
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from exc
    written = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if written != opset:
        raise ExportError(f"the exporter wrote opset {written}, asked for {opset}")
    bad = unsupported_ops(proto)
    if bad:
        raise ExportError(f"the graph uses operators outside the TensorRT-supported set: {', '.join(bad)}")
    training = training_mode_batchnorms(proto)
    if training:
        raise ExportError(f"training-mode BatchNormalization nodes in the graph: {', '.join(training)}")


def _compare(path: Path, ref: nn.Module, mode: str, name: str, x: torch.Tensor) -> dict[str, Any]:
    from tta.edge.model import EdgeModel

    edge = EdgeModel(path, providers="cpu")
    got = edge.run(x.numpy())
    want = _run_reference(ref, x, mode).numpy()
    diff = float(np.abs(got - want).max())
    tol = ATOL + RTOL * float(np.abs(want).max())
    check = {"input": name, "batch": int(x.shape[0]), "max_abs_diff": diff, "tolerance": tol,
             "argmax_agreement": float((got.argmax(-1) == want.argmax(-1)).mean())}
    if not diff <= tol:
        raise ExportError(f"onnxruntime output differs from PyTorch on {name} input (batch {x.shape[0]}): max |diff| "
                          f"{diff:.3e} > tolerance {tol:.3e}")
    return check


def read_metadata(path: str | os.PathLike[str]) -> ExportMetadata:
    """The `tta` metadata of an exported file (without running it)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise MetadataError(f"{path} is not a readable ONNX file ({exc})") from exc
    return ExportMetadata.from_props({p.key: p.value for p in proto.metadata_props}, source=str(path))


__all__ = ["ExportError", "ExportReport", "export_onnx", "read_metadata", "weights_sha256"]

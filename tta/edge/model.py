"""`EdgeModel`: an exported `tta` ONNX file run with onnxruntime, its metadata validated.

Inputs are float NCHW numpy arrays in [0, 1] (the graph normalises inside, as the PyTorch models do).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from tta.edge.errors import InvalidInputError, MetadataError, ModelFileError, ProviderError
from tta.edge.integrity import graph_sha256
from tta.edge.metadata import ExportMetadata
from tta.edge.providers import (
    PROVIDERS, ProviderFallbackWarning, check_onnxruntime_install, preload_gpu_libraries, select_providers,
    with_options,
)
from tta.errors import BatchTooSmallError, NonFiniteInputError

_ONNX_MAGIC_MIN_BYTES = 16


class EdgeModel:
    """Load `path` (an ONNX file written by `tta export onnx`) on the best available provider.

    providers: ``"auto"`` (TensorRT > CUDA > CPU, whatever the onnxruntime build has), a name
        (``"cpu"``, ``"cuda"``, ``"tensorrt"``) or a list of names in order of preference.
    mode: when given, the export mode the caller needs (``frozen``, ``alpha-bn``, ``features``).
    threads: intra-op threads of the CPU provider (None: onnxruntime's default).
    fp16 / trt_cache_dir: TensorRT provider options (fp16 kernels; engine cache folder, default
        ``<model folder>/.trt_cache`` so the engine is built once per device).
    """

    def __init__(self, path: str | os.PathLike[str], providers: str | Sequence[str] = "auto", *,
                 mode: str | None = None, threads: int | None = None, strict_providers: bool = False,
                 fp16: bool = False, trt_cache_dir: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelFileError(f"exported model file {self.path} does not exist")
        size = self.path.stat().st_size
        if size < _ONNX_MAGIC_MIN_BYTES:
            raise ModelFileError(f"{self.path} is not an ONNX model ({size} bytes)")
        check_onnxruntime_install()
        options = ort.SessionOptions()
        options.log_severity_level = 3  # provider fallbacks are reported by us, not by ORT's logger
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        chosen = select_providers(providers, strict=strict_providers)
        preload_gpu_libraries(chosen)
        data = self.path.read_bytes()
        try:
            cache = os.fspath(trt_cache_dir) if trt_cache_dir is not None else str(self.path.parent / ".trt_cache")
            self.session = ort.InferenceSession(data, sess_options=options,
                                                providers=with_options(chosen, fp16, cache))
        except Exception as exc:  # InvalidProtobuf / Fail: truncated or not an ONNX file, bad graph
            raise ModelFileError(
                f"onnxruntime cannot load {self.path} ({type(exc).__name__}: {str(exc).strip()[:300]}); the file is "
                "truncated, corrupt or not an ONNX model - re-export it with `tta export onnx`"
            ) from exc
        active = self.session.get_providers()
        if active and chosen and active[0] != chosen[0]:
            if strict_providers:
                raise ProviderError(f"{chosen[0]} could not start for {self.path.name} (missing GPU libraries?); "
                                    f"onnxruntime runs {active[0]}")
            warnings.warn(
                f"{chosen[0]} could not start for {self.path.name} (missing GPU libraries?); running on {active[0]}",
                ProviderFallbackWarning, stacklevel=2,
            )
        self.providers = active
        props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = ExportMetadata.from_props(props, source=str(self.path))
        self._verify_checksum(data)
        self._check_graph_matches_metadata()
        if mode is not None and self.metadata.mode != mode:
            raise MetadataError(
                f"{self.path} is a {self.metadata.mode!r} export; this needs a {mode!r} export "
                f"(`tta export onnx --mode {mode}`)"
            )

    # ------------------------------------------------------------------ checks
    def _verify_checksum(self, data: bytes) -> None:
        """The graph must hash to the export's ``graph_sha256`` (a file changed after export is refused)."""
        expected = self.metadata.graph_sha256
        if not expected:
            warnings.warn(f"{self.path.name} carries no graph checksum (exported before tta.graph_sha256 existed); "
                          "it was loaded unverified - re-export it to get the integrity check", stacklevel=3)
            return
        try:
            actual = graph_sha256(data)
        except ModelFileError as exc:
            raise ModelFileError(f"{self.path}: {exc}") from exc
        if actual != expected:
            raise ModelFileError(
                f"checksum mismatch for {self.path}: its graph hashes to {actual[:16]}..., the export recorded "
                f"{expected[:16]}...; the file was modified or damaged after export - re-export it with `tta export onnx`"
            )

    def _check_graph_matches_metadata(self) -> None:
        meta, src = self.metadata, str(self.path)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or inputs[0].name != meta.input_name:
            raise MetadataError(f"{src}: graph inputs {[i.name for i in inputs]} do not match metadata input "
                                f"{meta.input_name!r}")
        if not outputs or outputs[0].name != meta.output_name:
            raise MetadataError(f"{src}: graph outputs {[o.name for o in outputs]} do not match metadata output "
                                f"{meta.output_name!r}")
        graph_shape = [d if isinstance(d, int) else None for d in inputs[0].shape]
        if len(graph_shape) != 4 or list(graph_shape[1:]) != list(meta.input_shape[1:]) or \
                graph_shape[0] != meta.input_shape[0]:
            raise MetadataError(f"{src}: graph input shape {inputs[0].shape} does not match metadata input_shape "
                                f"{list(meta.input_shape)}")
        out_dim = outputs[0].shape[-1] if outputs[0].shape else None
        if isinstance(out_dim, int) and out_dim != meta.output_dim:
            raise MetadataError(f"{src}: graph output width {out_dim} does not match metadata output_dim {meta.output_dim}")
        if inputs[0].type != "tensor(float)":
            raise MetadataError(f"{src}: graph input type {inputs[0].type}, expected tensor(float)")

    def validate_batch(self, x: object, min_batch: int = 1) -> np.ndarray:
        """`x` as a contiguous float32 (N, C, H, W) array, or a clear `InvalidInputError`."""
        meta = self.metadata
        if not isinstance(x, np.ndarray):
            raise InvalidInputError(f"expected a numpy array batch, got {type(x).__name__}")
        if x.ndim != 4:
            hint = " (a single image? add a batch axis)" if x.ndim == 3 else ""
            raise InvalidInputError(f"expected a batch of shape (N, C, H, W), got shape {x.shape}{hint}")
        if tuple(x.shape[1:]) != tuple(meta.input_shape[1:]):
            raise InvalidInputError(
                f"{self.path.name} takes images of shape {tuple(meta.input_shape[1:])} (C, H, W), got a batch of shape "
                f"{x.shape}; resize the frames (the video loop does) or re-export for this size"
            )
        if x.shape[0] == 0:
            raise InvalidInputError(f"empty batch of shape {x.shape}")
        if meta.input_shape[0] is not None and x.shape[0] != meta.input_shape[0]:
            raise InvalidInputError(f"{self.path.name} was exported for batch {meta.input_shape[0]}, got {x.shape[0]}; "
                                    "export with --batch dynamic to run other batch sizes")
        if x.shape[0] < min_batch:
            raise BatchTooSmallError(f"a batch of {x.shape[0]} image(s) is too small here (need >= {min_batch})")
        if not np.issubdtype(x.dtype, np.floating):
            raise InvalidInputError(f"expected float images in [0, 1], got dtype {x.dtype} "
                                    "(convert uint8 images with x.astype(np.float32) / 255)")
        x = np.ascontiguousarray(x, dtype=np.float32)
        finite = np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
        if not finite.all():
            raise NonFiniteInputError(f"{int((~finite).sum())} of {x.shape[0]} image(s) contain NaN/Inf values; "
                                      "nothing was run or adapted")
        return x

    # ------------------------------------------------------------------ inference
    def run(self, x: np.ndarray) -> np.ndarray:
        """The graph's output for a validated batch: logits (N, classes) or features (N, D)."""
        x = self.validate_batch(x)
        return self.session.run([self.metadata.output_name], {self.metadata.input_name: x})[0]

    __call__ = run

    @property
    def provider(self) -> str:
        """Short name of the provider that runs the model (``cpu``, ``cuda``, ``tensorrt``)."""
        inverse = {v: k for k, v in PROVIDERS.items()}
        return inverse.get(self.providers[0], self.providers[0])

    def __repr__(self) -> str:
        m = self.metadata
        return (f"EdgeModel({self.path.name!r}, mode={m.mode!r}, input={list(m.input_shape)}, "
                f"output_dim={m.output_dim}, provider={self.provider!r})")

"""Edge runtime: exported `tta` models on onnxruntime, with numpy + onnxruntime only (no torch).

    from tta import edge
    abn = edge.EdgeAlphaBN("r20_alpha_bn.onnx", providers="auto")   # TensorRT > CUDA > CPU
    logits = abn(x)                        # x: float32 (N, C, H, W) in [0, 1]
    npc = edge.EdgeAdaNPC("r20_features.onnx", src_feats, src_labels, k=100, capacity=20000)
    probs = npc(x); npc.save("memory.safetensors")
    for r in edge.run_video(abn, "clip.mp4", batch_size=16): print(r.frames, r.classes)

`load_adapter(path, name=None)` picks the adapter from the export's metadata. OpenCV is imported
only by the video loop.
"""

from __future__ import annotations

import os

from tta.edge.adanpc import EdgeAdaNPC, EdgeAdaNPCConfig, knn_vote, load_source_memory
from tta.edge.adapters import EdgeAdapter, EdgeAlphaBN, EdgeSource
from tta.edge.errors import MetadataError, ModelFileError, ProviderError
from tta.edge.metadata import ExportMetadata
from tta.edge.model import EdgeModel
from tta.edge.providers import ProviderFallbackWarning, check_onnxruntime_install, select_providers
from tta.edge.video import FrameResult, frames_to_batch, run_video


def load_adapter(path: str | os.PathLike[str], providers: str | list[str] = "auto", **kwargs: object) -> EdgeAdapter:
    """The edge adapter of a ``frozen`` (source) or ``alpha-bn`` export. AdaNPC needs a memory:
    construct `EdgeAdaNPC` directly."""
    model = EdgeModel(path, providers)
    if model.metadata.mode == "frozen":
        return EdgeSource(model, **kwargs)  # type: ignore[arg-type]
    if model.metadata.mode == "alpha-bn":
        return EdgeAlphaBN(model, **kwargs)  # type: ignore[arg-type]
    raise MetadataError(f"{path} is a features export: build EdgeAdaNPC(model, source_features, source_labels)")


__all__ = [
    "EdgeAdaNPC", "EdgeAdaNPCConfig", "EdgeAdapter", "EdgeAlphaBN", "EdgeModel", "EdgeSource", "ExportMetadata",
    "FrameResult", "MetadataError", "ModelFileError", "ProviderError", "ProviderFallbackWarning",
    "check_onnxruntime_install", "frames_to_batch", "knn_vote", "load_adapter", "load_source_memory", "run_video", "select_providers",
]

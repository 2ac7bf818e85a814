"""The metadata every `tta` ONNX export carries in its `metadata_props` (torch-free).

Both sides use this module: `tta.export` writes it, `tta.edge` reads and validates it, so an edge
device needs no Python model code to know what a file takes and returns. Every key is prefixed with
``tta.``; values are strings (lists and dicts as JSON), as ONNX metadata requires.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from tta.edge.errors import MetadataError

FORMAT_VERSION = 1
PREFIX = "tta."
MODES = ("frozen", "alpha-bn", "features")
#: edge adapters each export mode supports
ADAPTERS_BY_MODE = {"frozen": ("source",), "alpha-bn": ("alpha-bn",), "features": ("adanpc",)}


@dataclass(frozen=True)
class ExportMetadata:
    """What an exported graph computes and takes.

    mode: ``frozen`` (source model, BN folded; logits), ``alpha-bn`` (the whole alpha-BN model,
        batch statistics in-graph; logits) or ``features`` (pooled penultimate features).
    input_shape: (N, C, H, W); N is None for a dynamic batch axis.
    normalization: per-channel mean/std the graph applies to its [0, 1] input (None: the graph takes
        the model's raw input).
    num_classes: classes of the source classifier (also for ``features`` exports, for AdaNPC).
    output_dim: last dimension of the output (num_classes, or the feature width).
    source_weight: alpha-BN weight of the source statistics (None when BN is folded).
    card / card_sha256: model card name and its checkpoint hash ("" for a model not from a card).
    weights_sha256: hash of the source weights (names, shapes and values of the PyTorch state dict,
        BatchNorm statistics included): identifies the model, e.g. to match an AdaNPC memory to it.
        It cannot be recomputed from the graph (BatchNorm is folded), so the edge checks files with:
    graph_sha256: hash of the serialized graph (operators and weights as stored in the file),
        verified by `EdgeModel` on load (`tta.edge.integrity`); "" in files exported before it existed.
    """

    mode: str
    input_name: str
    output_name: str
    input_shape: tuple[int | None, int, int, int]
    num_classes: int
    output_dim: int
    opset: int
    normalization: dict[str, list[float]] | None = None
    source_weight: float | None = None
    card: str = ""
    card_sha256: str = ""
    weights_sha256: str = ""
    graph_sha256: str = ""
    adapters: tuple[str, ...] = ()
    exporter: str = ""
    input_range: str = "[0, 1]"
    format_version: int = FORMAT_VERSION
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def dynamic_batch(self) -> bool:
        return self.input_shape[0] is None

    def to_props(self) -> dict[str, str]:
        props: dict[str, str] = {}
        for key, value in asdict(self).items():
            if key == "extra":
                continue
            props[PREFIX + key] = value if isinstance(value, str) else json.dumps(value)
        for key, value in self.extra.items():
            props[PREFIX + "extra." + key] = str(value)
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "the model") -> "ExportMetadata":
        ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if not ours:
            raise MetadataError(
                f"{source} has no tta export metadata (metadata_props 'tta.*'); it was not written by "
                "`tta export onnx` - re-export it with `tta export onnx --model CARD --out FILE`"
            )
        required = ("format_version", "mode", "input_name", "output_name", "input_shape", "num_classes",
                    "output_dim", "opset")
        missing = [k for k in required if k not in ours]
        if missing:
            raise MetadataError(f"{source}: export metadata is missing {', '.join(PREFIX + k for k in missing)}")
        try:
            version = int(ours["format_version"])
            values: dict[str, Any] = {
                "format_version": version,
                "mode": ours["mode"],
                "input_name": ours["input_name"],
                "output_name": ours["output_name"],
                "input_shape": tuple(json.loads(ours["input_shape"])),
                "num_classes": int(ours["num_classes"]),
                "output_dim": int(ours["output_dim"]),
                "opset": int(ours["opset"]),
                "normalization": json.loads(ours.get("normalization", "null")),
                "source_weight": json.loads(ours.get("source_weight", "null")),
                "card": ours.get("card", ""),
                "card_sha256": ours.get("card_sha256", ""),
                "weights_sha256": ours.get("weights_sha256", ""),
                "graph_sha256": ours.get("graph_sha256", ""),
                "adapters": tuple(json.loads(ours.get("adapters", "[]"))),
                "exporter": ours.get("exporter", ""),
                "input_range": ours.get("input_range", "[0, 1]"),
                "extra": {k[len("extra."):]: v for k, v in ours.items() if k.startswith("extra.")},
            }
        except (ValueError, TypeError) as exc:
            raise MetadataError(f"{source}: unreadable export metadata ({exc})") from exc
        if version > FORMAT_VERSION:
            raise MetadataError(
                f"{source}: export metadata format {version} is newer than this runtime understands "
                f"({FORMAT_VERSION}); upgrade tta"
            )
        meta = cls(**values)
        meta.validate(source)
        return meta

    def validate(self, source: str = "the model") -> None:
        if self.mode not in MODES:
            raise MetadataError(f"{source}: unknown export mode {self.mode!r} (known: {', '.join(MODES)})")
        shape = self.input_shape
        if len(shape) != 4 or any(d is not None and (not isinstance(d, int) or d < 1) for d in shape) or \
                any(d is None for d in shape[1:]):
            raise MetadataError(f"{source}: input_shape must be [N|null, C, H, W] with positive sizes, got {list(shape)}")
        if self.num_classes < 1 or self.output_dim < 1:
            raise MetadataError(f"{source}: num_classes and output_dim must be >= 1")
        if self.mode != "features" and self.output_dim != self.num_classes:
            raise MetadataError(f"{source}: a {self.mode} export must output num_classes={self.num_classes} logits, "
                                f"metadata says output_dim={self.output_dim}")
        if self.mode == "alpha-bn" and (self.source_weight is None or not 0.0 <= self.source_weight < 1.0):
            raise MetadataError(f"{source}: an alpha-bn export needs source_weight in [0, 1), got {self.source_weight}")
        if self.normalization is not None:
            mean, std = self.normalization.get("mean"), self.normalization.get("std")
            if not mean or not std or len(mean) != len(std) or len(mean) not in (1, shape[1]):
                raise MetadataError(f"{source}: normalization must give mean/std per channel, got {self.normalization}")

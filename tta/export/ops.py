"""Which ONNX operators the exports may contain: those TensorRT's ONNX parser supports.

The set is the part of the onnx-tensorrt operator support matrix for TensorRT 10.x
(github.com/onnx/onnx-tensorrt, docs/operators.md: "TensorRT 10.0 supports operators in the inclusive
range of opset 9 to opset 20") that CNN/ViT backbones export to. It is deliberately a whitelist: an
operator outside it fails the export with its name instead of failing later in `trtexec`.
"""

from __future__ import annotations

from collections import Counter

import onnx

#: opsets the exporter writes and TensorRT 10.0+ parses (torch's dynamo exporter emits opset >= 18).
SUPPORTED_OPSETS = range(18, 21)

TENSORRT_OPS = frozenset({
    "Abs", "Add", "ArgMax", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "Div", "Dropout", "Einsum", "Equal", "Erf", "Exp", "Expand", "Flatten",
    "Gather", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual",
    "HardSigmoid", "HardSwish", "Identity", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log",
    "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Not", "Pad", "Pow", "Range", "Reciprocal", "ReduceL2",
    "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize", "Shape", "Sigmoid", "Slice",
    "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "Tile", "Transpose", "Unsqueeze", "Where",
})


def op_histogram(model: onnx.ModelProto) -> Counter[str]:
    """Operator types of the main graph and every subgraph (If/Loop bodies)."""
    counts: Counter[str] = Counter()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            counts[node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    return counts


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    return sorted(op for op in op_histogram(model) if op not in TENSORRT_OPS)


def training_mode_batchnorms(model: onnx.ModelProto) -> list[str]:
    """Names of BatchNormalization nodes in training mode (rejected by ORT-CUDA and TensorRT)."""
    bad = []
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            training = any(a.name == "training_mode" and a.i == 1 for a in node.attribute)
            if training or len(node.output) > 1:
                bad.append(node.name or "<unnamed>")
    return bad

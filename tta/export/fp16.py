"""Float32 -> float16 conversion of an exported graph, keeping float32 inputs/outputs.

TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16``): a network is built in the
precision its ONNX graph is written in (strong typing). `build_trt_engine(fp16=True)` therefore
converts the graph with this function before parsing it on TensorRT 11; on TensorRT 10 it sets the
FP16 builder flag instead. The function rewrites every float32 initializer, Constant and Cast-to-float
of the graph to float16 and puts one Cast after the input and one before each output, so callers
still feed and read float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_F32, _F16 = TensorProto.FLOAT, TensorProto.FLOAT16


def _to_f16(tensor: onnx.TensorProto) -> onnx.TensorProto:
    if tensor.data_type != _F32:
        return tensor
    array = numpy_helper.to_array(tensor)
    if np.abs(array).max(initial=0.0) > np.finfo(np.float16).max:
        raise ValueError(f"tensor {tensor.name!r} has values beyond the float16 range; cannot convert")
    return numpy_helper.from_array(array.astype(np.float16), tensor.name)


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of `model` whose graph inputs/outputs stay float32 (one Cast at each end)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    for i, init in enumerate(graph.initializer):
        graph.initializer[i].CopyFrom(_to_f16(init))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == _F32:
                attr.t.CopyFrom(_to_f16(attr.t))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == _F32:
                attr.i = _F16
    nodes = list(graph.node)
    casts_in = []
    for inp in graph.input:
        if inp.type.tensor_type.elem_type != _F32:
            continue
        half = f"{inp.name}__fp16"
        for node in nodes:
            node.input[:] = [half if name == inp.name else name for name in node.input]
        casts_in.append(helper.make_node("Cast", [inp.name], [half], to=_F16, name=f"{inp.name}__cast_fp16"))
    casts_out = []
    for out in graph.output:
        if out.type.tensor_type.elem_type != _F32:
            continue
        half = f"{out.name}__fp16"
        for node in nodes:
            node.output[:] = [half if name == out.name else name for name in node.output]
            node.input[:] = [half if name == out.name else name for name in node.input]
        casts_out.append(helper.make_node("Cast", [half], [out.name], to=_F32, name=f"{out.name}__cast_fp32"))
    del graph.node[:]
    graph.node.extend(casts_in + nodes + casts_out)
    del graph.value_info[:]  # stale float32 annotations; shape inference rebuilds them
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model

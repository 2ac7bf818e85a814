"""Export: ONNX graphs of a source model (frozen, alpha-BN, features) and TensorRT engines.

    from tta.export import export_onnx, build_trt_engine
    export_onnx("resnet20-fmnist", "r20_abn.onnx", mode="alpha-bn", source_weight=0.9)
    build_trt_engine("r20_abn.onnx", "r20_abn.engine", fp16=True)   # needs `pip install 'tta-runtime[trt]'`

The files run without torch in `tta.edge`.
"""

from tta.export.adanpc_state import adanpc_state_to_edge, load_edge_state_into
from tta.export.fp16 import convert_to_fp16
from tta.export.onnx_export import ExportError, ExportReport, export_onnx, read_metadata, weights_sha256
from tta.export.tensorrt import TensorRTNotInstalledError, build_trt_engine

__all__ = [
    "ExportError", "ExportReport", "TensorRTNotInstalledError", "adanpc_state_to_edge", "build_trt_engine",
    "convert_to_fp16", "load_edge_state_into",
    "export_onnx", "read_metadata", "weights_sha256",
]

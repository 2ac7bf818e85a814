"""Integrity check of exported ONNX files without the `onnx` package (torch-free).

`graph_sha256(model_bytes)` hashes the bytes of the serialized graph (field 7 of ONNX's ModelProto:
every operator and every weight stored in the file), read with a minimal protobuf wire-format scanner.
`tta export onnx` stores it as the metadata entry ``tta.graph_sha256`` (the metadata entries are a
separate field of ModelProto, so storing the hash does not change it); `tta.edge.EdgeModel` recomputes
it on load and refuses a file whose graph was changed or damaged after export. Weights kept in
external data files (models over 2 GB) are outside the hash; `tta export onnx` writes none.
"""

from __future__ import annotations

import hashlib

from tta.edge.errors import ModelFileError

_GRAPH_FIELD = 7  # ModelProto.graph


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def graph_sha256(model_bytes: bytes) -> str:
    """SHA-256 of the graph field(s) of a serialized ONNX ModelProto, in file order."""
    data = memoryview(model_bytes)
    digest = hashlib.sha256()
    pos, found = 0, False
    try:
        while pos < len(data):
            key, pos = _varint(data, pos)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _varint(data, pos)
                if pos + length > len(data):
                    raise ValueError("truncated field")
                if field == _GRAPH_FIELD:
                    digest.update(data[pos:pos + length])
                    found = True
                pos += length
            else:
                raise ValueError(f"unsupported wire type {wire}")
            if pos > len(data):
                raise ValueError("truncated field")
    except ValueError as exc:
        raise ModelFileError(f"not a well-formed ONNX model ({exc})") from exc
    if not found:
        raise ModelFileError("not an ONNX model (no graph)")
    return digest.hexdigest()

"""ONNX export (frozen / alpha-bn / features), metadata, malformed files, fp16 graphs, TensorRT builder.

Exports of a tiny CIFAR ResNet run in the default suite (one export per mode, shared by the module);
timm resnet18 / vit_tiny_patch16_224, the built-in ViT and the shipped cards are `slow`.
TensorRT cannot be installed here: `test_trt_*` check our call sequence against a recording stand-in
for the `tensorrt` module (a unit test of build_trt_engine's logic, not a TensorRT run).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import tta
from tta.edge import EdgeAlphaBN, EdgeModel, EdgeSource, MetadataError, ModelFileError
from tta.errors import ConfigError, InvalidInputError, NoAdaptableLayerError
from tta.export import ExportError, TensorRTNotInstalledError, build_trt_engine, convert_to_fp16, export_onnx
from tta.export.ops import TENSORRT_OPS, op_histogram, training_mode_batchnorms
from tta.models.normalize import Normalized
from tta.models.resnet_cifar import CifarResNet

SOURCE_WEIGHT = 0.8


def tiny_cnn(seed: int = 0) -> nn.Module:
    """A 1-block-per-stage CIFAR ResNet (width 4) with non-trivial BN statistics and affine."""
    torch.manual_seed(seed)
    model = Normalized(CifarResNet(num_classes=10, depth_per_stage=1, width=4), [0.3, 0.4, 0.5], [0.2, 0.25, 0.3])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def tiny_exports(base: Path) -> dict[str, Path]:
    """frozen, alpha-bn and features exports of `tiny_cnn()` under `base` (reused when present)."""
    base.mkdir(parents=True, exist_ok=True)
    out = {}
    for mode, sw in (("frozen", None), ("alpha-bn", SOURCE_WEIGHT), ("features", None)):
        path = base / f"tiny_{mode}.onnx"
        if not path.exists():
            export_onnx(tiny_cnn(), path, mode=mode, source_weight=sw, input_size=(3, 32, 32))
        out[mode] = path
    return out


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny_exports(tmp_path_factory.getbasetemp() / "tta_exports")


def fmnist_batch(n: int = 32) -> torch.Tensor | None:
    try:
        from tta.streams.fashion_mnist import load_fashion_mnist

        images, _ = load_fashion_mnist("test")
    except Exception:
        return None
    return torch.from_numpy(images[:n]).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------------------------------- graphs
@pytest.mark.parametrize("mode", ["frozen", "alpha-bn", "features"])
def test_export_graph_is_clean_and_trt_compatible(exports, mode):
    proto = onnx.load(str(exports[mode]))
    onnx.checker.check_model(proto, full_check=True)
    ops = op_histogram(proto)
    assert set(ops) <= TENSORRT_OPS, set(ops) - TENSORRT_OPS
    assert not training_mode_batchnorms(proto)
    assert "BatchNormalization" not in ops  # folded (frozen/features) or spelled out (alpha-bn)
    if mode == "alpha-bn":
        n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in tiny_cnn().modules())
        assert ops["ReduceMean"] >= 2 * n_bn  # mean and variance of every BN layer, in-graph
    assert [o.version for o in proto.opset_import if o.domain == ""] == [18]
    dim0 = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value  # dynamic batch axis


def test_metadata_round_trip(exports):
    model = EdgeModel(exports["alpha-bn"], "cpu")
    meta = model.metadata
    assert meta.mode == "alpha-bn" and meta.source_weight == SOURCE_WEIGHT
    assert meta.input_shape == (None, 3, 32, 32) and meta.num_classes == 10 and meta.output_dim == 10
    assert meta.normalization == {"mean": pytest.approx([0.3, 0.4, 0.5]), "std": pytest.approx([0.2, 0.25, 0.3])}
    assert meta.adapters == ("alpha-bn",) and meta.opset == 18 and len(meta.weights_sha256) == 64
    feats = EdgeModel(exports["features"], "cpu").metadata
    assert feats.mode == "features" and feats.output_dim == 16 and feats.num_classes == 10
    assert feats.adapters == ("adanpc",)


def test_frozen_matches_source_model(exports):
    model = tiny_cnn()
    x = torch.rand(7, 3, 32, 32)
    got = EdgeSource(exports["frozen"], "cpu")(x.numpy())
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 2, 9])
def test_alpha_bn_export_matches_pytorch_adapter(exports, batch):
    """The edge graph against the runtime's own alpha-bn adapter (CalibratedBatchNorm), incl. one image."""
    adapter = tta.adapt(tiny_cnn(), "alpha-bn", source_weight=SOURCE_WEIGHT)
    x = torch.rand(batch, 3, 32, 32)
    edge = EdgeAlphaBN(exports["alpha-bn"], "cpu")
    got = edge(x.numpy())
    with torch.no_grad():
        want = adapter(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert edge.counters["small_batches"] == adapter.counters["small_batches"] == int(batch == 1)


def test_exports_match_on_real_images(exports):
    x = fmnist_batch()
    if x is None:
        pytest.skip("Fashion-MNIST not installed")
    model = tiny_cnn()
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(EdgeSource(exports["frozen"], "cpu")(x.numpy()), want, atol=1e-4, rtol=1e-4)


def test_features_export_matches_pooled_features(exports):
    model = tiny_cnn()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        want = model.model.forward_features(model.normalize(x)).numpy()
    np.testing.assert_allclose(EdgeModel(exports["features"], "cpu").run(x.numpy()), want, atol=1e-4, rtol=1e-4)


def test_fixed_batch_export_rejects_other_batch_sizes(tmp_path):
    path = tmp_path / "b4.onnx"
    report = export_onnx(tiny_cnn(), path, batch=4, input_size=(3, 32, 32))
    assert report.metadata.input_shape == (4, 3, 32, 32) and report.checks[0]["max_abs_diff"] < 1e-4
    model = EdgeModel(path, "cpu")
    model.run(np.random.rand(4, 3, 32, 32).astype(np.float32))
    with pytest.raises(InvalidInputError, match="exported for batch 4"):
        model.run(np.random.rand(3, 3, 32, 32).astype(np.float32))


# ---------------------------------------------------------------------------------------- bad requests
def test_bad_export_requests(tmp_path):
    with pytest.raises(ConfigError, match="unknown export mode"):
        export_onnx(tiny_cnn(), tmp_path / "x.onnx", mode="quantized")
    with pytest.raises(ConfigError, match="opset 17"):
        export_onnx(tiny_cnn(), tmp_path / "x.onnx", opset=17)
    with pytest.raises(ConfigError, match="batch"):
        export_onnx(tiny_cnn(), tmp_path / "x.onnx", batch=0)
    with pytest.raises(ConfigError, match="source_weight"):
        export_onnx(tiny_cnn(), tmp_path / "x.onnx", mode="alpha-bn", source_weight=1.0)
    no_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(NoAdaptableLayerError, match="no BatchNorm"):
        export_onnx(no_bn, tmp_path / "x.onnx", mode="alpha-bn", input_size=(3, 32, 32))
    assert not (tmp_path / "x.onnx").exists()


class _CumsumHead(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)).cumsum(dim=1)


def test_operator_outside_the_tensorrt_whitelist_fails_the_export(tmp_path):
    with pytest.raises(ExportError, match="outside the TensorRT-supported set: CumSum"):
        export_onnx(_CumsumHead(), tmp_path / "cumsum.onnx", input_size=(3, 8, 8))
    assert not (tmp_path / "cumsum.onnx").exists()


# ---------------------------------------------------------------------------------------- malformed files
def test_truncated_and_non_onnx_files(exports, tmp_path):
    data = exports["frozen"].read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated, corrupt or not an ONNX model"):
        EdgeModel(truncated, "cpu")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model, just some text that is long enough")
    with pytest.raises(ModelFileError):
        EdgeModel(text, "cpu")
    with pytest.raises(ModelFileError, match="does not exist"):
        EdgeModel(tmp_path / "missing.onnx", "cpu")


def _rewrite_metadata(src: Path, dst: Path, edit) -> Path:
    proto = onnx.load(str(src))
    props = {p.key: p.value for p in proto.metadata_props}
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, edit(props))
    onnx.save(proto, str(dst))
    return dst


def test_missing_and_mismatched_metadata(exports, tmp_path):
    bare = _rewrite_metadata(exports["frozen"], tmp_path / "bare.onnx", lambda p: {})
    with pytest.raises(MetadataError, match="no tta export metadata"):
        EdgeModel(bare, "cpu")
    partial = _rewrite_metadata(exports["frozen"], tmp_path / "partial.onnx",
                                lambda p: {k: v for k, v in p.items() if k != "tta.input_shape"})
    with pytest.raises(MetadataError, match="missing tta.input_shape"):
        EdgeModel(partial, "cpu")
    wrong = _rewrite_metadata(exports["frozen"], tmp_path / "wrong.onnx",
                              lambda p: {**p, "tta.input_shape": json.dumps([None, 3, 28, 28])})
    with pytest.raises(MetadataError, match="does not match metadata input_shape"):
        EdgeModel(wrong, "cpu")
    classes = _rewrite_metadata(exports["frozen"], tmp_path / "classes.onnx",
                                lambda p: {**p, "tta.num_classes": "100", "tta.output_dim": "100"})
    with pytest.raises(MetadataError, match="output width 10"):
        EdgeModel(classes, "cpu")
    with pytest.raises(MetadataError, match="needs a 'alpha-bn' export"):
        EdgeAlphaBN(exports["frozen"], "cpu")


def test_wrong_input_batches_are_rejected(exports):
    model = EdgeModel(exports["frozen"], "cpu")
    with pytest.raises(InvalidInputError, match=r"takes images of shape \(3, 32, 32\)"):
        model.run(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(InvalidInputError, match="single image"):
        model.run(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(InvalidInputError, match="uint8"):
        model.run(np.zeros((2, 3, 32, 32), np.uint8))
    bad = np.zeros((2, 3, 32, 32), np.float32)
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        model.run(bad)


# ---------------------------------------------------------------------------------------- fp16 graph
def test_fp16_conversion_keeps_float32_io(exports):
    proto = onnx.load(str(exports["alpha-bn"]))
    half = convert_to_fp16(proto)
    assert all(i.data_type != onnx.TensorProto.FLOAT for i in half.graph.initializer)
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    import onnxruntime as ort

    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    full = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, full, atol=2e-2 * max(1.0, float(np.abs(full).max())))  # fp16 tolerance


# ---------------------------------------------------------------------------------------- TensorRT
class _Recorder:
    """Stand-in for the `tensorrt` module that records the builder calls (not TensorRT)."""

    def __init__(self, version: str, has_fp16_flag: bool) -> None:
        self.calls: list[tuple] = []
        rec = self.calls
        self.module = types.ModuleType("tensorrt")
        m = self.module
        m.__version__ = version

        class Logger:
            WARNING = 2

            def __init__(self, level):
                rec.append(("Logger", level))

        flags = {"STRONGLY_TYPED": 2}
        builder_flags = {"FP16": 0} if has_fp16_flag else {}
        m.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
        m.BuilderFlag = types.SimpleNamespace(**builder_flags)
        m.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")

        class Profile:
            def set_shape(self, name, mn, opt, mx):
                rec.append(("set_shape", name, mn, opt, mx))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                rec.append(("pool", pool, size))

            def set_flag(self, flag):
                rec.append(("set_flag", flag))

            def add_optimization_profile(self, profile):
                rec.append(("add_profile",))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.append(("create_network", flags))
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.append(("build",))
                return b"ENGINE"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse(self, payload):
                rec.append(("parse", onnx.load_from_string(payload)))
                return True

        m.Logger, m.Builder, m.OnnxParser = Logger, Builder, OnnxParser


def _calls(rec, name):
    return [c for c in rec.calls if c[0] == name]


def test_trt_missing_says_how_to_install(exports, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as without the package
    with pytest.raises(TensorRTNotInstalledError, match=r"pip install 'tta-runtime\[trt\]'"):
        build_trt_engine(exports["frozen"], tmp_path / "m.engine")
    from tta.cli import main

    assert main(["export", "trt", "--onnx", str(exports["frozen"]), "--out", str(tmp_path / "m.engine")]) == 2


def test_trt10_fp16_uses_builder_flag_and_profile(exports, tmp_path, monkeypatch):
    rec = _Recorder("10.9.0", has_fp16_flag=True)
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
    report = build_trt_engine(exports["alpha-bn"], tmp_path / "m.engine", fp16=True, min_batch=2, opt_batch=8,
                              max_batch=32)
    assert (tmp_path / "m.engine").read_bytes() == b"ENGINE"
    assert report.precision == "fp16 (builder flag)" and report.profile == (2, 8, 32)
    assert _calls(rec, "create_network") == [("create_network", 0)]
    assert _calls(rec, "set_flag") == [("set_flag", 0)]
    assert _calls(rec, "set_shape") == [("set_shape", "input", (2, 3, 32, 32), (8, 3, 32, 32), (32, 3, 32, 32))]
    parsed = _calls(rec, "parse")[0][1]
    assert parsed.graph.initializer[0].data_type == onnx.TensorProto.FLOAT  # fp32 graph, TensorRT picks fp16


def test_trt11_fp16_builds_strongly_typed_fp16_graph(exports, tmp_path, monkeypatch):
    rec = _Recorder("11.1.0", has_fp16_flag=False)
    monkeypatch.setitem(sys.modules, "tensorrt", rec.module)
    report = build_trt_engine(exports["frozen"], tmp_path / "m.engine", fp16=True)
    assert report.precision == "fp16 (strongly typed graph)"
    assert _calls(rec, "create_network") == [("create_network", 1 << 2)]
    assert not _calls(rec, "set_flag")
    parsed = _calls(rec, "parse")[0][1]
    floats = {i.data_type for i in parsed.graph.initializer} & {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    assert floats == {onnx.TensorProto.FLOAT16}


def test_trt_rejects_bad_profiles_and_foreign_files(exports, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _Recorder("10.9.0", True).module)
    with pytest.raises(ConfigError, match="min_batch"):
        build_trt_engine(exports["frozen"], tmp_path / "m.engine", min_batch=8, opt_batch=4)
    bare = _rewrite_metadata(exports["frozen"], tmp_path / "bare.onnx", lambda p: {})
    with pytest.raises(MetadataError):
        build_trt_engine(bare, tmp_path / "m.engine")


# ---------------------------------------------------------------------------------------- other models (slow)
@pytest.mark.slow
@pytest.mark.parametrize("arch,chw,modes", [
    ("resnet18", (3, 64, 64), ("frozen", "alpha-bn", "features")),
    ("vit_tiny_patch16_224", (3, 224, 224), ("frozen", "features")),
])
def test_timm_round_trip(tmp_path, arch, chw, modes):
    import timm

    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    for mode in modes:
        report = export_onnx(model, tmp_path / f"{arch}_{mode}.onnx", mode=mode, input_size=chw)
        assert all(c["max_abs_diff"] <= c["tolerance"] for c in report.checks)
        assert set(report.ops) <= TENSORRT_OPS


@pytest.mark.slow
def test_builtin_vit_round_trip(tmp_path):
    from tta.models import build_model

    model = build_model("vit_patch4_32", num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    for mode in ("frozen", "features"):
        report = export_onnx(model, tmp_path / f"vit_{mode}.onnx", mode=mode, input_size=(3, 32, 32),
                             real_inputs=fmnist_batch(16))
        assert set(report.ops) <= TENSORRT_OPS
    with pytest.raises(NoAdaptableLayerError):
        export_onnx(model, tmp_path / "vit_abn.onnx", mode="alpha-bn", input_size=(3, 32, 32))


@pytest.mark.slow
@pytest.mark.parametrize("card_attr,modes", [("DEFAULT_CARD", ("frozen", "alpha-bn", "features")),
                                             ("VIT_CARD", ("frozen", "features"))])
def test_shipped_card_round_trip(tmp_path, card_attr, modes):
    from tta import models

    name = getattr(models, card_attr)
    if name not in models.list_cards():
        pytest.skip(f"model card {name} not shipped yet")
    card = models.get_card(name)
    for mode in modes:
        report = export_onnx(name, tmp_path / f"{mode}.onnx", mode=mode, real_inputs=fmnist_batch(64))
        assert report.metadata.card == name and report.metadata.card_sha256 == (card.sha256 or "")
        assert any(c["input"] == "real" for c in report.checks) or fmnist_batch(1) is None


def test_cli_exports_a_model_card(tmp_path, capsys):
    """`tta export onnx --model CARD.yaml`: card name and checkpoint hash end up in the metadata."""
    from tta.cli import main
    from tta.models import ModelCard, build_model, save_state_dict

    net = build_model("resnet20", num_classes=10, width=4)
    sha = save_state_dict(net.state_dict(), tmp_path / "tiny.safetensors")
    card = ModelCard(name="tiny-card", arch="resnet20", num_classes=10, checkpoint="tiny.safetensors", sha256=sha,
                     input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), arch_kwargs={"width": 4})
    card.save(tmp_path / "tiny-card.yaml")
    out = tmp_path / "card.onnx"
    assert main(["export", "onnx", "--model", str(tmp_path / "tiny-card.yaml"), "--out", str(out),
                 "--batch", "3", "--real-images", "0"]) == 0
    assert "onnxruntime vs torch on random (batch 3)" in capsys.readouterr().out
    meta = EdgeModel(out, "cpu").metadata
    assert (meta.card, meta.card_sha256, meta.input_shape) == ("tiny-card", sha, (3, 3, 32, 32))
    assert meta.normalization == {"mean": [0.5] * 3, "std": [0.25] * 3}

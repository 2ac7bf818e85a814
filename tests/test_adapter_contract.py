"""The deployed-model contract every registered adapter inherits from `Adapter`.

Parametrised over `tta.list_adapters()`, so an adapter added to the registry is covered without
touching this file (`build` below knows how to give AdaNPC its memory and EATA its Fisher information;
any other adapter is built with `tta.adapt(model, name, seed=0)`): grad modes, the caller's model left untouched, `.to(dtype)` after a
step, and rejected batches leaving every bit of the adapted state unchanged.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import tta
from tta.adapters.inputs import declare_input, value_verdict
from tta.errors import ConfigError, InputRangeError, InvalidInputError, NonFiniteInputError

ADAPTERS = tta.list_adapters()
#: fewer augmented views (speed) and an anchor threshold that always augments (draws random numbers);
#: RoTTA: a memory bank small enough that a batch of 6 updates the student
FAST = {
    "cotta": {"n_views": 2, "ap": 1.0},
    "vida": {"n_views": 2, "high_rank": 4, "ap": 1.0},
    "vdp": {"n_views": 2, "ap": 1.0},
    "rotta": {"memory_size": 8, "update_frequency": 4},
}
#: selection margins the unsure small CNN passes (so that the sample-selecting adapters do update)
SELECTING = {
    "eata": {"margin_e0": 0.99, "d_margin": 1.5},
    "eta": {"margin_e0": 0.99, "d_margin": 1.5},
    "sar": {"margin_e0": 0.99, "reset_constant": 0.0},
    "deyo": {"margin": 0.99, "margin_e0": 0.99, "plpd_threshold": -1.0},
}


def small_cnn() -> nn.Module:
    """The same small BN CNN on every call (its own seed), with non-trivial source statistics."""
    g = torch.Generator().manual_seed(1)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
        )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(8, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return model.eval()


def build(name: str, model: nn.Module | None = None, **config) -> tta.Adapter:
    model = small_cnn() if model is None else model
    adapter = tta.adapt(model, name, seed=0, **{**FAST.get(name, {}), **SELECTING.get(name, {}), **config})
    if name == "adanpc":
        g = torch.Generator().manual_seed(2)
        adapter.set_source_memory(torch.randn(40, 8, generator=g), torch.arange(40) % 10, 10)
    if name == "rmt":  # source class prototypes (10 classes x 8 feature dims of small_cnn)
        adapter.set_prototypes(torch.randn(10, 8, generator=torch.Generator().manual_seed(3)))
    if name == "eata":
        from tta.adapters.eata import compute_fisher

        adapter.set_fisher(compute_fisher(small_cnn(), batch(9, n=16), batch_size=8))
    return adapter


def batch(seed: int, n: int = 6, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def model_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_same(a, b, path="state") -> None:
    """Bit-exact equality of nested states (tensors, dicts, lists, scalars)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b, path


def adapted_changed(adapter: tta.Adapter, before: dict[str, torch.Tensor]) -> bool:
    after = model_tensors(adapter)
    return any(not torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------- grad modes

@pytest.mark.parametrize("name", ADAPTERS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_every_adapter_adapts_under_no_grad_and_inference_mode(name, mode):
    """Deployed code calls models under no_grad / inference_mode: the adapter behaves exactly as outside."""
    plain, guarded = build(name), build(name)
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    for seed in range(3):
        expected = plain(batch(seed))
        with context():
            out = guarded(batch(seed))
        assert not out.requires_grad and not out.is_inference()
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert_same(plain.state_dict(), guarded.state_dict())
    if guarded.optimizer is not None:
        assert guarded.counters["steps"] == 3 and guarded.optimizer.state, "no update was applied"
    with context():
        guarded.reset()
        fork = guarded.fork()
        torch.testing.assert_close(fork(batch(5)), guarded(batch(5)), rtol=0, atol=0)
    plain.reset()
    plain(batch(5))
    torch.testing.assert_close(guarded(batch(6)), plain(batch(6)), rtol=0, atol=0)


def test_inference_mode_with_an_inference_tensor_model():
    """A model built under inference_mode has inference tensors: copied by default; in place it cannot
    be adapted, and the error says so."""
    with torch.inference_mode():
        model = small_cnn()
        out = tta.adapt(model, "tent")(batch(0))  # built, and stepped, under inference mode
        memory = tta.adapt(model, "adanpc")
        memory.set_source_memory(torch.randn(20, 8), torch.arange(20) % 10, 10)
        memory(batch(1))
    assert out.shape == (6, 10) and memory.memory.size > 20
    with pytest.raises(InvalidInputError, match=r"inference_mode\(\).*adapt a copy"):
        tta.adapt(model, "tent", inplace=True)


# ---------------------------------------------------------------------- the caller's model

@pytest.mark.parametrize("name", ADAPTERS)
def test_caller_model_is_untouched_by_default(name):
    model = small_cnn()
    before = model_tensors(model)
    layout = [(n, type(m), m.training) for n, m in model.named_modules()]
    grads = [p.requires_grad for p in model.parameters()]
    adapter = build(name, model)
    for seed in range(2):
        adapter(batch(seed))
    assert adapter.model is not model
    assert_same(before, model_tensors(model))
    assert layout == [(n, type(m), m.training) for n, m in model.named_modules()]
    assert grads == [p.requires_grad for p in model.parameters()]


def test_inplace_adapts_the_given_model():
    model = small_cnn()
    adapter = tta.adapt(model, "tent", inplace=True)
    assert adapter.model is model
    before = model_tensors(model)
    adapter(batch(0))
    assert adapted_changed(adapter.model, before)


def test_a_model_that_cannot_be_copied_says_to_adapt_in_place():
    import threading

    model = small_cnn()
    model.lock = threading.Lock()
    with pytest.raises(InvalidInputError, match="cannot be copied.*inplace=True"):
        tta.adapt(model, "bn")
    assert tta.adapt(model, "bn", inplace=True)(batch(0)).shape == (6, 10)


def test_readme_snippet_one_model_two_adapters():
    model = small_cnn()
    tent = tta.adapt(model, "tent", preset="cifar10", lr=5e-4)
    bn = tta.adapt(model, "bn")
    for seed in range(3):
        tent(batch(seed))
    x = batch(7)
    torch.testing.assert_close(bn(x), tta.adapt(small_cnn(), "bn")(x), rtol=0, atol=0)
    torch.testing.assert_close(tta.adapt(model, "source")(x), small_cnn()(x), rtol=0, atol=0)


# ---------------------------------------------------------------------- devices and dtypes

def floating_state_dtypes(adapter: tta.Adapter) -> set[torch.dtype]:
    dtypes = {t.dtype for t in adapter.state_dict().values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    dtypes |= {t.dtype for t in adapter._source_state.values() if t.is_floating_point()}
    if adapter.optimizer is not None:
        for state in adapter.optimizer.state.values():
            dtypes |= {v.dtype for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step"}
    return dtypes


@pytest.mark.parametrize("name", ADAPTERS)
def test_to_float64_after_a_step(name, tmp_path):
    adapter = build(name)
    adapter(batch(0))
    assert adapter.to(torch.float64) is adapter
    assert floating_state_dtypes(adapter) == {torch.float64}
    out = adapter(batch(1).double())
    # probabilities of a memory adapter come from its fp32 similarity accumulation
    assert out.dtype == (torch.float64 if adapter.output_kind == "logits" else torch.float32)
    assert torch.isfinite(out).all()
    with pytest.raises(InvalidInputError, match="computes in float64 but the batch is float32"):
        adapter(batch(2))
    path = adapter.save(tmp_path / "state.pt")
    twin = build(name).to(torch.float64)
    twin.load(path)
    torch.testing.assert_close(twin(batch(3).double()), adapter(batch(3).double()), rtol=0, atol=0)
    adapter.reset()
    fresh = build(name).to(torch.float64)
    torch.testing.assert_close(adapter(batch(4).double()), fresh(batch(4).double()), rtol=0, atol=0)
    adapter.to(torch.float32)
    assert floating_state_dtypes(adapter) == {torch.float32}
    adapter(batch(5))


def test_vida_scales_stay_shared_after_a_move():
    adapter = build("vida").to(torch.float64)
    adapter(batch(0).double())
    from tta.adapters.vida import _ViDABranches

    for module, scales in ((adapter.model, adapter._student_scales), (adapter.teacher, adapter._teacher_scales)):
        layers = [m for m in module.modules() if isinstance(m, _ViDABranches)]
        assert all(layer.scales is scales for layer in layers)
    assert not torch.equal(adapter._student_scales, torch.ones(2, dtype=torch.float64))


# ---------------------------------------------------------------------- rejected batches

def bad_batches() -> dict[str, tuple[object, type[Exception], str]]:
    good = batch(9)
    return {
        "float64": (good.double(), InvalidInputError, "computes in float32 but the batch is float64"),
        "7x7": (batch(9, size=7), InvalidInputError, "takes 32x32 images"),
        "64x64": (batch(9, size=64), InvalidInputError, "takes 32x32 images"),
        "meta": (torch.empty(6, 3, 32, 32, device="meta"), InvalidInputError, "meta tensor"),
        "channels": (good[:, :1], InvalidInputError, "3 input channel"),
        "uint8": ((good * 255).to(torch.uint8), InvalidInputError, "floating-point"),
        "rank": (good[0], InvalidInputError, "single image"),
        "empty": (good[:0], InvalidInputError, "empty batch"),
        "not a tensor": (good.numpy(), InvalidInputError, "torch.Tensor"),
        "nan": (good.clone().index_fill_(0, torch.tensor([1]), float("nan")), NonFiniteInputError, "1 of 6"),
        "inf": (good.clone().index_fill_(0, torch.tensor([2, 4]), float("inf")), NonFiniteInputError, "2 of 6"),
        "1e30 pixel": (good.clone().index_put_((torch.tensor(0), torch.tensor(0), torch.tensor(3), torch.tensor(3)),
                                              torch.tensor(1e30)), InputRangeError, "outside the model's input range"),
        "0-255 floats": (good * 255, InputRangeError, r"x.float\(\) / 255"),
    }


@pytest.mark.parametrize("name", ADAPTERS)
def test_rejected_batches_leave_every_bit_of_state_unchanged(name):
    """The model declares its input (as card models do); each rejected batch changes nothing: parameters,
    optimizer, counters, generators, memory, and every later output equals a twin that never saw one."""
    make = lambda: build(name, declare_input(small_cnn(), (32, 32), (0.0, 1.0)))  # noqa: E731
    adapter, twin = make(), make()
    for a in (adapter, twin):
        a(batch(0))  # a real step first: optimizer state, generators and memory exist
    before = adapter.state_dict()
    for case, (x, exc, msg) in bad_batches().items():
        with pytest.raises(exc, match=msg):
            adapter(x)
        assert_same(before, adapter.state_dict(), f"after the {case!r} batch")
    for seed in (1, 2):
        torch.testing.assert_close(adapter(batch(seed)), twin(batch(seed)), rtol=0, atol=0)
    assert_same(twin.state_dict(), adapter.state_dict())


@pytest.mark.parametrize("name", ["cotta", "vida", "vdp"])
def test_wrong_size_image_on_a_vit_changes_nothing(name):
    """The case found by the fault sweep: the random draws came before the forward that failed."""
    from timm.models.vision_transformer import VisionTransformer

    def make():
        with torch.random.fork_rng():
            torch.manual_seed(3)
            vit = VisionTransformer(img_size=16, patch_size=8, num_classes=10, embed_dim=16, depth=1, num_heads=2)
        return build(name, vit)

    adapter, twin = make(), make()
    for a in (adapter, twin):
        a(batch(0, size=16))
    before = adapter.state_dict()
    with pytest.raises(InvalidInputError, match="takes 16x16 images"):
        adapter(batch(1, size=24))
    assert_same(before, adapter.state_dict())
    for seed in (2, 3):
        torch.testing.assert_close(adapter(batch(seed, size=16)), twin(batch(seed, size=16)), rtol=0, atol=0)


def test_device_mismatch_is_named():
    adapter = tta.adapt(small_cnn(), "bn").to("meta")
    with pytest.raises(InvalidInputError, match="the batch is on cpu but the adapter is on meta"):
        adapter(batch(0))


def test_engine_skips_and_reports_out_of_range_batches():
    from tta.engine import run_stream
    from tta.streams.base import Batch

    adapter = build("tent", declare_input(small_cnn(), (32, 32), (0.0, 1.0)))
    lines: list[str] = []
    stream = [Batch(x=batch(0), y=torch.zeros(6, dtype=torch.int64), domain="d"),
              Batch(x=batch(1) * 255, y=torch.zeros(6, dtype=torch.int64), domain="d")]
    result = run_stream(adapter, stream, device="cpu", progress=False, prefetch=0, log=lines.append)
    assert (result.skipped_batches, result.skipped_images, result.steps) == (1, 6, 1)
    assert any("outside the model's input range" in line for line in lines)


@pytest.mark.parametrize("name", ADAPTERS)
def test_a_step_failing_midway_restores_counters_and_generators(name, monkeypatch):
    """Defence in depth behind the checks: an error inside the step (here: the model raises after the
    adapter drew its random numbers) leaves the counters and the random streams as they were."""
    adapter, twin = build(name), build(name)
    for a in (adapter, twin):
        a(batch(0))
    counters = dict(adapter.counters)
    generators = {k: g.get_state() for k, g in adapter._generators.items()}

    def fail(*args, **kwargs):
        raise RuntimeError("device lost")

    for module in adapter.modules():
        if isinstance(module, nn.Linear):
            monkeypatch.setattr(module, "forward", fail)
    with pytest.raises(RuntimeError, match="device lost"):
        adapter(batch(1))
    monkeypatch.undo()
    assert adapter.counters == counters
    assert_same(generators, {k: g.get_state() for k, g in adapter._generators.items()})


def test_value_check_reads_no_value_in_the_check_itself():
    """The verdict is a 0-dim device tensor (the read happens where the adapter syncs anyway)."""
    x = batch(0)
    verdict = value_verdict(x, (0.0, 1.0))
    assert verdict.shape == () and verdict.dtype == torch.bool and bool(verdict)
    assert not bool(value_verdict(x * 2, (0.0, 1.0)))
    assert bool(value_verdict(x * 2, None))
    assert not bool(value_verdict(x.index_fill(0, torch.tensor([0]), float("nan")), None))
    assert not bool(value_verdict(x.index_fill(0, torch.tensor([0]), float("-inf")), (float("-inf"), 1.0)))


def test_declared_input_sources_and_overrides():
    plain = tta.adapt(small_cnn(), "bn")
    assert plain.input_size is None and plain.input_range is None
    plain(batch(0, size=7))  # nothing declared: a CNN runs at any size, any finite value
    plain(batch(0) * 255)
    declared = declare_input(small_cnn(), (32, 32), (0.0, 1.0))
    wide = tta.adapt(declared, "bn", input_size=(64, 64), input_range=(float("-inf"), float("inf")))
    wide(batch(0, size=64) * 255)
    with pytest.raises(InvalidInputError, match="takes 64x64 images"):
        wide(batch(0))
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=16, patch_size=8, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    assert tta.adapt(vit, "tent").input_size == (16, 16)  # a fixed-size patch embedding
    with pytest.raises(ConfigError, match="input_range"):
        tta.adapt(small_cnn(), "bn", input_range=(1.0, 0.0))


def test_card_models_declare_size_and_range():
    from tta.models import DEFAULT_CARD, get_card, load

    card = get_card(DEFAULT_CARD)
    if not card.checkpoint_path().is_file():
        pytest.skip("the default card's checkpoint is not present")
    adapter = tta.adapt(load(DEFAULT_CARD), "bn")
    assert adapter.input_size == tuple(card.input_size[1:]) and adapter.input_range == (0.0, 1.0)


# ---------------------------------------------------------------------- non-finite losses and parameters

def test_lr_inf_and_bad_optimizer_fields_are_config_errors():
    for bad in ({"lr": float("inf")}, {"lr": float("nan")}, {"betas": (1.0, 0.999)}, {"betas": (0.9,)},
                {"weight_decay": -1e-4}, {"weight_decay": float("inf")}, {"momentum": 1.5},
                {"optimizer": "sgd", "nesterov": True, "momentum": 0.0}, {"steps": 0}, {"seed": -1}):
        with pytest.raises(ConfigError):
            tta.adapt(small_cnn(), "tent", **bad)
    with pytest.raises(ConfigError, match="ap must be finite"):
        tta.adapt(small_cnn(), "cotta", ap=float("nan"))
    cls = tta.adapters.get_adapter_class("tent").Config
    with pytest.raises(ConfigError, match="lr must be finite"):
        cls.parse_assignments(["lr=inf"])


@pytest.mark.parametrize("assignment", ["lr=inf", "betas=0.9,1.0", "weight_decay=-1", "momentum=nan"])
def test_cli_refuses_bad_optimizer_fields_before_running(assignment, tmp_path, capsys):
    from tta.cli import main

    assert main(["run", "--adapter", "tent", "--set", assignment, "--no-progress", "--out", str(tmp_path / "r")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_nonfinite_parameters_are_rolled_back_to_source_and_reported(caplog):
    """An update that overflowed leaves inf parameters; the next step's loss is non-finite, the adapted
    parameters are then found non-finite and reset to the source state, and the run reports both."""
    from tta.engine import run_stream
    from tta.streams.base import Batch

    adapter = tta.adapt(small_cnn(), "tent")
    source = model_tensors(adapter)
    after_reset = []

    def stream():
        yield Batch(x=batch(0), y=None, domain="d")
        adapter.model[1].weight.data[0] = float("inf")  # what an update that overflowed leaves behind
        yield Batch(x=batch(1), y=None, domain="d")
        after_reset.append(model_tensors(adapter))
        yield Batch(x=batch(2), y=None, domain="d")

    lines: list[str] = []
    with caplog.at_level(logging.WARNING, logger="tta.adapters"):
        result = run_stream(adapter, stream(), device="cpu", progress=False, prefetch=0, log=lines.append)
    assert (result.skipped_nonfinite_loss, result.nonfinite_param_resets, result.steps) == (1, 1, 3)
    assert "reset to the source state" in caplog.text
    assert any("non-finite 1 time(s)" in line for line in lines)
    assert_same(source, after_reset[0])
    assert all(torch.isfinite(p).all() for p in adapter.parameters())


def test_run_log_reports_skipped_losses():
    from tta.engine import run_stream
    from tta.streams.base import Batch

    adapter = tta.adapt(small_cnn(), "tent")
    adapter.model[-1].weight.data.fill_(float("inf"))  # a broken frozen layer: every loss is non-finite
    lines: list[str] = []
    result = run_stream(adapter, [Batch(x=batch(0), y=None, domain="d")], device="cpu", progress=False,
                        prefetch=0, log=lines.append)
    assert result.skipped_nonfinite_loss == 1
    assert any("non-finite loss and were not applied" in line for line in lines)


# ---------------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("name", ["bn", "tent"])
def test_dynamo_graphs_and_breaks(name):
    """Under torch.compile the checks cost no graph break before the forward: a gradient-free adapter is
    one graph (its verdict read and counting run after it, untraced); TENT's breaks all come from its
    finite-loss read, the step's one host sync (figures for all four in BENCHMARKS.md)."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(build(name))(batch(0))
    sites = {(r.user_stack[-1].name if r.user_stack else "?") for r in explanation.break_reasons}
    if name == "tent":
        assert sites <= {"apply_loss", "_predict_and_adapt"}, sites
    else:
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), sites


@pytest.mark.slow
@pytest.mark.parametrize("name", ["source", "bn", "alpha-bn", "tent"])
def test_torch_compile_runs_and_matches_eager(name):
    torch._dynamo.reset()
    eager, compiled = build(name), torch.compile(build(name))
    for seed in range(3):
        torch.testing.assert_close(compiled(batch(seed)), eager(batch(seed)), rtol=1e-4, atol=1e-4)
    assert compiled.counters == eager.counters
    with pytest.raises(NonFiniteInputError):
        compiled(batch(3).index_fill(0, torch.tensor([0]), float("nan")))

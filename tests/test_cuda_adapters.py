"""Every adapter on a CUDA GPU: the shipped cards run there, deterministic adapters give the CPU's
results, CoTTA's batched ghost-BN views equal separate forwards and its fast path equals
reference_mode where their random streams cannot differ. Skipped without a CUDA GPU."""

from __future__ import annotations

import copy

import pytest
import torch

import tta
from tta.adapters import get_adapter_class
from tta.adapters.teacher import card_defaults
from tta.augment import stack_views
from tta.layers import set_ghost_groups
from tta.models import DEFAULT_CARD, VIT_CARD, load

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible"),
]


@pytest.fixture(autouse=True)
def fp32_math():
    """No TF32 in convolutions/matmuls, so the GPU computes what the CPU computes (to fp32 rounding)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def grey_batches(n: int = 3, b: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Grey RGB images with structure (not pure noise), as the Fashion-MNIST streams deliver."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(n):
        low = torch.rand(b, 1, 8, 8, generator=g)
        x = torch.nn.functional.interpolate(low, size=32, mode="bilinear", align_corners=False)
        xs.append(x.expand(b, 3, 32, 32).contiguous())
    return xs


def adapter_on(device: str, name: str, card: str = DEFAULT_CARD, **cfg) -> tta.Adapter:
    cfg = card_defaults(get_adapter_class(name).Config, cfg, card)
    if name == "adanpc":
        cfg.setdefault("memory", card)
    if name == "eata":
        cfg.setdefault("fisher", card)
    return tta.adapt(load(card), name, seed=0, **cfg).to(device)


@pytest.mark.parametrize("name", ["source", "bn", "alpha-bn", "tent", "adanpc"])
def test_deterministic_adapters_match_the_cpu(name):
    xs = grey_batches()
    cpu, gpu = adapter_on("cpu", name), adapter_on("cuda", name)
    for step, x in enumerate(xs):
        want = cpu(x)
        got = gpu(x.cuda())
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), want, atol=2e-3, rtol=2e-3, msg=f"{name} step {step}")
    for (key, p), q in zip(cpu.model.state_dict().items(), gpu.model.state_dict().values()):
        if p.is_floating_point():
            torch.testing.assert_close(q.cpu(), p, atol=2e-3, rtol=2e-3, msg=key)


def test_cotta_ghost_bn_batched_views_equal_separate_forwards_on_gpu():
    adapter = adapter_on("cuda", "cotta", n_views=8)
    x = grey_batches(1)[0].cuda()
    g = torch.Generator().manual_seed(3)
    params = adapter.augment.draw(8, (32, 32), g)
    views = adapter.augment.apply(x, params, adapter.augment.noise(8, x, torch.Generator("cuda").manual_seed(4)))
    with torch.no_grad():
        separate = torch.stack([adapter.teacher(v) for v in views])
        set_ghost_groups(adapter.teacher, 8)
        batched = adapter.teacher(stack_views(views)).view(8, x.shape[0], -1)
        set_ghost_groups(adapter.teacher, 1)
    torch.testing.assert_close(batched, separate, atol=1e-4, rtol=1e-4)


def test_cotta_fast_equals_reference_on_gpu_without_random_draws():
    """ap=0 and restore_prob=0: no view or restore mask reaches the result, so the GPU's random
    streams (which differ between the two paths there) play no part: results must agree."""
    xs = [x.cuda() for x in grey_batches(5)]
    fast = adapter_on("cuda", "cotta", ap=0.0, restore_prob=0.0)
    ref = adapter_on("cuda", "cotta", ap=0.0, restore_prob=0.0, reference_mode=True)
    for step, x in enumerate(xs):
        torch.testing.assert_close(fast(x), ref(x), atol=1e-4, rtol=1e-4, msg=f"step {step}")
    # The EMA (one lerp vs the literal mul-add) differs by an ulp, and Adam's normalisation turns
    # ulp-sized gradient differences of near-zero gradients into lr-sized steps: compare the whole
    # update (student - source) instead of single elements.
    source = load(DEFAULT_CARD).cuda()
    diff = sum(float((p - q).detach().square().sum()) for p, q in zip(fast.model.parameters(), ref.model.parameters()))
    moved = sum(float((q - s).detach().square().sum()) for q, s in zip(ref.model.parameters(), source.parameters()))
    assert moved > 0 and (diff / moved) ** 0.5 < 0.02
    assert fast.counters.get("aug_skipped") == 5


def test_cotta_runs_all_views_in_one_forward_on_gpu():
    adapter = adapter_on("cuda", "cotta", n_views=8, ap=1.0)
    batch_sizes = []
    hook = adapter.teacher.register_forward_pre_hook(lambda _m, args: batch_sizes.append(args[0].shape[0]))
    out = adapter(grey_batches(1)[0].cuda())
    hook.remove()
    assert out.device.type == "cuda" and torch.isfinite(out).all()
    assert batch_sizes == [32, 8 * 32]  # the clean teacher forward, then one ghost-BN forward of all views
    assert adapter.counters.get("aug_used") == 1


@pytest.mark.parametrize("name", ["vida", "vdp"])
def test_vit_adapters_run_on_gpu(name):
    adapter = adapter_on("cuda", name, card=VIT_CARD, n_views=4, ap=1.0)
    frozen = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    for x in grey_batches():
        out = adapter(x.cuda())
        assert out.device.type == "cuda" and out.shape == (32, 10) and torch.isfinite(out).all()
    changed = [k for k, v in adapter.model.state_dict().items() if not torch.equal(v, frozen[k])]
    if name == "vdp":
        assert changed == []  # the backbone is frozen, bit for bit
    else:
        assert changed  # the student moved


def test_adapter_state_round_trip_between_gpu_and_cpu(tmp_path):
    gpu = adapter_on("cuda", "tent")
    for x in grey_batches():
        gpu(x.cuda())
    gpu.save(tmp_path / "tent.pt")
    cpu = adapter_on("cpu", "tent")
    cpu.load(tmp_path / "tent.pt")
    x = grey_batches(1, seed=9)[0]
    torch.testing.assert_close(copy.deepcopy(cpu)(x), gpu(x.cuda()).cpu(), atol=2e-3, rtol=2e-3)


def count_syncs(fn) -> int:
    """Host-device synchronisations `fn` makes (torch.cuda sync debug mode, one warning each)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # only the per-operation warnings: setting the mode itself warns that it is a prototype feature
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in caught)


def test_input_checks_make_no_host_sync_and_steps_one():
    """The batch checks read metadata and reduce on the device (no sync); the verdict is read once per
    batch, at the step's own sync (bn: after the forward; tent: with the finite-loss check)."""
    from tta.adapters.inputs import value_verdict

    x = grey_batches(n=1)[0].cuda()
    for name in ("bn", "tent"):
        adapter = adapter_on("cuda", name)
        adapter(x)  # first call: lazy initialisation (optimizer state, kernels) out of the count
        assert count_syncs(lambda: (adapter.validate_batch(x), value_verdict(x, adapter.input_range))) == 0
        assert count_syncs(lambda: adapter(x)) == 1, name


# Margins loose enough that the selection rules pick samples on these synthetic batches.
ENTROPY_FAMILY = {
    "eata": {"margin_e0": 0.9, "d_margin": 1.5},
    "eta": {"margin_e0": 0.9, "d_margin": 1.5},
    "sar": {"margin_e0": 0.9, "reset_constant": 0.0},
    "deyo": {"margin": 0.9, "margin_e0": 0.9, "plpd_threshold": -1.0},
    "roid": {},
}


@pytest.mark.parametrize("card", [DEFAULT_CARD, VIT_CARD])
@pytest.mark.parametrize("name", sorted(ENTROPY_FAMILY))
def test_entropy_family_on_gpu_matches_the_cpu(name, card):
    """Same predictions as the CPU at every step (DeYO: the first; its patch shuffles are drawn on
    the GPU's generator afterwards), only norm affine parameters move (BatchNorm on the CNN card,
    LayerNorm on the ViT card)."""
    xs = grey_batches()
    cpu = adapter_on("cpu", name, card, **ENTROPY_FAMILY[name])
    gpu = adapter_on("cuda", name, card, **ENTROPY_FAMILY[name])
    before = {k: v.clone() for k, v in gpu.model.state_dict().items()}
    for step, x in enumerate(xs):
        want = cpu(x)
        got = gpu(x.cuda())
        assert got.device.type == "cuda" and torch.isfinite(got).all()
        if name != "deyo" or step == 0:
            torch.testing.assert_close(got.cpu(), want, atol=2e-3, rtol=2e-3, msg=f"{name} step {step}")
    changed = {k for k, v in gpu.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(gpu.norm_param_names)


# RoTTA: a memory bank that a batch of 32 fills and updates on twice.
MEAN_TEACHERS = {"rmt": {}, "rotta": {"memory_size": 16, "update_frequency": 16}}


@pytest.mark.parametrize("card", [DEFAULT_CARD, VIT_CARD])
@pytest.mark.parametrize("name", sorted(MEAN_TEACHERS))
def test_rmt_and_rotta_on_gpu(name, card):
    """The first prediction equals the CPU's (it precedes every update: RMT's student + teacher,
    RoTTA's teacher); later steps use the augmentation noise drawn on the GPU's generator, so they
    are checked for finite outputs and moved state (RMT: the student's parameters; RoTTA: its norm
    parameters, and on the CNN card the robust BN's global statistics)."""
    xs = grey_batches()
    cpu = adapter_on("cpu", name, card, **MEAN_TEACHERS[name])
    gpu = adapter_on("cuda", name, card, **MEAN_TEACHERS[name])
    before = {k: v.clone() for k, v in gpu.model.state_dict().items()}
    for step, x in enumerate(xs):
        got = gpu(x.cuda())
        assert got.device.type == "cuda" and torch.isfinite(got).all()
        if step == 0:
            torch.testing.assert_close(got.cpu(), cpu(x), atol=2e-3, rtol=2e-3, msg=f"{name} on {card}")
    changed = {k for k, v in gpu.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed
    if name == "rotta" and card == DEFAULT_CARD:
        assert any(k.endswith("running_mean") for k in changed)

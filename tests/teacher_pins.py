"""Pinned outputs of the teacher-student adapters (CoTTA, ViDA, VDP).

`CASES` run a few adaptation steps on small real architectures (a BatchNorm CNN and a timm ViT) with
fixed seeds; `record()` stores, per case, every step's output and a digest of the adapted state
(sum and sum of absolute values of each tensor, float64) in ``tests/fixtures/teacher_pins.safetensors``.
The file was recorded on the code before these adapters moved onto one shared base, so
`tests/test_teacher_pins.py` shows that the consolidation kept their values (not just that the fast
paths still agree with their reference paths).

The three ``*_clean`` cases (teacher on the clean image, ``ap=0``) were re-recorded with the symmetric
CE loss: with the soft CE loss the student's first step has an exactly zero gradient (the student *is*
the teacher then), so Adam's normalised step turned float rounding into full-size updates and those
cases pinned the recording CPU's rounding (another CPU's state digests differed by up to 50%).
Re-record only for an intended change of values, all cases or the ones named:

    PYTHONPATH=$PWD python tests/teacher_pins.py [CASE ...]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tta

FIXTURE = Path(__file__).parent / "fixtures" / "teacher_pins.safetensors"
STEPS = 3


def bn_cnn() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def tiny_vit() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=10, embed_dim=32, depth=2,
                                 num_heads=2, mlp_ratio=2.0).eval()


def batches(size: int, b: int = 6, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, size, size, generator=g) for _ in range(STEPS)]


#: name -> (adapter, model factory, image side, config)
CASES: dict[str, tuple[str, Any, int, dict[str, Any]]] = {
    "cotta_aug": ("cotta", bn_cnn, 12, {"n_views": 5, "ap": 1.0, "restore_prob": 0.05, "views_per_forward": 2}),
    "cotta_clean": ("cotta", bn_cnn, 12, {"n_views": 5, "ap": 0.0, "restore_prob": 0.05, "loss": "symmetric_ce"}),
    "cotta_reference": ("cotta", bn_cnn, 12, {"n_views": 3, "ap": 1.0, "restore_prob": 0.05, "reference_mode": True}),
    "cotta_symmetric_sgd": ("cotta", bn_cnn, 12, {"n_views": 3, "ap": 1.0, "loss": "symmetric_ce",
                                                   "optimizer": "sgd", "lr": 0.01, "momentum": 0.9}),
    "vida_vit": ("vida", tiny_vit, 16, {"n_views": 3, "high_rank": 8, "lr": 1e-3, "adapter_lr": 1e-3, "ap": 1.0}),
    "vida_cnn": ("vida", bn_cnn, 12, {"n_views": 4, "high_rank": 4, "lr": 1e-3, "adapter_lr": 1e-3, "ap": 1.0,
                                      "views_per_forward": 2}),
    "vida_reference_hka_clean": ("vida", tiny_vit, 16, {"n_views": 2, "high_rank": 4, "ap": 0.0, "hka": "reference",
                                                        "lr": 1e-3, "adapter_lr": 1e-3, "loss": "symmetric_ce"}),
    "vdp_vit": ("vdp", tiny_vit, 16, {"n_views": 3, "lr": 1e-2, "ap": 1.0}),
    "vdp_cnn_clean": ("vdp", bn_cnn, 12, {"n_views": 3, "lr": 1e-2, "ap": 0.0, "image_size": 12,
                                      "loss": "symmetric_ce"}),
}


def state_digest(adapter: tta.Adapter) -> dict[str, torch.Tensor]:
    """Per floating-point tensor of the adapter's state: (sum, sum of |x|) in float64."""
    return {key: torch.stack((t.double().sum(), t.double().abs().sum()))
            for key, t in adapter.state_dict().items() if isinstance(t, torch.Tensor) and t.is_floating_point()}


def run_case(name: str) -> dict[str, torch.Tensor]:
    adapter_name, factory, size, cfg = CASES[name]
    adapter = tta.adapt(factory(), adapter_name, seed=3, **cfg)
    out: dict[str, torch.Tensor] = {}
    for step, x in enumerate(batches(size)):
        out[f"{name}.out{step}"] = adapter(x).detach().clone()
    for key, digest in state_digest(adapter).items():
        out[f"{name}.state.{key}"] = digest
    return out


def record(cases: list[str] | None = None, path: Path = FIXTURE) -> Path:
    """Record every case, or re-record only `cases` and keep the other cases' pinned values."""
    from safetensors.torch import load_file, save_file

    unknown = sorted(set(cases or ()) - set(CASES))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    torch.set_num_threads(1)
    tensors: dict[str, torch.Tensor] = {}
    if cases:
        tensors = {k: v for k, v in load_file(str(path)).items() if k.split(".", 1)[0] not in cases}
    for name in cases or CASES:
        tensors.update(run_case(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"torch": torch.__version__})
    return path


if __name__ == "__main__":
    import sys

    print(record(sys.argv[1:] or None))

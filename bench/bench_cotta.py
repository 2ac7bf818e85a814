"""CoTTA per-batch time: fast path vs its compute floor vs reference_mode, measured in one run.

The compute floor is what any exact CoTTA must do on a batch that uses augmentation: (N + 3)
forwards (student, anchor, teacher, N augmented teacher views) and 1 backward of the same model at
the same batch size, with CoTTA's model configuration (BatchNorm on batch statistics). Augmentation,
EMA, restore and optimizer are outside the floor.

Modes are interleaved batch by batch so machine-load drift hits them alike. ``--ap 1.0`` forces
augmentation on every batch (the worst case the floor describes); the ``skip`` mode is the fast
path with augmentation skipped (a confident anchor). ``--input grey`` feeds R = G = B images, as
the Fashion-MNIST streams do (the augmentation then works on one channel). ``--device cuda`` runs
everything on the GPU (each timed step ends with a device synchronisation; views_per_forward auto =
all views in one ghost-BN forward there).

    .venv/bin/python bench/bench_cotta.py --model resnet20-fmnist --batch 200 --size 32 --batches 3 --input grey
    .venv/bin/python bench/bench_cotta.py --model timm:resnet50 --batch 64 --size 224 --batches 1 \
        --views-per-forward 2 --classes 1000
    python bench/bench_cotta.py --device cuda --model timm:resnet50 --classes 1000 --batch 64 --size 224 \
        --views 32 --modes floor,fast,reference,skip --batches 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import statistics
import time

import torch
from torch import nn

import tta
from tta.layers import replace_batchnorms


def build(model: str, classes: int) -> tuple[nn.Module, str]:
    try:
        from tta.models import get_card, list_cards, load

        if model in list_cards():
            card = get_card(model)
            return load(card), f"card {card.name}"
    except Exception:  # no models package or card: fall back to an architecture with random weights
        pass
    from tta.models.builders import build_model

    return build_model(model, num_classes=classes).eval(), f"{model} (random weights)"


def floor_step(model: nn.Module, x: torch.Tensor, n_views: int, views_channels_last: bool = False) -> None:
    """(n_views + 2) no-grad forwards + 1 forward with grad + 1 backward, each at batch size B;
    with `views_channels_last` the n_views forwards take channels_last input (the fast path's
    default), so the floor of that layout is measured too."""
    xv = x.contiguous(memory_format=torch.channels_last) if views_channels_last else x
    with torch.no_grad():
        for _ in range(2):
            model(x)
        for _ in range(n_views):
            model(xv)
    model(x).logsumexp(1).mean().backward()
    model.zero_grad(set_to_none=True)


def autocast_bf16(adapter: tta.Adapter, device: torch.device):
    """The adapter step under bf16 autocast on `device`."""

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return adapter(x)

    return step


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}"


class PhaseTimer:
    """Wall time per phase of the fast path's steps (forward hooks on the three models, wrappers
    on the augmentation, loss/optimizer, EMA and restore), for `--breakdown`."""

    def __init__(self, adapter, sync) -> None:
        self.sync, self.totals, self._open = sync, {}, {}
        self.teacher_calls = 0
        for name, module in (("student forward", adapter.model), ("anchor forward", adapter.anchor),
                             ("teacher forward", adapter.teacher)):
            module.register_forward_pre_hook(self._pre(name))
            module.register_forward_hook(self._post(name))
        aug = adapter.augment
        for attr, name in (("draw", "augment"), ("noise", "augment"), ("apply", "augment")):
            setattr(aug, attr, self._wrap(getattr(aug, attr), name))
        adapter.optimizer.step = self._wrap(adapter.optimizer.step, "optimizer step")
        adapter.apply_loss = self._wrap(adapter.apply_loss, "loss + backward + optimizer")
        adapter.update_teacher = self._wrap(adapter.update_teacher, "teacher EMA")
        adapter.restore = self._wrap(adapter.restore, "stochastic restore")

    def _add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def _pre(self, name: str):
        def hook(module, args):
            label = name
            if name == "teacher forward":  # the first teacher call of a step is the clean forward
                label += " (views)" if self.teacher_calls else ""
                self.teacher_calls += 1
            self.sync()
            self._open[id(module)] = (label, time.perf_counter())
        return hook

    def _post(self, _name: str):
        def hook(module, args, output):
            self.sync()
            label, t = self._open.pop(id(module))
            self._add(label, time.perf_counter() - t)
        return hook

    def _wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            self.sync()
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self._add(name, time.perf_counter() - t)
        return timed

    def run(self, adapter, xs) -> dict[str, float]:
        """Per-step mean seconds of each phase over the batches `xs` (after one untimed step)."""
        self.teacher_calls = 0
        adapter(xs[0])
        self.totals.clear()
        total = 0.0
        for x in xs[1:]:
            self.teacher_calls = 0
            self.sync()
            t = time.perf_counter()
            adapter(x)
            self.sync()
            total += time.perf_counter() - t
        n = len(xs) - 1
        out = {k: v / n for k, v in self.totals.items()}
        out["loss + backward (excl. optimizer)"] = out.pop("loss + backward + optimizer") - out.get("optimizer step", 0)
        out["other (python, generators, loss)"] = total / n - sum(out.values())
        out["total"] = total / n
        return out


def floor_breakdown(model: nn.Module, xs, n_views: int, sync) -> dict[str, float]:
    """Per-step mean seconds of the floor's parts: a no-grad forward (NCHW and channels_last
    input), the forward with grad and the backward."""
    parts = {"no-grad forward": 0.0, "no-grad forward (channels_last)": 0.0, "grad forward": 0.0, "backward": 0.0}
    for i, x in enumerate(xs):
        timings = {}
        xcl = x.contiguous(memory_format=torch.channels_last)
        for key, inp in (("no-grad forward", x), ("no-grad forward (channels_last)", xcl)):
            sync()
            t = time.perf_counter()
            with torch.no_grad():
                model(inp)
            sync()
            timings[key] = time.perf_counter() - t
        t = time.perf_counter()
        loss = model(x).logsumexp(1).mean()
        sync()
        timings["grad forward"] = time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        sync()
        timings["backward"] = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        if i:  # the first round is a warm-up
            for k, v in timings.items():
                parts[k] += v / (len(xs) - 1)
    parts["floor = (N + 2) no-grad + grad forward + backward"] = (
        (n_views + 2) * parts["no-grad forward"] + parts["grad forward"] + parts["backward"])
    parts["floor_cl = 2 no-grad + N channels_last + grad forward + backward"] = (
        2 * parts["no-grad forward"] + n_views * parts["no-grad forward (channels_last)"]
        + parts["grad forward"] + parts["backward"])
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20-fmnist", help="card name, or an architecture (random weights)")
    ap.add_argument("--fallback", default="resnet20", help="architecture when the card is missing")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--views-per-forward", type=int, default=0)
    ap.add_argument("--views-memory-format", default="auto", choices=["auto", "channels_last", "contiguous"],
                    help="memory format of the fast path's augmented views (auto: channels_last for 4-D images)")
    ap.add_argument("--batches", type=int, default=2, help="timed batches per mode (after one warm-up)")
    ap.add_argument("--ap", type=float, default=1.0)
    ap.add_argument("--input", choices=["colour", "grey"], default="colour",
                    help="random colour images, or grey ones (R = G = B) as in the Fashion-MNIST streams")
    ap.add_argument("--modes", default="floor,floor_cl,fast,reference,skip",
                    help="floor: N+3 forwards + 1 backward in the model's layout; floor_cl: the same with "
                         "channels_last views; fast; reference (reference_mode); skip (fast, confident anchor); "
                         "fast_nK (fast with K views); fast_vK (fast with K views per ghost-BN forward); fast_cl / "
                         "fast_nchw (fast with channels_last / contiguous views); fast_bf16 (fast under bf16 autocast); "
                         "fast_cl_bf16 (both)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--no-warmup", action="store_true")
    ap.add_argument("--breakdown", action="store_true",
                    help="instead of the modes: time each phase of the fast path's step and each part of the floor")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is visible")
    torch.manual_seed(0)
    try:
        base, described = build(args.model, args.classes)
    except Exception:
        base, described = build(args.fallback, args.classes)
    base = base.to(device)
    x_all = torch.rand(args.batches + 1, args.batch, 3, args.size, args.size)
    if args.input == "grey":  # R = G = B, like the default Fashion-MNIST stream
        x_all = x_all[:, :, :1].expand_as(x_all).contiguous()
    x_all = x_all.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if args.breakdown:
        common = {"seed": 0, "n_views": args.views, "ap": args.ap, "views_per_forward": args.views_per_forward,
                  "views_memory_format": args.views_memory_format}
        fast = tta.adapt(copy.deepcopy(base), "cotta", **common)
        phases = PhaseTimer(fast, sync).run(fast, list(x_all))
        floor_model = copy.deepcopy(base)
        replace_batchnorms(floor_model, 0.0)
        floor_model.requires_grad_(True)
        floor = floor_breakdown(floor_model, list(x_all), args.views, sync)
        result = {"model": described, "batch": args.batch, "size": args.size, "views": args.views,
                  "input": args.input, "machine": machine(device), "fast_path_phases_s": phases, "floor_parts_s": floor}
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return
    modes = args.modes.split(",")
    runners = {}
    common = {"seed": 0, "n_views": args.views, "ap": args.ap, "views_per_forward": args.views_per_forward}
    fast_only = {"views_memory_format": args.views_memory_format}
    if "floor" in modes:
        floor_model = copy.deepcopy(base)
        replace_batchnorms(floor_model, 0.0)
        floor_model.requires_grad_(True)
        runners["floor"] = lambda x: floor_step(floor_model, x, args.views)
    if "floor_cl" in modes:
        floor_cl_model = copy.deepcopy(base)
        replace_batchnorms(floor_cl_model, 0.0)
        floor_cl_model.requires_grad_(True)
        runners["floor_cl"] = lambda x: floor_step(floor_cl_model, x, args.views, views_channels_last=True)
    if "fast" in modes:
        runners["fast"] = tta.adapt(copy.deepcopy(base), "cotta", **common, **fast_only)
    if "reference" in modes:
        runners["reference"] = tta.adapt(copy.deepcopy(base), "cotta", reference_mode=True, **common)
    if "skip" in modes:
        runners["skip"] = tta.adapt(copy.deepcopy(base), "cotta", **{**common, "ap": 0.0}, **fast_only)
    for mode in modes:  # speed side of the views/precision trade-off: fast_n8, fast_n4, ...
        fewer = re.fullmatch(r"fast_n(\d+)", mode)
        if fewer:
            runners[mode] = tta.adapt(copy.deepcopy(base), "cotta", **{**common, "n_views": int(fewer[1])},
                                      **fast_only)
    for mode in modes:  # fast_vK: K views per ghost-BN forward; fast_cl / fast_nchw: the views' memory format
        per = re.fullmatch(r"fast_v(\d+)", mode)
        if per:
            runners[mode] = tta.adapt(copy.deepcopy(base), "cotta", **{**common, "views_per_forward": int(per[1])},
                                      **fast_only)
        elif mode in ("fast_cl", "fast_nchw"):
            fmt = "channels_last" if mode == "fast_cl" else "contiguous"
            runners[mode] = tta.adapt(copy.deepcopy(base), "cotta", **common, views_memory_format=fmt)
    if "fast_bf16" in modes:
        runners["fast_bf16"] = autocast_bf16(tta.adapt(copy.deepcopy(base), "cotta", **common, **fast_only),
                                            device)
    if "fast_cl_bf16" in modes:
        runners["fast_cl_bf16"] = autocast_bf16(
            tta.adapt(copy.deepcopy(base), "cotta", **common, views_memory_format="channels_last"), device)
    unknown = [m for m in modes if m not in runners]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}")

    times: dict[str, list[float]] = {m: [] for m in runners}
    first = 1 if args.no_warmup else 0  # batch 0: one untimed warm-up step per mode
    for i in range(first, args.batches + 1):
        for name, fn in runners.items():
            sync()
            t = time.perf_counter()
            fn(x_all[i])
            sync()
            elapsed = time.perf_counter() - t
            if i >= 1:
                times[name].append(elapsed)
            print(f"batch {i}{' (warm-up, untimed)' if i == 0 else ''} {name}: {elapsed:.3f} s", flush=True)
    med = {m: statistics.median(v) for m, v in times.items() if v}
    result = {
        "model": described, "batch": args.batch, "size": args.size, "views": args.views,
        "views_per_forward": args.views_per_forward or "auto",
        "views_memory_format": args.views_memory_format, "input": args.input, "ap": args.ap, "timed_batches": args.batches,
        "seconds_per_batch": med,
        "machine": machine(device),
    }
    if "floor" in med:
        result["ratio_to_floor"] = {m: med[m] / med["floor"] for m in med if m != "floor"}
    if "fast" in med and "reference" in med:
        result["reference_over_fast"] = med["reference"] / med["fast"]
        # modes are interleaved, so each round's ratio compares runs made under the same load
        result["reference_over_fast_per_round"] = [r / f for r, f in zip(times["reference"], times["fast"])]
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()

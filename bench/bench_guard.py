"""Cost of the collapse guard relative to the adapter's own predict-and-adapt step.

Per adapter, on one batch (default card, 200 Fashion-MNIST test images with gaussian_noise at
severity 5), timed side by side in rounds (each round times every part once, so load drifts hit them
alike; medians over rounds):

- step: ``adapter(x)``;
- probe: ``guard.observe`` on a probed batch (reference forward + signals + decision);
- other: ``guard.observe`` on a batch that is not probed (entropy of the outputs only);
- checkpoint: one healthy checkpoint (copy of the adapted tensors and optimizer state).

The overhead per step of each guard preset (`GuardConfig.PRESETS`: default, strict), relative to the
step, is (probe + (probe_every - 1) * other) / probe_every + checkpoint / checkpoint_every
(checkpoints are taken at most once per checkpoint_every batches, so the last term is an upper bound).

    nice -n 10 python bench/bench_guard.py --adapters bn,tent,cotta --set cotta.ap=card --rounds 9
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", default="bn,alpha-bn,tent,adanpc,cotta")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="ADAPTER.KEY=VALUE")
    p.add_argument("--model", default=None)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import tta
    from tta.adapters import adapt, get_adapter_class
    from tta.cli.run import card_defaults
    from tta.engine import CollapseGuard, GuardConfig
    from tta.engine.guard import _Checkpoint
    from tta.streams import corrupt, load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    x = torch.from_numpy(corrupt(images[: args.batch_size], "gaussian_noise", 5, seed=0)).permute(0, 3, 1, 2)
    x = x.float().div(255).contiguous()
    card = args.model or tta.models.DEFAULT_CARD
    presets = {name: GuardConfig.from_mapping({"preset": name}) for name in GuardConfig.PRESETS}
    names = [n.strip() for n in args.adapters.split(",") if n.strip()]
    entries = []
    for name in names:
        mine = [a.split(".", 1)[1] for a in args.assignments if a.split(".", 1)[0] == name]
        overrides = get_adapter_class(name).Config.parse_assignments(mine)
        adapter = adapt(tta.models.load(card), name, preset="cifar10",
                        **card_defaults(name, overrides, argparse.Namespace(model=card)))
        guard = CollapseGuard(adapter, GuardConfig(window=1, action="none"))
        out = adapter(x)  # warm-up
        guard.observe(0, x, out)
        entries.append((name, adapter, guard))
    times: dict[str, dict[str, list[float]]] = {n: {"step": [], "probe": [], "other": [], "checkpoint": []} for n in names}
    for r in range(args.rounds):
        for name, adapter, guard in entries:
            t0 = time.perf_counter()
            out = adapter(x)
            t1 = time.perf_counter()
            guard.observe(0, x, out)  # batch 0: probed
            t2 = time.perf_counter()
            guard.observe(1, x, out)  # batch 1: not probed (probe_every 4)
            t3 = time.perf_counter()
            _Checkpoint(adapter, r, guard._frozen)
            t4 = time.perf_counter()
            for key, dt in (("step", t1 - t0), ("probe", t2 - t1), ("other", t3 - t2), ("checkpoint", t4 - t3)):
                times[name][key].append(dt * 1e3)
    print(f"# guard cost, card {card}, batch {args.batch_size}, {args.rounds} rounds, {args.threads} thread(s), "
          f"torch {torch.__version__}, {platform.machine()}")
    for preset, cfg in presets.items():
        print(f"# {preset}: probe_every {cfg.probe_every}, checkpoint_every {cfg.checkpoint_every}")
    print("| adapter | step ms | probe ms | other batch ms | checkpoint ms | "
          + " | ".join(f"overhead per step ({preset})" for preset in presets) + " |")
    print("|---|---|---|---|---|" + "---|" * len(presets))
    for name in names:
        m = {k: statistics.median(v) for k, v in times[name].items()}
        shares = [((m["probe"] + (cfg.probe_every - 1) * m["other"]) / cfg.probe_every
                   + m["checkpoint"] / cfg.checkpoint_every) / m["step"] for cfg in presets.values()]
        print(f"| {name} | {m['step']:.1f} | {m['probe']:.1f} | {m['other']:.2f} | {m['checkpoint']:.2f} | "
              + " | ".join(f"{100 * share:.1f}%" for share in shares) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""AdaNPC on a kNN-trained and a cross-entropy-trained card: the continual stream, per domain.

    nice -n 10 .venv/bin/python bench/bench_adanpc_cards.py --cards resnet20-fmnist-knn,resnet20-fmnist \\
        --limit 2000 --out runs/adanpc-cards-2000            # the default stream's 2,000 images per domain
    ... --full --out runs/adanpc-cards-full                  # the complete protocol
    ... --diagnose --limit 2000                              # where the features leave the memory's neighbourhoods
    ... --trace --rows adanpc,adanpc+bn --limit 2000         # whom the test features vote with as the memory grows

Rows (all on the same stream, seed and order; a fresh model per row):

- ``source``: the card's linear head (for the kNN card: its linear probe), frozen;
- ``knn-source``: the vote over the card's source memory, nothing added (``adanpc extend_memory=false``):
  the "source model" of a kNN card;
- ``adanpc``: AdaNPC at the paper's defaults (k 100, tau 0.1, beta 0.1, unbounded memory);
- ``adanpc-bn``: AdaNPC-BN (``feature_bn=true``: feature BatchNorm1d, 3 entropy steps at 1e-5, tau 0.01);
- ``bn``, ``tent``: the CNN baselines on the card's linear head;
- ``knn-source+bn``: the vote over the source memory, nothing added, of the BN-adapted network's
  features (``norm=bn extend_memory=false``): the baseline of ``adanpc+bn``;
- ``adanpc+bn``: AdaNPC over features of the BN-adapted network (``norm=bn``);
- ``adanpc-bn+bn``: AdaNPC-BN over features of the BN-adapted network (``feature_bn=true norm=bn``).

Each row's result is written to ``OUT/<card>/<row>.json`` as it finishes (a rerun skips finished rows);
the Markdown tables (error % per domain, mean) are printed at the end and written to ``OUT/tables.md``.
``--memory CARD=PATH`` runs a card's AdaNPC rows on another memory file.

``--diagnose``: on the clean test images and per domain, with the frozen source network (and with BN-adapted features), the mean
cosine similarity of a test feature to its nearest source-memory row and the share of its 100
nearest rows that carry its true label (neighbourhood purity), plus the vote's error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import tta
from tta.engine import run_stream, seed_everything
from tta.streams import load_spec

ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "source": ("source", {}),
    "knn-source": ("adanpc", {"extend_memory": False}),
    "adanpc": ("adanpc", {}),
    "adanpc-bn": ("adanpc", {"feature_bn": True}),
    "bn": ("bn", {}),
    "tent": ("tent", {}),
    "knn-source+bn": ("adanpc", {"norm": "bn", "extend_memory": False}),
    "adanpc+bn": ("adanpc", {"norm": "bn"}),
    "adanpc-bn+bn": ("adanpc", {"feature_bn": True, "norm": "bn"}),
}
SHORT = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "defocus_blur": "defoc",
         "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "frost",
         "fog": "fog", "brightness": "brigh", "contrast": "contr", "elastic_transform": "elast",
         "pixelate": "pixel", "jpeg_compression": "jpeg"}


def markdown(results: dict[str, dict[str, Any]]) -> str:
    domains = next(iter(results.values()))["domains"]
    head = "| row | " + " | ".join(SHORT.get(d, d) for d in domains) + " | mean | img/s |"
    lines = [head, "|" + "---|" * (len(domains) + 3)]
    for row, r in results.items():
        cells = " | ".join(f"{r['domain_errors'][d]:.2f}" for d in domains)
        lines.append(f"| {row} | {cells} | **{r['mean_error']:.2f}** | {r['images_per_s']:.0f} |")
    return "\n".join(lines)


def run_rows(args: argparse.Namespace, memories: dict[str, str]) -> None:
    spec = load_spec(args.stream)
    if args.full:  # None in the build call means "the spec's own size", so clear the spec's
        spec = dataclasses.replace(spec, n_per_domain=None)
    n = None if args.full else args.limit
    seed = int(spec.seed or 0)
    stream = spec.build(n_per_domain=n, seed=seed, data_dir=args.data_dir)
    print(f"{spec.name}: {len(stream.domains)} domains, {sum(stream.domain_sizes.values())} images", flush=True)
    out = Path(args.out)
    tables = []
    for card in args.cards.split(","):
        results: dict[str, dict[str, Any]] = {}
        for row in args.rows.split(","):
            adapter_name, overrides = ROWS[row]
            path = out / card / f"{row}.json"
            if path.is_file():
                results[row] = json.loads(path.read_text())
                continue
            config = dict(overrides)
            if adapter_name == "adanpc":
                config["memory"] = memories.get(card, card)
            seed_everything(seed)
            adapter = tta.adapt(tta.models.load(card), adapter_name, preset=spec.preset, **config)
            t0 = time.perf_counter()
            res = run_stream(adapter, stream, device="cpu", reset="never", progress=False, seed=seed,
                             log=lambda s: None)
            record = {**res.to_dict(), "card": card, "row": row, "adapter": adapter_name,
                      "config": adapter.config.to_dict(), "n_per_domain": n, "stream": spec.name,
                      "wall_s": round(time.perf_counter() - t0, 1)}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1, default=str) + "\n")
            results[row] = record
            print(f"{card} {row}: mean error {res.mean_error:.2f}% ({record['wall_s']} s)", flush=True)
        tables.append(f"### {card}\n\n{markdown(results)}\n")
    text = "\n".join(tables)
    (out / "tables.md").write_text(text)
    print(text)


def clean_batches(n: int, batch_size: int) -> list[Any]:
    """The first `n` clean Fashion-MNIST test images as stream batches (domain "clean")."""
    from tta.streams.base import Batch
    from tta.streams.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    x = torch.from_numpy(images[:n].transpose(0, 3, 1, 2).copy()).float().div_(255)
    y = torch.from_numpy(labels[:n]).long()
    return [Batch(x[i:i + batch_size], y[i:i + batch_size], "clean") for i in range(0, n, batch_size)]


@torch.no_grad()
def diagnose(args: argparse.Namespace, memories: dict[str, str]) -> None:
    """Per domain: nearest-row similarity, neighbourhood purity and vote error, source vs BN features."""
    from tta.adapters.adanpc import load_memory, memory_path_for_card
    from tta.models.features import extract_features

    spec = load_spec(args.stream)
    stream = spec.build(n_per_domain=args.limit, seed=int(spec.seed or 0), data_dir=args.data_dir)
    for card in args.cards.split(","):
        feats_mem, labels_mem, num_classes, _ = load_memory(memories.get(card) or memory_path_for_card(card))
        rows = F.normalize(feats_mem.float(), dim=1)
        models = {"source": tta.models.load(card), "bn": tta.adapt(tta.models.load(card), "bn").model}
        stats: dict[str, dict[str, list[torch.Tensor]]] = {}
        for batch in [*clean_batches(args.limit, stream.batch_size), *stream]:
            for mode, model in models.items():
                q = F.normalize(extract_features(model, batch.x).float(), dim=1)
                scores, idx, sims = tta.ops.knn_vote(q, rows, labels_mem, num_classes, 100, 0.1, metric="ip",
                                                     return_neighbors=True)
                s = stats.setdefault(batch.domain, {}).setdefault(mode, [])
                s.append(torch.stack([sims[:, 0], (labels_mem[idx] == batch.y[:, None]).float().mean(1),
                                      (scores.argmax(1) != batch.y).float()], 1))
        print(f"### {card}: per domain, source / BN features (nearest-row cosine, purity of the 100 nearest "
              "rows %, vote error %)\n")
        print("| domain | cos src | cos bn | purity src | purity bn | err src | err bn |\n|---|---|---|---|---|---|---|")
        for domain, modes in stats.items():
            m = {mode: torch.cat(v).mean(0) for mode, v in modes.items()}
            print(f"| {SHORT.get(domain, domain)} | {m['source'][0]:.3f} | {m['bn'][0]:.3f} | "
                  f"{100 * m['source'][1]:.1f} | {100 * m['bn'][1]:.1f} | {100 * m['source'][2]:.1f} | "
                  f"{100 * m['bn'][2]:.1f} |")
        print()


@torch.no_grad()
def trace(args: argparse.Namespace, memories: dict[str, str]) -> None:
    """Per domain, for the AdaNPC rows of --rows: whom the test features vote with as the memory grows.

    With beta 0.1 and an unbounded memory every feature of a batch is appended, in order, as its own
    L2-normalised query; its 100 nearest rows in the memory as it stood at the vote give the share of
    test rows among the neighbours, the purity of the source and of the test neighbours (their label
    is the query's true class) and how many test neighbours carry a correct pseudo-label.
    """
    spec = load_spec(args.stream)
    seed = int(spec.seed or 0)
    stream = spec.build(n_per_domain=args.limit, seed=seed, data_dir=args.data_dir)
    for card in args.cards.split(","):
        for row in args.rows.split(","):
            adapter_name, overrides = ROWS[row]
            if adapter_name != "adanpc" or overrides.get("feature_bn") or overrides.get("extend_memory") is False:
                continue
            seed_everything(seed)
            adapter = tta.adapt(tta.models.load(card), "adanpc", preset=spec.preset,
                                **{**overrides, "memory": memories.get(card, card)})
            mem = adapter.memory
            assert mem is not None and mem.capacity is None
            truth = mem.labels[:mem.num_source].clone()  # the true label of every memory row
            stats: dict[str, list[torch.Tensor]] = {}
            for batch in stream:
                size = mem.size
                probs = adapter(batch.x)
                if mem.size - size != batch.x.shape[0]:
                    raise SystemExit("--trace needs every feature appended (beta <= 1/C, unbounded memory)")
                rows, labels = mem.rows()
                _, idx, _ = tta.ops.knn_vote(rows[size:].float(), rows[:size], labels[:size], mem.num_classes, 100,
                                             0.1, metric="ip", return_neighbors=True)
                is_test = idx >= mem.num_source
                same_class = labels[idx] == batch.y[:, None]
                n_test, n_src = is_test.sum(1).float(), (~is_test).sum(1).float()
                stats.setdefault(batch.domain, []).append(torch.stack([
                    n_test / idx.shape[1],
                    (same_class & ~is_test).sum(1) / n_src.where(n_src > 0, torch.nan),
                    (same_class & is_test).sum(1) / n_test.where(n_test > 0, torch.nan),
                    ((labels[idx] == truth[idx]) & is_test).sum(1) / n_test.where(n_test > 0, torch.nan),
                    (probs.argmax(1) != batch.y).float()], 1))
                truth = torch.cat([truth, batch.y])
            print(f"### {card} {row}: the 100 nearest memory rows of each test feature at its vote, per domain (%)\n")
            print("| domain | test rows among them | source rows of its class | test rows of its class | "
                  "test rows correctly pseudo-labelled | vote error |\n|---|---|---|---|---|---|")
            for domain, v in stats.items():
                m = 100 * torch.cat(v).nanmean(0)
                print(f"| {SHORT.get(domain, domain)} | " + " | ".join(f"{x:.1f}" for x in m.tolist()) + " |", flush=True)
            print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cards", default="resnet20-fmnist-knn,resnet20-fmnist")
    ap.add_argument("--rows", default="source,knn-source,adanpc,adanpc-bn,bn,tent",
                    help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--stream", default="fmnist-c-continual")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--limit", type=int, default=2000, help="images per domain (default 2000)")
    size.add_argument("--full", action="store_true", help="every image of every domain")
    ap.add_argument("--memory", action="append", default=[], metavar="CARD=PATH",
                    help="memory file for a card's AdaNPC rows (default: the card's own)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="runs/adanpc-cards")
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--trace", action="store_true", help="per domain, the share and labels of test rows among "
                    "the neighbours of AdaNPC rows (--rows)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    memories = dict(item.split("=", 1) for item in args.memory)
    if args.diagnose:
        diagnose(args, memories)
    elif args.trace:
        trace(args, memories)
    else:
        run_rows(args, memories)


if __name__ == "__main__":
    main()

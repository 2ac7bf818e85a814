"""The evaluation protocol: matrix plans and cells, resumable runs, the table, cost and memory figures,
tuning on validation streams only and tuned presets (toy "-C" sets of a few images; the shipped card)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from tta.cli import main
from tta.errors import ConfigError
from tta.protocol import presets
from tta.protocol.cost import resident_bytes, step_cost, step_memory, transient_peak_bytes
from tta.protocol.matrix import compare, load_cell, run_matrix
from tta.protocol.plan import Cell, parse_plan
from tta.protocol.table import render
from tta.protocol.tuning import grid_points, parse_grid

CARD = "resnet20-fmnist"
TEST_CORRUPTIONS = ("gaussian_noise", "fog")
VAL_CORRUPTIONS = ("speckle_noise", "saturate")


def write_c(root: Path, corruptions: tuple[str, ...], n: int = 24, seed: int = 0) -> None:
    """A tiny "-C" folder (CIFAR-10-C layout, severity 5 only) of smooth random images."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.save(root / "labels.npy", rng.integers(0, 10, n).astype(np.uint8))
    for i, c in enumerate(corruptions):
        img = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
        np.save(root / f"{c}.npy", img)
    (root / "meta.json").write_text(json.dumps({"severities": [5], "n": n}))


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A toy test spec and a toy validation spec (8 images per domain, batches of 4) with their data;
    the per-user folders point into tmp_path."""
    data, specs = tmp_path / "data", tmp_path / "streams"
    write_c(data / "toy-c", TEST_CORRUPTIONS)
    write_c(data / "toy-c-val", VAL_CORRUPTIONS, seed=1)
    specs.mkdir()
    common = {"dataset": "fashion-mnist-c", "setting": "continual", "severities": [5], "batch_size": 4,
              "n_per_domain": 8, "seed": 1, "preset": "cifar10"}
    (specs / "toy-continual.yaml").write_text(yaml.safe_dump({**common, "data": "toy-c",
                                                              "corruptions": list(TEST_CORRUPTIONS)}))
    (specs / "toy-reset.yaml").write_text(yaml.safe_dump({**common, "data": "toy-c", "reset": "domain",
                                                          "corruptions": list(TEST_CORRUPTIONS)}))
    (specs / "toy-val.yaml").write_text(yaml.safe_dump({**common, "data": "toy-c-val", "role": "validation",
                                                        "corruptions": list(VAL_CORRUPTIONS)}))
    monkeypatch.setenv("TTA_STREAMS_DIR", str(specs))
    monkeypatch.setenv("TTA_DATA_DIR", str(data))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "user"))
    monkeypatch.delenv("TTA_PRESETS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


PLAN = {
    "name": "toy",
    "cost": {"stream": "toy-continual", "limit": 8},
    "parts": [
        {"name": "main", "models": [CARD], "streams": ["toy-continual", "toy-reset"], "adapters": ["source", "tent"],
         "seeds": [1, 2], "limit": 8},
        {"name": "variant", "models": [CARD], "streams": ["toy-continual"], "adapters": ["tent"], "seeds": [1],
         "limit": 4, "variant": "lr 1e-4", "set": ["lr=1e-4"], "cost": False},
    ],
}


# ------------------------------------------------------------------------------------------------ plans


def test_plan_cells_are_the_union_of_the_parts():
    plan = parse_plan(PLAN)
    cells = plan.cells()
    stream = [c for c in cells if c.kind == "stream"]
    assert len(stream) == 2 * 2 * 2 + 1 and len([c for c in cells if c.kind == "cost"]) == 2
    assert len({c.key for c in cells}) == len(cells)
    variant = next(c for c in cells if c.variant)
    assert variant.label == "tent (lr 1e-4)" and variant.overrides == ("lr=1e-4",) and variant.limit == 4
    assert Cell.from_dict(variant.to_dict()) == variant and variant.digest() == Cell.from_dict(variant.to_dict()).digest()
    assert plan.select(["variant"]).cells() == [variant]
    cheap = parse_plan({**PLAN, "parts": [{**PLAN["parts"][0], "cost": {"limit": 2}}]}).cells()
    assert {c.limit for c in cheap if c.kind == "cost"} == {2}
    doubled = parse_plan({**PLAN, "parts": [PLAN["parts"][0], {**PLAN["parts"][0], "name": "again"}]})
    assert len(doubled.cells()) == len(parse_plan({**PLAN, "parts": [PLAN["parts"][0]]}).cells())
    clash = parse_plan({**PLAN, "parts": [PLAN["parts"][1], {**PLAN["parts"][1], "name": "b", "set": ["lr=1"]}]})
    with pytest.raises(ConfigError, match="define .* differently"):
        clash.cells()


@pytest.mark.parametrize("change, message", [
    ({"seeds": [1, -2]}, "seeds must be"),
    ({"limit": 0}, "limit must be"),
    ({"adapters": []}, "adapters must be a non-empty list"),
    ({"set": ["lr=1e-4"]}, "needs a variant name"),
    ({"colour": "red"}, "unknown keys"),
    ({"cost": {"stream": "x"}}, "cost must be"),
])
def test_bad_plans_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        parse_plan({"parts": [{**PLAN["parts"][0], **change}]})
    with pytest.raises(ConfigError, match="no part named"):
        parse_plan(PLAN).select(["nope"])


# ------------------------------------------------------------------------------------------------ matrix


def test_matrix_runs_records_the_protocol_resumes_and_tabulates(toy):
    plan = parse_plan(PLAN)
    cells = plan.cells()
    out = toy / "out"
    counts = run_matrix(cells, out, log=lambda _: None)
    assert counts == {"cells": 11, "done_before": 0, "ran": 11, "failed": 0, "busy": 0}
    cell = next(c for c in cells if c.adapter == "tent" and c.stream == "toy-reset" and c.seed == 2)
    meta = json.loads((out / cell.key / "meta.json").read_text())
    p = meta["protocol"]
    assert (p["stream"], p["setting"], p["reset"], p["order"], p["batch_size"], p["seed"], p["images_per_domain"],
            p["images"], p["corruptions"], p["severities"]) == ("toy-reset", "continual", "domain", "shuffle", 4, 2, 8,
                                                                16, list(TEST_CORRUPTIONS), [5])
    assert meta["model"]["checkpoint_sha256"] and meta["model"]["normalization"]["inside_model"] is True
    assert meta["model"]["normalization"]["mean"] == [0.219] * 3
    assert meta["adapter"]["config"]["lr"] == 1e-3 and meta["adapter"]["preset"] == "cifar10"
    assert meta["version"] and "commit" in meta["git"] and meta["threads"] == 1 and meta["torch"]
    result = json.loads((out / cell.key / "result.json").read_text())
    assert result["images"] == 16 and result["resets"] == 1 and len(result["predictions_sha256"]) == 64
    variant = next(c for c in cells if c.variant)
    assert load_cell(out, variant)["meta"]["adapter"]["config"]["lr"] == 1e-4

    # a second run finds everything done; a changed definition is a new cell
    assert run_matrix(cells, out, log=lambda _: None)["ran"] == 0
    changed = parse_plan({**PLAN, "parts": [PLAN["parts"][0], {**PLAN["parts"][1], "set": ["lr=2e-4"]}]}).cells()
    assert run_matrix(changed, out, log=lambda _: None) == {"cells": 11, "done_before": 10, "ran": 1, "failed": 0,
                                                            "busy": 0}

    table = render(parse_plan({**PLAN, "parts": [PLAN["parts"][0], {**PLAN["parts"][1], "set": ["lr=2e-4"]}]}), out)
    assert "| source |" in table and "| tent (lr 1e-4) |" in table and "± " in table
    assert "(1 seed, 4/domain)" in table  # the variant row ran fewer seeds and images than its column
    assert "`toy-reset`, continual" in table and "reset domain" in table and "checkpoint sha256" in table
    stats = {}
    for c in cells:
        if c.kind == "stream" and c.variant == "" and c.adapter == "source" and c.stream == "toy-continual":
            stats[c.seed] = load_cell(out, c)["result"]["mean"]
    mean = (stats[1] + stats[2]) / 2
    std = float(np.std([stats[1], stats[2]], ddof=1))
    assert f"| source | {mean:.2f} ± {std:.2f}" in table.replace("**", "")


def test_a_failing_cell_is_recorded_and_the_others_run(toy):
    cells = parse_plan({"parts": [{"name": "p", "models": [CARD], "streams": ["toy-continual"],
                                   "adapters": ["source", "no-such-adapter"], "seeds": [1], "cost": False}]}).cells()
    counts = run_matrix(cells, toy / "out", log=lambda _: None)
    assert counts["ran"] == 1 and counts["failed"] == 1
    assert "no-such-adapter" in (toy / "out" / cells[1].key / "error.txt").read_text()


def test_a_cell_held_by_a_live_runner_is_left_to_it(toy):
    cells = parse_plan({"parts": [{"name": "p", "models": [CARD], "streams": ["toy-continual"],
                                   "adapters": ["source"], "seeds": [1, 2], "cost": False}]}).cells()
    out = toy / "out"
    (out / cells[0].key).mkdir(parents=True)
    (out / cells[0].key / "running.lock").write_text(str(os.getppid()))  # a live process holds it
    (out / cells[1].key).mkdir(parents=True)
    (out / cells[1].key / "running.lock").write_text("999999999")  # stale: no such process
    counts = run_matrix(cells, out, log=lambda _: None)
    assert counts["busy"] == 1 and counts["ran"] == 1 and load_cell(out, cells[1]) is not None


def test_compare_reports_equal_and_different_runs(toy):
    cells = parse_plan({"parts": [{"name": "p", "models": [CARD], "streams": ["toy-continual"],
                                   "adapters": ["bn"], "seeds": [1], "cost": False}]}).cells()
    run_matrix(cells, toy / "a", log=lambda _: None)
    run_matrix(cells, toy / "b", log=lambda _: None)
    assert compare(cells, toy / "a", toy / "b") == (1, [])
    stored = json.loads((toy / "b" / cells[0].key / "result.json").read_text())
    stored["predictions_sha256"] = "0" * 64
    (toy / "b" / cells[0].key / "result.json").write_text(json.dumps(stored))
    n, diffs = compare(cells, toy / "a", toy / "b")
    assert n == 1 and len(diffs) == 1 and "predictions_sha256" in diffs[0]


@pytest.mark.slow
def test_ray_matrix_gives_the_sequential_results(toy):
    """One Ray task per cell on a local Ray instance: the same errors, steps and predictions."""
    pytest.importorskip("ray")
    cells = parse_plan({**PLAN, "parts": [{**PLAN["parts"][0], "cost": False}]}).cells()
    run_matrix(cells, toy / "seq", log=lambda _: None)
    counts = run_matrix(cells, toy / "ray", use_ray=True, workers=2, log=lambda _: None)
    assert counts["ran"] == len(cells) and compare(cells, toy / "seq", toy / "ray") == (len(cells), [])


# ------------------------------------------------------------------------------------------------ cost


def test_resident_bytes_count_each_storage_once():
    lin = nn.Linear(10, 5)
    assert resident_bytes(lin) == (50 + 5) * 4
    shared = nn.Sequential(lin, lin)
    assert resident_bytes(shared) == (50 + 5) * 4


def test_transient_peak_counts_what_is_live_at_once():
    def two_at_once():
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(2000, dtype=torch.float32)
        del a, b

    def one_after_the_other():
        a = torch.empty(1000, dtype=torch.float32)
        del a
        b = torch.empty(2000, dtype=torch.float32)
        del b

    assert transient_peak_bytes(two_at_once) == pytest.approx(12000, abs=512)
    assert transient_peak_bytes(one_after_the_other) == pytest.approx(8000, abs=512)


def test_step_memory_and_cost_of_an_adapter_against_the_source_model():
    import tta

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 10)).eval()
    x = torch.rand(16, 3, 16, 16)
    tent = tta.adapt(model, "tent")
    mem = step_memory(tent, model, x)
    # a step keeps activations for the backward and Adam keeps two moments: more than a forward
    assert mem["step_peak_bytes"] > mem["source_forward_peak_bytes"] > 0
    assert mem["adapter_resident_bytes"] > mem["source_resident_bytes"] and mem["ratio"] > 1
    cost = step_cost(tta.adapt(model, "bn"), model, [x, x, x])
    assert cost["batches"] == 2 and cost["images"] == 32 and cost["ratio"] > 0
    with pytest.raises(ValueError):
        step_cost(tent, model, [x])


# ------------------------------------------------------------------------------------------------ tuning


def test_grid_is_typed_by_the_adapter_config():
    from tta.adapters import get_adapter_class

    grid = parse_grid(["lr=1e-4,1e-3", "steps=1,2"], get_adapter_class("tent").Config)
    assert grid == {"lr": [1e-4, 1e-3], "steps": [1, 2]}
    assert grid_points(grid)[1] == {"lr": 1e-4, "steps": 2} and len(grid_points(grid)) == 4
    with pytest.raises(ConfigError):
        parse_grid(["lr=fast"], get_adapter_class("tent").Config)
    with pytest.raises(ConfigError, match="unknown config key"):
        parse_grid(["learning_rate=1e-3"], get_adapter_class("tent").Config)


def test_tuning_on_a_test_stream_is_refused(toy, capsys):
    """Neither a test spec nor a test spec relabelled on the command line: exit 2, nothing run or written."""
    for stream in ("toy-continual", "fmnist-c-continual"):
        assert main(["tune", "--adapter", "tent", "--stream", stream, "--grid", "lr=1e-4,1e-3"]) == 2
        err = capsys.readouterr().err
        assert "is a test stream" in err and "validation streams only" in err
    assert not (toy / "runs").exists() and not (toy / "user").exists()
    assert main(["run", "--adapter", "tent", "--stream", "toy-continual", "--stream-set", "role=validation"]) == 2
    assert "fixed by its spec file" in capsys.readouterr().err


def test_tune_writes_a_preset_the_bench_applies(toy, capsys):
    assert main(["tune", "--adapter", "tent", "--stream", "toy-val", "--grid", "lr=1e-5,5e-3", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "<- chosen" in out and out.count("e-0") >= 2
    path = toy / "user" / "tta-runtime" / "presets" / "tuned.yaml"  # the per-user folder, not the package
    entry = yaml.safe_load(path.read_text())["entries"][CARD]["tent"]
    points = entry["validation"]["points"]
    assert [p["values"]["lr"] for p in points] == [1e-5, 5e-3] and entry["validation"]["stream"] == "toy-val"
    best = min(points, key=lambda p: p["mean_error"])
    assert entry["values"] == {"lr": best["values"]["lr"]} and entry["validation"]["role"] == "validation"
    assert entry["base_preset"] == "cifar10" and len(entry["checkpoint_sha256"]) == 64

    # the tuned row: bench on the test stream with --preset tuned takes the chosen value
    assert main(["bench", "--adapters", "tent,bn", "--stream", "toy-continual", "--preset", "tuned",
                 "--out", str(toy / "bench"), "--no-progress"]) == 0
    meta = json.loads((toy / "bench" / "meta.json").read_text())
    assert meta["configs"]["tent"]["lr"] == best["values"]["lr"] and meta["configs"]["tent"]["betas"] == [0.9, 0.999]
    assert "[bn] no tuned values" in capsys.readouterr().out
    # a single adapter without tuned values is an error, not a silent default
    assert main(["run", "--adapter", "bn", "--stream", "toy-continual", "--preset", "tuned"]) == 2
    assert "has no values for bn" in capsys.readouterr().err


def test_tuned_values_of_another_checkpoint_are_refused(toy):
    from tta.models import get_card

    path = presets.output_path("tuned")
    presets.save_entry(path, CARD, "tent", {"base_preset": "cifar10", "values": {"lr": 1e-4},
                                            "checkpoint_sha256": "0" * 64, "validation": {}})
    with pytest.raises(ConfigError, match="another checkpoint"):
        presets.resolve("tuned", get_card(CARD), "tent", required=True)
    base, values, entry = presets.resolve("cifar10", get_card(CARD), "tent", required=True)
    assert (base, values, entry) == ("cifar10", {}, None)


def test_presets_are_found_in_search_order_and_never_written_into_the_package(toy, monkeypatch):
    from tta import paths
    from tta.models import get_card

    card = get_card(CARD)
    mine = toy / "mine"
    monkeypatch.setenv("TTA_PRESETS_DIR", str(mine))
    presets.save_entry(mine / "tuned.yaml", CARD, "tent", {"values": {"lr": 2e-4}, "checkpoint_sha256": card.sha256})
    presets.save_entry(presets.output_path("tuned"), CARD, "tent", {"values": {"lr": 9e-4}})
    presets.save_entry(presets.output_path("tuned"), CARD, "eta", {"values": {"lr": 3e-4}})
    assert presets.find_tuned("tuned", CARD, "tent").values == {"lr": 2e-4}  # $TTA_PRESETS_DIR first
    assert presets.find_tuned("tuned", CARD, "eta").values == {"lr": 3e-4}  # the user folder adds its entries
    assert presets.find_tuned("tuned", CARD, "vida") is None
    assert presets.find_tuned(str(mine / "tuned.yaml"), CARD, "tent").values == {"lr": 2e-4}  # a path
    with pytest.raises(ConfigError, match="installed package"):
        presets.output_path(str(Path(paths.__file__).parent / "_data" / "presets" / "x.yaml"))
    assert presets.output_path("tuned") == toy / "user" / "tta-runtime" / "presets" / "tuned.yaml"


def test_shipped_tuned_preset_fits_the_shipped_card_and_came_from_validation():
    """presets/tuned.yaml: every entry was chosen on a validation stream, for the card's current checkpoint
    (a retrained card must be retuned), with typed values its adapter's config accepts."""
    from tta.adapters import get_adapter_class
    from tta.adapters.teacher import card_defaults as teacher_card_defaults
    from tta.models import get_card

    path = Path(__file__).resolve().parents[1] / "presets" / "tuned.yaml"
    entries = yaml.safe_load(path.read_text())["entries"]
    assert entries
    for card_name, adapters in entries.items():
        card = get_card(card_name)
        for adapter, entry in adapters.items():
            assert entry["validation"]["role"] == "validation"
            assert entry["validation"]["stream"] == "fmnist-c-val"
            base, values, _ = presets.resolve(str(path), card, adapter, required=True)
            assert base == "cifar10" and values == entry["values"]
            config_class = get_adapter_class(adapter).Config
            # ``key=card`` values (CoTTA's ap=card) resolve against the card, as `tta run`/`bench` do
            config_class.build(base, **teacher_card_defaults(config_class, dict(values), card_name))

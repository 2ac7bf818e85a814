"""CLI: `tta run`, `tta bench`, `tta list` through `tta.cli.main`.

The model card and the "-C" data are stood in for by a tiny BatchNorm CNN and an in-memory stream
(monkeypatched `tta.models.load` / `tta.streams.load_spec`), so these tests need neither a trained
checkpoint nor generated data; the defaults themselves are the real card and spec names.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field

import pytest

import tta
import tta.models
import tta.streams
from engine_helpers import single_thread  # noqa: F401  (fixture)
from engine_helpers import tensor_stream, tiny_cnn
from tta.cli import SUBCOMMANDS, main
from tta.engine import run_stream

pytestmark = pytest.mark.usefixtures("single_thread")

DOMAINS = ("gaussian_noise", "shot_noise", "impulse_noise")


@dataclass
class ToySpec:
    """Stand-in for a `StreamSpec` (same build() signature) over an in-memory stream."""

    name: str = "toy-c"
    dataset: str = "toy"
    setting: str = "continual"
    batch_size: int = 16
    n_per_domain: int | None = 24
    seed: int = 1
    reset: str = "never"
    preset: str | None = None
    num_classes: int = 10
    calls: list = field(default_factory=list)

    def build(self, batch_size=None, n_per_domain=None, seed=None, data_dir=None):
        n = n_per_domain if n_per_domain is not None else (self.n_per_domain or 40)
        self.calls.append({"batch_size": batch_size, "n_per_domain": n, "seed": seed})
        stream = tensor_stream({d: n for d in DOMAINS}, batch_size or self.batch_size)
        stream.reset = self.reset
        return stream


@pytest.fixture
def toy(monkeypatch):
    spec = ToySpec()
    loaded: list[str] = []

    def load_spec(name):
        loaded.append(name)
        return spec

    def load(card, device="cpu"):
        loaded.append(card)
        return tiny_cnn()

    real_get_card = tta.models.get_card

    def get_card(card):
        """The real card when it exists, else a stand-in card for the tiny CNN."""
        try:
            return real_get_card(card)
        except tta.errors.DataNotFoundError:
            return tta.models.ModelCard(name=str(card), arch="tiny-cnn", num_classes=10, checkpoint="tiny.safetensors")

    monkeypatch.setattr(tta.streams, "load_spec", load_spec)
    monkeypatch.setattr(tta.models, "load", load)
    monkeypatch.setattr(tta.models, "get_card", get_card)
    spec.loaded = loaded
    return spec


def test_subcommands_tuple():
    assert {"run", "bench", "list_cmd"} <= set(SUBCOMMANDS)


def test_run_prints_domain_lines_and_writes_results(toy, tmp_path, capsys):
    rc = main(["run", "--adapter", "tent", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    # the defaults are the built-in card and spec names
    assert toy.loaded == [tta.streams.DEFAULT_SPEC, tta.models.DEFAULT_CARD]
    expected = run_stream(tta.adapt(tiny_cnn(), "tent"), ToySpec().build(), device="cpu", progress=False)
    for d in DOMAINS:
        assert f"error % [{d}][#samples={expected.domain_images[d]}]: {expected.domain_errors[d]:.2f}%" in out
    assert f"mean error: {expected.mean_error:.2f}%" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["tent"]["domains"] == pytest.approx(expected.domain_errors, abs=1e-3)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["configs"]["tent"]["optimizer"] == "adam" and meta["seed"] == 1


def test_run_options_reach_stream_and_adapter(toy, tmp_path):
    toy.preset = "imagenet"  # the spec names a preset
    assert main(["run", "--adapter", "tent", "--model", "m", "--stream", "s", "--limit", "8", "--batch-size", "4",
                 "--seed", "7", "--set", "steps=2", "--no-progress", "--out", str(tmp_path)]) == 0
    assert toy.calls[-1] == {"batch_size": 4, "n_per_domain": 8, "seed": 7}
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["configs"]["tent"]["optimizer"] == "sgd"  # from the spec's preset
    assert meta["configs"]["tent"]["steps"] == 2
    assert meta["runs"]["tent"]["steps"] == 2 * 3 * 2  # 2 steps x 3 domains x 2 batches
    assert main(["run", "--adapter", "tent", "--preset", "cifar10", "--full", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    assert toy.calls[-1]["n_per_domain"] == 40  # --full: the spec's n_per_domain cleared
    assert json.loads((tmp_path / "meta.json").read_text())["configs"]["tent"]["optimizer"] == "adam"


def test_guard_option_takes_an_optional_preset(toy, tmp_path):
    """--guard alone: the card's guard settings over the defaults; --guard strict: that preset over
    them; --guard-set still wins key by key."""
    probes = {}
    for name, extra in (("bare", ["--guard"]), ("strict", ["--guard", "strict"]),
                        ("strict-w2", ["--guard", "strict", "--guard-set", "probe_every=2"])):
        out = tmp_path / name
        assert main(["run", "--adapter", "tent", *extra, "--no-progress", "--out", str(out)]) == 0
        guard = json.loads((out / "meta.json").read_text())["runs"]["tent"]["guard"]
        probes[name] = (guard["config"]["probe_every"], guard["config"]["window"], guard["probes"])
    # 3 domains x 2 batches of 16: probed every 4th batch (0, 4), every batch, every 2nd
    assert probes == {"bare": (4, 8, 2), "strict": (1, 4, 6), "strict-w2": (2, 4, 3)}


def test_bench_writes_json_csv_png(toy, tmp_path, capsys):
    rc = main(["bench", "--adapters", "source,bn,tent", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data) == ["source", "bn", "tent"]
    for name, entry in data.items():
        assert list(entry["domains"]) == list(DOMAINS)
        assert entry["mean"] == pytest.approx(sum(entry["domains"].values()) / 3, abs=1e-3)
        assert entry["images_per_s"] > 0
        fresh = run_stream(tta.adapt(tiny_cnn(), name), ToySpec().build(), device="cpu", progress=False)
        assert entry["domains"] == pytest.approx(fresh.domain_errors, abs=1e-3)  # fresh model per adapter
    table = [ln for ln in out.splitlines() if ln.startswith(("adapter ", "source ", "bn ", "tent "))]
    assert table[0].split() == ["adapter", *DOMAINS, "mean", "images/s"]
    assert [ln.split()[0] for ln in table[1:]] == ["source", "bn", "tent"]
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][: len(DOMAINS) + 3] == ["adapter", *DOMAINS, "mean", "images_per_s"]
    assert [r[0] for r in rows[1:]] == ["source", "bn", "tent"]
    png = (tmp_path / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_bench_scoped_and_shared_overrides(toy, tmp_path):
    from tta.cli.bench import select_adapters, split_assignments

    assert select_adapters("all") == tta.list_adapters()
    per = split_assignments(["tent.lr=0.01", "steps=2", "alpha-bn.source_weight=0.5"], ["bn", "tent", "alpha-bn"])
    assert per["tent"] == {"lr": 0.01, "steps": 2}
    assert per["bn"] == {"steps": 2}
    assert per["alpha-bn"] == {"source_weight": 0.5, "steps": 2}
    assert main(["bench", "--adapters", "bn,tent", "--set", "lr=0.5", "--out", str(tmp_path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "meta.json").read_text())["configs"]["tent"]["lr"] == 0.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--adapter", "nope"], "unknown adapter 'nope'"),
        (["run", "--adapter", "tent", "--set", "learning_rate=1"], "unknown config key 'learning_rate'"),
        (["run", "--adapter", "tent", "--set", "lr=fast"], "lr: expected float"),
        (["run", "--adapter", "bn", "--reset", "sometimes"], "--reset"),
        (["run", "--adapter", "tent", "--guard", "paranoid"], "unknown guard preset 'paranoid'"),
        (["bench", "--adapters", "bn,nope"], "unknown adapter 'nope'"),
        (["bench", "--adapters", "bn", "--set", "lr=0.1"], "no selected adapter has a config key 'lr'"),
        (["bench", "--adapters", "bn", "--set", "tent.lr=0.1"], "not among the benchmarked adapters"),
    ],
)
def test_user_errors_exit_2_with_one_line(toy, tmp_path, capsys, argv, message):
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_missing_data_and_missing_card_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path / "no-data"))
    assert main(["run", "--adapter", "bn", "--no-progress"]) == 2  # the real default spec, no data
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and "tta make-c" in err and len(err.splitlines()) == 1

    monkeypatch.setattr(tta.streams, "load_spec", lambda name: ToySpec())
    monkeypatch.setenv("TTA_MODELS_DIR", str(tmp_path / "no-models"))
    assert main(["run", "--adapter", "bn", "--model", "ghost-card", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model card 'ghost-card'" in err and len(err.splitlines()) == 1


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("adapters:\n")
    for name in tta.list_adapters():
        assert f"\n  {name} " in out
    assert "\nmodels:\n" in out and "\nstreams:\n" in out
    for name in tta.streams.list_specs():
        assert name in out
    assert main(["list", "adapters"]) == 0
    assert "streams:" not in capsys.readouterr().out


def test_run_with_progress_bars(toy, capsys):
    assert main(["run", "--adapter", "bn"]) == 0
    captured = capsys.readouterr()
    for d in DOMAINS:
        assert f"error % [{d}][#samples=" in captured.out  # written above the bars
        assert f"{d}: 100%" in captured.err  # one bar per domain
    assert "mean error: " in captured.out


@pytest.mark.skipif("adanpc" not in tta.list_adapters(), reason="needs the AdaNPC adapter")
def _copy_card(folder, name="r20"):
    """The shipped ResNet-20 card as a user's own card `name` in `folder` (checkpoint + AdaNPC memory)."""
    import shutil

    shipped = tta.models.get_card("resnet20-fmnist")
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped.checkpoint_path(), folder / f"{name}.safetensors")
    text = shipped.path.read_text().replace("name: resnet20-fmnist", f"name: {name}")
    (folder / f"{name}.yaml").write_text(text.replace("checkpoint: resnet20-fmnist.safetensors",
                                                      f"checkpoint: {name}.safetensors"))
    return folder / f"{name}.yaml"


def test_memory_adapters_default_to_the_cards_memory(toy, tmp_path, capsys, monkeypatch):
    import argparse
    import shutil

    from tta.cli.run import card_defaults

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    card_yaml = _copy_card(tmp_path / "cards")
    # no memory file for the card: one clear line naming the fix, exit 2, nothing written
    assert main(["run", "--adapter", "adanpc", "--model", str(card_yaml), "--no-progress",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "tta build-memory" in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()

    shutil.copy(tta.models.get_card("resnet20-fmnist").artifact_path(".memory.safetensors"),
                tmp_path / "cards" / "r20.memory.safetensors")
    memory = str(tmp_path / "cards" / "r20.memory.safetensors")
    # found from the loaded card, whether it was given as a path or named
    assert card_defaults("adanpc", {}, argparse.Namespace(model=str(card_yaml))) == {"memory": memory}
    monkeypatch.setenv("TTA_MODELS_DIR", str(tmp_path / "cards"))
    assert card_defaults("adanpc", {}, argparse.Namespace(model="r20")) == {"memory": memory}
    assert card_defaults("adanpc", {"memory": "x.safetensors"}, argparse.Namespace(model="r20")) == {
        "memory": "x.safetensors"}
    assert card_defaults("tent", {"lr": 0.1}, argparse.Namespace(model="r20")) == {"lr": 0.1}
    # end to end with the real model given as a path (the toy stream's 8x8 images stand in for the data,
    # so the card's declared 32x32 input size is overridden)
    monkeypatch.setattr(tta.models, "load", tta.models.cards.load)
    assert main(["run", "--adapter", "adanpc", "--model", str(card_yaml), "--no-progress", "--set", "k=5",
                 "--set", "input_size=8,8"]) == 0


def test_meta_records_version_commit_and_the_log(toy, tmp_path, capsys):
    assert main(["run", "--adapter", "bn", "--no-progress", "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["package"] == "tta-runtime" and meta["version"] == tta.__version__
    assert meta["git"]["source"] == "git" and len(meta["git"]["commit"]) == 40
    log = (tmp_path / "run.log").read_text()
    assert "INFO tta: tta run: bn on" in log and "error % [gaussian_noise][#samples=24]:" in log
    assert "mean error: " in log


def test_bench_writes_after_each_adapter_and_survives_a_failure(toy, tmp_path, capsys, monkeypatch):
    from tta.adapters.tent import Tent

    written = []
    import tta.engine.report as report

    real_write = report.write_results

    def spy(results, out, **kw):
        written.append(list(results))
        return real_write(results, out, **kw)

    def broken_forward(self, x):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(report, "write_results", spy)
    monkeypatch.setattr(Tent, "forward_and_adapt", broken_forward)
    rc = main(["bench", "--adapters", "source,tent,bn", "--out", str(tmp_path), "--no-progress"])
    assert rc == 1
    captured = capsys.readouterr()
    assert "[tent] failed: RuntimeError: simulated kernel failure" in captured.out
    assert "1 of 3 adapters failed: tent (RuntimeError: simulated kernel failure)" in captured.out
    assert written[:2] == [["source"], ["source", "bn"]]  # written as each adapter finished
    data = json.loads((tmp_path / "results.json").read_text())
    assert list(data) == ["source", "bn"]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["failed"] == {"tent": "RuntimeError: simulated kernel failure"}
    assert "Traceback" in (tmp_path / "run.log").read_text()  # the details are in the log


def test_help_and_list_do_not_import_torch_or_timm():
    import subprocess
    import sys

    code = ("import sys; from tta.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "main(['list'])\n"
            "print('heavy:', sorted(m for m in ('torch', 'timm', 'torchvision', 'cv2', 'scipy') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout


def test_catalogue_read_without_import_matches_the_registry():
    """`tta list` reads the adapters' decorators with ast; it must agree with the imported registry."""
    from tta.adapters import get_adapter_class
    from tta.plugins import builtin_adapters

    entries = builtin_adapters()
    assert [e.name for e in entries] == sorted(get_adapter_class(n).name for n in tta.list_adapters()
                                               if get_adapter_class(n).__module__.startswith("tta.adapters."))
    for e in entries:
        doc = (get_adapter_class(e.name).__doc__ or "").strip()
        assert e.summary == (doc.splitlines()[0] if doc else "")

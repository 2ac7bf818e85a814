"""Long streams generated on the fly: recurring and CCC (continuously changing corruptions)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import tta
from engine_helpers import single_thread  # noqa: F401  (fixture)
from engine_helpers import bench_script, tiny_cnn
from tta.engine import run_stream
from tta.errors import ConfigError, DataNotFoundError
from tta.streams.ccc import DIFFICULTIES, CCCCalibration, best_path, calibrate, ccc_plans
from tta.streams.corruptions import STANDARD_ORDER
from tta.streams.generated import BatchPlan, GeneratedStream, recurring_plans
from tta.streams.specs import StreamSpec, load_spec

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def clean() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = (rng.random((50, 16, 16, 3)) * 255).astype(np.uint8)
    return images, np.arange(50) % 10


# ------------------------------------------------------------------------------------------------
# GeneratedStream


def test_any_batch_regenerates_alone_and_iteration_resumes(clean):
    images, labels = clean
    plans = recurring_plans(["gaussian_noise", "fog"], 3.5, n_per_domain=25, recurrences=2, batch_size=10)
    stream = GeneratedStream(images, labels, plans, seed=4)
    batches = list(stream)
    assert len(batches) == len(stream) == 2 * 2 * 3 and stream.num_images == 100
    assert [len(b) for b in batches[:3]] == [10, 10, 5]  # a visit's last batch is smaller
    assert [b.domain for b in batches[::3]] == ["gaussian_noise", "fog", "gaussian_noise", "fog"]
    assert stream.domains == ["gaussian_noise", "fog"] and stream.domain_sizes == {"gaussian_noise": 50, "fog": 50}
    for k in (0, 4, 11):
        again = stream.batch(k)
        assert torch.equal(again.x, batches[k].x) and torch.equal(again.y, batches[k].y)
    resumed = list(stream.iter_from(7))
    assert all(torch.equal(a.x, b.x) for a, b in zip(resumed, batches[7:]))
    # another seed: other images and other noise
    other = GeneratedStream(images, labels, plans, seed=5).batch(0)
    assert not torch.equal(other.x, batches[0].x)


def test_images_are_drawn_without_replacement_within_an_epoch(clean):
    images, labels = clean
    plans = [BatchPlan("clean", 10, ()) for _ in range(12)]  # 120 images = 2.4 epochs of 50
    stream = GeneratedStream(images, labels, plans, seed=1)
    idx = np.concatenate([stream.indices(k) for k in range(12)])
    assert sorted(idx[:50]) == list(range(50)) and sorted(idx[50:100]) == list(range(50))
    assert not np.array_equal(idx[:50], idx[50:100])  # a new permutation each epoch
    b = stream.batch(2)  # severity-free plan: the clean images themselves
    assert torch.equal(b.x, torch.from_numpy(images[stream.indices(2)]).permute(0, 3, 1, 2).float() / 255)
    assert torch.equal(b.y, torch.from_numpy(labels[stream.indices(2)]))


def test_corruptions_apply_in_order_with_per_batch_seeds(clean):
    images, labels = clean
    plan = BatchPlan("pair", 20, (("contrast", 2.5), ("gaussian_noise", 1.25)))
    stream = GeneratedStream(images, labels, [plan, plan], seed=3)
    x0, x1 = stream.batch(0).x, stream.batch(1).x
    assert not torch.equal(x0, x1)
    # the same plan at severity 0 for the second corruption is contrast alone
    single = GeneratedStream(images, labels, [BatchPlan("c", 20, (("contrast", 2.5), ("gaussian_noise", 0.0)))], seed=3)
    std = single.batch(0).x.flatten(1).std(1).mean()
    assert x0.flatten(1).std(1).mean() > std  # the noise was added on top


def test_generated_stream_rejects_bad_input(clean):
    images, labels = clean
    good = [BatchPlan("a", 5, (("fog", 1.0),))]
    with pytest.raises(ConfigError, match="uint8"):
        GeneratedStream(images.astype(np.float32), labels, good)
    with pytest.raises(ConfigError, match="at least one"):
        GeneratedStream(images[:0], labels[:0], good)
    with pytest.raises(ConfigError, match="labels"):
        GeneratedStream(images, labels[:3], good)
    with pytest.raises(ConfigError, match="size"):
        GeneratedStream(images, labels, [BatchPlan("a", 0, ())])
    with pytest.raises(ConfigError, match="unknown corruption"):
        GeneratedStream(images, labels, [BatchPlan("a", 5, (("rain", 1.0),))])
    with pytest.raises(ConfigError, match="outside"):
        GeneratedStream(images, labels, [BatchPlan("a", 5, (("fog", 6.0),))])
    with pytest.raises(ConfigError, match="reset"):
        GeneratedStream(images, labels, good, reset="sometimes")
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ConfigError, match="n_per_domain"):
            recurring_plans(["fog"], 5, bad, 2, 10)


# ------------------------------------------------------------------------------------------------
# CCC: paths, walks, calibration


def _monotone_paths(g: int, i0: int):
    """Every path from (i0, 0) to (0, j >= 1) with steps i - 1 or j + 1 (brute force)."""
    for j_end in range(1, g):
        for moves in set(itertools.permutations("d" * i0 + "r" * j_end)):
            path, (i, j) = [(i0, 0)], (i0, 0)
            for m in moves:
                i, j = (i - 1, j) if m == "d" else (i, j + 1)
                path.append((i, j))
            yield path


def test_best_path_is_the_exact_minimum():
    rng = np.random.default_rng(7)
    acc = rng.uniform(0, 100, (5, 5))
    for target in (20.0, 50.0):
        for start in (1, 3):
            best = min(_monotone_paths(5, start), key=lambda p: np.mean([(acc[c] - target) ** 2 for c in p]))
            got = best_path(acc, target, start=start)
            assert np.mean([(acc[c] - target) ** 2 for c in got]) == pytest.approx(
                np.mean([(acc[c] - target) ** 2 for c in best]))
            assert got[0] == (start, 0) and got[-1][0] == 0 and got[-1][1] >= 1
            assert all((a[0] - b[0], b[1] - a[1]) in ((1, 0), (0, 1)) for a, b in zip(got, got[1:]))


def synthetic_calibration(names=("gaussian_noise", "fog", "contrast"), grid=(0.0, 1.0, 2.0, 3.0, 4.0, 5.0)):
    """Accuracy falling with both severities: acc = 90 - 12 * s1 - 10 * s2 (+ a per-corruption offset)."""
    g = np.asarray(grid)
    offset = {n: 3.0 * k for k, n in enumerate(names)}
    single = {n: list(90 - 14 * g + offset[n] * (g > 0)) for n in names}
    pairs = {(a, b): (90 - 12 * g[1:, None] - 10 * g[None, 1:]) for a in names for b in names if a != b}
    return CCCCalibration(tuple(grid), 90.0, single, pairs, {})


def test_ccc_walk_is_continuous_and_holds_the_target():
    cal = synthetic_calibration()
    plans, transitions = ccc_plans(cal, target=50.0, speed=100, length=6000, batch_size=20, seed=3)
    assert sum(p.size for p in plans) == 6000 and all(p.size == 20 for p in plans)
    assert len(transitions) >= 3
    for t, nxt in zip(transitions, transitions[1:]):
        assert nxt.a == t.b and nxt.b != nxt.a  # the next transition starts from this one's target
        assert nxt.path[0] == (t.path[-1][1], 0)  # at the same severity
        assert nxt.start == t.start + t.images
    moves = []
    for p, q in zip(plans, plans[1:]):
        (a1, s1), (b1, s2) = p.corruptions
        (a2, u1), (b2, u2) = q.corruptions
        if p.domain == q.domain:
            moves.append(abs(u1 - s1) + abs(u2 - s2))
        else:  # across a transition the same corruption continues as the first one
            assert b1 == a2 and abs(u1 - s2) <= 0.25
    # a 1.0 grid step over speed * 4 = 400 images: 0.05 severity per batch of 20 (+ rounding to 1/100)
    assert max(moves) <= 0.05 + 0.01 + 1e-9
    # every visited grid cell keeps the synthetic accuracy near the target
    g = np.asarray(cal.grid)
    for t in transitions:
        acc = cal.pair(t.a, t.b)
        assert np.mean([abs(acc[c] - 50.0) for c in t.path]) < 8.0
    # seeded
    again, _ = ccc_plans(cal, target=50.0, speed=100, length=6000, batch_size=20, seed=3)
    assert again == plans
    other, _ = ccc_plans(cal, target=50.0, speed=100, length=6000, batch_size=20, seed=4)
    assert other != plans
    assert len(g) == 6


def test_speed_sets_how_fast_severities_move():
    cal = synthetic_calibration()
    _, fast = ccc_plans(cal, target=50.0, speed=100, length=20000, batch_size=20, seed=1)
    _, slow = ccc_plans(cal, target=50.0, speed=500, length=20000, batch_size=20, seed=1)
    assert fast[0].path == slow[0].path
    assert slow[0].images == 5 * fast[0].images
    assert len(fast) > len(slow)


def test_difficulty_selects_corruptions_that_reach_it():
    cal = synthetic_calibration()
    # single accuracies at severity 5: gaussian 20, fog 23, contrast 26
    assert cal.corruptions_for(25.0, tolerance=0.0) == ["fog", "gaussian_noise"]
    with pytest.raises(ConfigError, match="two calibrated corruptions"):
        ccc_plans(cal, target=10.0, speed=100, length=100, batch_size=20)
    with pytest.raises(ConfigError, match="speed"):
        ccc_plans(cal, target=50.0, speed=0, length=100, batch_size=20)
    with pytest.raises(ConfigError, match="no pair"):
        cal.pair("fog", "snow")


def test_calibration_round_trip_and_malformed_files(tmp_path):
    cal = synthetic_calibration()
    path = cal.save(tmp_path / "cal.json")
    back = CCCCalibration.load(path)
    assert back.grid == cal.grid and back.single.keys() == cal.single.keys()
    for name in cal.single:
        assert back.single[name] == pytest.approx(cal.single[name])
    np.testing.assert_allclose(back.pair("fog", "contrast"), cal.pair("fog", "contrast"), atol=1e-3)
    raw = json.loads(path.read_text())
    for broken in ({**raw, "format": "x"}, {**raw, "grid": [1, 0]}, {**raw, "pairs": {"fog>contrast": [[1]]}},
                   {**raw, "single": {"rain": raw["single"]["fog"]}}, [1, 2]):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(broken))
        with pytest.raises(ConfigError):
            CCCCalibration.load(bad)
    (tmp_path / "not.json").write_text("{")
    with pytest.raises(ConfigError, match="JSON"):
        CCCCalibration.load(tmp_path / "not.json")
    with pytest.raises(DataNotFoundError, match="calibrate-ccc"):
        CCCCalibration.load(tmp_path / "missing.json")


def test_calibrate_measures_the_model_on_every_cell(clean):
    images, labels = clean
    model = tiny_cnn()
    grid = (0.0, 2.5, 5.0)
    cal = calibrate(model, images, labels, corruptions=["gaussian_noise", "contrast", "fog"],
                    pair_corruptions=["gaussian_noise", "contrast"], n=20, grid=grid, seed=2)
    assert set(cal.pairs) == {("gaussian_noise", "contrast"), ("contrast", "gaussian_noise")}
    assert all(m.shape == (2, 2) for m in cal.pairs.values()) and len(cal.single["fog"]) == 3
    # a cell is the model's accuracy on its 20 images corrupted that way; the single cell (contrast, 5.0)
    # and the pair row of contrast at 5.0 share their images and noise
    from tta.streams.corruptions import CORRUPTIONS, corrupt

    key = (CORRUPTIONS.index("contrast"), 2)
    pick = np.sort(np.random.default_rng(np.random.SeedSequence(2, spawn_key=key)).choice(50, 20, replace=False))
    x = corrupt(images[pick], "contrast", 5.0, seed=np.random.SeedSequence(2, spawn_key=key))
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        acc = float((model(x).argmax(1) == torch.from_numpy(labels[pick])).double().mean() * 100)
    assert cal.single["contrast"][2] == pytest.approx(acc)
    full = cal.pair("contrast", "gaussian_noise")
    assert full[2, 0] == pytest.approx(acc) and full[0, 0] == pytest.approx(cal.clean)
    second = corrupt(corrupt(images[pick], "contrast", 5.0, seed=np.random.SeedSequence(2, spawn_key=key)),
                     "gaussian_noise", 2.5,
                     seed=np.random.SeedSequence(2, spawn_key=(*key, CORRUPTIONS.index("gaussian_noise"), 1)))
    with torch.no_grad():
        acc2 = float((model(torch.from_numpy(second).permute(0, 3, 1, 2).float() / 255).argmax(1)
                      == torch.from_numpy(labels[pick])).double().mean() * 100)
    assert full[2, 1] == pytest.approx(acc2)


# ------------------------------------------------------------------------------------------------
# specs


def test_shipped_recurring_spec():
    spec = load_spec("fmnist-c-recurring")
    assert spec.setting == "recurring" and spec.recurrences == 20 and spec.reset == "never"
    stream = spec.build()
    assert stream.num_images == 20 * 15 * 1000 == 300_000 and len(stream) == 1500
    assert stream.domains == list(STANDARD_ORDER)
    assert [stream.plans[k].domain for k in (0, 5, 75)] == ["gaussian_noise", "shot_noise", "gaussian_noise"]
    first, again = stream.batch(0), stream.batch(75)  # the same domain one recurrence later
    assert first.domain == again.domain and not torch.equal(first.x, again.x)
    small = spec.with_overrides(["recurrences=2"]).build(n_per_domain=100, batch_size=50)
    assert small.num_images == 2 * 15 * 100


@pytest.mark.parametrize("level", list(DIFFICULTIES))
def test_shipped_ccc_specs(level):
    spec = load_spec(f"fmnist-ccc-{level}")
    assert spec.setting == "ccc" and spec.length == 1_000_000 and spec.target == DIFFICULTIES[level]
    stream = spec.build()
    assert stream.num_images == 1_000_000 and len(stream) == 5000
    assert all(len(p.corruptions) == 2 for p in stream.plans)
    cal = CCCCalibration.load(spec.calibration_path())
    used = {c for t in stream.transitions for c in (t.a, t.b)}
    assert used <= set(cal.corruptions_for(spec.target))
    b = stream.batch(123)
    assert b.x.shape == (200, 3, 32, 32) and b.domain == stream.plans[123].domain
    short = spec.with_overrides(["length=3000", "speed=1000"]).build()
    assert short.num_images == 3000
    with pytest.raises(ConfigError, match="length"):
        spec.build(n_per_domain=100)


def test_spec_validation_of_long_stream_fields(tmp_path):
    base = {"name": "x", "dataset": "fashion-mnist", "setting": "recurring", "n_per_domain": 10}
    assert StreamSpec(**{**base, "reset": "every 1000"}).reset == 1000
    assert StreamSpec(**{**base, "reset": 7}).reset == 7
    for bad in ({"reset": "every"}, {"reset": "every x"}, {"reset": 0}, {"recurrences": 0}, {"recurrences": "3"},
                {"setting": "continual"}, {"order": "file"}, {"setting": "ccc", "difficulty": "impossible",
                                                            "calibration": "c.json", "length": 10},
                {"setting": "ccc", "difficulty": "easy", "length": 10},
                {"setting": "ccc", "difficulty": "easy", "calibration": "c.json"},
                {"setting": "ccc", "target_accuracy": 120, "calibration": "c.json", "length": 10}):
        with pytest.raises(ConfigError):
            StreamSpec(**{**base, **bad})
    with pytest.raises(ConfigError, match="data"):
        StreamSpec(name="x", dataset="fashion-mnist-c")
    with pytest.raises(ConfigError, match="unknown stream spec key"):
        StreamSpec(**base).with_overrides(["colour=red"])
    with pytest.raises(ConfigError, match="key=value"):
        StreamSpec(**base).with_overrides(["length"])
    spec_file = tmp_path / "c.yaml"
    spec_file.write_text("dataset: fashion-mnist\nsetting: ccc\ndifficulty: easy\nlength: 100\ncalibration: nope.json\n")
    with pytest.raises(DataNotFoundError, match="calibrate-ccc"):
        load_spec(spec_file).build()


def test_periodic_reset_from_a_stream_spec_reaches_the_engine(clean):
    images, labels = clean
    plans = recurring_plans(["fog"], 2.0, n_per_domain=50, recurrences=1, batch_size=10)
    stream = GeneratedStream(images, labels, plans, seed=0, reset="every 2")
    adapter = tta.adapt(tiny_cnn(), "tent")
    result = run_stream(adapter, stream, device="cpu", progress=False)
    assert stream.reset == 2 and result.resets == 2  # before batches 2 and 4


def test_generated_stream_runs_with_prefetch_and_windows(clean):
    images, labels = clean
    stream = GeneratedStream(images, labels, recurring_plans(["gaussian_noise", "contrast"], 4, 30, 2, 10), seed=0)
    result = run_stream(tta.adapt(tiny_cnn(), "bn"), stream, device="cpu", progress=False, prefetch=2)
    plain = run_stream(tta.adapt(tiny_cnn(), "bn"), stream, device="cpu", progress=False, prefetch=0)
    assert result.trace.correct == plain.trace.correct  # prefetch changes nothing but the timing
    windows = result.windows(40)
    assert [w["images"] for w in windows] == [40, 40, 40]
    total_wrong = sum(w["error"] * w["images"] for w in windows) / 100
    assert total_wrong == pytest.approx(result.stream_error * 120 / 100)


def test_long_stream_report_checks_each_guarded_run_against_its_plain_run(tmp_path):
    """bench/long_streams.py --report: the acceptance line of a guarded run, tagged (other guard settings)
    or not, compares its windows with the comparator's and its mean with the same adapter's plain run."""
    def run(adapter, variant, errors, events=()):
        windows = [{"error": e, "images": 100, "images_per_s": 50.0} for e in errors]
        return {"adapter": adapter, "variant": variant, "stream": "toy", "images": 100 * len(errors), "window": 100,
                "windows": windows, "mean_error": sum(errors) / len(errors), "stream_error": sum(errors) / len(errors),
                "images_per_s": 50.0, "resets": 0, "guard_events": list(events), "nonfinite_outputs": 0,
                "rss_mb": {"start": 1.0, "after_first_window": 2.0, "end": 2.0, "max": 3.0}}

    for name, data in {"bn.plain": run("bn", "plain", [10, 10, 10]),
                       "tent.plain": run("tent", "plain", [9, 12, 14]),
                       "tent.guard": run("tent", "guard", [9, 11.5, 10.5], [{"action": "rollback"}]),
                       "tent@fast.guard": run("tent@fast", "guard", [9, 10.5, 15]),
                       "eta.guard": run("eta", "guard", [10, 10, 10])}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    text = bench_script("long_streams").report(tmp_path)
    lines = [line for line in text.splitlines() if line.startswith("- ")]
    assert lines == [
        "- eta: worst guarded window +0.00 vs bn over 3 windows (met); guarded mean 10.00; no unguarded run in this "
        "folder to compare with",
        "- tent: worst guarded window +1.50 vs bn over 3 windows (MISSED); guarded mean 10.33 vs unguarded 11.67 (met)",
        "- tent@fast: worst guarded window +5.00 vs bn over 3 windows (MISSED); guarded mean 11.50 vs unguarded 11.67 "
        "(met)",
    ]
    assert "| tent | guard | 10.33 | 10.33 | +1.50 (window 2) | 1 / 3 | 1 rb, 0 rs | 50 |" in text

"""The real-time protocol (Alfarra et al., ICML 2024): schedule, skipped-batch predictions, engine, CLI."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import tta
from engine_helpers import single_thread  # noqa: F401  (fixture)
from engine_helpers import tensor_stream, tiny_cnn
from tta.adapters import list_adapters
from tta.engine import run_stream
from tta.engine.realtime import RealtimeConfig, RealtimeSchedule, parse_rate, predict_current
from tta.errors import ConfigError, NonFiniteInputError


def schedule(cost: float, interval_sources: float) -> RealtimeSchedule:
    s = RealtimeSchedule(RealtimeConfig(rate=f"{interval_sources}x-source", adapter_cost=cost))
    s.source_s, s.cost, s.interval = 0.01, cost, interval_sources
    return s


@pytest.mark.parametrize("cost, interval", [(1.0, 1.0), (2.5, 1.0), (3.0, 1.0), (7.3, 2.0), (0.4, 1.0), (40.0, 4.0)])
def test_schedule_skips_ceil_of_cost_over_interval_minus_one(cost, interval):
    """The paper's evaluator: after an adapted batch, ceil(ratio * eta) - 1 batches are not adapted on."""
    s = schedule(cost, interval)
    admitted = []
    for k in range(60):
        if s.admit(k):
            s.done(k, 123.0)  # calibrated costs: the wall time is ignored
            admitted.append(k)
        else:
            s.skipped()
    gap = max(1, math.ceil(cost / interval - 1e-12))
    assert admitted == list(range(0, 60, gap))
    assert s.summary()["adapted_fraction"] == pytest.approx(len(admitted) / 60)


def test_measured_costs_follow_each_steps_own_time():
    s = RealtimeSchedule(RealtimeConfig(rate="1x-source", costs="measured"))
    s.source_s, s.cost, s.interval = 0.01, 1.0, 1.0
    assert s.admit(0)
    s.done(0, 0.035)  # 3.5 source forwards: batches 1..3 arrive while busy
    assert [s.admit(k) for k in (1, 2, 3, 4)] == [False, False, False, True]
    s.done(4, 0.005)
    assert s.admit(5)


def test_rates_parse_and_bad_rates_are_config_errors():
    assert parse_rate("2x-source") == ("source", 2.0)
    assert parse_rate("0.5X-Source") == ("source", 0.5)
    assert parse_rate("20") == ("per_s", 20.0)
    assert parse_rate("12.5/s") == ("per_s", 12.5)
    assert parse_rate(8) == ("per_s", 8.0)
    for bad in ("fast", "0x-source", "-1", "inf", "2x", "", True, "nan"):
        with pytest.raises(ConfigError):
            parse_rate(bad)
    with pytest.raises(ConfigError):
        RealtimeConfig(rate="1x-source", costs="sometimes")
    with pytest.raises(ConfigError):
        RealtimeConfig(rate="1x-source", adapter_cost=0)
    with pytest.raises(ConfigError):
        RealtimeConfig(rate="1x-source", calibration_batches=0)


def _stream():
    return tensor_stream({"a": 64, "b": 64}, batch_size=16)


def test_engine_realtime_equals_a_manual_schedule(single_thread):
    """Adapted batches get the adapter's step, skipped ones the current state's plain forward; all count."""
    torch.manual_seed(0)
    model = tiny_cnn()
    adapter = tta.adapt(model, "tent", lr=1e-2)
    reference = adapter.fork()
    result = run_stream(adapter, _stream(), progress=False, keep_predictions=True, log=lambda _: None,
                        realtime=RealtimeConfig(rate="1x-source", adapter_cost=3.0))
    assert result.realtime["adapted_batches"] == 3 and result.realtime["predicted_batches"] == 5
    assert result.realtime["adapted_fraction"] == pytest.approx(3 / 8)
    assert result.steps == 3 and result.batches == 8 and result.images == 128

    expected = []
    for k, batch in enumerate(_stream()):
        out = reference(batch.x) if k % 3 == 0 else predict_current(reference, batch.x)
        expected.append(out.argmax(1))
    assert torch.equal(result.predictions, torch.cat(expected))
    for (name, a), b in zip(adapter.state_dict().items(), reference.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


def test_calibration_does_not_touch_the_adapters_state_and_reruns_agree(single_thread):
    """Costs calibrated on a fork; with the same cost ratio two runs agree exactly."""
    torch.manual_seed(0)
    a1 = tta.adapt(tiny_cnn(), "tent", lr=1e-2)
    a2 = a1.fork()
    r1 = run_stream(a1, _stream(), progress=False, keep_predictions=True, log=lambda _: None,
                    realtime="2x-source")
    assert r1.realtime["adapter_cost_source_forwards"] > 0 and r1.realtime["source_forward_ms"] > 0
    cost = r1.realtime["adapter_cost_source_forwards"]
    r2 = run_stream(a2, _stream(), progress=False, keep_predictions=True, log=lambda _: None,
                    realtime=RealtimeConfig(rate="2x-source", adapter_cost=cost))
    assert r2.realtime["adapted_batches"] == r1.realtime["adapted_batches"]
    assert torch.equal(r1.predictions, r2.predictions)
    assert r1.steps == r1.realtime["adapted_batches"]


def test_a_slow_rate_adapts_on_every_batch_and_equals_the_plain_run(single_thread):
    torch.manual_seed(0)
    a1 = tta.adapt(tiny_cnn(), "tent", lr=1e-2)
    a2 = a1.fork()
    plain = run_stream(a1, _stream(), progress=False, keep_predictions=True, log=lambda _: None)
    rt = run_stream(a2, _stream(), progress=False, keep_predictions=True, log=lambda _: None,
                    realtime=RealtimeConfig(rate="1000x-source", adapter_cost=5.0))
    assert rt.realtime["adapted_fraction"] == 1.0
    assert torch.equal(plain.predictions, rt.predictions)


def test_skipped_batches_with_nan_are_rejected_like_steps(single_thread):
    adapter = tta.adapt(tiny_cnn(), "tent")
    x = torch.rand(4, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError):
        predict_current(adapter, x)


@pytest.mark.parametrize("name", [n for n in list_adapters() if n not in ("adanpc", "vida", "vdp", "eata")])
def test_predict_current_never_changes_an_adapters_state(name, single_thread):
    """The skipped-batch prediction is a plain forward: no registered adapter's state moves."""
    torch.manual_seed(0)
    try:
        adapter = tta.adapt(tiny_cnn(), name)
    except tta.errors.TTAError as exc:  # an adapter that needs a card artefact or a BN-free model
        pytest.skip(f"{name}: {exc}")
    if name == "rmt":  # source class prototypes: 10 classes x the 16 pooled features of tiny_cnn
        adapter.set_prototypes(torch.randn(10, 16, generator=torch.Generator().manual_seed(3)))
    x = torch.rand(8, 3, 8, 8)
    adapter(x)  # one step: optimizer state, teacher and counters exist
    before = copy.deepcopy(adapter.state_dict())
    predict_current(adapter, torch.rand(8, 3, 8, 8))
    assert_same(before, adapter.state_dict(), name)


def assert_same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_bench_realtime_reports_adapted_fraction_and_costs(tmp_path, capsys, monkeypatch, single_thread):
    """`tta bench --realtime 1x-source` on the default card and spec (200 images per domain)."""
    import json

    from tta.cli import main

    from tta.paths import data_root

    if not (data_root() / "fashion-mnist-c").is_dir():
        pytest.skip("needs Fashion-MNIST-C (TTA_DATA_DIR)")
    rc = main(["bench", "--adapters", "source,tent", "--limit", "32", "--batch-size", "16", "--realtime", "1x-source",
               "--realtime-cost", "tent=3", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "results.json").read_text())
    for name in ("source", "tent"):
        rt = data[name]["realtime"]
        assert rt["rate"] == "1x-source" and rt["costs"] == "calibrated"
        assert rt["time_unit"] == "source model forward"
        assert rt["adapted_batches"] + rt["predicted_batches"] == 30
        assert rt["adapter_cost_source_forwards"] > 0
    assert data["tent"]["realtime"]["adapter_cost_source_forwards"] == 3.0  # pinned: batches 0, 3, ..., 27
    assert data["tent"]["realtime"]["adapted_batches"] == 10 and data["tent"]["realtime"]["adapter_step_ms"] is None
    assert data["source"]["realtime"]["adapter_step_ms"] > 0  # calibrated
    assert data["tent"]["steps"] == data["tent"]["realtime"]["adapted_batches"]
    assert "adapted %" in capsys.readouterr().out


@pytest.mark.parametrize("extra, words", [
    (["--realtime", "fast"], "realtime rate"),
    (["--realtime", "1x-source", "--realtime-cost", "tent=slow"], "--realtime-cost takes"),
    (["--realtime", "1x-source", "--realtime-cost", "-2"], "positive number"),
    (["--realtime-cost", "2"], "needs --realtime"),
])
def test_cli_rejects_bad_realtime_options_before_the_run(tmp_path, capsys, extra, words):
    from tta.cli import main

    rc = main(["bench", "--adapters", "tent", *extra, "--out", str(tmp_path / "o")])
    assert rc == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_time_unit_is_the_source_models_forward(single_thread):
    """With `source`, the interval and the cost are in forwards of that model (not of the adapter's
    prediction network, which can be heavier: ViDA, VDP)."""
    torch.manual_seed(0)
    source = tiny_cnn()
    adapter = tta.adapt(tiny_cnn(), "bn")
    s = RealtimeSchedule(RealtimeConfig(rate="1x-source", source=source, calibration_batches=2))
    s.calibrate(adapter, torch.rand(16, 3, 8, 8))
    assert s.summary()["time_unit"] == "source model forward" and s.interval == 1.0
    s2 = RealtimeSchedule(RealtimeConfig(rate="1x-source", source=source, adapter_cost=3.0))
    s2.calibrate(adapter, torch.rand(16, 3, 8, 8))
    assert s2.cost == 3.0 and s2.summary()["adapter_step_ms"] is None

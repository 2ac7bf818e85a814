"""The collapse guard: signals, decision rule, rollback/reset, events in the results, the CLI option."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import tta
from engine_helpers import single_thread  # noqa: F401  (fixture)
from engine_helpers import assert_same_tensors, bench_script, domain_data, model_tensors, tensor_stream, tiny_cnn
from tta.engine import CollapseGuard, GuardConfig, run_stream
from tta.engine.guard import declare_guard, declared_guard, default_guard, reference_model
from tta.errors import ConfigError, DataNotFoundError, InvalidInputError

pytestmark = pytest.mark.usefixtures("single_thread")


def batches(n: int, seed: int = 0, size: int = 32, shift: float = 0.2):
    x, _ = domain_data(n * size, shift, seed)
    return list(x.split(size))


def test_config_validation_and_parsing():
    assert GuardConfig.parse(["probe_every=2", "max-disagreement=0.1", "action=reset"]) == GuardConfig(
        probe_every=2, max_disagreement=0.1, action="reset")
    for bad in ({"probe_every": 0}, {"window": 1.5}, {"confident": 1.5}, {"max_disagreement": -0.1},
                {"action": "panic"}, {"reference": "teacher"}, {"keep": True}):
        with pytest.raises(ConfigError):
            GuardConfig(**bad)
    with pytest.raises(ConfigError, match="unknown guard setting"):
        GuardConfig.parse(["speed=3"])
    with pytest.raises(ConfigError, match="key=value"):
        GuardConfig.parse(["window"])
    with pytest.raises(ConfigError, match="probe_every"):
        GuardConfig.parse(["probe_every=two"])


def test_reference_is_the_stateless_source_model():
    model = tiny_cnn()
    adapter = tta.adapt(copy.deepcopy(model), "tent", lr=1e-2)
    ref = reference_model(adapter)
    for x in batches(3):
        adapter(x)  # adapting must not move the reference
    bn = tta.adapt(copy.deepcopy(model), "bn")
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(ref(x), bn(x))  # "auto" on a BatchNorm model = test-batch statistics
    src = reference_model(adapter, "source")
    with torch.no_grad():
        torch.testing.assert_close(src(x), model(x))
    # frozen source weights are shared with the adapter, not copied
    assert ref[0].weight.data_ptr() == adapter.model[0].weight.data_ptr()
    with pytest.raises(InvalidInputError, match="tta Adapter"):
        reference_model(torch.nn.Linear(2, 2))


def test_rotta_reference_normalises_with_test_batch_statistics():
    """RoTTA puts its robust BN in place of every BatchNorm; the guard's reference turns those back into
    BatchNorm with the test batch's statistics (BN), as for every other adapter, and not into the source
    model with its training statistics, which RoTTA contradicts simply by adapting."""
    model = tiny_cnn()
    rotta = tta.adapt(copy.deepcopy(model), "rotta")
    for x in batches(3):
        rotta(x)  # its robust statistics and weights move; the reference must not
    ref = reference_model(rotta)
    bn = tta.adapt(copy.deepcopy(model), "bn")
    x = batches(1, seed=9)[0]
    with torch.no_grad():
        torch.testing.assert_close(ref(x), bn(x))
        torch.testing.assert_close(reference_model(rotta, "source")(x), model.eval()(x))


def test_healthy_adapter_is_left_alone_and_checkpointed():
    adapter = tta.adapt(tiny_cnn(), "bn")
    guard = CollapseGuard(adapter, GuardConfig(probe_every=1, window=3, checkpoint_every=2), record=True)
    for k, x in enumerate(batches(12)):
        assert guard.observe(k, x, adapter(x)) is None
    assert guard.events == [] and guard.probes == 12 and guard.checkpoints_taken >= 4
    last = guard.history[-1]
    assert last["disagreement"] == 0.0 and last["agreement"] == 1.0 and last["diversity_ratio"] == pytest.approx(1.0)


def test_rollback_restores_the_checkpoint_exactly():
    adapter = tta.adapt(tiny_cnn(), "tent", lr=1e-3)
    guard = CollapseGuard(adapter, GuardConfig(probe_every=1, window=2, checkpoint_every=1, keep=5))
    data = batches(6)
    for k, x in enumerate(data[:4]):
        guard.observe(k, x, adapter(x))
    ck = guard._checkpoints[0]
    saved = {k: v.clone() for k, v in ck.state.items() if isinstance(v, torch.Tensor)}
    steps = adapter.counters["steps"]
    adapter(data[4])
    ck.restore(adapter)
    state = adapter.state_dict()
    for name, value in saved.items():
        assert torch.equal(state[name], value), name
    assert adapter.counters["steps"] == steps + 1  # counters say what happened; they do not roll back
    # the optimizer state rolled back too: the same next step from the checkpoint gives the same result
    twin = tta.adapt(tiny_cnn(), "tent", lr=1e-3)
    for x in data[: ck.batch + 1]:
        twin(x)
    assert torch.equal(adapter(data[5]), twin(data[5]))


def test_drift_triggers_rollback_then_reset_when_it_returns():
    adapter = tta.adapt(tiny_cnn(), "tent", lr=1e-3)
    cfg = GuardConfig(probe_every=1, window=2, checkpoint_every=1, max_disagreement=0.05, confident=0.0,
                      drift_diversity_ratio=None)  # the rolled outputs below do not narrow the histogram
    guard = CollapseGuard(adapter, cfg)
    data = batches(8)
    for k, x in enumerate(data[:4]):
        assert guard.observe(k, x, adapter(x)) is None
    assert [ck.batch for ck in guard._checkpoints] == [1, 2, 3]  # healthy checkpoints once the window is full

    def drifted(k):  # predictions contradicting the reference on every sample
        return guard.reference(data[k]).roll(1, dims=1)

    event = guard.observe(4, data[4], drifted(4))
    assert event["action"] == "rollback" and event["reason"] == "drift"
    assert event["to_batch"] == 2  # the newest checkpoint taken before the unhealthy window (batches 3-4)
    assert event["signals"]["disagreement"] > 0.05
    # the rolled-back state drifts again before a new healthy checkpoint: reset to source
    assert guard.observe(5, data[5], drifted(5)) is None  # a new window is being filled
    event = guard.observe(6, data[6], drifted(6))
    assert event["action"] == "reset" and [e["action"] for e in guard.events] == ["rollback", "reset"]
    assert_same_tensors(model_tensors(adapter.model), model_tensors(tta.adapt(tiny_cnn(), "tent").model))


def test_futile_resets_stand_the_guard_down_until_a_healthy_decision():
    """An adapter whose disagreement with the reference is not its adaptation's doing draws a drift reset
    at every decision; resets cannot fix that. After
    `max_futile_resets` drift resets with no healthy decision between them the guard stands down (the
    adapter is left alone and gets back the learning rate those resets took), and a healthy decision
    re-arms it."""
    adapter = tta.adapt(tiny_cnn(), "tent")
    lr0 = adapter.optimizer.param_groups[0]["lr"]
    guard = CollapseGuard(adapter, GuardConfig(probe_every=1, window=2, checkpoint_every=1, confident=0.0,
                                               max_futile_resets=2, drift_diversity_ratio=None))
    data = batches(24, seed=4)

    def feed(k: int, healthy: bool, collapsed: bool = False):
        reference = guard.reference(data[k])
        if collapsed:  # every prediction class 0
            return guard.observe(k, data[k], torch.nn.functional.one_hot(torch.zeros(len(reference), dtype=torch.long),
                                                                         reference.shape[1]).float() * 10)
        # contradicting outputs: every prediction moved to the next class (class diversity unchanged)
        return guard.observe(k, data[k], reference if healthy else reference.roll(1, dims=1))

    assert [feed(k, healthy=True) for k in range(2)] == [None, None]  # healthy once: resets can help
    actions = [(k, e["action"]) for k in range(2, 12) if (e := feed(k, healthy=False))]
    # the rollback does not hold; two futile resets, then it stands down (nothing at batches 9-11)
    assert actions == [(2, "rollback"), (4, "reset"), (6, "reset"), (8, "stand_down")]
    # the two futile resets halved the learning rate twice; standing down gives that back
    assert guard.events[2]["lr_scale"] == 0.25 and guard.events[3]["lr_scale"] == 1.0
    assert guard.stand_downs == 1 and guard.lr_scale == 1.0
    assert [g["lr"] for g in adapter.optimizer.param_groups] == [lr0]
    assert guard.events[-1]["reason"] == "drift" and guard.summary()["stand_downs"] == 1
    state = model_tensors(adapter)
    assert [feed(k, healthy=False) for k in range(12, 16)] == [None] * 4
    assert_same_tensors(model_tensors(adapter), state)  # standing down: the adapter is left as it is
    # standing down covers drift only: a collapse is reset (batch 16's window still holds batch 15)
    assert feed(16, healthy=False, collapsed=True) is None
    event = feed(17, healthy=False, collapsed=True)
    assert event["action"] == "reset" and event["reason"] == "collapse" and event["lr_scale"] == 0.5
    # a healthy decision re-arms the guard and takes a checkpoint; the next drift is acted on again
    assert [feed(k, healthy=True) for k in range(18, 20)] == [None, None]
    assert guard.checkpoints_taken == 2  # batches 1 and 19
    event = feed(20, healthy=False)
    assert event is not None and event["action"] == "rollback" and event["to_batch"] == 19


def test_a_starting_state_that_contradicts_the_reference_stands_the_guard_down():
    """An adapter that contradicts the reference from its first batch, before any adaptation (RoTTA's
    robust BN and VDP against the BN reference), starts in a state the guard has never seen healthy, so
    a reset to it cannot help: the first drift decision stands the guard down without touching the
    adapter, and a healthy decision arms it. An adapter that starts at the reference and decays before
    the first decision is reset as before; `max_futile_resets=0` always resets."""
    data = batches(12, seed=5)

    def run(healthy: set[int], max_futile_resets: int = 3):
        adapter = tta.adapt(tiny_cnn(), "tent")
        adapter(data[0])  # one step away from the source: a reset would show
        guard = CollapseGuard(adapter, GuardConfig(probe_every=1, window=2, checkpoint_every=1, confident=0.0,
                                                   max_futile_resets=max_futile_resets, drift_diversity_ratio=None))
        start = model_tensors(adapter)
        events = []
        for k, x in enumerate(data):
            reference = guard.reference(x)
            if (e := guard.observe(k, x, reference if k in healthy else reference.roll(1, dims=1))) is not None:
                events.append((k, e["action"], e["reason"]))
            if k == 5:
                now = model_tensors(adapter)
                unchanged = all(torch.equal(now[name], tensor) for name, tensor in start.items())
        return guard, events, unchanged

    guard, events, unchanged = run(healthy={6, 7})
    # stood down at the first decision and left alone; the healthy decision at batch 7 armed the guard
    assert events == [(1, "stand_down", "drift"), (8, "rollback", "drift"), (10, "reset", "drift")]
    assert unchanged and guard.events[0]["lr_scale"] is None
    assert guard.lr_scale == 0.5  # only the reset after the rollback backed the learning rate off
    # starting at the reference (batch 0 agrees): the drift at the first decision is reset
    assert run(healthy={0})[1][0] == (1, "reset", "drift")
    _, events, unchanged = run(healthy={6, 7}, max_futile_resets=0)
    assert events[:2] == [(1, "reset", "drift"), (3, "reset", "drift")] and not unchanged


def test_stand_down_can_be_switched_off():
    adapter = tta.adapt(tiny_cnn(), "tent")
    guard = CollapseGuard(adapter, GuardConfig(probe_every=1, window=2, confident=0.0, max_futile_resets=0,
                                               drift_diversity_ratio=None))
    data = batches(12, seed=4)
    events = [guard.observe(k, data[k], guard.reference(data[k]).roll(1, dims=1)) for k in range(12)]
    assert [e["action"] for e in events if e] == ["reset"] * 6 and guard.stand_downs == 0
    with pytest.raises(ConfigError, match="max_futile_resets"):
        GuardConfig(max_futile_resets=-1)


class _SpreadReference(torch.nn.Module):
    """A stand-in reference model that is sure of its answer and spreads its predictions over all ten
    classes (the tiny test CNN puts every sample in one class)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x.flatten(1).sum(1) * 1000).long().remainder(10)
        return torch.nn.functional.one_hot(cls, 10).float() * 5  # max-softmax 0.94


def test_drift_diversity_ratio_acts_only_on_contradictions_that_narrow_the_predictions():
    """With `drift_diversity_ratio`, contradicting the reference is drift only when the adapted class
    histogram is narrower than the reference's: an adapter correcting the reference keeps it as wide
    (here every prediction moved to another class: the histogram is permuted, its diversity unchanged),
    one confirming its own mistakes narrows it (here pairs of classes merged: five classes left)."""
    # max_futile_resets=0: the first decision may act (no stand-down before a healthy decision)
    cfg = GuardConfig(probe_every=1, window=2, drift_diversity_ratio=0.99, max_futile_resets=0)
    data = batches(8, seed=4)

    def guarded(config: GuardConfig) -> CollapseGuard:
        guard = CollapseGuard(tta.adapt(tiny_cnn(), "tent"), config, record=True)
        guard.reference = _SpreadReference()
        return guard

    def permuted(logits: torch.Tensor) -> torch.Tensor:
        return logits.roll(1, dims=1)

    def merged(logits: torch.Tensor) -> torch.Tensor:
        return logits.view(-1, 5, 2).sum(2).repeat_interleave(2, 1) * torch.tensor([1.0, 0.0] * 5)

    guard = guarded(cfg)
    assert [guard.observe(k, x, permuted(guard.reference(x))) for k, x in enumerate(data)] == [None] * 8
    signals = guard.history[-1]
    assert signals["disagreement"] == 1.0 and signals["diversity_ratio"] == pytest.approx(1.0) and not guard.events

    guard = guarded(cfg)
    events = [guard.observe(k, x, merged(guard.reference(x))) for k, x in enumerate(data[:2])]
    signals = guard.history[-1]
    assert cfg.min_diversity_ratio < signals["diversity_ratio"] < 0.8 and signals["disagreement"] > 0.3
    assert events[-1]["action"] == "reset" and events[-1]["reason"] == "drift"  # no checkpoint yet: reset

    assert GuardConfig().drift_diversity_ratio == 0.99  # the default
    # without the setting the disagreement alone decides: the permuted outputs are drift too
    guard = guarded(GuardConfig(probe_every=1, window=2, drift_diversity_ratio=None))
    assert guard.observe(0, data[0], permuted(guard.reference(data[0]))) is None
    assert guard.observe(1, data[1], permuted(guard.reference(data[1])))["reason"] == "drift"
    for bad in (0.0, 1.5, True, "x"):
        with pytest.raises(ConfigError, match="drift_diversity_ratio"):
            GuardConfig(drift_diversity_ratio=bad)
    assert GuardConfig.parse(["drift_diversity_ratio=none"]).drift_diversity_ratio is None
    assert GuardConfig.parse(["drift-diversity-ratio=0.99"]).drift_diversity_ratio == 0.99


def test_contradictions_excused_by_the_diversity_ratio_are_not_healthy_decisions():
    """A decision over the disagreement bound that `drift_diversity_ratio` excuses is neutral: it takes no
    checkpoint, does not clear the count of futile resets and does not re-arm a stood-down guard (otherwise
    an adapter whose source state contradicts the reference would be reset again at its next narrowing
    window, the failure the stand-down exists to stop)."""
    guard = CollapseGuard(tta.adapt(tiny_cnn(), "tent"),
                          GuardConfig(probe_every=1, window=1, checkpoint_every=1, drift_diversity_ratio=0.99,
                                      max_futile_resets=2), record=True)
    guard.reference = _SpreadReference()
    data = batches(9, seed=4)
    excused = {2, 5, 7}  # contradicting without narrowing (permuted); batches 1-8 else narrow (merged)

    def outputs(k: int) -> torch.Tensor:
        ref = guard.reference(data[k])
        if k == 0:  # healthy: arms the guard and takes a checkpoint
            return ref
        if k in excused:
            return ref.roll(1, dims=1)
        return ref.view(-1, 5, 2).sum(2).repeat_interleave(2, 1) * torch.tensor([1.0, 0.0] * 5)

    actions = [(k, e["action"]) for k in range(9) if (e := guard.observe(k, data[k], outputs(k)))]
    # batch 2 takes no checkpoint (the drift at 3 resets: the rollback did not hold), batch 5 does not
    # clear the count of futile resets, batch 7 does not re-arm the stood-down guard
    assert actions == [(1, "rollback"), (3, "reset"), (4, "reset"), (6, "stand_down")]
    assert guard.checkpoints_taken == 1 and guard.stand_downs == 1
    assert all(h["disagreement"] > 0.3 for h in guard.history[1:])
    assert [h["diversity_ratio"] >= 0.99 for h in guard.history] == [k in excused or k == 0 for k in range(9)]


def test_diversity_window_pools_the_narrowing_over_a_longer_span():
    """With `diversity_window`, the narrowing a drift decision needs is pooled over that many probes while
    the contradictions (and collapse) are judged on the short decision window: one narrow batch among wide
    ones no longer reads as decay; narrowing that persists still does, and so does collapse."""
    data = batches(9, seed=4)

    def run(config: GuardConfig, narrow: set[int], collapse_at: int | None = None) -> tuple[list, CollapseGuard]:
        guard = CollapseGuard(tta.adapt(tiny_cnn(), "tent"), config, record=True)
        guard.reference = _SpreadReference()
        events = []
        for k, x in enumerate(data):
            ref = guard.reference(x)
            if k == collapse_at:
                out = torch.full_like(ref, -10.0)
                out[:, 3] = 10.0
            elif k in narrow:  # pairs of classes merged: five classes left
                out = ref.view(-1, 5, 2).sum(2).repeat_interleave(2, 1) * torch.tensor([1.0, 0.0] * 5)
            else:  # every prediction moved to another class: contradicting, as wide as the reference
                out = ref.roll(1, dims=1)
            events.append(guard.observe(k, x, out))
        return [(k, e["action"], e["reason"]) for k, e in enumerate(events) if e], guard

    # max_futile_resets=0: the outputs contradict the reference from batch 0, which would stand it down
    short = GuardConfig(probe_every=1, window=1, checkpoint_every=1, max_futile_resets=0)
    pooled = GuardConfig(probe_every=1, window=1, checkpoint_every=1, diversity_window=8, max_futile_resets=0)
    assert run(short, {7})[0] == [(7, "reset", "drift")]  # one narrow batch decides alone
    acted, guard = run(pooled, {7})
    narrow = next(h for h in guard.history if h["batch"] == 7)
    assert acted == [] and narrow["diversity_ratio"] < 0.8 and narrow["disagreement"] > 0.3
    assert narrow["slow_diversity_ratio"] >= 0.99  # pooled over 8 probes the histogram stays wide
    # persistent narrowing is drift under the pooled ratio too, and collapse is judged on the short window
    assert run(pooled, set(range(3, 9)))[0][0][1:] == ("reset", "drift")
    assert run(pooled, set(), collapse_at=6)[0] == [(6, "reset", "collapse")]
    assert "slow_diversity_ratio" not in run(short, set())[1].history[-1]
    with pytest.raises(ConfigError, match="diversity_window"):
        GuardConfig(window=8, diversity_window=4)
    assert GuardConfig.parse(["diversity_window=32"]).diversity_window == 32


def test_collapse_onto_one_class_resets():
    adapter = tta.adapt(tiny_cnn(), "tent")
    guard = CollapseGuard(adapter, GuardConfig(probe_every=1, window=3))
    data = batches(3)
    one_class = torch.full((32, 10), -10.0)
    one_class[:, 3] = 10.0
    events = [guard.observe(k, x, one_class) for k, x in enumerate(data)]
    assert events[-1]["action"] == "reset" and events[-1]["reason"] == "collapse"
    assert events[-1]["signals"]["diversity"] == 0.0 and events[-1]["signals"]["entropy"] < 0.01


def test_monitoring_records_without_acting():
    adapter = tta.adapt(tiny_cnn(), "tent")
    guard = CollapseGuard(adapter, GuardConfig(probe_every=1, window=2, action="none"))
    before = model_tensors(adapter)
    data = batches(4)
    one_class = torch.zeros(32, 10)
    one_class[:, 0] = 20.0
    for k, x in enumerate(data):
        guard.observe(k, x, one_class)
    assert [e["action"] for e in guard.events] == ["none", "none", "none"]
    assert_same_tensors(model_tensors(adapter), before)


def test_probes_every_nth_batch_and_skips_single_images():
    adapter = tta.adapt(tiny_cnn(), "bn")
    guard = CollapseGuard(adapter, GuardConfig(probe_every=3, window=2))
    for k, x in enumerate(batches(9)):
        guard.observe(k, x, adapter(x))
    assert guard.probes == 3  # batches 0, 3, 6
    one = batches(1)[0][:1]
    guard.observe(9, one, adapter(one))
    assert guard.probes == 3


def test_run_stream_reports_guard_events_and_costs():
    stream = tensor_stream({"a": 96, "b": 96}, batch_size=32)
    adapter = tta.adapt(tiny_cnn(), "tent", lr=5.0)  # far too large: collapses
    result = run_stream(adapter, stream, device="cpu", progress=False,
                        guard=GuardConfig(probe_every=1, window=2, checkpoint_every=1))
    assert result.guard_events and all(e["action"] in ("rollback", "reset") for e in result.guard_events)
    assert result.guard["probes"] == 6 and result.guard_seconds > 0
    assert {"batch", "action", "reason", "to_batch", "signals"} <= set(result.guard_events[0])
    plain = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", progress=False)
    assert plain.guard is None and plain.guard_events == [] and plain.guard_seconds == 0.0


@pytest.mark.parametrize("name", ["tent", "cotta", "rotta"])
def test_a_guard_that_never_acts_changes_no_prediction(name):
    """Probes, signals and healthy checkpoints only read the adapter: a guarded run with no action gives
    every prediction of the unguarded run, for adapters that draw random numbers (CoTTA's augmented views
    and restore) or keep a memory (RoTTA) too. A long-stream run whose guard took no action therefore is
    its unguarded run (BENCHMARKS.md, "Long streams")."""
    stream = tensor_stream({"a": 96, "b": 96}, batch_size=32)
    runs = []
    for guard in (None, GuardConfig(probe_every=1, window=2, checkpoint_every=1, max_disagreement=1.0,
                                    min_diversity_ratio=0.0, min_entropy=0.0)):
        adapter = tta.adapt(tiny_cnn(), name)
        runs.append(run_stream(adapter, stream, device="cpu", progress=False, seed=3, keep_predictions=True,
                               guard=guard))
    plain, guarded = runs
    assert guarded.guard_events == [] and guarded.guard["probes"] == 6 and guarded.guard["checkpoints"] >= 1
    assert plain.steps == guarded.steps > 0
    assert np.array_equal(plain.predictions, guarded.predictions)
    assert plain.domain_errors == guarded.domain_errors


def test_model_card_guard_settings_are_the_defaults_on_that_model():
    """A card's ``guard`` settings travel on the loaded model (`declare_guard`, done by
    `tta.models.load`) and are the guard's defaults there: `CollapseGuard(adapter)`, `run_stream(guard=True)`
    and the CLI's --guard-set (`GuardConfig.parse(..., base=...)`, which overrides them key by key)."""
    model = declare_guard(tiny_cnn(), {"probe_every": 1, "window": 3})
    adapter = tta.adapt(model, "tent")
    assert declared_guard(adapter) == {"probe_every": 1, "window": 3}
    assert default_guard(adapter) == GuardConfig(probe_every=1, window=3) == CollapseGuard(adapter).config
    assert GuardConfig.parse(["window=5", "action=reset"], base=declared_guard(adapter)) == GuardConfig(
        probe_every=1, window=5, action="reset")
    stream = tensor_stream({"a": 160}, batch_size=32)
    result = run_stream(adapter, stream, device="cpu", progress=False, guard=True)
    assert result.guard["config"]["probe_every"] == 1 and result.guard["config"]["window"] == 3
    assert result.guard["probes"] == 5  # every batch probed, not every 4th
    plain = tta.adapt(tiny_cnn(), "tent")
    assert declared_guard(plain) == {} and default_guard(plain) == GuardConfig()
    with pytest.raises(ConfigError, match="window"):
        declare_guard(tiny_cnn(), {"window": 0})
    with pytest.raises(ConfigError, match=r"unknown guard setting\(s\) \['speed'\]"):
        declare_guard(tiny_cnn(), {"speed": 3})
    with pytest.raises(ConfigError, match="must be a mapping"):
        declare_guard(tiny_cnn(), [("window", 2)])


def test_presets_apply_under_the_explicit_settings():
    """``strict`` is the measured best setting; a preset applies first and explicit keys win, from a
    card's ``guard`` mapping, from --guard PRESET (over the card) and from --guard-set preset=NAME."""
    strict = GuardConfig(probe_every=1, window=4, diversity_window=32, drift_diversity_ratio=0.995)
    assert GuardConfig.from_mapping({"preset": "strict"}) == strict
    assert GuardConfig.from_mapping({"preset": "default"}) == GuardConfig()
    assert GuardConfig.from_mapping({"preset": "strict", "window": 6}) == GuardConfig(
        probe_every=1, window=6, diversity_window=32, drift_diversity_ratio=0.995)
    assert GuardConfig.parse(["preset=strict", "action=reset"]) == GuardConfig(**{**vars(strict), "action": "reset"})
    assert GuardConfig.parse(["window=6", "preset=strict"]) == strict  # in order: the preset came last
    # a card that chose strict, run with the default preset: the default's values, the card's other keys
    card = {"preset": "strict", "confident": 0.8}
    assert GuardConfig.parse([], base=card, preset="default") == GuardConfig(confident=0.8)
    assert GuardConfig.parse([], base={"window": 2}, preset="strict") == strict  # the preset over the card
    for bad in ({"preset": "paranoid"}, {"preset": 3}):
        with pytest.raises(ConfigError, match="unknown guard preset .*valid: default, strict"):
            GuardConfig.from_mapping(bad)
    with pytest.raises(ConfigError, match="unknown guard preset 'fast'"):
        GuardConfig.parse(["preset=fast"])
    with pytest.raises(ConfigError, match="unknown guard setting 'PRESETS'"):
        GuardConfig.parse(["PRESETS=1"])
    with pytest.raises(ConfigError, match="unknown guard preset"):
        declare_guard(tiny_cnn(), {"preset": "paranoid"})

    adapter = tta.adapt(declare_guard(tiny_cnn(), {"preset": "strict"}), "tent")
    assert default_guard(adapter) == strict == CollapseGuard(adapter).config
    assert CollapseGuard(adapter, "default").config == GuardConfig()
    with pytest.raises(ConfigError, match="GuardConfig or a preset name"):
        CollapseGuard(adapter, {"preset": "strict"})
    stream = tensor_stream({"a": 160}, batch_size=32)
    for guard in (True, "strict"):
        result = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", progress=False, guard=guard)
        assert result.guard["probes"] == (5 if guard == "strict" else 2)  # every batch, or batches 0 and 4
    with pytest.raises(ConfigError, match="unknown guard preset 'nope'"):
        run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", progress=False, guard="nope")


def test_periodic_reset_restarts_the_guard_windows():
    stream = tensor_stream({"a": 320}, batch_size=32)
    adapter = tta.adapt(tiny_cnn(), "tent")
    result = run_stream(adapter, stream, device="cpu", progress=False, reset=3,
                        guard=GuardConfig(probe_every=1, window=4, action="none"))
    assert result.resets == 3
    assert result.guard_events == []  # the window never fills between two resets: no decision


# ------------------------------------------------------------------------------------------------
# the acceptance case: TENT with a learning rate 100x its default collapses; the guard catches it


@pytest.fixture(scope="module")
def fmnist_noise():
    from tta.streams.fashion_mnist import load_fashion_mnist
    from tta.streams.generated import GeneratedStream, recurring_plans

    try:
        images, labels = load_fashion_mnist("test")
    except DataNotFoundError as exc:  # pragma: no cover - the Debian package is installed here
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    return GeneratedStream(images, labels, recurring_plans(["gaussian_noise"], 5, 2000, 1, 50), seed=0)


def test_tent_at_100x_learning_rate_is_caught_and_recovered(fmnist_noise):
    """Unguarded, TENT at lr 0.1 (cifar10 preset: 1e-3) collapses on Fashion-MNIST gaussian noise within a
    few batches and ends near 80% error. Guarded (probing every 2nd batch, 4 probes per decision), the
    collapse is caught at the first decision after it starts (at most 2 windows of 8 batches later), the
    reset brings the error straight back to BN's, and the learning-rate backoff keeps it there."""
    model = tta.models.load("resnet20-fmnist")
    cfg = GuardConfig(probe_every=2, window=4)
    bn = run_stream(tta.adapt(copy.deepcopy(model), "bn"), fmnist_noise, device="cpu", progress=False)
    plain = run_stream(tta.adapt(copy.deepcopy(model), "tent", preset="cifar10", lr=0.1), fmnist_noise,
                       device="cpu", progress=False)
    guarded = run_stream(tta.adapt(copy.deepcopy(model), "tent", preset="cifar10", lr=0.1), fmnist_noise,
                         device="cpu", progress=False, guard=cfg)

    def err(r, part):
        return 100 * (1 - np.sum(r.trace.correct[part]) / np.sum(r.trace.images[part]))

    tail = slice(-10, None)  # the last 500 images
    assert err(plain, tail) > err(bn, tail) + 30  # collapsed
    per_batch = [100 * (1 - c / n) for c, n in zip(plain.trace.correct, plain.trace.images)]
    collapsing = next(k for k, e in enumerate(per_batch) if e > 20 + 100 * (1 - bn.trace.correct[k] / 50))
    events = guarded.guard_events
    assert events and events[0]["action"] == "reset"
    assert events[0]["batch"] <= collapsing + 2 * cfg.window * cfg.probe_every
    first = events[0]["batch"]
    after = slice(first + 1, first + 5)
    assert err(guarded, after) < err(bn, after) + 10  # recovered right away
    assert err(guarded, tail) < err(bn, tail) + 10
    assert guarded.stream_error < plain.stream_error - 25
    assert guarded.guard["lr_scale"] < 1.0


@pytest.mark.parametrize("settings", ["probe_every=1,window=2", "probe_every=2,window=3",
                                      "probe_every=1,window=2,diversity_window=6",
                                      "probe_every=1,window=2,drift_diversity_ratio=none"])
@pytest.mark.parametrize("start", ["agrees", "contradicts"])
def test_guard_signals_replay_finds_the_guards_first_action(tmp_path, settings, start):
    """`bench/guard_signals.py --rule` replays a decision rule on a recorded run: its first action (batch,
    reason) is the one a `CollapseGuard` with those settings takes on the same predictions (a stand-down
    changes nothing, so the replay goes on past it, as the guarded run does)."""
    gs = bench_script("guard_signals")
    data = batches(12, seed=4)
    reference = _SpreadReference()
    narrow = {5, 7, 8, 9}  # contradicting and merged onto five classes; the other batches permuted (wide)

    def outputs(k: int, ref: torch.Tensor) -> torch.Tensor:
        if k == 11:
            return torch.nn.functional.one_hot(torch.zeros(len(ref), dtype=torch.long), 10).float() * 9
        if k in narrow:
            return ref.view(-1, 5, 2).sum(2).repeat_interleave(2, 1) * torch.tensor([1.0, 0.0] * 5)
        return ref.roll(1, dims=1) if k >= 3 or (k == 0 and start == "contradicts") else ref

    rows = []
    for k, x in enumerate(data):
        ref = reference(x)
        p, r = outputs(k, ref).softmax(1), ref.softmax(1)
        pa, pr = p.argmax(1), r.argmax(1)
        row = np.zeros(len(gs.COLUMNS) + 20)
        row[gs.COL["n"]] = len(x)
        for t in gs.THRESHOLDS:
            reliable = r.max(1).values >= t
            row[gs.COL[f"reliable@{t}"]] = int(reliable.sum())
            row[gs.COL[f"contradicted@{t}"]] = int((reliable & (pa != pr)).sum())
        row[len(gs.COLUMNS):] = torch.cat([torch.bincount(pa, minlength=10), torch.bincount(pr, minlength=10)]).numpy()
        rows.append(row)
    record = tmp_path / "record.npy"
    np.save(record, np.array(rows))
    replayed = gs.replay(str(record), settings)

    guard = CollapseGuard(tta.adapt(tiny_cnn(), "tent"),
                          GuardConfig.parse(settings.split(",")))
    guard.reference = reference
    first = next(((k, e) for k, x in enumerate(data)
                  if (e := guard.observe(k, x, outputs(k, reference(x)))) is not None and e["action"] != "stand_down"),
                 None)
    if first is None:  # stood down from the start and never armed (probe_every=2: no healthy decision)
        assert replayed["batch"] is None and guard.stand_downs == 1 and start == "contradicts"
        return
    assert (replayed["batch"], replayed["reason"]) == (first[0], first[1]["reason"])
    assert replayed["disagreement"] == pytest.approx(first[1]["signals"]["disagreement"], abs=1e-4)

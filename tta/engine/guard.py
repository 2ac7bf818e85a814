"""`CollapseGuard`: watch an adapter's health on a long stream; roll back or reset it when it degrades.

Continual adapters drift on long streams: entropy minimisation slowly confirms its own mistakes
until the adapted model is worse than the model it started from (Press et al., "RDumb", NeurIPS 2023,
on CCC; Hoang et al., "Persistent Test-time Adaptation in Recurring Testing Scenarios" (PeTTA),
NeurIPS 2024, on 20 recurrences of CIFAR-10-C). The guard runs beside any adapter and needs no labels:

Signals (cheap; every batch unless said otherwise)
- ``entropy``: mean prediction entropy of the batch / ln C. A collapsed model is over-confident
  (SAR, Niu et al. ICLR 2023, resets when the moving average of its entropy loss falls below a floor).
- ``diversity``: entropy of the predicted-class histogram over the decision window / ln C, relative to
  the reference model's on the same probed batches (``diversity_ratio``). Collapse onto few classes
  shows here first (PeTTA's and RDumb's failure mode).
- ``disagreement`` (probed batches, one in `probe_every`): the reference model (the source weights;
  with test-batch statistics when the model has BatchNorm, which cannot drift because it keeps no
  state) is run on the batch; among the samples the reference is confident about
  (max-softmax >= `confident`) the share the adapted model contradicts. A healthy adapter improves
  on the reference where the reference is unsure and agrees where it is sure; a drifting one starts
  contradicting confident reference predictions. This is the divergence-from-source signal of PeTTA
  measured on predictions instead of feature prototypes. ``agreement`` (all samples) and the
  reference's own entropy are reported beside it.
  The signal assumes the confident reference predictions are nearly always right. On Fashion-MNIST
  they are right 93% of the time for the `resnet20-fmnist` card (test-batch statistics, the 15 test
  corruptions) and 98% on the held-out corruptions. For the `vit-fmnist` source model they are right
  only 85% of the time on the test corruptions: an adapter that fixes a few of those mistakes (ETA)
  crosses the 1% bound although it is improving (BENCHMARKS.md, "Long streams"). So by default a
  drift decision also needs the class diversity of the adapted predictions to narrow
  (`drift_diversity_ratio`, 0.99): an adapter that corrects the reference keeps its predictions as
  spread over the classes as the reference's, one that decays by confirming its own mistakes narrows
  them. With it ETA's, RMT's and ROID's corrections are left alone and TENT's, ETA's, EATA's and DeYO's
  decay on the CNN card is still caught; ``drift_diversity_ratio=None`` lets the disagreement alone
  decide.

Decision rule (at each probe, once `window` probes have been seen since the last action)
- collapse: ``diversity_ratio < min_diversity_ratio`` or ``entropy < min_entropy`` -> reset to source;
- drift: pooled ``disagreement > max_disagreement`` and (unless `drift_diversity_ratio` is None)
  ``diversity_ratio < drift_diversity_ratio``, the ratio pooled over `diversity_window` probes when
  that is set (the contradictions come with narrowing predictions;
  a decision over the bound whose predictions do not narrow is neither acted on nor healthy: it does
  not re-arm a stood-down guard or count as a healthy decision between futile resets)
  -> roll back to the last healthy checkpoint
  (`action="rollback"`, default) or reset (`action="reset"`); a second drift before a new healthy
  checkpoint was taken resets to source (the checkpoint did not hold).
- every reset the guard makes also scales the optimizer's learning rates by `lr_backoff`: a model
  that collapses, or drifts again after a rollback, adapts too aggressively for its stream, and a
  plain reset would replay the same failure (a 100x learning rate collapses again within batches).
- stand-down: after `max_futile_resets` drift resets in a row (no healthy decision and no collapse
  between them), the next drift decision stands the guard down until a decision is healthy again
  (event ``stand_down``; the adapter's state is left as it is and the learning rates those resets
  backed off are given back). Resets that never bring the disagreement under the bound show that it
  does not come from accumulated adaptation: the adapter's own source state contradicts the reference,
  and further resets only throw adaptation away and shrink the learning rate.
  For the same reason, when the adapter's starting state already contradicts the reference (on the
  first probed batch, before any adaptation: more than `max_disagreement` of its reliable
  predictions), a drift decision before the first healthy one stands the guard down at once: a reset
  returns the adapter to that state, which the guard has never seen agree with the reference. VDP
  (whose network keeps the source BatchNorm statistics) and RoTTA (whose robust BatchNorm starts from
  them and moves with momentum 0.05) contradict the BN reference from their first batch of
  `fmnist-c-recurring` (80 of its 143 confident predictions); an adapter that starts at the reference
  (TENT, ETA, ...) and decays before the first decision is reset as before. `max_futile_resets=0`
  turns both off.
  Collapse is always acted on.
Healthy checkpoints: every `checkpoint_every` batches while the pooled signals are clearly healthy
(disagreement at most half its bound), an in-memory copy of the adapter's adapted tensors and extra state (optimizer, RNG; frozen weights are
shared, not copied); the guard keeps `keep` of them and rolls back to the newest one taken before the
unhealthy window began.

Every action is an event (batch, images seen, action, reason, signal values) in `events` and in the
run results (`RunResult.guard_events`). The cost is one reference forward per probed batch plus O(B*C)
tensor ops per batch (`bench/bench_guard.py` measures it against the adapter's own step).
"""

from __future__ import annotations

import copy
import math
import typing
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.engine.adapted_state import adapted_state, frozen_names, load_adapted
from tta.errors import ConfigError, InvalidInputError
from tta.layers import calibrated_layers, has_batchnorm, replace_batchnorms


@dataclass
class GuardConfig:
    """Collapse-guard settings (see the module docstring for the rule).

    probe_every: run the reference model on one batch in this many (cost: one source forward each).
    window: probes pooled in a decision (window x probe_every batches).
    confident: reference max-softmax above which its prediction counts as reliable.
    max_disagreement: drift when the adapted model contradicts more than this share of the reliable
        reference predictions (pooled over the window). Default 1% (chosen with
        `bench/guard_signals.py`): on 6 recurrences of `fmnist-c-recurring` the guard's three drift events
        fired at pooled shares of 1.07-1.37% (batches 136, 268, 300), and guarded TENT stayed within 0.01
        points of BN on every 10,000-image window, unguarded TENT ending one 3.0 points above
        (BENCHMARKS.md, "Long streams").
    min_diversity_ratio: collapse when the adapted predictions' class diversity falls below this
        fraction of the reference's on the same batches.
    min_entropy: collapse when the mean normalised prediction entropy over the window falls below this.
    checkpoint_every: batches between healthy checkpoints; keep: checkpoints kept.
    lr_backoff: every reset the guard makes multiplies the adapter's optimizer learning rates by this
        (1 = off). A reset means the adapter collapsed, or drifted again from a rolled-back state: its
        adaptation is too aggressive for this stream, and resetting alone would replay the failure.
    drift_diversity_ratio: a drift decision also needs the adapted predictions' class diversity under
        this fraction of the reference's on the same batches (default 0.99); None: the disagreement
        alone decides. An adapter that decays by confirming its own mistakes narrows its
        class histogram as it goes, while one that corrects the reference's confident mistakes keeps it
        at least as wide (measured in BENCHMARKS.md, "Telling correction from decay"). A decision
        over the disagreement bound that this setting excuses is neutral: no action, and not healthy.
    diversity_window: probes pooled for the diversity ratio that `drift_diversity_ratio` tests (None: the
        decision's `window`; otherwise at least `window`). A class histogram over a few hundred images
        is noisy: over 4-8 probed batches of 200 images the ratio of an adapter that corrects the
        reference dips under 0.99 now and then, and a guard that decides often (small `probe_every`)
        meets those dips. Pooling the narrowing over a longer span keeps its estimate steady while the
        contradictions, and collapse, are still judged on the short window. Pooled over the probes
        since the last action, so right after one it is the decision window's.
    max_futile_resets: drift resets in a row (no healthy decision or collapse between them) after which
        a further drift decision stands the guard down instead of resetting again, and restores the
        learning rates those resets backed off, until a decision is healthy. When the first probed
        batch (the adapter's starting state) contradicts the reference, a drift decision before the
        first healthy one stands the guard down too (a reset would return to that state). 0 = never
        stand down.
    action: what a drift triggers: "rollback" (to a healthy checkpoint) or "reset" (to source);
        "none" only records events (monitoring).
    reference: "auto" (test-batch statistics when the model has BatchNorm, else the source model),
        "bn" or "source".

    Presets (`PRESETS`; ``preset`` in a card's ``guard`` settings, ``tta run --guard strict``,
    ``run_stream(guard="strict")``, ``CollapseGuard(adapter, "strict")``): ``default`` gives the fields
    it names their defaults (over a card that chose another preset); ``strict`` probes every batch and
    decides on 4 probes, pooling the narrowing test over 32 at a tighter ratio (``probe_every=1
    window=4 diversity_window=32 drift_diversity_ratio=0.995``). On CCC-medium it first acts on a slow
    decay at batch 198-248 instead of 276 and holds TENT and DeYO within one point of BN on every
    10,000-image window, where the default leaves 7-11 windows 1-2.6 points above it; it leaves
    ROID's and RMT's corrections alone. It costs about four times the default's overhead per step
    (one reference forward per batch instead of one per four; BENCHMARKS.md, "The `strict` preset").
    """

    probe_every: int = 4
    window: int = 8
    confident: float = 0.9
    max_disagreement: float = 0.01
    min_diversity_ratio: float = 0.5
    min_entropy: float = 0.02
    checkpoint_every: int = 50
    keep: int = 3
    lr_backoff: float = 0.5
    drift_diversity_ratio: float | None = 0.99
    diversity_window: int | None = None
    max_futile_resets: int = 3
    action: Literal["rollback", "reset", "none"] = "rollback"
    reference: Literal["auto", "bn", "source"] = "auto"

    #: ``default`` names the fields' own defaults (read from the fields above), so it undoes a card's preset
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "default": {"probe_every": probe_every, "window": window, "diversity_window": diversity_window,
                    "drift_diversity_ratio": drift_diversity_ratio},
        "strict": {"probe_every": 1, "window": 4, "diversity_window": 32, "drift_diversity_ratio": 0.995},
    }

    def __post_init__(self) -> None:
        for key in ("probe_every", "window", "checkpoint_every", "keep"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"guard {key} must be an integer >= 1, got {value!r}")
        value = self.max_futile_resets
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"guard max_futile_resets must be an integer >= 0 (0 = never stand down), got {value!r}")
        value = self.diversity_window
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < self.window):
            raise ConfigError(f"guard diversity_window must be an integer >= window ({self.window}) or None "
                              f"(the decision window), got {value!r}")
        for key in ("confident", "max_disagreement", "min_diversity_ratio", "min_entropy", "lr_backoff"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"guard {key} must be a number in [0, 1], got {value!r}")
        value = self.drift_diversity_ratio
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0.0 < value <= 1.0):
            raise ConfigError(f"guard drift_diversity_ratio must be a number in (0, 1] or None (off), got {value!r}")
        if self.action not in ("rollback", "reset", "none"):
            raise ConfigError(f"guard action must be rollback, reset or none, got {self.action!r}")
        if self.reference not in ("auto", "bn", "source"):
            raise ConfigError(f"guard reference must be auto, bn or source, got {self.reference!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def preset_values(cls, name: Any) -> dict[str, Any]:
        """The settings of preset `name` (a key of `PRESETS`)."""
        if not isinstance(name, str) or name not in cls.PRESETS:
            raise ConfigError(f"unknown guard preset {name!r}; valid: {', '.join(cls.PRESETS)}")
        return dict(cls.PRESETS[name])

    @classmethod
    def _expand(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """`settings` with its ``preset`` (if any) replaced by the preset's values; its other keys win."""
        if not isinstance(settings, Mapping):
            raise ConfigError(f"guard settings must be a mapping of setting -> value, got {type(settings).__name__}")
        unknown = sorted(set(settings) - set(cls.field_names()) - {"preset"}, key=str)
        if unknown:
            raise ConfigError(f"unknown guard setting(s) {unknown}; valid: preset, {', '.join(cls.field_names())}")
        values = cls.preset_values(settings["preset"]) if "preset" in settings else {}
        values.update((k, v) for k, v in settings.items() if k != "preset")
        return values

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> "GuardConfig":
        """The defaults under `settings` (e.g. a model card's ``guard``; a ``preset`` key applies that
        preset first), every key and value checked."""
        return cls(**cls._expand(settings))

    @classmethod
    def parse(cls, assignments: list[str], base: Mapping[str, Any] | None = None,
              preset: str | None = None) -> "GuardConfig":
        """``key=value`` strings (CLI ``--guard-set``) on top of `preset` (CLI ``--guard NAME``) on top
        of `base` (a model card's ``guard`` settings, `declared_guard`) on top of the defaults."""
        from tta.adapters.config import _parse_string

        names = set(cls.field_names())
        hints = {k: v for k, v in typing.get_type_hints(cls).items() if k in names}
        values = cls._expand(base or {})
        if preset is not None:
            values.update(cls.preset_values(preset))
        for item in assignments:
            if "=" not in item:
                raise ConfigError(f"guard setting: expected key=value, got {item!r}")
            key, raw = (part.strip() for part in item.split("=", 1))
            key = key.replace("-", "_")
            if key == "preset":
                values.update(cls.preset_values(raw))
                continue
            if key not in hints:
                raise ConfigError(f"unknown guard setting {key!r}; valid: preset, {', '.join(sorted(hints))}")
            values[key] = _parse_string(key, hints[key], raw)
        return cls(**values)  # every key checked above


#: the guard's actions that change the adapter (``stand_down`` and ``none`` only record an event)
STATE_ACTIONS = ("rollback", "reset")


def count_actions(events: list[Mapping[str, Any]]) -> dict[str, int]:
    """How many guard events of each kind: rollback, reset, stand_down (from `events` or
    `RunResult.guard_events`, also as read back from a results file)."""
    return {kind: sum(e["action"] == kind for e in events) for kind in (*STATE_ACTIONS, "stand_down")}


#: attribute of a model holding its card's guard settings (set by `tta.models.load`)
GUARD_ATTR = "tta_guard"


def declare_guard(model: nn.Module, settings: Mapping[str, Any] | None) -> nn.Module:
    """Record on `model` the guard settings its card gives (checked now); returns `model`."""
    if settings:
        GuardConfig.from_mapping(settings)
        setattr(model, GUARD_ATTR, dict(settings))
    return model


def declared_guard(module: nn.Module) -> dict[str, Any]:
    """The guard settings declared on an adapter's model (or on `module` itself); {} when none."""
    for m in (getattr(module, "model", None), module):
        settings = getattr(m, GUARD_ATTR, None) if m is not None else None
        if settings:
            return dict(settings)
    return {}


def default_guard(adapter: nn.Module, preset: str | None = None) -> GuardConfig:
    """The guard's defaults for `adapter`: `GuardConfig` defaults under its model card's settings, under
    `preset` (a key of `GuardConfig.PRESETS`) when given."""
    return GuardConfig.parse([], base=declared_guard(adapter), preset=preset)


def reference_model(adapter: nn.Module, kind: str = "auto") -> nn.Module:
    """A frozen copy of the adapter's source model (frozen weights shared, not copied).

    ``"bn"``: every BatchNorm normalises with the test batch's statistics (stateless: it cannot drift);
    ``"source"``: the source model as trained; ``"auto"``: "bn" when the model has BatchNorm layers.
    A layer that an adapter put in place of a BatchNorm and that offers ``as_batchnorm()`` (RoTTA's
    robust BN) counts as one: it is turned back into a BatchNorm first.
    """
    model = getattr(adapter, "model", None)
    source_state = getattr(adapter, "_source_state", None)
    if not isinstance(model, nn.Module) or source_state is None:
        raise InvalidInputError(f"the collapse guard needs a tta Adapter, got {type(adapter).__name__}")
    memo: dict[int, Any] = {id(t): t for t in adapter.frozen_tensors()}
    ref = copy.deepcopy(model, memo)
    ref.load_state_dict(source_state, strict=False)
    # layers an adapter put in place of BatchNorm (RoTTA's robust BN) turn back into BatchNorm, so that
    # the reference normalises with the test batch's statistics as for every other adapter
    for parent in list(ref.modules()):
        for name, child in list(parent.named_children()):
            if callable(getattr(child, "as_batchnorm", None)):
                setattr(parent, name, child.as_batchnorm())
    if kind == "auto":
        kind = "bn" if has_batchnorm(ref) else "source"
    if has_batchnorm(ref):
        replace_batchnorms(ref, 0.0 if kind == "bn" else 1.0)
        for layer in calibrated_layers(ref):
            layer.ghost_groups = 1
            layer.use_source_stats = False
    ref.eval().requires_grad_(False)
    return ref


def _probabilities(outputs: torch.Tensor, kind: str) -> torch.Tensor:
    outputs = outputs.detach().float()
    return outputs if kind == "probs" else outputs.softmax(1)


def _normalised_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of probabilities / ln C."""
    return -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])


def _diversity(probes: list[dict[str, Any]]) -> tuple[float, float]:
    """Class diversity of the adapted predictions pooled over `probes`, and its ratio to the reference's."""
    hist = torch.stack([e["hist"] for e in probes]).sum(0).double()
    ref_hist = torch.stack([e["ref_hist"] for e in probes]).sum(0).double()
    diversity = float(_normalised_entropy(hist / hist.sum()))
    ref_diversity = float(_normalised_entropy(ref_hist / ref_hist.sum()))
    return diversity, diversity / ref_diversity if ref_diversity > 0 else 1.0


class _Checkpoint:
    """In-memory copy of an adapter's adapted state (`tta.engine.adapted_state`: frozen tensors are
    shared, neither copied nor written back)."""

    def __init__(self, adapter: nn.Module, batch: int, frozen: set[str]) -> None:
        self.batch = batch
        self.frozen = frozen
        self.state = adapted_state(adapter, frozen, clone=True)
        if "_extra_state" in self.state:
            self.state["_extra_state"] = copy.deepcopy(self.state["_extra_state"])

    def restore(self, adapter: nn.Module) -> None:
        counters = dict(getattr(adapter, "counters", {}))  # counters say what happened; they do not roll back
        state = dict(self.state)
        if "_extra_state" in state:
            state["_extra_state"] = copy.deepcopy(state["_extra_state"])
        load_adapted(adapter, state, self.frozen, f"guard checkpoint of batch {self.batch}")
        if counters:
            adapter.counters.update(counters)


class CollapseGuard:
    """Health signals, decision rule and recovery for one adapter (see the module docstring).

        guard = CollapseGuard(adapter, GuardConfig())      # or "strict", a preset over the card's settings
        for k, x in enumerate(batches):
            outputs = adapter(x)
            event = guard.observe(k, x, outputs)   # None, or the action taken

    `run_stream(..., guard=GuardConfig())` does exactly this and reports the events.
    """

    def __init__(self, adapter: nn.Module, config: GuardConfig | str | None = None, *, record: bool = False) -> None:
        if not callable(getattr(adapter, "reset", None)) or not hasattr(adapter, "state_dict"):
            raise InvalidInputError(f"the collapse guard needs an adapter with reset(), got {type(adapter).__name__}")
        self.adapter = adapter
        if config is not None and not isinstance(config, (GuardConfig, str)):
            raise ConfigError(f"guard config must be a GuardConfig or a preset name, got {type(config).__name__}")
        self.config = config if isinstance(config, GuardConfig) else default_guard(adapter, preset=config)
        self.output_kind = getattr(adapter, "output_kind", "logits")
        self.reference = reference_model(adapter, self.config.reference)
        self.events: list[dict[str, Any]] = []
        self.probes = 0
        self.checkpoints_taken = 0
        self.lr_scale = 1.0  # product of the learning-rate backoffs applied so far
        self._futile_resets = 0  # drift resets since the last healthy decision
        self._lrs_before_futile: list[float] | None = None  # learning rates before the first of them
        self._lr_scale_before_futile = 1.0
        self._stood_down = False
        #: the first probed batch (the starting state) or a decision was healthy: a reset to source can help
        self._healthy_seen = False
        self._frozen = frozen_names(adapter)
        self._checkpoints: deque[_Checkpoint] = deque(maxlen=self.config.keep)
        self._since_action = 0
        self._rolled_back = False
        #: the probes since the last action: the last `window` decide, all of them pool `diversity_window`
        self._window: deque[dict[str, Any]] = deque(maxlen=max(self.config.window, self.config.diversity_window or 0))
        self._entropy: deque[float] = deque(maxlen=self.config.window * self.config.probe_every)
        #: with `record`, the pooled signals at every decision ({"batch": k, **signals}), for analysis
        self.history: list[dict[str, float]] | None = [] if record else None

    # ------------------------------------------------------------------ state
    def notify_reset(self) -> None:
        """The adapter was reset from outside (a reset policy): start the signals afresh."""
        self._window.clear()
        self._entropy.clear()
        self._checkpoints.clear()
        self._since_action = 0
        self._rolled_back = False

    def to(self, device: torch.device | str) -> "CollapseGuard":
        self.reference.to(device)
        return self

    # ------------------------------------------------------------------ per batch
    @torch.no_grad()
    def observe(self, batch: int, x: torch.Tensor, outputs: torch.Tensor) -> dict[str, Any] | None:
        """Record batch `batch` (input `x`, the adapter's `outputs` on it); act when unhealthy.

        Returns the event dict when the guard acted, else None."""
        cfg = self.config
        p = _probabilities(outputs, self.output_kind)
        self._entropy.append(float(_normalised_entropy(p).mean()))
        if batch % cfg.probe_every or x.shape[0] < 2:
            return None
        ref = self.reference(x).float().softmax(1)
        ref_conf, ref_pred = ref.max(1)
        pred = p.argmax(1)
        reliable = ref_conf >= cfg.confident
        c = p.shape[1]
        self._window.append({
            "n": x.shape[0],
            "agree": int((pred == ref_pred).sum()),
            "reliable": int(reliable.sum()),
            "contradicted": int((reliable & (pred != ref_pred)).sum()),
            "hist": torch.bincount(pred, minlength=c).cpu(),
            "ref_hist": torch.bincount(ref_pred, minlength=c).cpu(),
            "ref_entropy": float(_normalised_entropy(ref).mean()),
        })
        self.probes += 1
        if self.probes == 1:  # the adapter's starting (source) state: does it agree with the reference?
            first = self._window[-1]
            self._healthy_seen = first["contradicted"] <= cfg.max_disagreement * first["reliable"]
        self._since_action += 1
        if self._since_action < cfg.window:
            return None
        signals = self.signals()
        if self.history is not None:
            self.history.append({"batch": batch, **signals})
        collapse = signals["diversity_ratio"] < cfg.min_diversity_ratio or signals["entropy"] < cfg.min_entropy
        contradicting = signals["disagreement"] > cfg.max_disagreement
        narrowing = signals.get("slow_diversity_ratio", signals["diversity_ratio"])
        drift = contradicting and (cfg.drift_diversity_ratio is None or narrowing < cfg.drift_diversity_ratio)
        if contradicting and not (collapse or drift):
            return None  # contradictions without narrowing: not acted on, but not healthy either
        if not (collapse or drift):
            self._futile_resets = 0
            self._stood_down = False
            self._healthy_seen = True
            clearly_healthy = signals["disagreement"] <= cfg.max_disagreement / 2
            due = not self._checkpoints or batch - self._checkpoints[-1].batch >= cfg.checkpoint_every
            if clearly_healthy and due:
                self._checkpoints.append(_Checkpoint(self.adapter, batch, self._frozen))
                self.checkpoints_taken += 1
                self._rolled_back = False
            return None
        if self._stood_down and not collapse:
            return None  # standing down: the window slides on until a decision is healthy
        return self._act(batch, "collapse" if collapse else "drift", signals)

    def signals(self) -> dict[str, float]:
        """The pooled signals of the current window (and, with `diversity_window`, the slow diversity
        ratio over the probes since the last action, at most that many)."""
        probes = list(self._window)
        w = probes[-self.config.window:]
        n = sum(e["n"] for e in w)
        reliable = sum(e["reliable"] for e in w)
        diversity, ratio = _diversity(w)
        signals = {
            "entropy": sum(self._entropy) / len(self._entropy),
            "ref_entropy": sum(e["ref_entropy"] for e in w) / len(w),
            "diversity": diversity,
            "diversity_ratio": ratio,
            "agreement": sum(e["agree"] for e in w) / n,
            "disagreement": sum(e["contradicted"] for e in w) / reliable if reliable else 0.0,
            "reliable": reliable / n,
        }
        if self.config.diversity_window is not None:
            signals["slow_diversity_ratio"] = _diversity(probes)[1]
        return signals

    def _act(self, batch: int, reason: str, signals: dict[str, float]) -> dict[str, Any]:
        cfg = self.config
        span = cfg.window * cfg.probe_every
        target = None
        if cfg.action == "none":
            action = "none"
        elif reason == "collapse" or cfg.action == "reset" or self._rolled_back or not self._checkpoints:
            action = "reset"
        else:
            action = "rollback"
            older = [ck for ck in self._checkpoints if ck.batch <= batch - span]
            target = older[-1] if older else self._checkpoints[0]
        stand_down = (action == "reset" and reason == "drift" and cfg.max_futile_resets > 0
                      and (self._futile_resets >= cfg.max_futile_resets or not self._healthy_seen))
        optimizer = getattr(self.adapter, "optimizer", None)
        lr_scale = None
        if stand_down:
            # the resets did not help, or the adapter was never healthy (its source state contradicts the
            # reference too): the disagreement is not the adaptation's doing, and neither was the
            # learning rate too high; give back what the futile resets' backoff took
            action = "stand_down"
            self._stood_down = True
            if optimizer is not None and self._lrs_before_futile is not None:
                for group, lr in zip(optimizer.param_groups, self._lrs_before_futile):
                    group["lr"] = lr
                self.lr_scale = self._lr_scale_before_futile
                lr_scale = self.lr_scale
        elif action == "reset" and reason == "drift":
            if self._futile_resets == 0:
                self._lrs_before_futile = (None if optimizer is None
                                           else [group["lr"] for group in optimizer.param_groups])
                self._lr_scale_before_futile = self.lr_scale
            self._futile_resets += 1
        elif action == "reset":  # a collapse: that reset works (and its backoff stays); a new row starts
            self._futile_resets = 0
        if action == "reset":
            self.adapter.reset()
            self._checkpoints.clear()
            self._rolled_back = False
            if optimizer is not None and cfg.lr_backoff != 1.0:
                for group in optimizer.param_groups:
                    group["lr"] *= cfg.lr_backoff
                self.lr_scale *= cfg.lr_backoff
                lr_scale = self.lr_scale
        elif action == "rollback":
            assert target is not None
            target.restore(self.adapter)
            while self._checkpoints and self._checkpoints[-1].batch > target.batch:
                self._checkpoints.pop()
            self._rolled_back = True
        event = {
            "batch": batch,
            "action": action,
            "reason": reason,
            "to_batch": None if target is None else target.batch,
            "lr_scale": lr_scale,
            "signals": {k: round(v, 4) for k, v in signals.items()},
        }
        self.events.append(event)
        if action in STATE_ACTIONS:  # otherwise the same state goes on being measured
            self._window.clear()
            self._entropy.clear()
            self._since_action = 0
        return event

    @property
    def stand_downs(self) -> int:
        return count_actions(self.events)["stand_down"]

    def summary(self) -> dict[str, Any]:
        return {"config": asdict(self.config), "probes": self.probes, "checkpoints": self.checkpoints_taken,
                "events": len(self.events), "stand_downs": self.stand_downs, "lr_scale": self.lr_scale}


__all__ = ["STATE_ACTIONS", "CollapseGuard", "GuardConfig", "count_actions", "declare_guard", "declared_guard",
           "default_guard", "reference_model"]

"""The real-time evaluation protocol of Alfarra et al., "Evaluation of Test-Time Adaptation Under
Computational Time Constraints" (ICML 2024; code: MotasemAlfarra/Online_Test_Time_Adaptation).

The stream reveals a batch every `interval` seconds, whatever the adapter does. An adapter whose
step takes longer than the interval cannot adapt on every batch:

- the adapter adapts on batch k (its usual predict-and-adapt step; that batch gets the adapted
  output) and is busy for its step cost C;
- the batches that arrive while it is busy (arrival time < start + C) are **not adapted on**: they
  are predicted by the current model (the latest adapted state) with a plain forward and no update,
  as the paper's evaluator does with the wrapped network (`model.model`); they **count** in the error
  like every other batch (the paper reports error over the whole stream);
- the next batch that arrives once the adapter is free is adapted on. With C and the interval in one
  unit, the adapter skips ``ceil(C / interval) - 1`` batches after each step: the paper's delay
  ``ceil(ratio * eta) - 1`` with ratio = C / source forward and eta = source forward / interval.

Rates: ``"Kx-source"`` is a batch every K source-model forward times (the paper's eta = 1/K; its
main setting, the stream as fast as the source model, is ``1x-source``), measured in the same run,
so results do not depend on the machine's speed; a plain number is batches per second.

Determinism: nothing sleeps and no thread races the stream. Time is simulated: batch k arrives at
``k * interval`` and the adapter is busy for its cost, both in source-forward units. Costs are
calibrated once per run (median of `calibration_batches` timed steps of a *fork* of the adapter on
the first batch, against the median no-grad forward of the source model, interleaved) and held
constant (``costs="calibrated"``), so the schedule is a pure function of (cost ratio, interval) and
reruns with the same ratio agree exactly; pin the ratio with `adapter_cost` (e.g. from a previous
run's results) to repeat a run on another machine. ``costs="measured"`` uses each adapted step's own
wall time instead (the paper's evaluator does this; it follows data-dependent costs such as CoTTA's
skipped augmentations, at the price of run-to-run noise).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from tta.errors import ConfigError

_RELATIVE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*x-source\s*$", re.IGNORECASE)
_ABSOLUTE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(?:/s)?\s*$", re.IGNORECASE)
#: cost ratios are rounded to this many decimals (they are reported with it and reruns compare them)
COST_DECIMALS = 2


@dataclass(frozen=True)
class RealtimeConfig:
    """The real-time protocol's settings (see the module docstring).

    rate: ``"Kx-source"`` (a batch every K source forwards; K > 0) or batches per second (a number,
        or ``"N/s"``).
    costs: ``"calibrated"`` (one cost ratio per run, deterministic schedule) or ``"measured"``
        (every adapted step's own wall time).
    calibration_batches: timed steps (after one untimed warm-up) of the calibration.
    adapter_cost: the adapter's step cost in source forwards; given, it replaces the calibration
        of the adapter (the source forward is still timed for an absolute rate).
    source: the source model (the network before adaptation) whose no-grad forward is the time
        unit; None: the adapter's own prediction network stands in, which is the source network for
        adapters that only change parameters or normalisation (BN, TENT, CoTTA...) but heavier for
        adapters that add modules (ViDA's adapters, VDP's prompts): pass the source model for those
        (`tta bench --realtime` does, for every adapter).
    """

    rate: str | float
    costs: Literal["calibrated", "measured"] = "calibrated"
    calibration_batches: int = 5
    adapter_cost: float | None = None
    source: nn.Module | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.parsed_rate()  # raises on a bad rate
        if self.costs not in ("calibrated", "measured"):
            raise ConfigError(f"realtime costs must be 'calibrated' or 'measured', got {self.costs!r}")
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) \
                or self.calibration_batches < 1:
            raise ConfigError(f"realtime calibration_batches must be an integer >= 1, got {self.calibration_batches!r}")
        if self.adapter_cost is not None and not (isinstance(self.adapter_cost, (int, float))
                                                  and math.isfinite(self.adapter_cost) and self.adapter_cost > 0):
            raise ConfigError(f"realtime adapter_cost must be a positive number of source forwards, "
                              f"got {self.adapter_cost!r}")

    def parsed_rate(self) -> tuple[str, float]:
        """``("source", K)`` for ``Kx-source``, ``("per_s", N)`` for N batches per second."""
        return parse_rate(self.rate)


def parse_rate(rate: str | float) -> tuple[str, float]:
    """``"2x-source"`` -> ("source", 2.0); ``"20"`` / ``"20/s"`` / 20 -> ("per_s", 20.0)."""
    if isinstance(rate, bool):
        raise ConfigError(f"realtime rate must be 'Kx-source' or batches per second, got {rate!r}")
    if isinstance(rate, (int, float)):
        kind, value = "per_s", float(rate)
    elif isinstance(rate, str) and (m := _RELATIVE.match(rate)):
        kind, value = "source", float(m.group(1))
    elif isinstance(rate, str) and (m := _ABSOLUTE.match(rate)):
        kind, value = "per_s", float(m.group(1))
    else:
        raise ConfigError(f"realtime rate must be 'Kx-source' (a batch every K source-model forwards, "
                          f"e.g. 1x-source) or batches per second (e.g. 20), got {rate!r}")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"realtime rate must be positive and finite, got {rate!r}")
    return kind, value


def predict_current(adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The prediction of the adapter's current state on `x`, without adapting: a no-grad forward of
    the network it predicts with (`Adapter.prediction_model()`; `Adapter.predict_current` when the
    adapter defines its own, e.g. AdaNPC's memory vote without adding to the memory)."""
    validate = getattr(adapter, "validate_batch", None)
    if callable(validate):  # the same input checks as a step: a rejected batch is rejected here too
        from tta.adapters.inputs import rejection, value_verdict

        validate(x)
        value_range = getattr(adapter, "input_range", None)
        if not bool(value_verdict(x, value_range)):
            raise rejection(getattr(adapter, "name", type(adapter).__name__), x, value_range)
    own = getattr(adapter, "predict_current", None)
    if callable(own):
        return own(x)
    model = adapter.prediction_model() if callable(getattr(adapter, "prediction_model", None)) else adapter
    with torch.no_grad():
        return model(x)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RealtimeSchedule:
    """Which batches an adapter adapts on when batches arrive every `interval` (simulated clock).

    Units are source-model forwards: batch k arrives at ``k * interval``; an adapted batch keeps the
    adapter busy for `cost` (calibrated) or its own measured time. `admit(k)` says whether batch k
    is adapted on; `done(k, seconds)` records the step.
    """

    def __init__(self, config: RealtimeConfig) -> None:
        self.config = config
        self.source_s: float | None = None  # median no-grad forward of the network (seconds)
        self.adapter_s: float | None = None  # median adapter step (seconds), None when pinned
        self.cost: float | None = None  # adapter step in source forwards (constant in "calibrated")
        self.interval: float | None = None  # batch interval in source forwards
        self._busy_until = -math.inf
        self.adapted = 0
        self.predicted = 0  # batches predicted by the current model without adapting
        self.busy_time = 0.0  # simulated source forwards spent adapting

    # ------------------------------------------------------------------ calibration
    def calibrate(self, adapter: nn.Module, x: torch.Tensor) -> None:
        """Time the network's no-grad forward and (unless pinned) the adapter's step on batch `x`,
        interleaved, on a fork of the adapter: the adapter's own state is not touched."""
        n = self.config.calibration_batches
        probe = adapter.fork() if callable(getattr(adapter, "fork", None)) else None
        device = x.device
        need_adapter = self.config.adapter_cost is None or self.config.costs == "measured"
        if need_adapter and probe is None:
            raise ConfigError(f"realtime calibration needs an adapter with fork(); {type(adapter).__name__} has none")
        source_times: list[float] = []
        adapter_times: list[float] = []
        source = self.config.source
        if source is not None:
            source.to(device)

        def source_forward() -> None:
            if source is None:
                predict_current(probe if probe is not None else adapter, x)
            else:
                with torch.no_grad():
                    source(x)

        for i in range(n + 1):  # the first round is an untimed warm-up
            _sync(device)
            t0 = time.perf_counter()
            source_forward()
            _sync(device)
            t1 = time.perf_counter()
            if need_adapter:
                probe(x)
                _sync(device)
            t2 = time.perf_counter()
            if i:
                source_times.append(t1 - t0)
                adapter_times.append(t2 - t1)
        del probe
        self.source_s = statistics.median(source_times)
        if self.config.adapter_cost is not None:
            self.cost = float(self.config.adapter_cost)
        else:
            self.adapter_s = statistics.median(adapter_times)
            self.cost = round(max(self.adapter_s / self.source_s, 10.0 ** -COST_DECIMALS), COST_DECIMALS)
        kind, value = self.config.parsed_rate()
        self.interval = value if kind == "source" else (1.0 / value) / self.source_s

    # ------------------------------------------------------------------ the protocol
    def admit(self, k: int) -> bool:
        """Batch k is adapted on when the adapter is free at its arrival time."""
        assert self.interval is not None, "calibrate() first"
        arrival = k * self.interval
        # a relative tolerance: a step that takes exactly one interval leaves the next batch adaptable
        return arrival >= self._busy_until - 1e-9 * max(1.0, abs(self._busy_until))

    def done(self, k: int, seconds: float) -> None:
        """Batch k was adapted on in `seconds` of wall time."""
        assert self.interval is not None and self.cost is not None and self.source_s is not None
        cost = self.cost if self.config.costs == "calibrated" else seconds / self.source_s
        self._busy_until = k * self.interval + cost
        self.busy_time += cost
        self.adapted += 1

    def skipped(self) -> None:
        self.predicted += 1

    def step(self, adapter: nn.Module, k: int, x: torch.Tensor) -> torch.Tensor:
        """Batch k under the protocol: adapted on when the adapter is free, else predicted by the
        current model without an update."""
        if not self.admit(k):
            self.skipped()
            return predict_current(adapter, x)
        _sync(x.device)
        t0 = time.perf_counter()
        out = adapter(x)
        _sync(x.device)
        self.done(k, time.perf_counter() - t0)
        return out

    def summary(self) -> dict[str, Any]:
        """Settings, measured costs and counts (`RunResult.realtime`)."""
        total = self.adapted + self.predicted
        cfg = self.config
        return {
            "rate": cfg.rate, "costs": cfg.costs, "calibration_batches": cfg.calibration_batches,
            "adapter_cost": cfg.adapter_cost,
            "time_unit": "source model forward" if cfg.source is not None else "prediction network forward",
            "interval_source_forwards": None if self.interval is None else round(self.interval, 6),
            "source_forward_ms": None if self.source_s is None else round(self.source_s * 1e3, 4),
            "adapter_step_ms": None if self.adapter_s is None else round(self.adapter_s * 1e3, 4),
            "adapter_cost_source_forwards": self.cost,
            "adapted_batches": self.adapted,
            "predicted_batches": self.predicted,
            "adapted_fraction": self.adapted / total if total else None,
        }


def as_realtime_config(realtime: RealtimeConfig | str | float | None) -> RealtimeConfig | None:
    """`run_stream`'s ``realtime=`` argument: a config, a rate, or None (off)."""
    if realtime is None or isinstance(realtime, RealtimeConfig):
        return realtime
    return RealtimeConfig(rate=realtime)


__all__ = ["COST_DECIMALS", "RealtimeConfig", "RealtimeSchedule", "as_realtime_config", "parse_rate", "predict_current"]

"""`run_stream`: run an adapter over a stream of batches (predict-and-adapt), with metrics."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Literal

import numpy as np
import torch
from torch import nn

from tta.engine.guard import CollapseGuard, GuardConfig, count_actions
from tta.engine.heap import DEFAULT_TRIM_EVERY, HeapTrimmer
from tta.engine.metrics import BatchTrace, ErrorCounter, RunResult, percentile
from tta.engine.prefetch import Prefetcher
from tta.engine.realtime import RealtimeConfig, RealtimeSchedule, as_realtime_config
from tta.errors import ConfigError, InputValueError
from tta.streams.base import Batch, Stream
from tta.streams.base import check_reset

logger = logging.getLogger("tta.engine")

ResetPolicy = Literal["never", "domain"] | int
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else the CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


def resolve_amp(amp: bool | str | None, device: torch.device) -> torch.dtype | None:
    """AMP dtype: False/None = off; True = bf16 on CPU, fp16 on CUDA; or "bf16"/"fp16" explicitly."""
    if amp is None or amp is False:
        return None
    if amp is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if amp in AMP_DTYPES:
        return AMP_DTYPES[amp]
    raise ConfigError(f"amp must be True/False, 'bf16' or 'fp16', got {amp!r}")


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def predicted_classes(outputs: torch.Tensor) -> torch.Tensor:
    """Argmax over classes; works for logits and probabilities alike."""
    return outputs.argmax(1)


def run_stream(
    adapter: nn.Module,
    stream: Stream | Iterable[Batch],
    *,
    device: str | torch.device = "auto",
    amp: bool | str = False,
    reset: ResetPolicy | None = None,
    prefetch: int = 2,
    progress: bool = True,
    seed: int | None = None,
    on_nonfinite: Literal["skip", "raise"] = "skip",
    keep_predictions: bool = False,
    guard: GuardConfig | bool | str | None = None,
    realtime: RealtimeConfig | str | float | None = None,
    log: Callable[[str], None] | None = None,
    trim_heap_every: int | None = DEFAULT_TRIM_EVERY,
) -> RunResult:
    """Predict-and-adapt on every batch of `stream`; returns per-domain error and speed metrics.

    device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``...; the adapter is moved there.
    amp: autocast the adapter's forward (off by default; True = bf16 on CPU, fp16 on CUDA).
    reset: ``"never"``, ``"domain"`` (reset to the source state when the batch domain changes) or
        N (reset before every N-th batch: after batches N, 2N, ...; RDumb's periodic reset, Press et
        al. 2023, is N = 1000; ``"every N"`` also reads as N); None = the stream's own policy (its
        ``reset`` attribute, set by stream specs), else ``"never"``.
    prefetch: batches loaded ahead in a background thread (0 = load in the calling thread);
        on CUDA they are pinned and copied asynchronously.
    seed: seeds Python/NumPy/torch global generators before the run (the adapter's own generators
        are seeded by its config's ``seed``).
    on_nonfinite: a batch with NaN/Inf values (or values outside the model's input range) is rejected
        by the adapter before any state change; ``"skip"`` counts it (its samples count as errors)
        and goes on, ``"raise"`` re-raises.
    keep_predictions: keep the predicted class of every image (``-1`` for skipped batches).
    guard: run the adapter under a `CollapseGuard` (True = the `GuardConfig` defaults, under the guard
        settings of the model's card when it has them, `tta.engine.guard.default_guard`; a preset name
        such as ``"strict"``: that preset over the card's settings, `GuardConfig.PRESETS`): its events
        (rollbacks, resets, with the signals that triggered them) go into ``guard_events``.
    realtime: the real-time protocol of Alfarra et al. (ICML 2024; `tta.engine.realtime`): batches
        arrive at a fixed rate (``"2x-source"``: a batch every 2 source-model forwards; a number:
        batches per second, or a `RealtimeConfig`); batches arriving while the adapter is busy are
        predicted by its current state without an update and count in the error. Its settings,
        costs and the fraction of batches adapted go into ``realtime``.
    log: receives one line per finished domain and the mean; default: printed under the
        progress bar when `progress`, else sent to the ``tta.engine`` logger. Domain lines read as
        the reference CTTA library (mariodoebler/test-time-adaptation) writes them:
        ``fashion-mnist-c error % [fog5][#samples=2000]: 65.50%`` (the stream's `dataset` and
        `domain_labels`, set by stream specs, give the dataset and the corruption+severity label).
    trim_heap_every: return freed heap memory to the system every N batches (glibc's
        ``malloc_trim``; `tta.engine.heap`): less resident memory on long streams whose step tensor
        sizes vary (ROID, DeYO, EATA, SAR); 0 or None = never.
    """
    reset = check_reset(getattr(stream, "reset", "never") if reset is None else reset)
    if on_nonfinite not in ("skip", "raise"):
        raise ConfigError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")
    if prefetch < 0:
        raise ConfigError(f"prefetch must be >= 0, got {prefetch}")
    trimmer = HeapTrimmer(trim_heap_every)
    if reset != "never" and not callable(getattr(adapter, "reset", None)):
        raise ConfigError(f"reset={reset!r} needs an adapter with reset(); {type(adapter).__name__} has none")
    if seed is not None:
        seed_everything(seed)
    dev = resolve_device(device)
    amp_dtype = resolve_amp(amp, dev)
    adapter.to(dev)
    watcher = CollapseGuard(adapter, None if guard is True else guard).to(dev) if guard else None
    realtime = as_realtime_config(realtime)
    schedule = RealtimeSchedule(realtime) if realtime is not None else None

    tqdm_cls = _tqdm() if progress else None
    if log is None:
        log = tqdm_cls.write if tqdm_cls is not None else logger.info
    domains = list(getattr(stream, "domains", []) or [])
    sizes = dict(getattr(stream, "domain_sizes", {}) or {})
    counter = ErrorCounter(domains)
    counters = getattr(adapter, "counters", {})
    before = dict(counters)

    latencies: list[float] = []
    predictions: list[torch.Tensor] = []
    trace = BatchTrace()
    guard_seconds = 0.0
    images = batches = skipped_batches = skipped_images = resets = nonfinite_outputs = 0
    current: str | None = None
    mixed = False  # per-sample domains: per-domain lines are printed at the end
    logged: set[str] = set()
    bar = None
    t_start: float | None = None

    dataset = str(getattr(stream, "dataset", "") or "")
    labels = dict(getattr(stream, "domain_labels", {}) or {})

    def domain_line(name: str, err: float) -> str:
        n = int(counter.seen[counter.index(name)])
        return f"{dataset + ' ' if dataset else ''}error % [{labels.get(name, name)}][#samples={n}]: {err:.2f}%"

    def finish_domain(name: str) -> None:
        errors = counter.errors()
        if not mixed and name in errors and name not in logged:
            logged.add(name)
            log(domain_line(name, errors[name]))

    source: Iterable[Batch]
    source = Prefetcher(stream, prefetch, pin_memory=dev.type == "cuda") if prefetch else stream
    non_blocking = dev.type == "cuda"
    try:
        for k, batch in enumerate(source):
            if t_start is None:
                t_start = time.perf_counter()
            if batch.domain != current:
                if current is not None:
                    finish_domain(current)
                    if reset == "domain":
                        adapter.reset()
                        resets += 1
                        if watcher is not None:
                            watcher.notify_reset()
                if tqdm_cls is not None:
                    if bar is not None:
                        bar.close()
                    bar = tqdm_cls(total=sizes.get(batch.domain), desc=batch.domain, unit="img",
                                   leave=True, dynamic_ncols=True)
                current = batch.domain
            if isinstance(reset, int) and k > 0 and k % reset == 0:
                adapter.reset()
                resets += 1
                if watcher is not None:
                    watcher.notify_reset()
            mixed = mixed or batch.sample_domains is not None

            n = len(batch)
            t0 = time.perf_counter()
            try:
                x = batch.x.to(dev, non_blocking=non_blocking)
                with autocast(dev, amp_dtype):
                    if schedule is None:
                        outputs = adapter(x)
                    else:
                        if schedule.interval is None:  # costs measured once, on the first batch
                            schedule.calibrate(adapter, x)
                            t_start = t0 = time.perf_counter()
                        outputs = schedule.step(adapter, k, x)
                pred = predicted_classes(outputs).cpu()  # host sync: latency includes the device work
                if not bool(torch.isfinite(outputs).all()):
                    nonfinite_outputs += 1
            except InputValueError as exc:
                if on_nonfinite == "raise":
                    raise
                skipped_batches += 1
                skipped_images += n
                log(f"skipped batch {k} [{batch.domain}]: {exc}")
                pred = None
            latencies.append((time.perf_counter() - t0) * 1e3)
            if watcher is not None and pred is not None:
                tg = time.perf_counter()
                event = watcher.observe(k, x, outputs)
                guard_seconds += time.perf_counter() - tg
                if event is not None:
                    log(f"guard: {event['action']} at batch {k} ({event['reason']}; "
                        + ", ".join(f"{key} {v:.3f}" for key, v in event["signals"].items()) + ")")
            batches += 1
            images += n
            trimmer.tick()

            correct = -1
            if batch.y is not None:
                y = batch.y.cpu()
                if pred is None:
                    counter.add_wrong(batch.domain, batch.sample_domains, n)
                    correct = 0
                else:
                    hits = pred == y
                    counter.add(batch.domain, batch.sample_domains, hits)
                    correct = int(hits.sum())
            trace.add(n, correct, time.perf_counter() - t_start)
            if keep_predictions:
                predictions.append(pred if pred is not None else torch.full((n,), -1, dtype=torch.int64))
            if bar is not None:
                bar.update(n)
                if counter.labeled:
                    bar.set_postfix(acc=f"{counter.running_accuracy():.2f}%", refresh=False)
    finally:
        if isinstance(source, Prefetcher):
            source.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t_start if t_start is not None else 0.0

    if mixed:
        for name, err in counter.errors().items():
            log(domain_line(name, err))
    elif current is not None:
        finish_domain(current)
    errors = counter.errors()
    mean = float(np.mean(list(errors.values()))) if errors else None
    if mean is not None:
        log(f"mean error: {mean:.2f}%")
    if nonfinite_outputs:
        log(f"warning: {nonfinite_outputs} batch(es) produced NaN/Inf outputs")
    if watcher is not None:
        counts = count_actions(watcher.events)
        stood = f", stood down {counts['stand_down']} time(s)" if counts["stand_down"] else ""
        log(f"guard: {counts['rollback'] + counts['reset']} action(s) ({counts['rollback']} rollbacks, "
            f"{counts['reset']} resets){stood}, {watcher.probes} probes, {watcher.checkpoints_taken} checkpoints")
    if skipped_batches:
        log(f"skipped {skipped_batches} batch(es) ({skipped_images} images) with non-finite or out-of-range "
            "values; counted as errors")

    def delta(key: str) -> int:
        return int(counters.get(key, 0)) - int(before.get(key, 0))

    if delta("skipped_nonfinite_loss"):
        log(f"warning: {delta('skipped_nonfinite_loss')} of {delta('steps')} step(s) had a non-finite loss and were "
            "not applied")
    if delta("nonfinite_param_resets"):
        log(f"warning: the adapted parameters became non-finite {delta('nonfinite_param_resets')} time(s) (learning "
            "rate too high?); each time the adapter was reset to the source state")
    if delta("aug_used") + delta("aug_skipped"):  # CoTTA: share of batches without augmented views
        log(f"augmentation skipped on {delta('aug_skipped')} of {delta('aug_used') + delta('aug_skipped')} "
            "batches (anchor confident)")

    seen = counter.seen.tolist()
    return RunResult(
        adapter=str(getattr(adapter, "name", type(adapter).__name__)),
        domains=list(counter.domains),
        domain_errors=errors,
        domain_images={d: int(s) for d, s in zip(counter.domains, seen) if s > 0},
        mean_error=mean,
        images=images,
        seconds=seconds,
        images_per_s=images / seconds if seconds > 0 else float("nan"),
        latency_ms_p50=percentile(latencies, 50),
        latency_ms_p95=percentile(latencies, 95),
        batches=batches,
        steps=delta("steps"),
        small_batches=delta("small_batches"),
        skipped_batches=skipped_batches,
        skipped_images=skipped_images,
        skipped_nonfinite_loss=delta("skipped_nonfinite_loss"),
        nonfinite_param_resets=delta("nonfinite_param_resets"),
        resets=resets,
        nonfinite_outputs=nonfinite_outputs,
        device=str(dev),
        amp=None if amp_dtype is None else str(amp_dtype).removeprefix("torch."),
        guard_events=list(watcher.events) if watcher is not None else [],
        guard=watcher.summary() if watcher is not None else None,
        guard_seconds=guard_seconds,
        heap_trims=trimmer.trims,
        heap_trim_seconds=trimmer.seconds,
        realtime=schedule.summary() if schedule is not None else None,
        trace=trace,
        predictions=torch.cat(predictions) if keep_predictions and predictions else None,
    )


def _tqdm():
    from tqdm.auto import tqdm

    return tqdm

"""Streaming engine: per-domain metrics, reset policies, seeding, non-finite batches, unlabeled streams."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tta
from engine_helpers import single_thread  # noqa: F401  (fixture)
from engine_helpers import assert_same_tensors, domain_data, model_tensors, tensor_stream, tiny_cnn
from tta.adapters.norm import Source
from tta.engine import run_stream
from tta.errors import ConfigError, NonFiniteInputError
from tta.streams.base import Batch, Stream, TensorStream

pytestmark = pytest.mark.usefixtures("single_thread")

DOMAINS = {"gaussian_noise5": 40, "shot_noise5": 30, "impulse_noise5": 25}


def hand_errors(adapter: nn.Module, stream: Stream) -> dict[str, float]:
    """The reference loop: predict-and-adapt batch by batch, count errors per domain."""
    wrong: dict[str, int] = {}
    seen: dict[str, int] = {}
    for b in stream:
        pred = adapter(b.x).argmax(1)
        wrong[b.domain] = wrong.get(b.domain, 0) + int((pred != b.y).sum())
        seen[b.domain] = seen.get(b.domain, 0) + len(b)
    return {d: 100.0 * wrong[d] / seen[d] for d in seen}


@pytest.mark.parametrize("name", ["source", "bn", "tent"])
def test_per_domain_errors_match_hand_loop(name):
    stream = tensor_stream(DOMAINS, batch_size=16)  # uneven last batches
    adapter = tta.adapt(tiny_cnn(), name)
    reference = copy.deepcopy(adapter)
    result = run_stream(adapter, stream, device="cpu", progress=False)
    expected = hand_errors(reference, stream)
    assert list(result.domain_errors) == list(DOMAINS)
    for d in DOMAINS:
        assert result.domain_errors[d] == pytest.approx(expected[d], abs=1e-9)
    assert result.mean_error == pytest.approx(sum(expected.values()) / 3)
    assert result.domain_images == DOMAINS
    assert result.images == sum(DOMAINS.values())
    assert result.batches == len(stream) == 3 + 2 + 2
    assert result.images_per_s > 0
    assert 0 < result.latency_ms_p50 <= result.latency_ms_p95
    assert result.steps == len(stream)  # one step per batch
    assert_same_tensors(model_tensors(adapter), model_tensors(reference))  # same adapted state


def test_probability_outputs_use_argmax():
    class ProbsSource(Source):
        output_kind = "probs"

        @torch.no_grad()
        def forward_and_adapt(self, x):
            return self.model(x).softmax(1)

    stream = tensor_stream(DOMAINS, batch_size=20)
    model = tiny_cnn()
    result = run_stream(ProbsSource(copy.deepcopy(model)), stream, device="cpu", progress=False, keep_predictions=True)
    expected = torch.cat([model(b.x).argmax(1) for b in stream])
    assert torch.equal(result.predictions, expected)
    assert result.domain_errors == pytest.approx(hand_errors(tta.adapt(model, "source"), stream))


def test_per_sample_domains():
    class Mixed(Stream):
        domains = ["a", "b", "c"]
        domain_sizes = {"a": 0, "b": 0, "c": 0}

        def __init__(self):
            g = torch.Generator().manual_seed(5)
            self.batches = []
            for _ in range(4):
                x, y = domain_data(12, 0.1, int(torch.randint(0, 1000, (1,), generator=g)))
                self.batches.append(Batch(x, y, "mixed", torch.randint(0, 3, (12,), generator=g)))

        def __iter__(self):
            return iter(self.batches)

    stream = Mixed()
    model = tiny_cnn()
    result = run_stream(tta.adapt(copy.deepcopy(model), "source"), stream, device="cpu", progress=False)
    wrong = torch.zeros(3)
    seen = torch.zeros(3)
    for b in stream:
        bad = (model(b.x).argmax(1) != b.y).float()
        for i in range(len(b)):
            wrong[b.sample_domains[i]] += bad[i]
            seen[b.sample_domains[i]] += 1
    assert list(result.domain_errors) == ["a", "b", "c"]
    for i, d in enumerate("abc"):
        assert result.domain_errors[d] == pytest.approx(100 * float(wrong[i] / seen[i]))


class ResetSpy:
    """Records the adapter's batch counter at every reset."""

    def __init__(self, adapter):
        self.at: list[int] = []
        original = adapter.reset

        def spy():
            self.at.append(adapter.counters["batches"])
            original()

        adapter.reset = spy


def test_reset_per_domain_exactly_at_changes():
    sizes = [("a", 48), ("b", 32), ("a", 32)]  # 3, 2, 2 batches of 16; "a" comes back
    stream = tensor_stream(sizes, batch_size=16)
    adapter = tta.adapt(tiny_cnn(), "tent")
    spy = ResetSpy(adapter)
    result = run_stream(adapter, stream, device="cpu", reset="domain", progress=False)
    assert spy.at == [3, 5]
    assert result.resets == 2
    # after the last reset only the last segment was adapted on: equal to a fresh run over it
    last = TensorStream([stream.segments[-1]], batch_size=16)
    fresh = tta.adapt(tiny_cnn(), "tent")
    run_stream(fresh, last, device="cpu", progress=False)
    assert_same_tensors(model_tensors(adapter.model), model_tensors(fresh.model))


def test_stream_reset_attribute_is_the_default_policy():
    stream = tensor_stream({"a": 32, "b": 32}, batch_size=16)
    stream.reset = "domain"  # what stream specs set (reset_each_shift)
    adapter = tta.adapt(tiny_cnn(), "tent")
    spy = ResetSpy(adapter)
    assert run_stream(adapter, stream, device="cpu", progress=False).resets == 1
    assert spy.at == [2]
    assert run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", reset="never", progress=False).resets == 0


def test_reset_every_n_batches():
    stream = tensor_stream({"a": 64, "b": 48}, batch_size=16)  # 7 batches
    adapter = tta.adapt(tiny_cnn(), "tent")
    spy = ResetSpy(adapter)
    result = run_stream(adapter, stream, device="cpu", reset=2, progress=False)
    assert spy.at == [2, 4, 6]
    assert result.resets == 3
    never = tta.adapt(tiny_cnn(), "tent")
    spy_never = ResetSpy(never)
    run_stream(never, stream, device="cpu", reset="never", progress=False)
    assert spy_never.at == []


@pytest.mark.parametrize("bad", ["sometimes", 0, -3, True, 1.5])
def test_reset_policy_validated(bad):
    with pytest.raises(ConfigError, match="reset"):
        run_stream(tta.adapt(tiny_cnn(), "bn"), tensor_stream({"a": 8}, 8), reset=bad, progress=False)


class NoisyModel(nn.Module):
    """Draws from the global torch generator in forward: only a seeded run is reproducible."""

    def __init__(self):
        super().__init__()
        self.net = tiny_cnn()

    def forward(self, x):
        return self.net(x) + torch.randn(x.shape[0], 10) * 3.0


def test_seed_makes_runs_reproducible():
    stream = tensor_stream(DOMAINS, batch_size=16)
    runs = [run_stream(NoisyModel(), stream, device="cpu", seed=s, progress=False, keep_predictions=True)
            for s in (3, 3, 4)]
    assert torch.equal(runs[0].predictions, runs[1].predictions)
    assert not torch.equal(runs[0].predictions, runs[2].predictions)
    assert runs[0].domain_errors == runs[1].domain_errors


def test_nonfinite_batch_skipped_reported_and_state_unchanged(capsys):
    xa, ya = domain_data(48, 0.0, 1)
    poisoned = xa.clone()
    poisoned[20, 0, 3, 3] = float("nan")  # second batch of 16
    stream = TensorStream([("a", poisoned, ya)], batch_size=16)
    clean = TensorStream([("a", torch.cat([xa[:16], xa[32:]]), torch.cat([ya[:16], ya[32:]]))], batch_size=16)

    adapter = tta.adapt(tiny_cnn(), "tent")
    reference = copy.deepcopy(adapter)
    result = run_stream(adapter, stream, device="cpu", progress=False, keep_predictions=True, log=print)
    assert result.skipped_batches == 1 and result.skipped_images == 16
    assert result.steps == 2
    assert (result.predictions[16:32] == -1).all()
    # the adapter ends exactly where a run over the clean batches only ends
    ref_preds = torch.cat([reference(b.x).argmax(1) for b in clean])
    assert_same_tensors(model_tensors(adapter), model_tensors(reference))
    assert torch.equal(torch.cat([result.predictions[:16], result.predictions[32:]]), ref_preds)
    # skipped samples count as errors
    wrong = int((ref_preds != clean.segments[0][2]).sum()) + 16
    assert result.domain_errors["a"] == pytest.approx(100 * wrong / 48)
    assert "skipped 1 batch(es) (16 images)" in capsys.readouterr().out

    with pytest.raises(NonFiniteInputError):
        run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", progress=False, on_nonfinite="raise")


def test_unlabeled_stream_reports_throughput_and_predictions():
    stream = tensor_stream(DOMAINS, batch_size=16, labeled=False)
    result = run_stream(tta.adapt(tiny_cnn(), "bn"), stream, device="cpu", progress=False, keep_predictions=True)
    assert result.domain_errors == {} and result.mean_error is None and result.accuracy is None
    assert result.images == sum(DOMAINS.values())
    assert result.predictions.shape == (result.images,)
    assert result.images_per_s > 0


def test_progress_bar_and_log_lines(capsys):
    stream = tensor_stream(DOMAINS, batch_size=16)
    result = run_stream(tta.adapt(tiny_cnn(), "bn"), stream, device="cpu", progress=True)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.out.splitlines() if ln.startswith(("error %", "mean error"))]
    assert lines == [f"error % [{d}][#samples={result.domain_images[d]}]: {result.domain_errors[d]:.2f}%"
                     for d in DOMAINS] + [f"mean error: {result.mean_error:.2f}%"
    ]
    for d in DOMAINS:  # one bar per domain, sized by the stream
        assert f"{d}: 100%" in captured.err
    assert "acc=" in captured.err


def test_prefetch_and_synchronous_loading_agree():
    stream = tensor_stream(DOMAINS, batch_size=16)
    a = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", prefetch=3, progress=False, keep_predictions=True)
    b = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", prefetch=0, progress=False, keep_predictions=True)
    assert torch.equal(a.predictions, b.predictions)


def test_stream_error_propagates_from_prefetch_thread():
    class Broken(Stream):
        domains = ["a"]
        domain_sizes = {"a": 64}

        def __iter__(self):
            x, y = domain_data(16, 0.0, 1)
            yield Batch(x, y, "a")
            raise OSError("corrupt file a.npy")

    with pytest.raises(OSError, match="corrupt file"):
        run_stream(tta.adapt(tiny_cnn(), "bn"), Broken(), device="cpu", progress=False)


def test_amp_bf16_on_cpu():
    stream = tensor_stream({"a": 32}, batch_size=16)
    result = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", amp=True, progress=False)
    assert result.amp == "bfloat16"
    assert result.steps == 2
    with pytest.raises(ConfigError, match="amp"):
        run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", amp="int8", progress=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_run_matches_cpu_reference(amp):
    """Pinned-memory prefetch, asynchronous copies and fp16 autocast on the GPU."""
    stream = tensor_stream(DOMAINS, batch_size=16)
    cpu = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cpu", progress=False, keep_predictions=True)
    gpu = run_stream(tta.adapt(tiny_cnn(), "tent"), stream, device="cuda", amp=amp, progress=False,
                     keep_predictions=True)
    assert gpu.device.startswith("cuda") and gpu.amp == ("float16" if amp else None)
    agree = (gpu.predictions == cpu.predictions).float().mean().item()
    assert agree > (0.9 if amp else 0.98)
    assert gpu.steps == cpu.steps

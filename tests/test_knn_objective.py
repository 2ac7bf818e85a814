"""The kNN-vote source objective (`tta train-source --objective knn`): loss, queue, schedule, probe, card."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tta
from tta.errors import ConfigError
from tta.models.knn_objective import (
    FeatureQueue,
    annealed_temperature,
    fit_linear_probe,
    knn_vote_loss,
    knn_vote_scores,
)


def rederived_loss(feats: torch.Tensor, labels: torch.Tensor, queue: torch.Tensor, queue_labels: torch.Tensor,
                   num_classes: int, k: int, tau: float) -> torch.Tensor:
    """The objective spelled out the way the AdaNPC paper writes it: a dense one-hot vote, no tiling."""
    sims = F.normalize(feats, dim=1) @ F.normalize(queue, dim=1).T           # (B, M) cosine
    top, idx = sims.topk(k, dim=1)                                            # k nearest queue rows
    weights = torch.exp(top / tau) / torch.exp(top / tau).sum(1, keepdim=True)
    onehot = torch.zeros(feats.shape[0], k, num_classes)
    onehot.scatter_(2, queue_labels[idx].unsqueeze(2), 1.0)                   # (B, k, C)
    scores = (onehot * weights.unsqueeze(2)).sum(1)                           # (B, C)
    picked = scores[torch.arange(feats.shape[0]), labels]
    return -torch.log(torch.clamp(picked + 1e-5, max=1.0)).mean()


def test_loss_and_gradient_match_an_independent_rederivation():
    torch.manual_seed(1)
    feats = torch.randn(5, 4, dtype=torch.float64).float().requires_grad_(True)
    queue_raw = torch.randn(9, 4)
    queue_labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    labels = torch.tensor([0, 2, 1, 1, 0])
    queue = F.normalize(queue_raw, dim=1)

    loss = knn_vote_loss(knn_vote_scores(feats, queue, queue_labels, 3, 4, 0.3), labels)
    (grad,) = torch.autograd.grad(loss, feats)
    feats2 = feats.detach().clone().requires_grad_(True)
    want = rederived_loss(feats2, labels, queue_raw, queue_labels, 3, 4, 0.3)
    (want_grad,) = torch.autograd.grad(want, feats2)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)
    assert loss.item() > 0


def test_loss_by_hand_with_one_neighbour():
    # k = 1: the vote is the nearest row's label with weight 1
    queue = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    queue_labels = torch.tensor([0, 1])
    feats = torch.tensor([[2.0, 0.1], [0.1, 3.0]])      # nearest rows: 0, 1
    scores = knn_vote_scores(feats, queue, queue_labels, 2, 1, 0.1)
    torch.testing.assert_close(scores, torch.eye(2))
    assert knn_vote_loss(scores, torch.tensor([0, 1])).item() == pytest.approx(-math.log(1.0), abs=1e-6)
    # both wrong: each true class gets 0 votes -> -log(1e-5)
    assert knn_vote_loss(scores, torch.tensor([1, 0])).item() == pytest.approx(-math.log(1e-5), rel=1e-5)


def test_queue_is_a_ring_buffer_of_normalised_rows():
    q = FeatureQueue(4, 2)
    q.push(torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), torch.tensor([0, 1, 2]))
    feats, labels = q.rows()
    assert q.count == 3 and labels.tolist() == [0, 1, 2]
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))
    q.push(torch.tensor([[5.0, 0.0], [0.0, 5.0]]), torch.tensor([3, 4]))  # overwrites the oldest row (slot 0)
    feats, labels = q.rows()
    assert q.count == 4 and labels.tolist() == [4, 1, 2, 3]
    q.push(torch.rand(9, 2), torch.arange(9))  # more than the queue: the newest 4 survive
    assert sorted(q.rows()[1].tolist()) == [5, 6, 7, 8]
    with pytest.raises(ConfigError):
        FeatureQueue(0, 2)


def test_temperature_is_annealed_linearly_from_1_to_0_1():
    assert annealed_temperature(0, 101) == pytest.approx(1.0)
    assert annealed_temperature(50, 101) == pytest.approx(0.55)
    assert annealed_temperature(100, 101) == pytest.approx(0.1)
    assert annealed_temperature(500, 101) == pytest.approx(0.1)


def test_linear_probe_separates_separable_features():
    torch.manual_seed(0)
    centers = torch.eye(3, 5) * 4
    labels = torch.arange(300) % 3
    feats = centers[labels] + 0.3 * torch.randn(300, 5)
    weight, bias, loss = fit_linear_probe(feats, labels, 3)
    assert weight.shape == (3, 5) and bias.shape == (3,)
    assert ((feats @ weight.T + bias).argmax(1) == labels).all() and loss < 0.1


def test_train_config_validates_the_knn_options():
    from tta.models.training import TrainConfig

    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(objective="triplet").resolved()
    with pytest.raises(ConfigError, match="knn_k"):
        TrainConfig(objective="knn", knn_queue=8, knn_k=9).resolved()
    with pytest.raises(ConfigError, match="memory_dtype"):
        TrainConfig(objective="knn", memory_dtype="int8").resolved()


@pytest.mark.data
def test_train_source_knn_writes_card_probe_and_memory(tmp_path: Path, monkeypatch) -> None:
    """End to end on a tiny subset: the pipeline (card, probe head, memory, recorded command), not accuracy."""
    from tta.adapters.adanpc import load_memory
    from tta.cli import main
    from tta.models import get_card

    monkeypatch.setenv("TTA_MODELS_DIR", str(tmp_path))
    out = tmp_path / "tinyknn"
    argv = ["train-source", "--objective", "knn", "--epochs", "1", "--out", str(out), "--arch-kwargs", '{"width": 4}',
            "--batch-size", "64", "--limit-train", "256", "--limit-test", "100", "--seed", "3", "--no-progress",
            "--knn-queue", "128", "--knn-k", "5", "--memory-rows", "200"]
    assert main(argv) == 0
    card = get_card(out.with_suffix(".yaml"))
    assert "--objective knn --knn-queue 128 --knn-k 5 --memory-dtype float16 --memory-rows 200" in card.command
    knn = card.training["knn"]
    assert card.training["objective"] == "knn" and knn["queue"] == 128 and knn["k"] == 5
    assert knn["clean_accuracy_linear_probe"] == card.clean_accuracy
    assert 0 <= knn["clean_accuracy_knn_vote"] <= 100 and knn["clean_correct_knn_vote"] <= 100
    feats, labels, num_classes, meta = load_memory(tmp_path / "tinyknn.memory.safetensors")
    assert feats.shape == (200, 16) and feats.dtype == torch.float16 and num_classes == 10
    assert meta["checkpoint_sha256"] == card.sha256 and meta["rows"] == "200"
    # the head is the linear probe, not the random initialisation: it fits the training features
    model = tta.models.load(card)
    assert model.model.fc.weight.abs().sum() > 0
    # AdaNPC finds the memory from the card name alone; with extend_memory=False the vote is the
    # card's recorded kNN accuracy
    from tta.streams.fashion_mnist import load_fashion_mnist

    images, test_labels = load_fashion_mnist("test")
    x = torch.from_numpy(images[:100].transpose(0, 3, 1, 2).copy()).float() / 255
    adapter = tta.adapt(model, "adanpc", memory="tinyknn", extend_memory=False)
    with torch.no_grad():
        correct = sum(int((adapter(x[i:i + 50]).argmax(1) == torch.from_numpy(test_labels[i:i + 50])).sum())
                      for i in (0, 50))
    assert adapter.memory.num_test == 0
    assert correct == knn["clean_correct_knn_vote"]


@pytest.mark.data
@pytest.mark.slow  # 10,000 test images against 60,000 rows
def test_shipped_knn_card_memory_reproduces_the_recorded_vote_accuracy() -> None:
    """models/resnet20-fmnist-knn: AdaNPC finds the shipped memory from the card name, and its vote
    without adaptation (extend_memory=False) gives the card's recorded kNN clean accuracy."""
    from tta.models import get_card
    from tta.streams.fashion_mnist import load_fashion_mnist

    card = get_card("resnet20-fmnist-knn")
    knn = card.training["knn"]
    adapter = tta.adapt(tta.models.load(card), "adanpc", memory=card.name, extend_memory=False)
    assert adapter.memory.num_source == knn["memory_rows"] == 60000
    images, labels = load_fashion_mnist("test")
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels).long()
    with torch.inference_mode():
        correct = sum(int((adapter(x[i:i + 500].float() / 255).argmax(1) == y[i:i + 500]).sum())
                      for i in range(0, len(y), 500))
    assert adapter.memory.num_test == 0
    assert correct == knn["clean_correct_knn_vote"], f"{correct / 100:.2f}% vs card {knn['clean_accuracy_knn_vote']}%"


@pytest.mark.data
def test_training_pushes_each_batch_into_the_queue_after_its_step(tmp_path: Path, monkeypatch) -> None:
    """The reference's update order (``KNN.update``): the batch votes against the queue as it stands,
    the step is taken, then the batch's features from that forward pass (detached) and its labels
    overwrite the oldest queue rows, so the next batch votes against them."""
    from tta.models import knn_objective, training

    votes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = []
    losses: list[torch.Tensor] = []
    pushes: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def recording_vote(features, memory, memory_labels, num_classes, k, temperature):
        votes.append((features.detach().clone(), memory.clone(), memory_labels.clone(), temperature))
        return knn_objective.knn_vote_scores(features, memory, memory_labels, num_classes, k, temperature)

    def recording_loss(scores, labels):
        losses.append(labels.clone())
        return knn_objective.knn_vote_loss(scores, labels)

    class RecordingQueue(knn_objective.FeatureQueue):
        def push(self, features, labels):
            pushes.append((features.detach().clone(), labels.clone(), self.ptr))
            super().push(features, labels)

    monkeypatch.setattr(training, "knn_vote_scores", recording_vote)
    monkeypatch.setattr(training, "knn_vote_loss", recording_loss)
    monkeypatch.setattr(training, "FeatureQueue", RecordingQueue)
    cfg = training.TrainConfig(objective="knn", epochs=1, batch_size=32, limit_train=128, limit_test=50,
                               arch_kwargs={"width": 4}, knn_queue=48, knn_k=5, memory_rows=64,
                               out=str(tmp_path / "q"), optimizer="adamw", lr=1e-2, weight_decay=0.0)
    training.train_source(cfg, progress=False)

    steps = 128 // 32
    train_votes = votes[:steps]  # later calls: the evaluation of the finished network
    assert len(pushes) == 1 + steps and len(losses) == steps  # the prefill, then one push per step
    assert pushes[0][0].shape[0] == 48 and pushes[0][2] == 0
    for i in range(steps):
        feats, labels, ptr = pushes[1 + i]
        vote_feats, _, _, tau = train_votes[i]
        torch.testing.assert_close(feats, vote_feats)  # the features the batch was voted with, before the step
        assert torch.equal(labels, losses[i])
        assert ptr == (48 + 32 * i) % 48
        assert tau == pytest.approx(annealed_temperature(i, steps))
        if i + 1 < steps:  # the next step votes against a queue holding this batch, normalised
            _, memory, memory_labels, _ = train_votes[i + 1]
            slots = (ptr + torch.arange(32)) % 48
            torch.testing.assert_close(memory[slots], F.normalize(feats, dim=1))
            assert torch.equal(memory_labels[slots], labels)

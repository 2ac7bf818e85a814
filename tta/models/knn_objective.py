"""The kNN-vote training objective of AdaNPC's source model and the linear probe of its card.

AdaNPC (Zhang et al., ICML 2023) trains its source network as "ERM with a non-parametric
classifier" (yfzhang114/AdaNPC, ``domainbed/algorithms.py`` class ``KNN``): each training batch is
classified by a kNN vote against a queue of recent training features, and the loss is the negative
log of the vote for the true class. The features are thereby shaped for the vote that classifies
them at test time. Per step:

1. features f of the batch, L2-normalised; cosine similarity to every queue row;
2. the top-k rows vote: scores[c] = sum over the k neighbours of softmax(sim / tau) * [label == c];
3. loss = mean over the batch of -log(min(scores[y] + 1e-5, 1));
4. after the step the batch's (detached, normalised) features and labels overwrite the oldest rows
   of the queue (a ring buffer).

tau is annealed linearly from 1.0 towards 0.1 over training (the reference:
``tau = 1 - 0.9 * step / 5000`` over its 5,000 steps). Differences from the reference: the queue
starts filled with features of random training images under the initial network instead of random
vectors all labelled 0, and tau reaches 0.1 exactly at the last step of whatever length training has.

Such a network has no trained linear head; the card's head is a linear probe (multinomial logistic
regression fitted on the frozen training features), so logit-based adapters (source, BN, TENT) run
on the same card and the kNN vote and the probe can be compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tta import ops
from tta.errors import ConfigError

#: added to the vote before the log (the reference's value): a true class outside the top-k costs -log(1e-5)
VOTE_EPS = 1e-5


class FeatureQueue:
    """Ring buffer of the `size` most recent L2-normalised training features with their labels."""

    def __init__(self, size: int, dim: int, device: torch.device | str = "cpu") -> None:
        if size < 1 or dim < 1:
            raise ConfigError(f"FeatureQueue needs size >= 1 and dim >= 1, got {size}, {dim}")
        self.features = torch.zeros((size, dim), device=device)
        self.labels = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.ptr = 0
        self.count = 0

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Overwrite the oldest rows with `features` (normalised here, detached) and `labels`."""
        features, labels = features[-self.size :], labels[-self.size :]
        n = features.shape[0]
        slots = (self.ptr + torch.arange(n, device=self.features.device)) % self.size
        self.features[slots] = F.normalize(features.detach().float(), dim=1)
        self.labels[slots] = labels.to(self.labels.device)
        self.ptr = (self.ptr + n) % self.size
        self.count = min(self.count + n, self.size)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (count, D), labels (count,)) of the filled rows (filled from row 0 on)."""
        return self.features[: self.count], self.labels[: self.count]


def knn_vote_scores(features: torch.Tensor, memory: torch.Tensor, memory_labels: torch.Tensor, num_classes: int,
                    k: int, temperature: float) -> torch.Tensor:
    """Class scores (B, C) of the cosine top-k softmax vote; differentiable w.r.t. `features`.

    `memory` rows must be L2-normalised. When k exceeds the rows, every row votes.
    """
    if memory.shape[0] == 0:
        raise ConfigError("knn_vote_scores: the memory is empty")
    queries = F.normalize(features.float(), dim=1)
    return ops.knn_vote(queries, memory, memory_labels, num_classes, k, temperature, metric="ip")


def knn_vote_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean negative log of the vote for the true class (the reference's ``nll(log(scores))``)."""
    return F.nll_loss(torch.log((scores + VOTE_EPS).clamp(max=1.0)), labels)


def annealed_temperature(step: int, total_steps: int, start: float = 1.0, end: float = 0.1) -> float:
    """Linear schedule: `start` at step 0, `end` at the last step (``total_steps - 1``)."""
    if total_steps <= 1:
        return end
    frac = min(max(step / (total_steps - 1), 0.0), 1.0)
    return start + (end - start) * frac


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4,
                     max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Multinomial logistic regression on frozen features, full-batch L-BFGS (deterministic).

    Minimises mean cross-entropy + `weight_decay` * ||W||^2 / 2 (the bias is not decayed).
    Returns (weight (C, D), bias (C,), final training loss).
    """
    x = features.float()
    weight = torch.zeros((num_classes, x.shape[1]), requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
        final = float(closure().detach())
    return weight.detach(), bias.detach(), final

"""tta::knn_vote: compiled kernels against the torch reference, neighbour sets with tie tolerance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tta.ops
from tta.errors import InvalidInputError
from tta.ops import reference
from ops_testing import DEVICES, requires_compiled

pytestmark = requires_compiled

#: similarity gap under which two memory rows count as tied at the k-th place
TIE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def true_similarity(q, mem, idx, metric):
    """fp64 similarity of each (query, returned index) pair, the arbiter of near-ties."""
    q64, m64 = q.double(), mem.double()
    rows = m64[idx.clamp_min(0)]  # (B, k, D)
    if metric == "cosine":
        return F.cosine_similarity(q64[:, None], rows, dim=-1, eps=1e-12)
    if metric == "ip":
        return (q64[:, None] * rows).sum(-1)
    return -(q64[:, None] - rows).square().sum(-1)


def assert_same_neighbours(q, mem, got, want, metric, tie, max_swap_fraction=0.02):
    """Neighbour sets agree except for near-ties at the boundary; similarities are exact."""
    (_, gi, gs), (_, wi, ws) = got, want
    valid = wi >= 0
    assert torch.equal(gi >= 0, valid), "padding differs"
    # reported similarities are the true ones, sorted descending
    true = true_similarity(q, mem, gi, metric)
    scale = 1.0 if metric != "l2" else max(1.0, float(ws[valid].abs().max()))
    torch.testing.assert_close(gs[valid].double(), true[valid], rtol=0, atol=tie * scale)
    assert (gs[:, :-1][valid[:, 1:]] >= gs[:, 1:][valid[:, 1:]]).all(), "not sorted"
    # the sorted similarity profiles agree, whatever the order among ties
    torch.testing.assert_close(gs[valid], ws[valid], rtol=0, atol=tie * scale)
    swaps = 0
    for b in range(q.shape[0]):
        g = set(gi[b][valid[b]].tolist())
        w = set(wi[b][valid[b]].tolist())
        extra = g - w
        if not extra:
            continue
        boundary = ws[b][valid[b]].min()
        extra_sims = true_similarity(q[b : b + 1], mem, torch.tensor([sorted(extra)]), metric)[0]
        assert (extra_sims >= boundary.double() - tie * scale).all(), f"query {b}: a non-neighbour was returned"
        swaps += len(extra)
    assert swaps <= max_swap_fraction * int(valid.sum()) + 2


def vote_of(sims, idx, labels, num_classes, temperature):
    """The vote recomputed from an op's own neighbours (checks the fused vote exactly)."""
    valid = idx >= 0
    w = torch.softmax(sims.masked_fill(~valid, float("-inf")) / temperature, dim=1).nan_to_num(0.0)
    return torch.zeros(idx.shape[0], num_classes, dtype=torch.float32, device=idx.device).scatter_add_(
        1, labels[idx.clamp_min(0)], w * valid
    )


CASES = [
    # B, M, D, C, k
    (64, 5000, 32, 10, 100),
    (7, 3000, 33, 13, 256),
    (5, 50, 8, 4, 100),  # k > M: every row votes
    (3, 1, 8, 4, 5),
    (33, 70000, 16, 10, 10),  # several tiles
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
@pytest.mark.parametrize("mem_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-M{}-D{}-C{}-k{}".format(*c))
def test_matches_reference(case, mem_dtype, metric, device):
    B, M, D, C, k = case
    q = torch.randn(B, D, device=device)
    mem = torch.randn(M, D, device=device).to(mem_dtype)
    labels = torch.randint(0, C, (M,), device=device)
    got = torch.ops.tta.knn_vote(q, mem, labels, C, k, 0.1, metric)
    want = reference.knn_vote(q, mem, labels, C, k, 0.1, metric)
    assert got[0].shape == (B, C) and got[1].shape == (B, k) and got[2].shape == (B, k)
    assert got[1].dtype == torch.int64 and got[0].dtype == torch.float32
    assert_same_neighbours(q.cpu(), mem.float().cpu(), [t.cpu() for t in got], [t.cpu() for t in want], metric, TIE[torch.float32])
    torch.testing.assert_close(got[0], vote_of(got[2], got[1], labels, C, 0.1), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(got[0].sum(1), torch.ones(B, device=device))
    if k > M:
        assert (got[1][:, M:] == -1).all() and torch.isinf(got[2][:, M:]).all()
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_queries(device):
    q = torch.randn(16, 24, device=device)
    mem = F.normalize(torch.randn(2000, 24, device=device), dim=1)
    labels = torch.randint(0, 10, (2000,), device=device)
    for dtype in (torch.float16, torch.bfloat16):
        got = torch.ops.tta.knn_vote(q.to(dtype), mem.to(dtype), labels, 10, 20, 0.1, "ip")
        want = reference.knn_vote(q.to(dtype), mem.to(dtype), labels, 10, 20, 0.1, "ip")
        assert_same_neighbours(q.to(dtype).float().cpu(), mem.to(dtype).float().cpu(), [t.cpu() for t in got],
                               [t.cpu() for t in want], "ip", TIE[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_memory_votes_nothing(device):
    q = torch.randn(4, 8, device=device)
    scores, idx, sims = torch.ops.tta.knn_vote(q, q.new_empty(0, 8), torch.empty(0, dtype=torch.long, device=device), 3, 5, 0.1, "cosine")
    assert (scores == 0).all() and (idx == -1).all() and torch.isinf(sims).all()


def test_exact_votes_on_known_memory():
    # memory = 3 orthogonal directions; the query is closest to row 1 (label 2)
    mem = torch.eye(3, 4)
    labels = torch.tensor([0, 2, 1])
    q = torch.tensor([[0.1, 1.0, 0.2, 0.0]])
    scores, idx, sims = tta.ops.knn_vote(q, mem, labels, 3, 2, 0.5, "cosine", return_neighbors=True)
    cos = F.cosine_similarity(q, mem)
    assert idx.tolist() == [[1, 2]]
    w = torch.softmax(cos[[1, 2]] / 0.5, 0)
    torch.testing.assert_close(scores[0], torch.tensor([0.0, w[1], w[0]]))


def test_bad_arguments():
    q, mem = torch.randn(2, 4), torch.randn(6, 4)
    labels = torch.zeros(6, dtype=torch.long)
    with pytest.raises(InvalidInputError, match="k must be"):
        tta.ops.knn_vote(q, mem, labels, 3, 300, 0.1)
    with pytest.raises(InvalidInputError, match="metric"):
        tta.ops.knn_vote(q, mem, labels, 3, 2, 0.1, metric="dot")
    with pytest.raises(InvalidInputError, match="labels"):
        tta.ops.knn_vote(q, mem, labels[:5], 3, 2, 0.1)
    with pytest.raises(InvalidInputError, match=r"\(B, D\)"):
        tta.ops.knn_vote(q, torch.randn(6, 5), labels, 3, 2, 0.1)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.tta.knn_vote(q, mem, labels + 7, 3, 2, 0.1, "cosine")


def test_gradients_use_the_reference():
    q = torch.randn(3, 4, requires_grad=True)
    mem, labels = torch.randn(20, 4), torch.randint(0, 3, (20,))
    tta.ops.knn_vote(q, mem, labels, 3, 5, 0.1)[:, 0].sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def _knn_samples():
    mem = torch.randn(300, 16)
    labels = torch.randint(0, 5, (300,))
    return [
        (torch.randn(8, 16), mem, labels, 5, 10, 0.1, "cosine"),
        (torch.randn(8, 16), mem.half(), labels, 5, 10, 0.1, "ip"),
        (torch.randn(4, 16), mem[:7], labels[:7], 5, 20, 0.2, "l2"),
        (torch.randn(4, 16).t().contiguous().t(), mem.bfloat16(), labels, 6, 256, 0.05, "cosine"),
    ]


@pytest.mark.parametrize("sample", range(4))
def test_opcheck_knn_vote(sample):
    torch.library.opcheck(torch.ops.tta.knn_vote.default, _knn_samples()[sample])


@pytest.mark.slow
def test_torch_compile_fullgraph_equals_eager():
    torch._dynamo.reset()

    def f(q, mem, labels):
        return tta.ops.knn_vote(q * 2, mem, labels, 7, 16, 0.1, "cosine").argmax(1)

    q, mem, labels = torch.randn(9, 12), torch.randn(500, 12).half(), torch.randint(0, 7, (500,))
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, mem, labels), f(q, mem, labels))


# The CUDA kernel cuts each query's memory scan into ranges (one block per query and range, then a
# merge of the ranges' lists): one query over many ranges, M not a multiple of the range count,
# k=256 over two ranges, and a second memory tile (9 rows per range) whose ranges hold fewer rows
# than k.
SPLIT_CASES = [
    # B, M, D, C, k
    (1, 100_003, 16, 10, 100),
    (1, 3000, 8, 5, 256),
    (2, 70_001, 8, 5, 256),
    (100, 671_088 + 50, 4, 10, 100),
]


@pytest.mark.parametrize("device", DEVICES[1:])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "B{}-M{}-D{}-C{}-k{}".format(*c))
def test_split_scan_matches_reference(case, metric, device):
    B, M, D, C, k = case
    q = torch.randn(B, D, device=device)
    mem = torch.randn(M, D, device=device)
    labels = torch.randint(0, C, (M,), device=device)
    got = torch.ops.tta.knn_vote(q, mem, labels, C, k, 0.1, metric)
    want = reference.knn_vote(q, mem, labels, C, k, 0.1, metric)
    assert (got[1] >= 0).all() and (got[1] < M).all()
    assert all(len(set(row)) == k for row in got[1].tolist()), "a neighbour was returned twice"
    assert_same_neighbours(q.cpu(), mem.cpu(), [t.cpu() for t in got], [t.cpu() for t in want], metric, TIE[torch.float32])
    torch.testing.assert_close(got[0], vote_of(got[2], got[1], labels, C, 0.1), rtol=1e-4, atol=2e-5)

"""EATA / ETA: sample selection, re-weighting, the moving probability average and the Fisher
regulariser against hand derivations; the Fisher artefact (computation, file, CLI, card rule)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tta
from norm_oracle import affine_bn_model, bn_logits, entropy, leaf
from tta.adapters.eata import compute_fisher, fisher_path_for_card, load_fisher, save_fisher
from tta.errors import ConfigError, DataNotFoundError, InvalidInputError

C, N = 5, 16


def features(seed: int, n: int = N) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, C, generator=g) * torch.linspace(0.5, 2.0, C)


def source_affine(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(C, generator=g) * 2 + 1.5, torch.randn(C, generator=g) * 0.3


def eta_oracle_step(feats, gamma, beta, model_probs, d_margin, lr, fisher=None, anchor=None, alpha=0.0):
    """One ETA/EATA step by hand: (logits, selected mask, new gamma, new beta, new model_probs)."""
    g, b = leaf(gamma), leaf(beta)
    z = bn_logits(feats, g, b)
    h = entropy(z)
    e0 = 0.4 * math.log(C)
    p = torch.softmax(z.detach(), 1)
    sel = h.detach() < e0
    if model_probs is not None:
        cos = (p @ model_probs) / (p.norm(dim=1) * model_probs.norm())
        sel = sel & (cos.abs() < d_margin)
    if not bool(sel.any()):
        return z.detach(), sel, gamma, beta, model_probs
    hs = h[sel]
    loss = (hs / torch.exp(hs.detach() - e0)).mean()
    if fisher is not None:
        loss = loss + alpha * ((fisher[0] * (g - anchor[0]) ** 2).sum() + (fisher[1] * (b - anchor[1]) ** 2).sum())
    loss.backward()
    new_probs = p[sel].mean(0) if model_probs is None else 0.9 * model_probs + 0.1 * p[sel].mean(0)
    return z.detach(), sel, (g - lr * g.grad).detach(), (b - lr * b.grad).detach(), new_probs


def test_eta_selection_reweighting_and_probability_average_match_a_hand_derivation():
    gamma, beta = source_affine()
    lr, d_margin = 0.5, 0.6
    adapter = tta.adapt(affine_bn_model(gamma, beta), "eta", optimizer="sgd", lr=lr, momentum=0.0, d_margin=d_margin)
    probs, reliable, selected = None, 0, 0
    saw_redundant = False
    for step, seed in enumerate((1, 2, 3)):
        feats = features(seed)
        out = adapter(feats.view(N, C, 1, 1))
        z, sel, gamma, beta, probs = eta_oracle_step(feats, gamma, beta, probs, d_margin, lr)
        h = entropy(z)
        reliable += int((h < 0.4 * math.log(C)).sum())
        selected += int(sel.sum())
        saw_redundant |= bool(((h < 0.4 * math.log(C)) & ~sel).any())
        assert 0 < int(sel.sum()) < N, f"step {step}: the test needs a partial selection"
        torch.testing.assert_close(out, z, atol=1e-5, rtol=1e-5)  # the prediction before the update
        bn = adapter.model[1]
        torch.testing.assert_close(bn.weight.detach(), gamma, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(bn.bias.detach(), beta, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(adapter.model_probs, probs, atol=1e-6, rtol=1e-5)
    assert saw_redundant, "the redundancy filter must drop a reliable sample somewhere in the test"
    assert adapter.counters["reliable"] == reliable and adapter.counters["selected"] == selected


def test_nothing_selected_means_no_step_and_no_average():
    gamma, beta = source_affine()
    adapter = tta.adapt(affine_bn_model(gamma * 0.01, beta * 0), "eta", optimizer="sgd", lr=0.5, momentum=0.0)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    adapter(features(1).view(N, C, 1, 1))  # near-uniform predictions: every entropy is above 0.4 ln C
    assert adapter.counters["selected"] == 0 and adapter.model_probs is None
    for k, v in adapter.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def fisher_oracle(images: torch.Tensor, gamma, beta, batch_size: int):
    """Mean over batches of the squared gradient of CE(logits, argmax logits), by hand."""
    sums = [torch.zeros(C), torch.zeros(C)]
    batches = 0
    for start in range(0, images.shape[0], batch_size):
        g, b = leaf(gamma), leaf(beta)
        z = bn_logits(images[start : start + batch_size].flatten(1), g, b)
        labels = z.detach().argmax(1)
        loss = -torch.log_softmax(z, 1)[torch.arange(z.shape[0]), labels].mean()
        loss.backward()
        sums[0] += g.grad**2
        sums[1] += b.grad**2
        batches += 1
    return sums[0] / batches, sums[1] / batches


def test_compute_fisher_matches_a_hand_derivation():
    gamma, beta = source_affine(3)
    images = torch.rand(10, C, 1, 1, generator=torch.Generator().manual_seed(5))
    fisher = compute_fisher(affine_bn_model(gamma, beta), images, batch_size=4)  # batches of 4, 4, 2
    want_g, want_b = fisher_oracle(images, gamma, beta, 4)
    assert sorted(fisher) == ["1.bias", "1.weight"]
    torch.testing.assert_close(fisher["1.weight"], want_g, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(fisher["1.bias"], want_b, atol=1e-7, rtol=1e-5)
    assert float(want_g.sum()) > 0
    # uint8 images are scaled to [0, 1] as the stream delivers them
    as_bytes = (images * 255).round().to(torch.uint8)
    f8 = compute_fisher(affine_bn_model(gamma, beta), as_bytes, batch_size=4)
    want8 = fisher_oracle(as_bytes.float() / 255, gamma, beta, 4)
    torch.testing.assert_close(f8["1.weight"], want8[0], atol=1e-7, rtol=1e-5)


def test_eata_regulariser_matches_a_hand_derivation():
    gamma0, beta0 = source_affine()
    fisher = {"1.weight": torch.rand(C) * 0.2, "1.bias": torch.rand(C) * 0.2}
    lr, alpha, d_margin = 0.5, 40.0, 0.6
    adapter = tta.adapt(affine_bn_model(gamma0, beta0), "eata", optimizer="sgd", lr=lr, momentum=0.0,
                        d_margin=d_margin, fisher_alpha=alpha)
    adapter.set_fisher(fisher)
    gamma, beta, probs = gamma0, beta0, None
    for seed in (1, 2, 3):
        adapter(features(seed).view(N, C, 1, 1))
        _, _, gamma, beta, probs = eta_oracle_step(features(seed), gamma, beta, probs, d_margin, lr,
                                                   fisher=(fisher["1.weight"], fisher["1.bias"]),
                                                   anchor=(gamma0, beta0), alpha=alpha)
        torch.testing.assert_close(adapter.model[1].weight.detach(), gamma, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter.model[1].bias.detach(), beta, atol=1e-5, rtol=1e-5)
    # the regulariser changed the trajectory (ETA with the same data ends elsewhere)
    eta = tta.adapt(affine_bn_model(gamma0, beta0), "eta", optimizer="sgd", lr=lr, momentum=0.0, d_margin=d_margin)
    for seed in (1, 2, 3):
        eta(features(seed).view(N, C, 1, 1))
    assert not torch.allclose(eta.model[1].weight, adapter.model[1].weight, atol=1e-4)


def test_eata_without_fisher_fails_before_touching_the_state():
    gamma, beta = source_affine()
    adapter = tta.adapt(affine_bn_model(gamma, beta), "eata", optimizer="sgd", lr=0.5)
    before = adapter.state_dict()
    with pytest.raises(ConfigError, match="tta build-fisher"):
        adapter(features(1).view(N, C, 1, 1))
    after = adapter.state_dict()
    assert after["_extra_state"] == before["_extra_state"]
    for k, v in after.items():
        if k != "_extra_state":
            assert torch.equal(v, before[k]), k
    with pytest.raises(InvalidInputError, match="does not match the trained parameters"):
        adapter.set_fisher({"1.weight": torch.ones(C)})
    with pytest.raises(InvalidInputError, match="shape"):
        adapter.set_fisher({"1.weight": torch.ones(C + 1), "1.bias": torch.ones(C)})
    with pytest.raises(InvalidInputError, match="negative or non-finite"):
        adapter.set_fisher({"1.weight": -torch.ones(C), "1.bias": torch.ones(C)})
    # fisher_alpha = 0 is ETA: no Fisher needed
    tta.adapt(affine_bn_model(gamma, beta), "eata", fisher_alpha=0.0)(features(1).view(N, C, 1, 1))


def test_fisher_file_round_trip_and_bad_files(tmp_path):
    fisher = {"1.weight": torch.rand(C), "1.bias": torch.rand(C)}
    path = save_fisher(tmp_path / "m.fisher.safetensors", fisher, {"card": "m", "samples": 10})
    loaded, meta = load_fisher(path)
    assert meta["card"] == "m" and meta["samples"] == "10"
    for k in fisher:
        assert torch.equal(loaded[k], fisher[k])
    gamma, beta = source_affine()
    adapter = tta.adapt(affine_bn_model(gamma, beta), "eata", fisher=str(path))
    adapter(features(1).view(N, C, 1, 1))
    with pytest.raises(DataNotFoundError, match="tta build-fisher"):
        load_fisher(tmp_path / "missing.fisher.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DataNotFoundError, match="not a readable EATA Fisher file"):
        load_fisher(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "something-else"})
    with pytest.raises(DataNotFoundError, match="not an EATA Fisher file"):
        load_fisher(tmp_path / "other.safetensors")
    with pytest.raises(InvalidInputError):
        save_fisher(tmp_path / "bad.safetensors", {"w": torch.tensor([float("nan")])})


def test_shipped_cards_have_a_fisher_file_for_their_norm_parameters():
    from tta.models import DEFAULT_CARD, VIT_CARD, load

    for card in (DEFAULT_CARD, VIT_CARD):
        fisher, meta = load_fisher(fisher_path_for_card(card))
        assert meta["card"] == card and meta["samples"] == "2000" and meta["command"].startswith("tta build-fisher")
        adapter = tta.adapt(load(card), "eata", fisher=card)
        assert sorted(fisher) == sorted(adapter.norm_param_names)


@pytest.mark.data
def test_build_fisher_cli_writes_beside_the_card_and_the_cli_default_finds_it(tmp_path, capsys):
    import argparse

    import yaml

    from tta.cli import main
    from tta.cli.run import card_defaults
    from tta.models.builders import build_model
    from tta.models.checkpoint import save_state_dict, sha256_file
    from tta.streams.fashion_mnist import default_dir

    if not (default_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed")
    model = build_model("resnet20", num_classes=10, width=4)
    save_state_dict(model.state_dict(), tmp_path / "tiny.safetensors")
    card = {"name": "tiny", "arch": "resnet20", "num_classes": 10, "checkpoint": "tiny.safetensors",
            "sha256": sha256_file(tmp_path / "tiny.safetensors"), "input_size": [3, 32, 32],
            "arch_kwargs": {"width": 4}, "dataset": "fashion-mnist"}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(card))
    assert main(["build-fisher", "--model", str(tmp_path / "tiny.yaml"), "--samples", "48", "--batch-size", "16"]) == 0
    assert "wrote" in capsys.readouterr().out
    path = tmp_path / "tiny.fisher.safetensors"
    fisher, meta = load_fisher(path)
    assert meta["samples"] == "48" and meta["batch_size"] == "16" and meta["card"] == "tiny"
    assert path.stat().st_mode & 0o044  # readable beyond the owner, like the card
    args = argparse.Namespace(model=str(tmp_path / "tiny.yaml"))
    assert card_defaults("eata", {}, args) == {"fisher": str(path)}
    assert card_defaults("eta", {}, args) == {}
    path.unlink()
    with pytest.raises(ConfigError, match="tta build-fisher --model"):
        card_defaults("eata", {}, args)
    assert card_defaults("eata", {"fisher_alpha": 0.0}, args) == {"fisher_alpha": 0.0}
    adapter = tta.adapt(build_model("resnet20", num_classes=10, width=4).eval(), "eata")
    assert sorted(fisher) == sorted(adapter.norm_param_names)

"""CTTA settings (continual, gradual, mixed, Dirichlet order) and YAML stream specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tta.errors import ConfigError, DataNotFoundError
from tta.streams import (
    DEFAULT_SPEC,
    EXTRA_CORRUPTIONS,
    STANDARD_ORDER,
    ArrayDomain,
    ContinualStream,
    GradualStream,
    MixedDomainStream,
    dirichlet_order,
    list_specs,
    load_spec,
)


def domain(n: int, tag: int, classes: int = 10, seed: int = 0) -> ArrayDomain:
    """n images whose red channel holds `tag` and green channel the sample index (mod 256)."""
    img = np.zeros((n, 8, 8, 3), np.uint8)
    img[..., 0] = tag
    img[..., 1] = (np.arange(n) % 256)[:, None, None]
    labels = np.random.default_rng(seed).integers(0, classes, n)
    return ArrayDomain(img, labels)


def run_lengths(labels: np.ndarray) -> float:
    changes = np.count_nonzero(np.diff(labels)) + 1
    return len(labels) / changes


def test_continual_stream_order_sizes_and_batches():
    doms = [("a", domain(50, 10)), ("b", domain(30, 20)), ("c", domain(40, 30))]
    s = ContinualStream(doms, batch_size=16, n_per_domain=32, seed=0)
    assert s.domains == ["a", "b", "c"] and s.domain_sizes == {"a": 32, "b": 30, "c": 32}
    batches = list(s)
    assert len(s) == len(batches) == 2 + 2 + 2
    assert [b.domain for b in batches] == ["a", "a", "b", "b", "c", "c"]
    for b in batches:
        assert b.x.dtype == torch.float32 and b.x.shape[1:] == (3, 8, 8) and 0 <= b.x.min() and b.x.max() <= 1
        tag = {"a": 10, "b": 20, "c": 30}[b.domain]
        assert torch.all((b.x[:, 0] * 255).round() == tag)
        idx = (b.x[:, 1, 0, 0] * 255).round().long().numpy()
        np.testing.assert_array_equal(b.y.numpy(), dict(doms)[b.domain].labels[idx])  # labels follow images
    assert s.reset == "never"


def test_shuffle_vs_file_order_and_seed():
    doms = [("a", domain(40, 1))]
    file_idx = [(b.x[:, 1, 0, 0] * 255).round().long() for b in ContinualStream(doms, 10, order="file")]
    assert torch.equal(torch.cat(file_idx), torch.arange(40))
    first = torch.cat([b.x for b in ContinualStream(doms, 10, seed=3)])
    again = torch.cat([b.x for b in ContinualStream(doms, 10, seed=3)])
    other = torch.cat([b.x for b in ContinualStream(doms, 10, seed=4)])
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted((first[:, 1, 0, 0] * 255).round().long().tolist()) == list(range(40))


def test_gradual_severity_sequence():
    doms = {c: {s: domain(20, s) for s in range(1, 6)} for c in ("fog", "snow", "frost")}
    s = GradualStream(doms, batch_size=10, n_per_domain=10)
    up_down = [1, 2, 3, 4, 5, 4, 3, 2, 1]
    assert s.severity_sequence == up_down * 3
    s5 = GradualStream(doms, batch_size=10, n_per_domain=10, first_from_5=True)
    assert s5.severity_sequence == [5, 4, 3, 2, 1] + up_down * 2
    seen = [(b.domain, int((b.x[0, 0, 0, 0] * 255).round())) for b in s5]
    assert seen[0] == ("fog@5", 5) and seen[4] == ("fog@1", 1) and seen[5] == ("snow@1", 1)
    assert all(int(d.rsplit("@")[1]) == sev for d, sev in seen)  # severity images match the name
    with pytest.raises(ConfigError, match="needs severity 1"):
        GradualStream({"fog": {5: domain(10, 5)}}, 5)


def test_dirichlet_ordering_lengthens_label_runs_as_concentration_falls():
    labels = np.repeat(np.arange(10), 200)
    rng = np.random.default_rng(0)
    runs = {}
    for conc in (0.01, 0.1, 1.0, 100.0):
        order = dirichlet_order(labels, conc, np.random.default_rng(1))
        assert sorted(order.tolist()) == list(range(2000))  # a permutation
        runs[conc] = run_lengths(labels[order])
    assert runs[0.01] > runs[0.1] > runs[1.0] > runs[100.0]
    iid = run_lengths(labels[rng.permutation(2000)])
    assert runs[0.01] > 20 * iid and runs[0.01] > 3 * runs[100.0]
    s = ContinualStream([("a", domain(500, 1))], 50, order="dirichlet", concentration=0.05, seed=0)
    y = torch.cat([b.y for b in s]).numpy()
    assert run_lengths(y) > 5 * run_lengths(domain(500, 1).labels)
    with pytest.raises(ConfigError, match="concentration"):
        ContinualStream([("a", domain(10, 1))], 5, order="dirichlet")


def test_mixed_stream_sets_sample_domains():
    doms = [("a", domain(40, 10)), ("b", domain(40, 20)), ("c", domain(40, 30))]
    s = MixedDomainStream(doms, batch_size=24, n_per_domain=32, seed=0)
    assert s.domains == ["a", "b", "c"] and s.domain_sizes == {"a": 32, "b": 32, "c": 32} and len(s) == 4
    counts = np.zeros(3, int)
    mixed_batches = 0
    for b in s:
        assert b.domain == "mixed" and b.sample_domains.dtype == torch.int64 and len(b.sample_domains) == len(b)
        tags = (b.x[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(tags, (b.sample_domains + 1) * 10)  # each sample from the domain it names
        idx = (b.x[:, 1, 0, 0] * 255).round().long().numpy()
        for d in range(3):
            rows = (b.sample_domains == d).numpy()
            np.testing.assert_array_equal(b.y.numpy()[rows], doms[d][1].labels[idx[rows]])
        counts += np.bincount(b.sample_domains.numpy(), minlength=3)
        mixed_batches += len(torch.unique(b.sample_domains)) > 1
    assert counts.tolist() == [32, 32, 32] and mixed_batches == 4


# ------------------------------------------------------------------------------------------------
# specs

REQUIRED = ("fmnist-c-continual", "fmnist-c-gradual", "fmnist-c-mixed", "fmnist-c-dirichlet",
            "cifar10-c-continual", "cifar100-c-continual", "imagenet-c-continual")


def test_repository_specs_load():
    names = list_specs()
    assert set(REQUIRED) <= set(names) and DEFAULT_SPEC == "fmnist-c-continual"
    for name in names:
        spec = load_spec(name)
        assert spec.name == name
        if spec.role == "validation":  # held-out corruptions only
            assert spec.corruptions and not set(spec.corruptions) & set(STANDARD_ORDER)
        else:
            assert spec.role == "test" and spec.corruptions == STANDARD_ORDER
    d = load_spec(DEFAULT_SPEC)
    assert (d.setting, d.severities, d.reset, d.dataset) == ("continual", (5,), "never", "fashion-mnist-c")
    assert load_spec("fmnist-c-reset-each-shift").reset == "domain"
    assert load_spec("fmnist-c-gradual").setting == "gradual"


def test_spec_with_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError) as err:
        load_spec("fmnist-c-continual").build()
    msg = str(err.value)
    assert str(tmp_path / "fashion-mnist-c") in msg
    assert f"tta make-c --dataset fashion-mnist --out {tmp_path / 'fashion-mnist-c'}" in msg
    with pytest.raises(DataNotFoundError, match="zenodo.org/record/2535967"):
        load_spec("cifar10-c-continual").build()
    with pytest.raises(DataNotFoundError, match="ImageNet-C.*zenodo"):
        load_spec("imagenet-c-continual").build()
    with pytest.raises(DataNotFoundError, match="known specs: .*fmnist-c-continual"):
        load_spec("no-such-spec")


def write_fmnist_c(root: Path, n: int = 20, severities=(1, 2, 3, 4, 5)) -> None:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.save(root / "labels.npy", np.tile(rng.integers(0, 10, n).astype(np.uint8), len(severities)))
    for c in STANDARD_ORDER:
        blocks = []
        for s in severities:
            b = np.zeros((n, 32, 32, 3), np.uint8)
            b[..., 0] = STANDARD_ORDER.index(c)
            b[..., 1] = s
            blocks.append(b)
        np.save(root / f"{c}.npy", np.concatenate(blocks))
    (root / "meta.json").write_text(json.dumps({"severities": list(severities)}))


def test_specs_build_their_settings_from_data(tmp_path, monkeypatch):
    write_fmnist_c(tmp_path / "fashion-mnist-c")
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path))
    s = load_spec("fmnist-c-continual").build(batch_size=8, n_per_domain=10)
    assert s.domains == list(STANDARD_ORDER) and len(s) == 15 * 2 and s.reset == "never"
    for b in s:
        assert int((b.x[0, 0, 0, 0] * 255).round()) == STANDARD_ORDER.index(b.domain)
        assert int((b.x[0, 1, 0, 0] * 255).round()) == 5  # severity 5
    g = load_spec("fmnist-c-gradual").build(n_per_domain=4, batch_size=4)
    assert g.severity_sequence[:6] == [5, 4, 3, 2, 1, 1]
    m = load_spec("fmnist-c-mixed").build(n_per_domain=4)
    assert next(iter(m)).sample_domains is not None
    dirichlet = load_spec("fmnist-c-dirichlet").build(n_per_domain=20, batch_size=20)
    assert len(dirichlet) == 15
    # data_dir may be the set's folder itself; arguments override the spec
    s2 = load_spec(DEFAULT_SPEC).build(data_dir=tmp_path / "fashion-mnist-c", batch_size=5, n_per_domain=5, seed=9)
    assert len(s2) == 15


def test_spec_needing_missing_severities_is_explained(tmp_path):
    write_fmnist_c(tmp_path / "fashion-mnist-c", severities=(5,))
    with pytest.raises(DataNotFoundError, match=r"holds severities \[5\], not \[1, 2, 3, 4\].*tta make-c"):
        load_spec("fmnist-c-gradual").build(data_dir=tmp_path)
    assert len(load_spec(DEFAULT_SPEC).build(data_dir=tmp_path, n_per_domain=4)) == 15


def test_spec_files_are_validated(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("dataset: fashion-mnist-c\ndata: x\nsetting: sideways\n")
    monkeypatch.setenv("TTA_STREAMS_DIR", str(tmp_path))
    assert "mine" in list_specs() and DEFAULT_SPEC in list_specs()
    with pytest.raises(ConfigError, match="setting must be one of"):
        load_spec("mine")
    (tmp_path / "typo.yaml").write_text("dataset: fashion-mnist-c\ndata: x\nbatchsize: 3\n")
    with pytest.raises(ConfigError, match="unknown spec keys \\['batchsize'\\]"):
        load_spec(tmp_path / "typo.yaml")
    (tmp_path / "odd.yaml").write_text("dataset: fashion-mnist-c\ndata: x\ncorruptions: [rain]\n")
    with pytest.raises(ConfigError, match="unknown corruptions"):
        load_spec("odd")


def test_validation_spec_holds_the_held_out_corruptions(tmp_path, monkeypatch):
    val = load_spec("fmnist-c-val")
    assert val.role == "validation" and val.corruptions == EXTRA_CORRUPTIONS
    assert (val.setting, val.severities, val.reset, val.batch_size, val.order) == ("continual", (5,), "never", 200,
                                                                                    "shuffle")
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataNotFoundError) as err:  # the hint makes exactly these corruptions
        val.build()
    assert (f"tta make-c --dataset fashion-mnist --out {tmp_path / 'fashion-mnist-c-val'} --corruptions "
            "speckle_noise,gaussian_blur,spatter,saturate --severities 5") in str(err.value)


def test_recurring_validation_spec_generates_the_held_out_corruptions():
    """fmnist-c-val-recurring: the held-out corruptions in the recurring setting (choosing guard settings
    on a long stream without touching the test corruptions); generated from the clean test split."""
    val = load_spec("fmnist-c-val-recurring")
    assert val.role == "validation" and val.corruptions == EXTRA_CORRUPTIONS and val.setting == "recurring"
    assert (val.recurrences, val.n_per_domain, val.batch_size, val.severities) == (20, 1000, 200, (5,))
    try:
        stream = val.with_overrides(["recurrences=2"]).build(n_per_domain=10, batch_size=5)
    except DataNotFoundError as exc:  # pragma: no cover - the Debian package is installed here
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    batches = list(stream)
    assert len(batches) == 16 and sum(len(b.x) for b in batches) == 80
    assert [b.domain for b in batches[::2]] == [c for c in EXTRA_CORRUPTIONS] * 2
    assert batches[0].x.shape[1:] == (3, 32, 32) and batches[0].y is not None


def test_a_validation_stream_cannot_hold_test_corruptions_or_be_declared_on_the_command_line(tmp_path):
    (tmp_path / "leaky.yaml").write_text("dataset: fashion-mnist-c\ndata: x\nrole: validation\n"
                                         "corruptions: [saturate, fog]\n")
    with pytest.raises(ConfigError, match=r"validation stream must hold held-out corruptions only.*'fog'"):
        load_spec(tmp_path / "leaky.yaml")
    (tmp_path / "odd.yaml").write_text("dataset: fashion-mnist-c\ndata: x\nrole: training\n")
    with pytest.raises(ConfigError, match="role must be one of"):
        load_spec(tmp_path / "odd.yaml")
    for spec in (DEFAULT_SPEC, "fmnist-c-val"):
        with pytest.raises(ConfigError, match="role .* fixed by its spec file"):
            load_spec(spec).with_overrides(["role=validation"])


def test_cifar10_c_and_imagenet_c_specs_build_from_their_layouts(tmp_path, monkeypatch):
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path))
    write_fmnist_c(tmp_path / "CIFAR-10-C", n=10)
    (tmp_path / "CIFAR-10-C" / "meta.json").unlink()  # the downloaded CIFAR-10-C has no meta.json
    s = load_spec("cifar10-c-continual").build()
    assert len(s) == 15 and s.domain_sizes["fog"] == 10
    first = next(iter(s))
    assert first.domain == "gaussian_noise" and int((first.x[0, 1, 0, 0] * 255).round()) == 5

    from test_datasets import write_imagenet_c

    write_imagenet_c(tmp_path / "ImageNet-C", corruptions=("fog", "snow"), severities=(5,))
    spec_file = tmp_path / "inc.yaml"
    spec_file.write_text("dataset: imagenet-c\ndata: ImageNet-C\ncorruptions: [snow, fog]\nbatch_size: 3\n"
                         "resize_crop: [256, 224]\nn_per_domain: null\n")
    s = load_spec(spec_file).build()
    batches = list(s)
    assert s.domains == ["snow", "fog"] and [len(b) for b in batches] == [3, 1, 3, 1]
    assert batches[0].x.shape == (3, 3, 224, 224) and set(batches[0].y.tolist()) <= {0, 1}

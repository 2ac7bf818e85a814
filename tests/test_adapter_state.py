"""Saved adapter states: validated whole before anything is applied, integrity-checked, written atomically.

One rule for `Adapter.load` / `load_state_dict` and `StreamPool.load` (`tta.adapters.state`).
"""

from __future__ import annotations

import os
import random
import signal
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import tta
from tta.adapters.state import read_state, save_state, seal
from tta.fileio import remove_stale_temporaries
from tta.engine import StreamPool
from tta.errors import InvalidInputError, StateMismatchError

from test_adapter_contract import ADAPTERS, assert_same, batch, build


def stepped(name: str, steps: int = 2) -> tta.Adapter:
    adapter = build(name)
    for seed in range(steps):
        adapter(batch(seed))
    return adapter


def rewrite(path: Path, mutate, adapter: tta.Adapter, reseal: bool = True) -> Path:
    """Load a saved state, change it (`mutate(state, adapter)`), write it back (resealed: only the
    content checks can catch it)."""
    state = torch.load(path, weights_only=True)
    mutate(state, adapter)
    out = path.with_name("tampered.pt")
    torch.save(seal(state) if reseal else state, out)
    return out


def last_key(state: dict, adapter: tta.Adapter, trainable: bool) -> str:
    """The last parameter entry of the state (many entries would be applied before it) of the given kind."""
    live = dict(adapter.state_dict(keep_vars=True))
    keys = [k for k, v in live.items() if isinstance(v, torch.Tensor) and k in state
            and isinstance(v, torch.nn.Parameter) and v.requires_grad == trainable]
    return keys[-1]


def _shape(state, adapter):
    key = last_key(state, adapter, trainable=True)
    state[key] = torch.zeros(state[key].shape[0] + 1)


def _nan(state, adapter):
    key = last_key(state, adapter, trainable=True)
    state[key] = state[key].clone().fill_(float("nan"))


def _frozen(state, adapter):
    key = last_key(state, adapter, trainable=False)
    state[key] = state[key] + 0.01


def _optimizer_shape(state, adapter):
    entry = next(iter(state["_extra_state"]["optimizer"]["state"].values()))
    key = next(k for k in entry if k != "step")
    entry[key] = torch.zeros(3)


TAMPERINGS = {
    "wrong shape": (_shape, "has shape"),
    "missing key": (lambda s, a: s.pop(last_key(s, a, trainable=True)), "missing"),
    "extra key": (lambda s, a: s.__setitem__("model.extra.weight", torch.zeros(2)), "unexpected"),
    "counters not a dict": (lambda s, a: s["_extra_state"].__setitem__("counters", [1, 2]), "counters must map"),
    "negative counter": (lambda s, a: s["_extra_state"]["counters"].__setitem__("steps", -1), "counters must map"),
    "nan weight": (_nan, "contains NaN/Inf"),
    "replaced frozen weight": (_frozen, "frozen tensor .* differs"),
    "optimizer entry shape": (_optimizer_shape, "optimizer entry"),
    "optimizer lr inf": (lambda s, a: s["_extra_state"]["optimizer"]["param_groups"][0].__setitem__("lr", float("inf")),
                         "non-finite or invalid 'lr'"),
    "optimizer group sizes": (lambda s, a: s["_extra_state"]["optimizer"]["param_groups"][0]["params"].pop(),
                              "parameter groups of sizes"),
    "generator bytes": (lambda s, a: s["_extra_state"]["generators"].__setitem__("cpu", torch.zeros(3, dtype=torch.uint8)),
                        "generator state of 'cpu' is invalid"),
    "seed": (lambda s, a: s["_extra_state"].__setitem__("seed", -3), "seed must be"),
    "format": (lambda s, a: s["_extra_state"].__setitem__("format", "tta-adapter-state/1"), "state format"),
}

@pytest.mark.parametrize("name", ["tent", "cotta"])
@pytest.mark.parametrize("case", sorted(TAMPERINGS))
def test_load_validates_the_whole_state_before_applying_any_of_it(name, case, tmp_path):
    source = stepped(name)
    path = source.save(tmp_path / "state.pt")
    target = stepped(name, steps=3)  # a different adapted state: a partial load would show
    mutate, msg = TAMPERINGS[case]
    tampered = rewrite(path, mutate, target)
    before = target.state_dict()
    with pytest.raises(StateMismatchError, match=msg):
        target.load(tampered)
    assert_same(before, target.state_dict())
    with pytest.raises(StateMismatchError, match=msg):  # the in-memory entry point: the same rule
        target.load_state_dict(torch.load(tampered, weights_only=True))
    assert_same(before, target.state_dict())
    target.load(path)  # the untampered file loads
    assert_same(source.state_dict(), target.state_dict())


def test_integrity_digest_catches_changed_and_flipped_bytes(tmp_path):
    adapter = stepped("tent")
    path = adapter.save(tmp_path / "state.pt")
    before = adapter.state_dict()

    def nudge(state, adapter):
        key = last_key(state, adapter, trainable=True)
        state[key] = state[key] + 1e-6

    with pytest.raises(StateMismatchError, match="integrity check failed"):
        adapter.load(rewrite(path, nudge, adapter, reseal=False))
    with pytest.raises(StateMismatchError, match="no integrity digest"):
        adapter.load(rewrite(path, lambda s, a: s["_extra_state"].pop("digest"), adapter, reseal=False))
    # 64 flipped bytes inside the stored tensor records (the zip reader checks no CRC): the digest catches them
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        regions = []
        for info in archive.infolist():
            if "/data/" in info.filename:
                name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
                regions.append((info.header_offset + 30 + name_len + extra_len, info.file_size))
    rng = random.Random(0)
    for _ in range(64):
        start, size = rng.choice(regions)
        data[start + rng.randrange(size)] ^= 0xFF
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(StateMismatchError, match="integrity check failed"):
        adapter.load(flipped)
    # ... and anywhere in the file: rejected one way or another, never applied
    for seed in range(5):
        data = bytearray(path.read_bytes())
        rng = random.Random(seed)
        for _ in range(64):
            data[rng.randrange(len(data))] ^= 0xFF
        flipped.write_bytes(bytes(data))
        with pytest.raises(StateMismatchError):
            adapter.load(flipped)
    assert_same(before, adapter.state_dict())


@pytest.mark.parametrize("name", ADAPTERS)
def test_save_load_round_trip_is_bit_exact_for_every_adapter(name, tmp_path):
    source = stepped(name)
    path = source.save(tmp_path / "state.pt")
    assert isinstance(read_state(path)["_extra_state"]["digest"], str)
    target = stepped(name, steps=1)
    target.load(path)
    assert_same(source.state_dict(), target.state_dict())
    for seed in (5, 6):
        torch.testing.assert_close(target(batch(seed)), source(batch(seed)), rtol=0, atol=0)
    assert_same(source.state_dict(), target.state_dict())


def test_adanpc_memory_entry_is_validated(tmp_path):
    adapter = stepped("adanpc")
    path = adapter.save(tmp_path / "state.pt")
    before = adapter.state_dict()
    cases = {
        "dim": (lambda m: m.__setitem__("features", torch.zeros(m["features"].shape[0], 5)), "5-dim rows"),
        "labels": (lambda m: m["labels"].__setitem__(0, 99), r"labels must lie in \[0, 10\)"),
        "nan": (lambda m: m["features"].__setitem__(0, float("nan")), "NaN/Inf"),
        "keys": (lambda m: m.pop("stamps"), "must hold"),
    }
    for mutate, msg in cases.values():
        with pytest.raises(StateMismatchError, match=msg):
            adapter.load(rewrite(path, lambda s, a: mutate(s["_extra_state"]["memory"]), adapter))
        assert_same(before, adapter.state_dict())


def test_stream_pool_load_follows_the_same_rule(tmp_path):
    pool = StreamPool(build("tent"), device="cpu")
    pool.step("a", batch(0))
    path = pool.save("a", tmp_path / "a.pt")
    pool.load("b", path)
    assert_same(pool.get("a").state_dict(), pool.get("b").state_dict())
    a = pool.get("a")
    for mutate, msg in (TAMPERINGS["replaced frozen weight"], TAMPERINGS["wrong shape"]):
        with pytest.raises(StateMismatchError, match=msg):
            pool.load("b", rewrite(path, mutate, a))
    with pytest.raises(StateMismatchError, match="no integrity digest"):
        pool.load("b", rewrite(path, lambda s, _: s["_extra_state"].pop("digest"), a, reseal=False))
    assert_same(pool.get("a").state_dict(), pool.get("b").state_dict())


def test_assign_is_refused():
    adapter = stepped("tent")
    with pytest.raises(InvalidInputError, match="assign=True"):
        adapter.load_state_dict(adapter.state_dict(), assign=True)


# ---------------------------------------------------------------------- writing

KILLED_WRITER = r"""
import sys, time, torch
from tta.adapters.state import save_state

def slow_save(obj, f):
    f.write(b"partial" * 1000)
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

torch.save = slow_save
save_state({"x": torch.zeros(3)}, sys.argv[1])
"""


def test_a_killed_save_leaves_the_target_intact_and_its_temporary_is_removed_next_time(tmp_path):
    target = tmp_path / "state.pt"
    save_state({"x": torch.ones(3)}, target)
    good = target.read_bytes()
    env = {**os.environ, "PYTHONPATH": str(Path(tta.__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, env=env)
    try:
        assert child.stdout.readline().strip() == b"writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    stale = [p for p in tmp_path.iterdir() if p.name != "state.pt"]
    assert len(stale) == 1 and stale[0].name.startswith(".state.pt.") and stale[0].name.endswith(".tmp")
    assert target.read_bytes() == good
    # a temporary of a live writer (this process's parent is alive) is left alone
    live = tmp_path / f".state.pt.{os.getppid()}.0badc0de.tmp"
    live.write_bytes(b"in progress")
    save_state({"x": torch.full((3,), 2.0)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["state.pt", live.name])
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.full((3,), 2.0))
    assert remove_stale_temporaries(target) == []


def test_saved_states_get_the_permissions_of_any_new_file(tmp_path):
    old = os.umask(0o022)
    try:
        path = stepped("tent").save(tmp_path / "state.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

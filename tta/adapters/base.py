"""The adapter base class: small hooks around one predict-and-adapt step.

Subclasses override a few hooks (the structure users of mariodoebler/test-time-adaptation know):

- `configure_model()`: patch/swap layers, set which parameters require grad, set train/eval modes;
- `collect_params()`: the parameters the optimizer updates (empty for gradient-free adapters);
- `loss(outputs, x)`: the adaptation loss of one step;
- `forward_and_adapt(x)`: one predict-and-adapt step (default: forward, loss, `apply_loss`);
- `reset()`: restore the source state (extend it when the adapter owns more state).

The contract every adapter inherits from `forward`, written once here:

- **The caller's model is not modified** unless ``inplace=True`` (the `torch.ao.quantization.prepare`
  convention): `tta.adapt` deep-copies the model once, at construction (`copy_model`), and the adapter
  works on the copy. ``inplace=True`` hands the given model itself to the adapter (layers swapped,
  requires_grad set) and saves that copy's memory; so does constructing an adapter class directly.
- **Grad modes.** The step runs under `torch.enable_grad()`, so a caller's `torch.no_grad()` does not
  break gradient-based adapters; under `torch.inference_mode()` the step leaves inference mode for its
  own duration and adapts on a normal-tensor copy of the batch (inference tensors cannot be saved for
  backward or updated in place), so deployed inference code works unchanged.
- **Input checks** (`tta.adapters.inputs`): structure first (no device sync), then an on-device
  verdict on the values (finite, inside the declared input range). `value_check` says where each
  adapter reads the verdict on the host: ``"before_step"`` (the safe default: one read before any
  state changes), ``"with_loss"`` (the first state change is `apply_loss`, whose own finite-loss read
  carries it: no extra sync) or ``"after_forward"`` (the adapter keeps no state between batches: read
  after the forward is queued, where the caller would wait for the outputs anyway). A rejected batch
  raises before the adapted state changes; should a step still fail, the counters and random
  generators are restored, so a rejected batch leaves every bit of the state as it was.
- **Non-finite updates.** A non-finite loss is not applied (``counters["skipped_nonfinite_loss"]``);
  only then (no per-step cost) are the adapted parameters checked, and non-finite ones, left by an
  earlier update that overflowed, are rolled back to the source state
  (``counters["nonfinite_param_resets"]``, logged on ``tta.adapters``).
- **Devices and dtypes.** `.to(device)` / `.to(dtype)` move the optimizer state and the source
  snapshot with the parameters and buffers; subclasses re-align their own references in
  `_after_move` (ViDA's shared scales, AdaNPC's memory). Random generators cannot change device:
  the adapter keeps one per device, seeded from its seed on first use there (all saved in its state).
- **State.** `state_dict()` covers everything the adapter owns: model (and teacher/anchor/memory
  modules or buffers registered on the adapter), optimizer state, counters and random generator
  states. `save()` writes it atomically with an integrity digest; loading validates the whole state
  before applying any of it (`tta.adapters.state`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from itertools import chain
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
from torch import nn

from tta.adapters.config import AdapterConfig, OptimConfig
from tta.adapters.inputs import (
    check_structure,
    declared_input_range,
    declared_input_size,
    infer_in_channels,
    model_dtype,
    rejection,
    value_verdict,
)
from tta.adapters.state import FORMAT as STATE_FORMAT
from tta.adapters.state import (
    check_counters,
    check_generators,
    check_optimizer_state,
    check_tensors,
    device_available,
    read_state,
    save_state,
    seal,
    verify_digest,
)
from tta.errors import BatchTooSmallError, ConfigError, InvalidInputError, StateMismatchError
from tta.layers import calibrated_layers, source_statistics

logger = logging.getLogger("tta.adapters")

C = TypeVar("C", bound=AdapterConfig)
ValueCheck = Literal["before_step", "with_loss", "after_forward"]
COUNTERS = ("steps", "batches", "small_batches", "skipped_nonfinite_loss", "nonfinite_param_resets")


class Adapter(nn.Module, Generic[C]):
    """Base class of every adapter. Construct through `tta.adapt(model, name, **config)`.

    Generic over its config type: ``class Tent(Adapter[TentConfig])`` types ``self.config``.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: what `forward` returns: "logits" or "probs" (non-parametric adapters)
    output_kind: ClassVar[str] = "logits"
    #: where the value verdict of a batch is read on the host (see the module docstring)
    value_check: ClassVar[ValueCheck] = "before_step"
    #: True when the adapter normalises with test-batch statistics (needs > 1 sample per batch);
    #: an instance may set it from its model (e.g. False for a LayerNorm-only model)
    uses_batch_stats: bool = False

    def __init__(self, model: nn.Module, config: C | None = None) -> None:
        """Adapt `model` itself (layers swapped, requires_grad set); `tta.adapt` hands it a copy unless
        asked for ``inplace=True``."""
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"expected an nn.Module to adapt, got {type(model).__name__}")
        if config is None:
            config = self.Config()  # type: ignore[assignment]
        if not isinstance(config, self.Config):
            raise ConfigError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        if any(t.is_inference() for t in chain(model.parameters(), model.buffers())):
            raise InvalidInputError(
                f"{self.name}: the model's tensors were created under torch.inference_mode() and cannot be "
                "adapted in place; adapt a copy (tta.adapt without inplace=True) or build the model outside "
                "inference mode"
            )
        # Everything the adapter creates is a normal tensor, even when it is built under inference mode
        # (inference tensors could never be updated by a step).
        with torch.inference_mode(False):
            self._build(model, config)

    def _build(self, model: nn.Module, config: C) -> None:
        self.config: C = config
        self.model = model
        self.in_channels = infer_in_channels(model)
        self.input_size = config.input_size or declared_input_size(model)
        self.input_range = config.input_range or declared_input_range(model)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._pending_verdict: tuple[torch.Tensor, torch.Tensor] | None = None
        self.configure_model()
        params = list(self.collect_params())
        self.optimizer = self.build_optimizer(params) if params else None
        self._source_state = self._snapshot()
        self._signature = self._compute_signature()

    # ------------------------------------------------------------------ hooks
    def configure_model(self) -> None:
        """Prepare `self.model` for adaptation (swap layers, requires_grad, modes)."""

    def collect_params(self) -> Iterable[nn.Parameter] | list[dict[str, Any]]:
        """Parameters (or optimizer param groups) updated by the optimizer."""
        return []

    def loss(self, outputs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not define a loss")

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """One predict-and-adapt step: forward, loss, backward, optimizer step."""
        outputs = self.model(x)
        loss = self.loss(outputs, x)
        self.apply_loss(loss)
        return outputs.detach()

    def optimizer_step(self) -> None:
        """Apply the gradients of the current loss (override to shape the update, e.g. VDP)."""
        assert self.optimizer is not None
        self.optimizer.step()

    def reset(self) -> None:
        """Restore the source state: model tensors, optimizer state, counters of the stream."""
        self.model.load_state_dict(self._source_state, strict=False)
        if self.optimizer is not None:
            self.optimizer.state.clear()
        self._generators.clear()

    def frozen_tensors(self) -> Iterable[torch.Tensor]:
        """Tensors never modified by adaptation; `fork()` shares them instead of copying.

        Default: the parameters of `self.model` that do not require grad. Override when the model
        holds parameters without grad that adaptation still changes (e.g. an EMA teacher).
        """
        return [p for p in self.model.parameters() if not p.requires_grad]

    def adapted_parameters(self) -> list[torch.Tensor]:
        """Tensors checked for non-finite values after a non-finite loss (default: the optimizer's)."""
        if self.optimizer is None:
            return []
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ helpers for subclasses
    def build_optimizer(self, params: list[Any]) -> torch.optim.Optimizer:
        cfg = self.config
        if not isinstance(cfg, OptimConfig):
            raise ConfigError(f"{type(self).__name__} collects parameters but its config has no optimizer fields")
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
            )
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return opt_cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)

    def apply_loss(self, loss: torch.Tensor) -> bool:
        """Backward + `optimizer_step`; a non-finite loss is not applied (returns False).

        The finite-loss read is the step's host sync; a batch verdict left pending
        (``value_check = "with_loss"``) is read in the same transfer and a rejected batch raises here,
        before any update.
        """
        assert self.optimizer is not None
        finite = torch.isfinite(loss.detach()).all()
        pending, self._pending_verdict = self._pending_verdict, None
        if pending is not None:
            loss_ok, input_ok = torch.stack((finite, pending[1])).tolist()
            if not input_ok:
                self.optimizer.zero_grad(set_to_none=True)
                raise rejection(self.name, pending[0], self.input_range)
        else:
            loss_ok = bool(finite)
        if not loss_ok:
            self.optimizer.zero_grad(set_to_none=True)
            self._count(skipped_nonfinite_loss=1)
            self._roll_back_nonfinite_parameters()
            return False
        loss.backward()
        self.optimizer_step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def generator(self, device: torch.device | str) -> torch.Generator:
        """The adapter's own random generator on `device` (saved in its state)."""
        device = torch.device(device)
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[key] = gen
        return gen

    @property
    def device(self) -> torch.device:
        for t in self.model.parameters():
            return t.device
        for t in self.model.buffers():
            return t.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ public API
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict on batch `x` (N, C, H, W; float in the model's input range) and adapt on it."""
        self.validate_batch(x)
        if torch.is_inference_mode_enabled():
            # Adapting needs autograd and in-place updates, which inference mode forbids: leave it for
            # this call and adapt on a normal-tensor copy of the batch (the outputs are normal tensors).
            with torch.inference_mode(False):
                return self._predict_and_adapt(x.clone())
        return self._predict_and_adapt(x)

    def _predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        verdict = value_verdict(x, self.input_range)
        small = self.uses_batch_stats and x.shape[0] < 2
        if small and self.config.small_batch == "raise":
            raise BatchTooSmallError(
                f"{self.name}: a batch of {x.shape[0]} image(s) of shape {tuple(x.shape[1:])} is too "
                "small to estimate batch statistics; use a larger batch or small_batch='source'"
            )
        check = self.value_check
        if small or check == "before_step" or (check == "with_loss" and self.config.episodic):
            self._read_verdict(x, verdict)
            check = "before_step"
        if small:
            out = self.predict_without_adapting(x)
            self._count(small_batches=1)
            return out
        # What a failing step could leave changed without the tensors being touched: the counters and
        # the random generators. Adapters reading the verdict with the loss or after the forward write
        # no counter before `_finish_batch` and, without generators, need no copy, so torch.compile
        # sees no read of a counter (each value read would be a guard, each new value a recompile).
        saved = self._save_volatile() if check == "before_step" or self._generators else None
        try:
            out = self._adapt_steps(x, verdict if check == "with_loss" else None)
        except BaseException:
            if saved is not None:
                self._restore_volatile(saved)
            raise
        return self._finish_batch(x, verdict if check == "after_forward" else None, saved, out)

    def _adapt_steps(self, x: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
        """`config.steps` predict-and-adapt steps under `enable_grad` (a caller's no_grad does not apply)."""
        if self.config.episodic:
            self.reset()
        self._pending_verdict = None if pending is None else (x, pending)
        try:
            out = x
            with torch.enable_grad():
                for _ in range(self.config.steps):
                    out = self.forward_and_adapt(x)
            if self._pending_verdict is not None:  # an adapter that never reached apply_loss
                self._read_verdict(x, pending)
        finally:
            self._pending_verdict = None
        return out

    @torch.compiler.disable
    def _finish_batch(self, x: torch.Tensor, verdict: torch.Tensor | None,
                      saved: tuple[dict[str, int], dict[str, torch.Tensor]] | None, out: torch.Tensor) -> torch.Tensor:
        """Read a verdict left for after the forward, then count the batch. Not traced by torch.compile:
        its one graph break comes after the whole forward."""
        if verdict is not None and not bool(verdict):
            if saved is not None:
                self._restore_volatile(saved)
            raise rejection(self.name, x, self.input_range)
        self.counters["steps"] += self.config.steps
        self.counters["batches"] += 1
        return out.detach()

    @torch.compiler.disable
    def _count(self, **increments: int) -> None:
        for key, n in increments.items():
            self.counters[key] = self.counters.get(key, 0) + n

    def _save_volatile(self) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
        return dict(self.counters), {k: g.get_state() for k, g in self._generators.items()}

    def _restore_volatile(self, saved: tuple[dict[str, int], dict[str, torch.Tensor]]) -> None:
        counters, generators = saved
        self.counters.clear()
        self.counters.update(counters)
        for key in [k for k in self._generators if k not in generators]:
            del self._generators[key]
        for key, gen_state in generators.items():
            self._generators[key].set_state(gen_state)

    def _read_verdict(self, x: torch.Tensor, verdict: torch.Tensor) -> None:
        if not bool(verdict):
            raise rejection(self.name, x, self.input_range)

    @torch.no_grad()
    def predict_without_adapting(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction of the current state with source normalisation statistics; no update."""
        with source_statistics(self.prediction_model()):
            return self.prediction_model()(x)

    def prediction_model(self) -> nn.Module:
        """The module whose output is the prediction (the teacher for teacher-student adapters)."""
        return self.model

    def validate_batch(self, x: Any) -> None:
        """Structural checks of a batch (type, rank, dtype, device, channels, size); no device sync."""
        check_structure(self.name, x, in_channels=self.in_channels, size=self.input_size,
                        dtype=model_dtype(self.model), device=self.device)

    def fork(self) -> "Adapter[C]":
        """An independent copy of this adapter (own adapted state), sharing frozen tensors."""
        memo: dict[int, Any] = {id(t): t for t in self.frozen_tensors()}
        for t in self._source_state.values():
            memo[id(t)] = t
        with torch.inference_mode(False):
            return copy.deepcopy(self, memo)

    # ------------------------------------------------------------------ devices and dtypes
    def _apply(self, fn: Any, recurse: bool = True) -> "Adapter[C]":
        super()._apply(fn, recurse)
        if "_source_state" in self.__dict__:  # not during construction
            self._after_move()
        return self

    def _after_move(self) -> None:
        """Re-align what `nn.Module._apply` does not reach after `.to()`/`.double()`/`.cuda()`...:
        the optimizer state (to its parameters' device and dtype) and the source snapshot."""
        if self.optimizer is not None:
            align_optimizer_state(self.optimizer)
        self._source_state = self._realigned_source_state()

    def _realigned_source_state(self) -> dict[str, torch.Tensor]:
        """The source snapshot on the device and dtype of the model tensors it restores."""
        live = self.model.state_dict(keep_vars=True)
        return {k: v.to(device=live[k].device, dtype=live[k].dtype) for k, v in self._source_state.items()}

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "adapter": self.name,
            "signature": self._signature,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "counters": dict(self.counters),
            "seed": self._seed,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Apply a header already checked by `check_state` (called by `load_state_dict`)."""
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.counters.clear()
        self.counters.update(dict.fromkeys(COUNTERS, 0))
        self.counters.update(state.get("counters", {}))
        self._seed = int(state.get("seed", self._seed))
        self._generators.clear()
        for key, gen_state in state.get("generators", {}).items():
            if device_available(torch.device(key)):
                self.generator(key).set_state(gen_state)
            else:
                logger.warning("%s: the state's random generator for %s is dropped (no such device here)", self.name, key)

    def check_extra_state(self, extra: Mapping[str, Any], where: str) -> None:
        """Validate the header's entries (extend for state a subclass keeps in it); raise, never apply."""
        check_optimizer_state(where, extra.get("optimizer"), self.optimizer)
        check_counters(where, extra.get("counters", {}))
        check_generators(where, extra.get("seed", self._seed), extra.get("generators", {}))

    def check_state(self, state: Any, *, where: str | None = None, strict: bool = True,
                    require_digest: bool = False) -> None:
        """Validate a whole state against this adapter without changing anything (see `tta.adapters.state`)."""
        where = where or self.name
        if not isinstance(state, Mapping):
            raise StateMismatchError(f"{where}: an adapter state is a dict, got {type(state).__name__}")
        extra = state.get("_extra_state")
        if not isinstance(extra, Mapping):
            raise StateMismatchError(
                f"{where}: the state has no adapter header (_extra_state); it was not saved by Adapter.state_dict()"
            )
        self._check_state_header(extra)
        if extra.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise StateMismatchError(f"{where}: state format {extra.get('format')!r}; this runtime reads {STATE_FORMAT!r}")
        if require_digest or "digest" in extra:
            verify_digest(state, where)
        frozen = {id(t) for t in self.frozen_tensors()}
        check_tensors(where, state, self.state_dict(keep_vars=True), frozen, strict)
        self.check_extra_state(extra, where)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load a state: the whole of it is validated first (`check_state`), then applied."""
        if assign:
            raise InvalidInputError(f"{self.name}: assign=True would replace the adapter's tensors (and detach them "
                                    "from its optimizer); load by copy")
        self.check_state(state_dict, strict=strict)
        with torch.inference_mode(False):
            return super().load_state_dict(state_dict, strict=strict)

    def _check_state_header(self, state: Mapping[str, Any]) -> None:
        if state.get("adapter") != self.name:
            raise StateMismatchError(
                f"the state was saved by adapter {state.get('adapter')!r}; this adapter is {self.name!r}"
            )
        if state.get("signature") != self._signature:
            raise StateMismatchError(
                f"{self.name}: the state was saved from a different model (signature "
                f"{state.get('signature')} != {self._signature}); load it into an adapter built on "
                "the same architecture"
            )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the adapted state to `path` atomically, sealed with its digest (the old file survives a
        failed write)."""
        return save_state(seal(self.state_dict()), path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load a state written by `save()` (weights-only unpickling; digest and content checked first)."""
        self.load_saved(read_state(path), where=str(path))

    def load_saved(self, state: Mapping[str, Any], where: str) -> None:
        """Load the content of a file written by `save()` (`read_state`): the rule of `load`, which
        `StreamPool.load` shares: the digest is required, the whole state is checked, then applied."""
        self.check_state(state, where=where, require_digest=True)
        with torch.inference_mode(False):
            nn.Module.load_state_dict(self, state)

    # ------------------------------------------------------------------ internals
    def _roll_back_nonfinite_parameters(self) -> None:
        """After a non-finite loss: if an earlier update left non-finite parameters, reset to source."""
        tensors = self.adapted_parameters()
        if not tensors:
            return
        with torch.no_grad():
            peaks = torch.stack([n.float() for n in torch._foreach_norm(tensors, ord=float("inf"))])
            if bool(torch.isfinite(peaks).all()):
                return
        self.reset()
        self.counters["nonfinite_param_resets"] += 1
        logger.warning("%s: the adapted parameters became non-finite (an update overflowed: learning rate too "
                       "high?); reset to the source state", self.name)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of every model tensor adaptation may change (trainable params and buffers)."""
        frozen = {id(t) for t in self.frozen_tensors()}
        snap: dict[str, torch.Tensor] = {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor) and id(t) not in frozen:
                snap[name] = t.detach().clone()
        return snap

    def _compute_signature(self) -> str:
        h = hashlib.sha1()
        for name, t in self.model.state_dict().items():
            if isinstance(t, torch.Tensor):
                h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        return h.hexdigest()[:16]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, config={self.config}"


def copy_model(model: nn.Module, who: str) -> nn.Module:
    """A deep copy of `model` whose tensors are normal tensors (also under inference mode)."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"expected an nn.Module to adapt, got {type(model).__name__}")
    try:
        with torch.inference_mode(False):
            return copy.deepcopy(model)
    except Exception as exc:  # a module holding something that cannot be copied (a lock, a handle...)
        raise InvalidInputError(f"{who}: the model cannot be copied ({type(exc).__name__}: {exc}); pass "
                                "inplace=True to adapt it in place") from exc


def align_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Move every optimizer state tensor to its parameter's device and (floating) dtype.

    Step counters stay where PyTorch keeps them (CPU float32) unless the group is capturable or fused,
    as `torch.optim.Optimizer.load_state_dict` places them.
    """
    for group in optimizer.param_groups:
        step_on_param = bool(group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    if step_on_param:
                        state[key] = value.to(device=p.device)
                    continue
                state[key] = value.to(device=p.device, dtype=p.dtype if value.is_floating_point() else value.dtype)


__all__ = ["Adapter", "align_optimizer_state", "calibrated_layers", "copy_model", "infer_in_channels", "read_state",
           "save_state"]

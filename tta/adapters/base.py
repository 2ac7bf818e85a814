"""The adapter base class: small hooks around one predict-and-adapt step.

Subclasses override a few hooks (the structure users of mariodoebler/test-time-adaptation know):

- `configure_model()`: patch/swap layers, set which parameters require grad, set train/eval modes;
- `collect_params()`: the parameters the optimizer updates (empty for gradient-free adapters);
- `loss(outputs, x)`: the adaptation loss of one step;
- `forward_and_adapt(x)`: one predict-and-adapt step (default: forward, loss, backward, step);
- `reset()`: restore the source state (extend it when the adapter owns more state).

`forward(x)` validates the batch first, so a rejected batch never touches the adapted state.
`state_dict()` covers everything the adapter owns: model (and teacher/anchor/memory modules or
buffers registered on the adapter), optimizer state, counters and random generator states.
"""

from __future__ import annotations

import copy
import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tta.adapters.config import AdapterConfig, OptimConfig
from tta.errors import (
    BatchTooSmallError,
    ConfigError,
    InvalidInputError,
    NonFiniteInputError,
    StateMismatchError,
)
from tta.fileio import default_file_mode
from tta.layers import calibrated_layers, source_statistics


class Adapter(nn.Module):
    """Base class of every adapter. Construct through `tta.adapt(model, name, **config)`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[AdapterConfig]] = AdapterConfig
    #: what `forward` returns: "logits" or "probs" (non-parametric adapters)
    output_kind: ClassVar[str] = "logits"
    #: True when the adapter normalises with test-batch statistics (needs > 1 sample per batch)
    uses_batch_stats: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config: AdapterConfig | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"expected an nn.Module to adapt, got {type(model).__name__}")
        if config is None:
            config = self.Config()
        if not isinstance(config, self.Config):
            raise ConfigError(f"{type(self).__name__} needs a {self.Config.__name__}, got {type(config).__name__}")
        self.config = config
        self.model = model
        self.in_channels = infer_in_channels(model)
        self.counters: dict[str, int] = {"steps": 0, "batches": 0, "small_batches": 0, "skipped_nonfinite_loss": 0}
        seed = config.seed if config.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}
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
        """Backward + optimizer step; a non-finite loss is not applied (returns False)."""
        assert self.optimizer is not None
        if not bool(torch.isfinite(loss)):
            self.optimizer.zero_grad(set_to_none=True)
            self.counters["skipped_nonfinite_loss"] += 1
            return False
        loss.backward()
        self.optimizer.step()
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
        if self.uses_batch_stats and x.shape[0] < 2:
            if self.config.small_batch == "raise":
                raise BatchTooSmallError(
                    f"{self.name}: a batch of {x.shape[0]} image(s) of shape {tuple(x.shape[1:])} is too "
                    "small to estimate batch statistics; use a larger batch or small_batch='source'"
                )
            self.counters["small_batches"] += 1
            return self.predict_without_adapting(x)
        if self.config.episodic:
            self.reset()
        out = x
        for _ in range(self.config.steps):
            out = self.forward_and_adapt(x)
            self.counters["steps"] += 1
        self.counters["batches"] += 1
        return out

    @torch.no_grad()
    def predict_without_adapting(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction of the current state with source normalisation statistics; no update."""
        with source_statistics(self.prediction_model()):
            return self.prediction_model()(x)

    def prediction_model(self) -> nn.Module:
        """The module whose output is the prediction (the teacher for teacher-student adapters)."""
        return self.model

    def validate_batch(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise InvalidInputError(f"{self.name}: expected a torch.Tensor batch, got {type(x).__name__}")
        if x.dim() != 4:
            hint = " (a single image? add a batch dimension or use the frame micro-batcher)" if x.dim() == 3 else ""
            raise InvalidInputError(
                f"{self.name}: expected a batch of shape (N, C, H, W), got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[0] == 0:
            raise InvalidInputError(f"{self.name}: empty batch of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise InvalidInputError(
                f"{self.name}: expected a floating-point batch, got dtype {x.dtype} "
                "(convert uint8 images with x.float() / 255)"
            )
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise InvalidInputError(
                f"{self.name}: the model takes {self.in_channels} input channel(s), got a batch of shape "
                f"{tuple(x.shape)} ({x.shape[1]} channels)"
            )
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
            raise NonFiniteInputError(
                f"{self.name}: {bad} of {x.shape[0]} image(s) contain NaN/Inf values; the batch was not "
                "adapted on and the adapted state is unchanged"
            )

    def fork(self) -> "Adapter":
        """An independent copy of this adapter (own adapted state), sharing frozen tensors."""
        memo: dict[int, Any] = {id(t): t for t in self.frozen_tensors()}
        for t in self._source_state.values():
            memo[id(t)] = t
        return copy.deepcopy(self, memo)

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
        self._check_state_header(state)
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.counters.update(state.get("counters", {}))
        self._seed = int(state.get("seed", self._seed))
        self._generators.clear()
        for key, gen_state in state.get("generators", {}).items():
            self.generator(key).set_state(gen_state)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False):  # type: ignore[override]
        extra = state_dict.get("_extra_state")
        if extra is None:
            raise StateMismatchError(
                f"{self.name}: the state has no adapter header (_extra_state); it was not saved by "
                "Adapter.state_dict()"
            )
        self._check_state_header(extra)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _check_state_header(self, state: dict[str, Any]) -> None:
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
        """Write the adapted state to `path` atomically (the old file survives a failed write)."""
        return save_state(self.state_dict(), path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load an adapted state written by `save()` (weights-only unpickling)."""
        self.load_state_dict(read_state(path))

    # ------------------------------------------------------------------ internals
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


def save_state(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """`torch.save` to a temporary file in the same folder, fsync, then atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, default_file_mode())  # mkstemp makes 0600; a saved state gets open()'s mode
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an adapter state file written by `save_state` (weights-only unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise StateMismatchError(f"no adapter state file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, forbidden pickle opcode...
        raise StateMismatchError(f"{path} is not a readable adapter state: {exc}") from exc
    if not isinstance(state, dict):
        raise StateMismatchError(f"{path} does not hold an adapter state dict")
    return state


def infer_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first convolution (None when the model has none)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


__all__ = ["Adapter", "infer_in_channels", "read_state", "save_state", "calibrated_layers"]

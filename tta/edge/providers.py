"""onnxruntime execution provider selection with explicit fallbacks.

``"auto"`` tries TensorRT, then CUDA, then CPU, using what the installed onnxruntime build offers.
Asking for a provider the build lacks (or that fails to start, e.g. CUDA libraries missing) falls
back to the next one with a `ProviderFallbackWarning` naming what was asked, what runs, and how to
get the missing one. ``strict=True`` raises `ProviderError` instead.

`onnxruntime` and `onnxruntime-gpu` ship the same Python module (``onnxruntime``); with both
installed, whichever was installed last silently wins. `check_onnxruntime_install()` detects that.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from importlib import metadata

import onnxruntime as ort

from tta.edge.errors import ProviderError

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")
_HOW_TO_GET = {
    "tensorrt": "install onnxruntime-gpu (README, 'Edge on GPU') and the TensorRT libraries "
                "(`pip install 'tta-runtime[trt]'`) on a machine with an NVIDIA GPU",
    "cuda": "replace onnxruntime by onnxruntime-gpu: `pip uninstall -y onnxruntime && pip install onnxruntime-gpu` "
            "(on a machine with an NVIDIA GPU and CUDA libraries)",
    "cpu": "reinstall onnxruntime",
}


class ProviderFallbackWarning(UserWarning):
    """A requested execution provider is unavailable; the model runs on another one."""


def check_onnxruntime_install() -> None:
    """Raise `ProviderError` when both onnxruntime and onnxruntime-gpu are installed."""
    names = set()
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(dist)
            names.add(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(names) == 2:
        raise ProviderError(
            "both onnxruntime and onnxruntime-gpu are installed; they provide the same `onnxruntime` module and "
            "overwrite each other. Keep one: `pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
            "onnxruntime-gpu` (GPU) or `... && pip install onnxruntime` (CPU)"
        )


def canonical(name: str) -> str:
    key = name.lower().removesuffix("executionprovider")
    if key not in PROVIDERS:
        raise ProviderError(f"unknown execution provider {name!r}; use one of {', '.join(PROVIDERS)} or 'auto'")
    return key


def select_providers(requested: str | Sequence[str] = "auto", available: Sequence[str] | None = None,
                     strict: bool = False) -> list[str]:
    """onnxruntime provider names to try, in order; CPU is always the last resort (unless strict)."""
    available = list(ort.get_available_providers() if available is None else available)
    if isinstance(requested, str) and requested.lower() == "auto":
        wanted, explicit = list(AUTO_ORDER), False
    else:
        wanted = [canonical(requested)] if isinstance(requested, str) else [canonical(p) for p in requested]
        explicit = True
    chosen = [p for p in wanted if PROVIDERS[p] in available]
    missing = [p for p in wanted if PROVIDERS[p] not in available]
    if explicit and missing:
        message = (f"execution provider(s) {', '.join(missing)} not available in this onnxruntime build "
                   f"(available: {', '.join(available)}); to get {missing[0]}: {_HOW_TO_GET[missing[0]]}")
        if strict:
            raise ProviderError(message)
        if "cpu" not in chosen:
            chosen.append("cpu")
        warnings.warn(message + f"; running on {chosen[0]}", ProviderFallbackWarning, stacklevel=3)
    if not chosen:
        raise ProviderError(f"none of the requested providers {wanted} is available (available: {available})")
    return [PROVIDERS[p] for p in chosen]


_PRELOADED = False


def preload_gpu_libraries(providers: Sequence[str]) -> None:
    """Before the first GPU session: ``onnxruntime.preload_dlls()`` (onnxruntime-gpu >= 1.21), which
    loads the CUDA and cuDNN libraries from PyTorch when it is imported, else from the ``nvidia-*``
    pip packages (``pip install "onnxruntime-gpu[cuda,cudnn]"``), so the CUDA provider starts without
    LD_LIBRARY_PATH. Once per process; a failure is a warning (the session then reports what runs)."""
    global _PRELOADED
    gpu = {PROVIDERS["cuda"], PROVIDERS["tensorrt"]}
    if _PRELOADED or not gpu.intersection(providers) or not hasattr(ort, "preload_dlls"):
        return
    _PRELOADED = True
    try:
        ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - the session start below reports the consequence
        warnings.warn(f"onnxruntime.preload_dlls() failed ({type(exc).__name__}: {exc}); the CUDA provider may not "
                      "start", ProviderFallbackWarning, stacklevel=3)


def with_options(providers: Sequence[str], fp16: bool = False,
                 trt_cache_dir: str | None = None) -> list[str | tuple[str, dict[str, str]]]:
    """onnxruntime `providers=` entries: the TensorRT provider gets its engine cache (so a device
    builds the engine once, not at every start) and fp16; the others run with their defaults."""
    out: list[str | tuple[str, dict[str, str]]] = []
    for name in providers:
        if name == PROVIDERS["tensorrt"]:
            options = {"trt_fp16_enable": str(bool(fp16)), "trt_engine_cache_enable": str(trt_cache_dir is not None)}
            if trt_cache_dir is not None:
                options["trt_engine_cache_path"] = str(trt_cache_dir)
            out.append((name, options))
        else:
            out.append(name)
    return out

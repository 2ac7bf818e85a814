"""Which extra of the `tta-runtime` distribution installs a missing module (torch-free).

The base install (`pip install tta-runtime`) holds numpy, PyYAML and platformdirs: `tta list`, cards and
specs. `[edge]` adds onnxruntime + safetensors (`tta.edge`), `[video]` OpenCV, `[torch]` the full runtime,
`[serve]` Ray Serve (`tta serve`).
A feature reached without its extra raises `MissingDependencyError` naming the pip line instead of a
bare ModuleNotFoundError.
"""

from __future__ import annotations

from tta.errors import MissingDependencyError

DISTRIBUTION = "tta-runtime"
#: top-level module -> the extra that installs it
EXTRA_OF_MODULE: dict[str, str] = {
    "torch": "torch", "torchvision": "torch", "timm": "torch", "scipy": "torch", "tqdm": "torch",
    "matplotlib": "torch", "onnx": "torch", "onnxscript": "torch", "imagecorruptions": "torch", "PIL": "torch",
    "onnxruntime": "edge", "safetensors": "edge",
    "cv2": "video",
    "ray": "serve", "starlette": "serve",
}
ABOUT_EXTRA = {"torch": "the full PyTorch runtime", "edge": "the edge runtime", "video": "video support",
               "serve": "Ray Serve"}


def install_hint(extra: str) -> str:
    return f'pip install "{DISTRIBUTION}[{extra}]"'


def missing_dependency(exc: ImportError, what: str) -> MissingDependencyError | None:
    """A `MissingDependencyError` for `exc` when the missing module belongs to an extra, else None.

    what: the feature that needed it (e.g. ``"tta run"``).
    """
    name = getattr(exc, "name", None) or ""
    extra = EXTRA_OF_MODULE.get(name.split(".")[0])
    if not isinstance(exc, ModuleNotFoundError) or extra is None:
        return None
    return MissingDependencyError(
        f"{what} needs {ABOUT_EXTRA[extra]} (module {name!r} is not installed): {install_hint(extra)}"
    )

"""Names a stream spec is checked against, importable without numpy, OpenCV or torch (`tta list`)."""

from __future__ import annotations

from tta.errors import ConfigError

#: The 15 standard corruptions in the continual CTTA order of TENT / CoTTA (Hendrycks & Dietterich's
#: CIFAR-10-C order: noise, blur, weather, digital).
STANDARD_ORDER: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
#: The CIFAR-10-C "extra" (validation) corruptions implemented here (spatter is not implemented).
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "saturate")
#: Every corruption `tta.streams.corrupt` accepts.
CORRUPTIONS: tuple[str, ...] = STANDARD_ORDER + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: Sample order within a domain, and the reset policies a stream can carry.
ORDERS: tuple[str, ...] = ("shuffle", "file", "dirichlet")
RESETS: tuple[str, ...] = ("never", "domain")
#: CCC difficulty levels: the source-model accuracy (%) a `ccc` stream holds (`tta.streams.ccc`).
DIFFICULTIES: dict[str, float] = {"easy": 70.0, "medium": 50.0, "hard": 25.0}


def check_reset(reset: object) -> str | int:
    """A stream's reset policy: "never", "domain", or N = reset every N batches (RDumb's periodic
    reset, Press et al. 2023, resets every 1,000 steps); ``"every N"`` is read as N."""
    if isinstance(reset, str) and reset.strip().lower().startswith("every"):
        try:
            reset = int(reset.split(None, 1)[1])
        except (IndexError, ValueError):
            raise ConfigError(f"reset 'every N' needs a number of batches, got {reset!r}") from None
    if reset in RESETS:
        return reset  # type: ignore[return-value]
    if isinstance(reset, int) and not isinstance(reset, bool) and reset >= 1:
        return reset
    raise ConfigError(f"reset must be one of {RESETS} or 'every N' (N batches >= 1), got {reset!r}")

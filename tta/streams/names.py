"""Names a stream spec is checked against, importable without numpy, OpenCV or torch (`tta list`)."""

from __future__ import annotations

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

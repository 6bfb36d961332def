"""Encoding generated images to file bytes: one definition for the server and the batch runner, so a
request gives the same bytes through either."""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image

ImageFormat = Literal["png", "jpeg", "webp"]
EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def encode_image(image: np.ndarray, output_format: ImageFormat = "png", compression: int = 100) -> bytes:
    """uint8 (H, W, 3) -> PNG / JPEG (quality = compression) / WebP (lossless at 100) bytes."""
    buffer = io.BytesIO()
    pil = Image.fromarray(image)
    if output_format == "png":
        pil.save(buffer, format="PNG")
    elif output_format == "jpeg":
        pil.save(buffer, format="JPEG", quality=max(1, compression))
    elif output_format == "webp":
        pil.save(buffer, format="WEBP", quality=compression, lossless=compression == 100)
    else:
        raise ValueError(f"unknown image format {output_format!r}")
    return buffer.getvalue()

"""Image codecs: the fastest encoder available for each format, all releasing the GIL.

PNG (RGB/RGBA) uses fpng, about 15x faster than libpng at the same size; single-channel PNG and
the fallback use Pillow. JPEG uses simplejpeg (libjpeg-turbo). Every encoder here produces
standard files that ``tf.image.decode_image`` (and so tfds) reads.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Literal

import numpy as np

try:  # fpng's extension module; the package-level import pulls in optional cv2 glue lazily.
    from fpng import fpng_ext as _fpng
except Exception:  # pragma: no cover - fpng ships wheels for the platforms we support
    _fpng = None

try:
    import simplejpeg as _simplejpeg
except Exception:  # pragma: no cover
    _simplejpeg = None


@dataclasses.dataclass(frozen=True)
class ImageCodec:
    """How a uint8 image is stored.

    Attributes:
      format: ``"png"`` (lossless, the default), ``"jpeg"`` (lossy, small and fast) or ``"raw"``
        (the pixels as a bytes-encoded uint8 tensor: exact and fastest, but large).
      quality: JPEG quality, 1..100.
    """

    format: Literal["png", "jpeg", "raw"] = "png"
    quality: int = 95

    def __post_init__(self):
        if self.format not in ("png", "jpeg", "raw"):
            raise ValueError(f"image codec: expected 'png', 'jpeg' or 'raw', given {self.format!r}")
        if not 1 <= int(self.quality) <= 100:
            raise ValueError(f"image codec: JPEG quality must be in 1..100, given {self.quality}")

    @classmethod
    def parse(cls, value: str | ImageCodec) -> ImageCodec:
        """Reads ``"png"``, ``"raw"``, ``"jpeg"`` or ``"jpeg:90"`` (JPEG with quality 90)."""
        if isinstance(value, ImageCodec):
            return value
        if not isinstance(value, str):
            raise ValueError(f"image codec: expected a str or ImageCodec, given {value!r}")
        name, _, quality = value.lower().partition(":")
        if name in ("jpg", "jpeg"):
            return cls("jpeg", int(quality) if quality else 95)
        if quality:
            raise ValueError(f"image codec: only jpeg takes a quality, given {value!r}")
        return cls(name)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"jpeg:{self.quality}" if self.format == "jpeg" else self.format


def encode_png(image: np.ndarray, *, compress_level: int = 1) -> bytes:
    """Lossless PNG of a uint8 (H, W, C) image."""
    h, w, c = image.shape
    if _fpng is not None and c in (3, 4):
        return _fpng.encode_image_to_memory(np.ascontiguousarray(image).tobytes(), w, h, c)
    return encode_png_pillow(image, compress_level=compress_level)


def encode_raw(pixels: bytes | memoryview, shape: tuple[int, ...], codec: ImageCodec) -> bytes:
    """Encodes raw C-order uint8 pixels of an (H, W, C) image (bytes or a buffer, such as a
    view of shared memory; only fpng needs them copied into bytes)."""
    h, w, c = shape
    if codec.format == "png" and _fpng is not None and c in (3, 4):
        return _fpng.encode_image_to_memory(
            pixels if isinstance(pixels, bytes) else bytes(pixels), w, h, c)
    return encode(np.frombuffer(pixels, np.uint8).reshape(shape), codec)


def encode_png_pillow(image: np.ndarray, *, compress_level: int = 1) -> bytes:
    from PIL import Image

    c = image.shape[2]
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[c]
    pil = Image.fromarray(image[:, :, 0] if c == 1 else np.ascontiguousarray(image), mode)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, *, quality: int = 95) -> bytes:
    """JPEG of a uint8 (H, W, 1|3) image."""
    c = image.shape[-1]
    if _simplejpeg is not None:
        return _simplejpeg.encode_jpeg(np.ascontiguousarray(image), quality=quality,
                                       colorspace="GRAY" if c == 1 else "RGB",
                                       colorsubsampling="Gray" if c == 1 else "420")
    from PIL import Image

    pil = Image.fromarray(image[:, :, 0] if c == 1 else np.ascontiguousarray(image))
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode(image: np.ndarray, codec: ImageCodec) -> bytes:
    if codec.format == "png":
        return encode_png(image)
    if codec.format == "jpeg":
        return encode_jpeg(image, quality=codec.quality)
    raise ValueError(f"codec {codec} does not encode to bytes")


def decode(data: bytes, channels: int | None = None) -> np.ndarray:
    """Decodes PNG or JPEG bytes to a uint8 (H, W, C) array."""
    if data[:2] == b"\xff\xd8" and _simplejpeg is not None:
        if channels == 1:
            out = _simplejpeg.decode_jpeg(data, colorspace="GRAY")
        else:
            out = _simplejpeg.decode_jpeg(data, colorspace="RGB")
        return out
    from PIL import Image

    with Image.open(io.BytesIO(data)) as pil:
        arr = np.asarray(pil)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr

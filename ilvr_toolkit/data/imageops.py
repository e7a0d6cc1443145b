"""The one image loader (``load_rgb``) of the converter, the references and the evaluation sets,
and cropping. Kept free of torch so the converter's worker processes stay light.
"""

import contextlib
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["WIDE_MODES", "BadImage", "center_crop_square", "check_file_size", "load_rgb", "open_image"]
__all__ += ["read_image_file", "to_rgb"]

# Integer modes whose samples span 16 bits. Pillow opens 16-bit grayscale PNG/TIFF as
# "I;16*" (recent versions) or "I" (older ones), so "I" is read as 16-bit too.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImage(ValueError):
    """An input that is not a usable image (corrupt, truncated, not an image, too small)."""


def check_file_size(size: int) -> None:
    """``BadImage`` for a file (or a zip member, by its declared size) larger than any image Pillow
    decodes, read before its bytes are: 2 x ``Image.MAX_IMAGE_PIXELS`` pixels (more raise
    DecompressionBombError) of 16-bit RGBA (8 bytes), stored uncompressed, with room for headers:
    20 bytes per ``MAX_IMAGE_PIXELS`` (1.8 GB by default; none if that limit is turned off)."""
    limit = 20 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if limit is not None and size > limit:
        raise BadImage(f"too large: {size} bytes, more than any image Pillow decodes ({limit})")


def read_image_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of the file at ``path`` (a link followed); ``BadImage`` for what is not a regular
    file (a device or FIFO would be read for ever) or is too large (:func:`check_file_size`)."""
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise BadImage(f"not a regular file ({Path(path).resolve()})")
        check_file_size(info.st_size)
        return file.read()


def open_image(data: bytes) -> Image.Image:
    """Decode ``data`` fully (a truncated file fails here, not later); ``BadImage`` if unusable."""
    try:
        with warnings.catch_warnings():  # over MAX_IMAGE_PIXELS: decoded, or skipped with its own line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except Image.DecompressionBombError as e:
        raise BadImage(f"too many pixels: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (no known format)") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise BadImage(f"cannot decode: {type(e).__name__}: {e}") from None
    return img


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> "RGB".

    - transparency (an alpha band, or a palette / grayscale / RGB ``transparency`` key) is
      composited over ``background`` (white): the colour under a fully transparent pixel is
      arbitrary and often black or garbage, so dropping alpha would leak it into the image;
    - 16-bit grayscale (``I;16*``, and ``I`` as Pillow may open it) becomes 8 bits by rounding
      v / 257 (65535 -> 255, 257 -> 1; ``convert("L")`` would clip all above 255 to white), its
      transparent value (exact 16-bit match) composited like any other;
      float ``F`` is clipped to 0..255;
    - CMYK (no colour profile applied), YCbCr, LAB, HSV, 1, L, P use Pillow's own conversion.
    """
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in WIDE_MODES:
        wide, key = np.asarray(img), img.info.get("transparency")
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
        if isinstance(key, int):  # the exact 16-bit transparent value (not its 8-bit rounding): alpha 0
            img = Image.merge("LA", (img, Image.fromarray(np.where(wide == key, 0, 255).astype(np.uint8))))
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    if img.mode == "F":  # float samples: Pillow's rule, clip to 0..255
        img = img.convert("L")
    return img.convert("RGB")


def load_rgb(source: bytes | bytearray | Image.Image) -> Image.Image:
    """Encoded bytes (or a PIL image) -> upright RGB: decoded fully (``open_image``), EXIF
    orientation applied (phone photos), converted by ``to_rgb``; ``BadImage`` if unusable."""
    img = source if isinstance(source, Image.Image) else open_image(source)
    with contextlib.suppress(Exception):  # a malformed EXIF block should not cost the image
        img = ImageOps.exif_transpose(img)
    try:
        return to_rgb(img)
    except Exception as e:  # exotic modes Pillow cannot convert
        raise BadImage(f"cannot convert mode {img.mode} to RGB: {e}") from None


def center_crop_square(img: Image.Image) -> Image.Image:
    """The largest centred square; an odd excess leaves the extra pixel on the right/bottom."""
    (w, h), side = img.size, min(img.size)
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side))

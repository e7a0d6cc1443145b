"""The one image loader (``load_rgb``) of the converter, the references and the evaluation sets,
and cropping. Kept free of torch so the converter's worker processes stay light.
"""

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = ["WIDE_MODES", "BadImage", "center_crop_square", "load_rgb", "open_image", "to_rgb"]

# Integer modes whose samples span 16 bits. Pillow opens 16-bit grayscale PNG/TIFF as
# "I;16*" (recent versions) or "I" (older ones), so "I" is read as 16-bit too.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class BadImage(ValueError):
    """An input that is not a usable image (corrupt, truncated, not an image, too small)."""


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

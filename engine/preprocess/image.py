"""Turning whatever a person hands us into a clean RGB ``PIL.Image``, or a ``ValueError`` that says what is wrong."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Refuse images whose pixel count could exhaust memory (decompression bombs). 40 MP covers any real reference.
MAX_PIXELS = 40_000_000


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def _open_path(path: Path, name: str) -> Image.Image:
    if not path.is_file():
        raise ValueError(f"{name}: file {str(path)!r} does not exist; give the path of a PNG/JPEG/WebP image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"{name}: {str(path)!r} is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{name}: {str(path)!r} is not a readable image ({exc})") from None
    return image


def _from_array(array: np.ndarray, name: str) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"{name}: array of shape {array.shape} is not an image (expected HxW, HxWx3 or HxWx4)")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.number):
            raise ValueError(f"{name}: array of dtype {array.dtype} is not an image")
        array = np.asarray(array, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: image array contains NaN or infinite values")
        if array.max(initial=0) <= 1.0:  # float images in [0, 1]
            array = array * 255.0
        array = np.clip(np.rint(array), 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def load_image(image, name: str = "image", min_side: int = 1, background=(255, 255, 255)) -> Image.Image:
    """Returns ``image`` as an RGB ``PIL.Image``.

    Accepts a PIL image in any mode (EXIF orientation applied; transparency composited over ``background``),
    a numpy array (HxW, HxWx3, HxWx4; uint8 or float in [0, 1]) or a file path. Animated images use their first
    frame. Raises ``ValueError`` naming ``name`` and the problem for anything else.
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open_path(Path(image), name)
    elif isinstance(image, np.ndarray):
        image = _from_array(image, name)
    elif not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be an image (PIL.Image, numpy array or file path); got {_describe(image)}")

    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"{name}: {width}x{height} is over the {MAX_PIXELS // 1_000_000} MP limit; downscale it first")
    if min(width, height) < min_side:
        raise ValueError(f"{name}: {width}x{height} is too small; give an image at least {min_side} px on each side")
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image = ImageOps.exif_transpose(image)

    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        span = array.max() - array.min()
        array = (array - array.min()) / (span if span > 0 else 1.0)
        return _from_array(array, name).convert("RGB")
    return image.convert("RGB")


def pad_to_square(image: Image.Image, fill=(255, 255, 255)) -> Image.Image:
    """Pads to a centred square. Sheets are 2:3 full-body images: CLIP's centre crop would cut off head and feet,
    so the adapter (in training and inference alike) sees the whole sheet padded with its white background."""
    return pad_to_aspect(image, 1, 1, fill)


def pad_to_aspect(image: Image.Image, width: int, height: int, fill=(255, 255, 255)) -> Image.Image:
    """Pads ``image`` (centred, with ``fill``) to the aspect ratio ``width:height``; nothing is cut off."""
    w, h = image.size
    if w * height == h * width:
        return image
    if w * height > h * width:  # too wide: pad top and bottom
        size = (w, -(-w * height // width))
    else:
        size = (-(-h * width // height), h)
    canvas = Image.new(image.mode, size, fill)
    canvas.paste(image, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas


def clip_processor(size: int):
    """The CLIP image processor for an image encoder of ``size`` px (resize the shortest side, centre crop, CLIP's
    normalisation): the one factory every pipeline, trainer and benchmark uses."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

"""Reference preprocessing: images, pose maps (numpy + Pillow only)."""

from .image import MAX_PIXELS, load_image, pad_to_square

__all__ = ["MAX_PIXELS", "load_image", "pad_to_square"]

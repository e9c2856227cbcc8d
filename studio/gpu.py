"""ZeroGPU support: on a Hugging Face ZeroGPU Space, GPU work runs under ``spaces.GPU`` with a duration computed from
the request; elsewhere (or without the ``spaces`` package) the decorator changes nothing."""

from __future__ import annotations

import os


def on_zero_gpu() -> bool:
    """On ZeroGPU hardware the decorated functions run in another process: their arguments are pickled (no callbacks)
    and what they change in their arguments is lost (so they are pure: inputs in, images out)."""
    return bool(os.environ.get("SPACES_ZERO_GPU"))


def gpu(duration):
    """``duration(*args, **kwargs) -> seconds``, used only on ZeroGPU hardware."""
    try:
        import spaces  # noqa: F401  (only on Spaces)
    except ImportError:
        spaces = None
    if spaces is None or not on_zero_gpu():
        return lambda fn: fn
    return spaces.GPU(duration=duration)


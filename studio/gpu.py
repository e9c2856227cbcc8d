"""ZeroGPU support: on a Hugging Face ZeroGPU Space, GPU work runs under ``spaces.GPU`` with a duration computed from
the request; elsewhere (or without the ``spaces`` package) the decorator changes nothing."""

from __future__ import annotations

import os


def gpu(duration):
    """``duration(*args, **kwargs) -> seconds``, used only on ZeroGPU hardware."""
    try:
        import spaces  # noqa: F401  (only on Spaces)
    except ImportError:
        spaces = None
    if spaces is None or not os.environ.get("SPACES_ZERO_GPU"):
        return lambda fn: fn
    return spaces.GPU(duration=duration)


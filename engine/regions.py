"""Where each character of a group panel stands: soft column regions for regional IP-Adapter conditioning.

A panel with several characters gives each character's adapter tokens only that character's region (diffusers'
``ip_adapter_masks``): n characters get n equal columns, left to right, with a narrow feathered seam so the
masks sum to one everywhere and each is exactly zero beyond its seam. Positions from the script (``left``,
``centre``, ``right``) pick a column; characters without one fill the free columns in the order written.
"""

from __future__ import annotations

import re

import numpy as np

POSITIONS = ("left", "centre", "right")
MAX_CHARACTERS = 3
FEATHER = 0.06  # seam width as a fraction of the panel width


def column_order(positions: list[str | None]) -> list[int]:
    """The column of each character (0 = leftmost): explicit positions first, the rest in written order.

    With two characters only left and right are columns; ``centre`` then means "no preference"."""
    n = len(positions)
    if not 1 <= n <= MAX_CHARACTERS:
        raise ValueError(f"{n} characters in one panel; a panel holds 1 to {MAX_CHARACTERS}")
    wanted = {"left": 0, "right": n - 1, "centre": 1 if n == 3 else None}
    columns: list[int | None] = []
    for position in positions:
        if position is not None and position not in wanted:
            raise ValueError(f"unknown position {position!r}: expected one of {', '.join(POSITIONS)} or None")
        column = wanted[position] if position is not None else None
        if column is not None and column in columns:
            raise ValueError(f"two characters cannot both stand {position}")
        columns.append(column)
    free = iter(c for c in range(n) if c not in columns)
    return [c if c is not None else next(free) for c in columns]


def character_regions(positions: list[str | None] | int, height: int, width: int,
                      feather: float = FEATHER) -> np.ndarray:
    """``[n, height, width]`` float32 masks, one per character (in the order given), summing to one per pixel."""
    if isinstance(positions, int):
        positions = [None] * positions
    columns = column_order(list(positions))
    n = len(columns)
    x = (np.arange(width, dtype=np.float64) + 0.5) / width
    # soft step at each seam: 0 left of it, 1 right of it, linear over the feather band
    steps = [np.clip((x - k / n) / max(feather, 1e-6) + 0.5, 0.0, 1.0) for k in range(1, n)]
    edges = [np.ones_like(x)] + steps + [np.zeros_like(x)]
    strips = [edges[c] - edges[c + 1] for c in range(n)]
    return np.stack([np.broadcast_to(strips[c], (height, width)) for c in columns]).astype(np.float32)


GROUP_WORDS = {2: "two people", 3: "three people"}
COUNT_WORDS = {2: {"two", "2", "both", "pair", "couple"}, 3: {"three", "3", "trio"}}


def describe_group(prompt: str, count: int) -> str:
    """The prompt of a panel with ``count`` characters, led by how many people it shows (as the demo world's
    captions are, and as SDXL needs to draw more than one figure) unless it already says how many."""
    lead = GROUP_WORDS.get(count)
    words = set(re.findall(r"[a-z0-9]+", prompt.lower()))
    if lead is None or words & COUNT_WORDS[count]:
        return prompt
    return f"{lead}, {prompt}"

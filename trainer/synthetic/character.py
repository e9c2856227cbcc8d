"""Characters: appearance only, fully determined by the character id (numpy only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

HAIR_STYLES = ("short", "long", "bob", "ponytail", "twin tails", "spiky", "curly", "bald", "buzz cut", "bun")
HAIR_COLORS = {
    "black": (30, 28, 32), "dark brown": (74, 48, 30), "brown": (128, 82, 46), "blonde": (226, 190, 110),
    "red": (178, 52, 34), "ginger": (214, 110, 40), "grey": (150, 150, 154), "white": (236, 236, 232),
    "blue": (60, 110, 210), "pink": (236, 120, 170), "green": (70, 160, 90), "purple": (130, 70, 170),
}
SKIN_TONES = {
    "very light": (255, 226, 206), "light": (244, 204, 176), "fair": (232, 184, 150), "medium": (210, 158, 118),
    "olive": (188, 142, 98), "tan": (166, 116, 78), "brown": (124, 82, 54), "dark": (88, 58, 40),
}
TOPS = ("t-shirt", "long sleeve", "jacket", "dress", "hoodie", "tank top")
PATTERNS = ("plain", "stripes", "dots", "checks", "logo")
BOTTOMS = ("trousers", "shorts", "skirt")
CLOTH_COLORS = {
    "red": (200, 40, 46), "orange": (236, 128, 36), "yellow": (240, 204, 48), "green": (52, 150, 72),
    "teal": (30, 140, 140), "blue": (44, 86, 186), "navy": (30, 40, 90), "purple": (120, 60, 160),
    "pink": (236, 130, 170), "white": (240, 240, 236), "grey": (130, 130, 136), "black": (36, 36, 40),
    "brown": (120, 78, 48), "beige": (214, 190, 150),
}
SHOES = {"black": (30, 30, 34), "white": (236, 236, 236), "brown": (110, 66, 36), "red": (190, 40, 40),
         "blue": (50, 90, 190), "yellow": (230, 190, 40)}
ACCESSORIES = ("hat", "glasses", "scarf", "bag")
HEIGHTS = ("short", "average", "tall")
BUILDS = ("slim", "average", "broad")


@dataclass(frozen=True)
class Character:
    """Everything that must stay the same across a character's images."""

    id: int
    height: float  # leg/torso length factor, 0.88 .. 1.12
    build: float  # width factor, 0.82 .. 1.28
    head_size: float  # head size relative to the body unit, 0.92 .. 1.15
    skin: str
    hair_style: str
    hair_color: str
    top: str
    top_color: str
    pattern: str
    pattern_color: str
    bottom: str
    bottom_color: str
    shoes: str
    hat: bool
    glasses: bool
    scarf: bool
    bag: bool
    accent_color: str  # hat / scarf / bag colour

    @property
    def height_word(self) -> str:
        return HEIGHTS[0 if self.height < 0.96 else 2 if self.height > 1.04 else 1]

    @property
    def build_word(self) -> str:
        return BUILDS[0 if self.build < 0.97 else 2 if self.build > 1.13 else 1]

    @property
    def accessories(self) -> list[str]:
        return [name for name in ACCESSORIES if getattr(self, name)]

    def attributes(self) -> dict:
        attrs = asdict(self)
        attrs.update(height_word=self.height_word, build_word=self.build_word)
        return attrs

    def description(self) -> str:
        """An appearance description, e.g. 'a tall slim person with fair skin, long red hair, ...'."""
        hair = "no hair" if self.hair_style == "bald" else f"{self.hair_color} hair in a {self.hair_style} style"
        if self.hair_style in ("short", "long", "curly", "spiky"):
            hair = f"{self.hair_style} {self.hair_color} hair"
        pattern = "" if self.pattern == "plain" else {"stripes": " striped", "dots": " polka-dot",
                                                       "checks": " checked", "logo": ""}[self.pattern]
        top = f"a {self.top_color}{pattern} {self.top}"
        if self.pattern == "logo":
            top += f" with a {self.pattern_color} logo"
        elif self.pattern != "plain":
            top += f" ({self.pattern_color} {self.pattern})"
        article = "an" if self.height_word[0] in "aeiou" else "a"
        parts = [f"{article} {self.height_word} {self.build_word} person with {self.skin} skin", hair, top]
        if self.top != "dress":
            parts.append(f"{self.bottom_color} {self.bottom}")
        parts.append(f"{self.shoes} shoes")
        extras = [f"a {self.accent_color} {a}" if a in ("hat", "scarf", "bag") else a for a in self.accessories]
        text = ", ".join(parts)
        return text + (", " + " and ".join(extras) if extras else "")


def _pick(rng: np.random.Generator, options):
    options = list(options)
    return options[int(rng.integers(len(options)))]


@lru_cache(maxsize=4096)
def make_character(character_id: int) -> Character:
    """The character with this id (same id -> same character, on any machine)."""
    if not isinstance(character_id, (int, np.integer)) or character_id < 0:
        raise ValueError(f"character id must be a non-negative integer; got {character_id!r}")
    rng = np.random.default_rng([int(character_id), 0x5E41A1])
    top = _pick(rng, TOPS)
    top_color = _pick(rng, CLOTH_COLORS)
    pattern = _pick(rng, PATTERNS) if rng.random() < 0.6 else "plain"
    pattern_color = _pick(rng, [c for c in CLOTH_COLORS if c != top_color])
    bottom_color = _pick(rng, [c for c in CLOTH_COLORS if c != top_color])
    hair_style = _pick(rng, HAIR_STYLES)
    return Character(
        id=int(character_id),
        height=float(rng.uniform(0.88, 1.12)),
        build=float(rng.uniform(0.82, 1.28)),
        head_size=float(rng.uniform(0.92, 1.15)),
        skin=_pick(rng, SKIN_TONES),
        hair_style=hair_style,
        hair_color=_pick(rng, HAIR_COLORS),
        top=top,
        top_color=top_color,
        pattern=pattern,
        pattern_color=pattern_color,
        bottom=_pick(rng, BOTTOMS),
        bottom_color=bottom_color,
        shoes=_pick(rng, SHOES),
        hat=bool(rng.random() < 0.2) and hair_style not in ("twin tails",),
        glasses=bool(rng.random() < 0.25),
        scarf=bool(rng.random() < 0.2),
        bag=bool(rng.random() < 0.2),
        accent_color=_pick(rng, CLOTH_COLORS),
    )


def appearance_combinations() -> int:
    """How many distinct discrete appearances exist (continuous body shape not counted)."""
    return (len(HAIR_STYLES) * len(HAIR_COLORS) * len(SKIN_TONES) * len(TOPS) * len(CLOTH_COLORS)
            * len(PATTERNS) * (len(CLOTH_COLORS) - 1) * len(BOTTOMS) * (len(CLOTH_COLORS) - 1) * len(SHOES)
            * 2 ** len(ACCESSORIES) * len(CLOTH_COLORS))


SPLITS = {"train": (0, 90), "val": (90, 95), "test": (95, 100)}


def split_of(character_id: int) -> str:
    """train / val / test by a hash of the id: 90% / 5% / 5%, disjoint by construction."""
    bucket = (int(character_id) * 2654435761 % 2**32) % 100
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def character_ids(split: str, n: int, start: int = 0) -> list[int]:
    """The first ``n`` character ids (from ``start``) that belong to ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {sorted(SPLITS)}")
    ids, cid = [], start
    while len(ids) < n:
        if split_of(cid) == split:
            ids.append(cid)
        cid += 1
    return ids

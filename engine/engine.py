"""The engine: the pipelines of one preset on one device, and what was loaded from where (``load_engine`` in
``engine.loading`` builds it)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .pipelines.personalize import PersonalizePipeline
from .presets import Preset

if TYPE_CHECKING:
    from .pipelines.standardize import StandardizePipeline


class EngineLoadError(ValueError):
    """A component could not be loaded; the message names it, its source and how to get it."""


@dataclass
class LoadedComponent:
    name: str
    location: str  # resolved local path, or hub:repo/subfolder/file
    kind: str  # the class that was loaded

    def __str__(self) -> str:
        return f"{self.name:14s} {self.kind:34s} {self.location}"


@dataclass
class Engine:
    """Everything the studio and the CLI need: the pipelines of one preset on one device."""

    preset: Preset
    device: torch.device
    dtype: torch.dtype
    personalize: PersonalizePipeline | None
    standardize: "StandardizePipeline | None" = None
    components: list[LoadedComponent] = field(default_factory=list)
    why: str = ""  # why this preset/device was chosen (shown by the UI)
    # One model call at a time: the pipelines keep per-call state (scheduler timesteps, adapter scale, guidance, run
    # counters, the sheet cache), so concurrent callers (UI and API events, threads of a script) queue here.
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)

    def describe(self) -> str:
        dtypes = {str(p.dtype).replace("torch.", "") for p in (self.personalize, self.standardize) if p is not None}
        dtypes = dtypes or {str(self.dtype).replace("torch.", "")}
        lines = [f"preset {self.preset.name} on {self.device} ({', '.join(sorted(dtypes))})"]
        if self.why:
            lines.append(self.why)
        lines += [str(c) for c in self.components]
        return "\n".join(lines)

    def generation_options(self, **options) -> dict:
        """The preset's defaults updated with the non-None ``options``."""
        merged = dict(self.preset.defaults)
        merged.update({k: v for k, v in options.items() if v is not None})
        return merged

    def generate_panels(self, prompts, sheet=None, **options):
        """Panels for ``prompts`` with the preset's defaults; returns ``PersonalizePipelineOutput``."""
        if self.personalize is None:
            raise ValueError("this engine was loaded without Stage II (personalize)")
        with self.lock:
            return self.personalize(prompt=prompts, sheet=sheet, **self.generation_options(**options))

    def appearance_scores(self, sheet, images, masks=None) -> list[float]:
        """How much each image still looks like the sheet's character (CLIP image cosine, figure only)."""
        if self.personalize is None:
            raise ValueError("this engine was loaded without Stage II (personalize)")
        with self.lock:
            return self.personalize.appearance_scores(sheet, images, masks)

    def figure_mask(self, image):
        """The figure mask (H, W) in [0, 1] of an image from the mask detector, or None where there is none."""
        detector = getattr(self.standardize, "mask_detector", None) if self.standardize is not None else None
        if detector is None:
            return None
        with self.lock:
            return detector(image)

    def standardize_reference(self, reference, **options):
        """A character sheet from ``reference`` with the preset's Stage I defaults; ``StandardizePipelineOutput``."""
        if self.standardize is None:
            raise ValueError("this engine was loaded without Stage I (standardize)")
        merged = dict(self.preset.standardize_defaults)
        merged.update({k: v for k, v in options.items() if v is not None})
        with self.lock:
            return self.standardize(reference, **merged)

"""What the studio does, as plain functions over the engine's public API (no torch, no Gradio).

The UI events and the named API endpoints both call these; long work reports progress through a callback.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from engine.preprocess.image import load_image

from .layout import PanelArt, paginate, render_page
from .script import PanelSpec, parse_script
from .story import STYLES, Character, Panel, Story

MAX_PROMPT_CHARS = 600
NAME = re.compile(r"^[\w][\w .'-]{0,39}$")
Progress = Callable[[float, str], None]


def _noop(fraction: float, text: str) -> None:
    return None


def read_reference(image) -> tuple[Image.Image, str | None]:
    """A reference upload as RGB, plus a note for the user (animated images use their first frame)."""
    note = None
    if isinstance(image, str):
        try:
            with Image.open(image) as probe:
                if getattr(probe, "n_frames", 1) > 1:
                    note = "That was an animated image: its first frame is used."
        except (OSError, SyntaxError, Image.DecompressionBombError):
            pass  # load_image below says what is wrong
    return load_image(image, name="reference", min_side=64), note


def check_name(name: str, story: Story | None = None) -> str:
    name = (name or "").strip()
    if not name:
        raise ValueError("Give the character a name (it is how the script refers to them, e.g. [Mia]).")
    if name.upper() == "NC":
        raise ValueError("NC is reserved for panels without a character; choose another name.")
    if not NAME.match(name) or "[" in name or "]" in name or "," in name:
        raise ValueError(f"{name!r} is not a usable name: up to 40 letters, digits, spaces, - or ' (no [ ] or ,).")
    return name


def review_image(canvas: Image.Image, mask: Image.Image | None, pose_map: Image.Image | None) -> Image.Image:
    """The canvas with the detected mask (background dimmed) and the reference pose drawn over it."""
    base = canvas.convert("RGB")
    if mask is not None:
        m = np.asarray(mask.convert("L"), np.float32)[..., None] / 255.0
        arr = np.asarray(base, np.float32)
        tint = np.array([40, 60, 140], np.float32)
        arr = arr * (0.45 + 0.55 * m) + tint * 0.35 * (1 - m)
        base = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if pose_map is not None:
        pose = np.asarray(pose_map.convert("RGB"))
        drawn = pose.max(axis=2) > 30
        arr = np.asarray(base).copy()
        arr[drawn] = pose[drawn]
        base = Image.fromarray(arr)
    return base


def standardize(engine, image, seed: int | None, steps: int | None, guidance: float | None,
                progress: Progress = _noop) -> dict:
    """Reference -> sheet and what the reviewer sees. ValueError for bad input."""
    reference, note = read_reference(image)
    total = steps or engine.preset.standardize_defaults.get("num_inference_steps", 20)

    def on_step(pipe, i, t, tensors):
        progress((i + 1) / total, "standardizing")
        return {}

    out = engine.standardize_reference(reference, seed=None if seed is None else int(seed),
                                       num_inference_steps=None if steps is None else int(steps),
                                       guidance_scale=guidance, callback_on_step_end=on_step)
    return {"reference": reference, "sheet": out.sheet, "review": review_image(out.canvas, out.mask,
                                                                              out.reference_pose_map),
            "target_pose": out.target_pose_map, "seed": out.seed, "note": note}


def set_character(story: Story, name: str, result: dict, steps, guidance) -> Character:
    """Adds (or replaces) a character with a freshly standardized, not yet accepted, sheet."""
    name = check_name(name)
    character = Character(name=name, reference=result["reference"], sheet=result["sheet"], accepted=False,
                          seed=result["seed"], steps=steps, guidance=guidance, review=result["review"])
    story.characters[name] = character
    return character


def parse(story: Story, script: str) -> list[PanelSpec]:
    """The script's panels for the story's accepted characters (ValueError listing every problem)."""
    return parse_script(script, list(story.accepted()))


def sync_panels(story: Story, specs: list[PanelSpec]) -> None:
    """Keeps drawn panels whose line did not change; new or changed lines get new panels."""
    old = {(p.spec.character, p.spec.prompt): p for p in story.panels}
    panels = []
    for spec in specs:
        kept = old.pop((spec.character, spec.prompt), None)
        if kept is not None:
            kept.spec = spec
            panels.append(kept)
        else:
            panels.append(Panel(spec=spec))
    story.panels = panels


def styled(prompt: str, style: str) -> str:
    suffix = STYLES.get(style, ("", ""))[0]
    return f"{prompt}, {suffix}" if suffix else prompt


def draw_panels(engine, story: Story, indices: list[int] | None = None, seed: int | None = None, steps=None,
                strength=None, batch: int = 4, progress: Progress = _noop) -> Iterator[list[int]]:
    """Draws the panels (all not-yet-drawn ones, or ``indices``) in batches; yields the indices after each batch
    so the UI can show them as they finish. Locked panels keep their seed; others get ``seed + index`` or a new one."""
    todo = [i for i in (indices if indices is not None else range(len(story.panels)))
            if indices is not None or story.panels[i].image is None]
    if not todo:
        return
    accepted = story.accepted()
    for i in todo:
        name = story.panels[i].spec.character
        if name is not None and name not in accepted:
            raise ValueError(f"panel {i + 1} needs {name}, who has no accepted sheet: accept the sheet first")
        if len(story.panels[i].text) > MAX_PROMPT_CHARS:
            raise ValueError(f"panel {i + 1}: the prompt is over {MAX_PROMPT_CHARS} characters")
    rng = np.random.default_rng()
    negative = " , ".join(x for x in (story.negative_prompt, STYLES.get(story.style, ("", ""))[1]) if x) or None
    done = 0
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        panels = [story.panels[i] for i in chunk]
        seeds = []
        for i, p in zip(chunk, panels):
            if not (p.locked and p.seed is not None):
                p.seed = int(seed) + i if seed is not None else int(rng.integers(0, 2**31 - 1))
            seeds.append(p.seed)

        def on_step(pipe, step, t, tensors, done=done, size=len(chunk)):
            within = (pipe.current_run * pipe.num_timesteps + step + 1) / max(1, pipe.num_runs * pipe.num_timesteps)
            progress((done + within * size) / len(todo), f"drawing panels {done + 1}-{done + size} of {len(todo)}")
            return {}

        output = engine.generate_panels(
            [styled(p.text, story.style) for p in panels],
            sheet=[accepted[p.spec.character].sheet if p.spec.character else None for p in panels],
            seeds=seeds, negative_prompt=negative, num_inference_steps=steps,
            adapter_scale=strength, callback_on_step_end=on_step)
        for p, image in zip(panels, output.images):
            p.image = image
            p.mask = engine.figure_mask(image)
            if p.spec.character is not None:
                p.consistency = engine.appearance_scores(accepted[p.spec.character].sheet, [image], [p.mask])[0]
        flag_drift(story)
        done += len(chunk)
        yield chunk


DRIFT_RATIO = 0.85


def flag_drift(story: Story) -> None:
    """Marks panels whose appearance score is well below their character's median (below 85% of it)."""
    by_character: dict[str, list[Panel]] = {}
    for p in story.panels:
        if p.consistency is not None and p.spec.character is not None:
            by_character.setdefault(p.spec.character, []).append(p)
    for panels in by_character.values():
        median = float(np.median([p.consistency for p in panels]))
        for p in panels:
            p.drifted = len(panels) >= 3 and p.consistency < DRIFT_RATIO * median


def make_pages(story: Story) -> list[Image.Image]:
    drawn = [p for p in story.panels if p.image is not None]
    if not drawn:
        raise ValueError("No panels are drawn yet: draw the panels first.")
    pages = []
    for page in paginate(len(drawn), story.layout):
        arts = [PanelArt(image=drawn[i].image, mask=drawn[i].mask, speech=drawn[i].spec.speech,
                         caption=drawn[i].spec.caption) for i in page]
        image, _ = render_page(arts, story.layout, story.page_size, gutter=story.gutter, border=story.border)
        pages.append(image)
    return pages

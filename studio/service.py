"""What the studio does, as plain functions over the engine's public API (no torch, no Gradio).

The UI events and the named API endpoints both call these; long work reports progress through a callback.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from engine.preprocess.image import MAX_PIXELS, load_image
from engine.regions import character_regions, describe_group

from .layout import BORDER_RANGE, GUTTER_RANGE, LAYOUTS, PAGE_SIZES, PanelArt, paginate, render_page
from .script import PanelSpec, parse_script
from .story import STYLES, Character, Panel, Story, check_name, load_archive  # noqa: F401 (check_name: the studio's name rule)

Progress = Callable[[float, str], None]

# What one request may cost, the same for the UI and every API endpoint (a request past these is refused with a
# message, never trimmed silently): sampling steps, panels and sheets per request, and every uploaded image.
MAX_PROMPT_CHARS = 600
MAX_STEPS = 50
MAX_PANELS_PER_REQUEST = 24
MAX_SHEETS_PER_REQUEST = 16
MAX_PAGES_PER_REQUEST = 50
MAX_UPLOAD_BYTES = 25 * 2**20
MAX_UPLOAD_PIXELS = MAX_PIXELS  # 40 MP, the engine's own limit
GUIDANCE_RANGE = (1.0, 10.0)  # Stage I's classifier-free guidance
COLOUR_RANGE = (0.0, 1.0)  # Stage I's colour correction after the model (colour_match: 0 off, 1 the reference's)
STRENGTH_RANGE = (0.0, 1.5)  # Stage II's adapter scale ("character strength")
MAX_SEED = 2**32 - 1
# Uploads are opened by these Pillow plugins only: no EPS/PS (Ghostscript), PDF, SVG or exotic formats.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def _noop(fraction: float, text: str) -> None:
    return None


def read_upload(file, what: str = "image", min_side: int = 1) -> tuple[Image.Image, str | None]:
    """An uploaded image (a file path from Gradio, or an image object) as RGB, plus a note for the user (animated
    images use their first frame). Every endpoint reads uploads through here: a size limit in bytes and pixels, and
    only the formats of ``IMAGE_FORMATS``. Messages name the person's file, never the server's temporary path."""
    if not isinstance(file, (str, os.PathLike)):
        return load_image(file, name=what, min_side=min_side), None
    path = Path(file)
    shown = f"{what} {path.name!r}"
    if not path.is_file():
        raise ValueError(f"{shown} was not received: upload it again")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{shown} is an empty file (0 bytes): upload the image again")
    if size > MAX_UPLOAD_BYTES:
        raise ValueError(f"{shown} is {size / 2**20:.1f} MB; uploads are limited to {MAX_UPLOAD_BYTES // 2**20} MB "
                         "(save it as a smaller JPEG or PNG)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as image:
                if image.width * image.height > MAX_UPLOAD_PIXELS:
                    raise ValueError(f"{shown} is {image.width}x{image.height}, over the "
                                     f"{MAX_UPLOAD_PIXELS // 1_000_000} MP limit: downscale it first")
                note = "That was an animated image: its first frame is used." \
                    if getattr(image, "n_frames", 1) > 1 else None
                image.load()
                return load_image(image, name=shown, min_side=min_side), note
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"{shown} is too large to decode safely: downscale it first") from None
    except (OSError, SyntaxError):  # not an image, a truncated one, or a format outside the allowlist
        raise ValueError(f"{shown} is not a readable image: give a PNG, JPEG, WebP, GIF, BMP or TIFF file") from None


def read_reference(image) -> tuple[Image.Image, str | None]:
    """A reference upload as RGB, plus a note for the user."""
    return read_upload(image, "reference", min_side=64)


def seed_value(value) -> int | None:
    """One meaning of a seed everywhere (UI fields and API): empty, None or negative (-1) means a random seed."""
    if value in (None, ""):
        return None
    try:
        seed = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"seed {value!r} is not a whole number (give -1 for a random seed)") from None
    if seed > MAX_SEED:
        raise ValueError(f"seed {seed} is too large: give 0 to {MAX_SEED}, or -1 for a random seed")
    return None if seed < 0 else seed


def number(value, what: str, low: float, high: float, default=None, integer: bool = False):
    """A numeric option in [low, high] (None keeps ``default``); ValueError naming the option otherwise."""
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} should be a number from {low:g} to {high:g}, not {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{what} should be a number from {low:g} to {high:g}, not {value!r}") from None
    if not (low <= x <= high):  # also refuses NaN
        raise ValueError(f"{what} {value} is out of range: choose {low:g} to {high:g}")
    if integer and x != int(x):
        raise ValueError(f"{what} should be a whole number, not {value}")
    return int(x) if integer else x


def steps_value(value, default=None) -> int | None:
    return number(value, "steps", 1, MAX_STEPS, default, integer=True)


def page_settings(layout, page_size, gutter, border) -> tuple[str, str, int, int]:
    """Checked page options (None takes the default)."""
    layout = layout or "4-panel grid"
    page_size = page_size or "A4"
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")
    if page_size not in PAGE_SIZES:
        raise ValueError(f"unknown page size {page_size!r}: choose one of {', '.join(PAGE_SIZES)}")
    return (layout, page_size, number(gutter, "gutter", *GUTTER_RANGE, 24, integer=True),
            number(border, "border", *BORDER_RANGE, 5, integer=True))


PANEL_OPTIONS = {"steps", "strength", "style", "negative_prompt"}


def panel_options(options) -> dict:
    """The /panels options object, checked: {"steps": 1-50, "strength": 0-1.5, "style": one of STYLES,
    "negative_prompt": text}; every key optional."""
    if options in (None, ""):
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"options should be an object like {{\"steps\": 20, \"strength\": 1.0}}, "
                         f"not {type(options).__name__}")
    unknown = sorted(set(options) - PANEL_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}: "
                         f"use {', '.join(sorted(PANEL_OPTIONS))}")
    style = options.get("style", "none")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}: choose one of {', '.join(STYLES)}")
    negative = options.get("negative_prompt", "") or ""
    if not isinstance(negative, str) or len(negative) > MAX_PROMPT_CHARS:
        raise ValueError(f"negative_prompt should be text of at most {MAX_PROMPT_CHARS} characters")
    return {"steps": steps_value(options.get("steps")),
            "strength": number(options.get("strength"), "strength", *STRENGTH_RANGE), "style": style,
            "negative_prompt": negative}


class Cancelled(Exception):
    """The person pressed Cancel: raised from a sampling step, so the run stops at once."""


def step_callback(progress: Progress, fraction, text: str, cancel: Callable[[], bool] | None = None):
    """A pipeline's ``callback_on_step_end``: reports ``fraction(pipe, step)`` and stops the run when cancelled."""
    def on_step(pipe, step, t, tensors):
        if cancel is not None and cancel():
            raise Cancelled
        progress(fraction(pipe, step), text)
        return {}
    return on_step


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


def standardize(engine, image, seed=None, steps=None, guidance=None, colour=None, progress: Progress = _noop,
                cancel: Callable[[], bool] | None = None) -> dict:
    """Reference -> sheet and what the reviewer sees; pure (inputs in, images out), so it can run as a ZeroGPU
    function. ValueError for bad input (checked before any model runs). ``colour``: how far each body part's colour
    is moved toward the reference's after the model (Stage I's ``colour_match``; None: the preset's)."""
    reference, note = read_reference(image)
    seed, steps = seed_value(seed), steps_value(steps)
    guidance = number(guidance, "guidance", *GUIDANCE_RANGE)
    colour = number(colour, "colour correction", *COLOUR_RANGE)
    total = steps or engine.preset.standardize_defaults.get("num_inference_steps", 20)
    on_step = step_callback(progress, lambda pipe, i: (i + 1) / total, "standardizing", cancel)
    out = engine.standardize_reference(reference, seed=seed, num_inference_steps=steps, guidance_scale=guidance,
                                       colour_match=colour, callback_on_step_end=on_step)
    return {"reference": reference, "sheet": out.sheet, "review": review_image(out.canvas, out.mask,
                                                                              out.reference_pose_map),
            "target_pose": out.target_pose_map, "seed": out.seed, "note": note}


def set_character(story: Story, name: str, result: dict, steps, guidance, colour=None) -> Character:
    """Adds (or replaces) a character with a freshly standardized, not yet accepted, sheet. A replaced character's
    revision goes up, so panels drawn from its old sheet become stale once the new one is accepted."""
    name = check_name(name)
    old = story.characters.get(name)
    character = Character(name=name, reference=result["reference"], sheet=result["sheet"], accepted=False,
                          seed=result["seed"], steps=steps, guidance=guidance, colour=colour, review=result["review"],
                          revision=0 if old is None else old.revision + 1)
    story.characters[name] = character
    return character


def parse(story: Story, script: str) -> list[PanelSpec]:
    """The script's panels for the story's accepted characters (ValueError listing every problem)."""
    return parse_script(script, list(story.accepted()))


def sync_panels(story: Story, specs: list[PanelSpec]) -> None:
    """Keeps drawn panels whose line did not change; new or changed lines get new panels."""
    def key(spec):  # who stands where, and what happens
        return tuple(spec.characters), tuple(spec.positions), spec.prompt

    old = {key(p.spec): p for p in story.panels}
    panels = []
    for spec in specs:
        kept = old.pop(key(spec), None)
        if kept is not None:
            kept.spec = spec
            panels.append(kept)
        else:
            panels.append(Panel(spec=spec))
    story.panels = panels


def styled(prompt: str, style: str) -> str:
    suffix = STYLES.get(style, ("", ""))[0]
    return f"{prompt}, {suffix}" if suffix else prompt


def character_masks(mask: np.ndarray | None, positions: list) -> list[np.ndarray | None]:
    """Each character's part of a panel's figure mask: the figures inside that character's region (the columns the
    engine conditioned them in); the whole mask for a panel with one character."""
    if mask is None or len(positions) <= 1:
        return [mask] * len(positions)
    return [mask * region for region in character_regions(list(positions), *mask.shape)]


def render_panels(engine, prompts: list[str], sheets: list, regions: list, seeds: list[int], negative_prompt=None,
                  steps=None, strength=None, progress: Progress = _noop,
                  cancel: Callable[[], bool] | None = None) -> dict:
    """The model work of one batch of panels, pure (inputs in; images, figure masks and appearance scores out), so it
    can run as a ZeroGPU function in another process: it touches no story. ``sheets[i]`` is a list of the panel's
    character sheets (empty: no character), ``regions[i]`` their positions; ``scores[i]`` one score per sheet."""
    def fraction(pipe, step):
        return (pipe.current_run * pipe.num_timesteps + step + 1) / max(1, pipe.num_runs * pipe.num_timesteps)

    output = engine.generate_panels(prompts, sheet=[list(s) or None for s in sheets],
                                    regions=[list(r) if len(r) > 1 else None for r in regions], seeds=seeds,
                                    negative_prompt=negative_prompt, num_inference_steps=steps, adapter_scale=strength,
                                    callback_on_step_end=step_callback(progress, fraction, "drawing panels", cancel))
    masks = [engine.figure_mask(image) for image in output.images]
    scores = [[engine.appearance_scores(sheet, [image], [part])[0]
               for sheet, part in zip(group, character_masks(mask, positions))]
              for group, positions, image, mask in zip(sheets, regions, output.images, masks)]
    return {"images": output.images, "masks": masks, "scores": scores}


def draw_panels(engine, story: Story, indices: list[int] | None = None, seed: int | None = None, steps=None,
                strength=None, batch: int = 4, progress: Progress = _noop, render=None,
                cancel: Callable[[], bool] | None = None) -> Iterator[list[int]]:
    """Draws the panels (those not drawn yet or stale, or ``indices``) in batches through ``render`` (the pure model
    call; ``render_panels`` on ``engine`` by default); yields the indices after each batch so the UI can show them as they finish. Locked panels keep their seed;
    others get ``seed + index`` or a new one. At most ``MAX_PANELS_PER_REQUEST`` panels per call."""
    todo = list(indices) if indices is not None else story.to_draw()
    if not todo:
        return
    if len(todo) > MAX_PANELS_PER_REQUEST:
        raise ValueError(f"{len(todo)} panels in one request; draw at most {MAX_PANELS_PER_REQUEST} at a time")
    steps, strength = steps_value(steps), number(strength, "strength", *STRENGTH_RANGE)
    seed = seed_value(seed)
    accepted = story.accepted()
    for i in todo:
        for name in story.panels[i].spec.characters:
            if name not in accepted:
                raise ValueError(f"panel {i + 1} needs {name}, who has no accepted sheet: accept the sheet first")
        if len(story.panels[i].text) > MAX_PROMPT_CHARS:
            raise ValueError(f"panel {i + 1}: the prompt is over {MAX_PROMPT_CHARS} characters")
    if render is None:
        def render(*args):
            return render_panels(engine, *args)
    rng = np.random.default_rng()
    negative = " , ".join(x for x in (story.negative_prompt, STYLES.get(story.style, ("", ""))[1]) if x) or None
    done = 0
    for start in range(0, len(todo), batch):
        chunk = todo[start:start + batch]
        panels = [story.panels[i] for i in chunk]
        for i, p in zip(chunk, panels):
            if not (p.locked and p.seed is not None):
                p.seed = int(seed) + i if seed is not None else int(rng.integers(0, 2**31 - 1))
        characters = [[accepted[name] for name in p.spec.characters] for p in panels]
        out = render([styled(describe_group(p.text, len(p.spec.characters)), story.style) for p in panels],
                     [[c.sheet for c in group] for group in characters], [p.spec.positions for p in panels],
                     [p.seed for p in panels], negative, steps, strength,
                     lambda f, t, done=done, size=len(chunk): progress(
                         (done + f * size) / len(todo), f"drawing panels {done + 1}-{done + size} of {len(todo)}"),
                     cancel)
        for p, group, image, mask, scores in zip(panels, characters, out["images"], out["masks"], out["scores"]):
            p.image, p.mask = image, mask
            p.scores = {c.name: float(score) for c, score in zip(group, scores)}
            p.sheet_revisions = {c.name: c.revision for c in group}
        flag_drift(story)
        done += len(chunk)
        yield chunk


DRIFT_RATIO = 0.85


def flag_drift(story: Story) -> None:
    """Marks panels where a character's appearance score is well below that character's median over the story's
    panels (below 85% of it)."""
    by_character: dict[str, list[float]] = {}
    for p in story.panels:
        for name, score in p.scores.items():
            by_character.setdefault(name, []).append(score)
    medians = {name: float(np.median(scores)) for name, scores in by_character.items() if len(scores) >= 3}
    for p in story.panels:
        p.drifted = any(name in medians and score < DRIFT_RATIO * medians[name] for name, score in p.scores.items())


def panel_art(panel: Panel) -> PanelArt:
    """What a page draws of a panel: its picture, figures, captions and bubbles, each bubble's tail aimed at its
    speaker's figure (the figure inside the speaker's region)."""
    spec = panel.spec
    parts = dict(zip(spec.characters, character_masks(panel.mask, spec.positions)))
    return PanelArt(image=panel.image, mask=panel.mask, speech=spec.speech, caption=spec.caption,
                    speakers=[parts.get(name) if name is not None else None for name in spec.speakers])


def make_pages(story: Story, layout=None, page_size=None, gutter=None, border=None) -> list[Image.Image]:
    """The story's drawn panels laid out as pages (the story's page settings, or the ones given)."""
    layout, page_size = layout or story.layout, page_size or story.page_size
    gutter = story.gutter if gutter is None else gutter
    border = story.border if border is None else border
    drawn = [p for p in story.panels if p.image is not None]
    if not drawn:
        raise ValueError("No panels are drawn yet: draw the panels first.")
    pages = []
    for page in paginate(len(drawn), layout):
        arts = [panel_art(drawn[i]) for i in page]
        image, _ = render_page(arts, layout, page_size, gutter=gutter, border=border)
        pages.append(image)
    return pages


MAX_ARCHIVE_UPLOAD_BYTES = 256 * 2**20


def read_archive(file) -> Story:
    """A project archive upload (a path), with the upload limits; messages name the person's file."""
    path = Path(file)
    if not path.is_file():
        raise ValueError(f"project {path.name!r} was not received: upload it again")
    size = path.stat().st_size
    if size > MAX_ARCHIVE_UPLOAD_BYTES:
        raise ValueError(f"project {path.name!r} is {size / 2**20:.0f} MB; projects are limited to "
                         f"{MAX_ARCHIVE_UPLOAD_BYTES // 2**20} MB")
    try:
        return load_archive(path.read_bytes())
    except ValueError as exc:
        raise ValueError(f"Cannot open {path.name!r}: {exc}") from None

"""A story: its characters (references, sheets), script, panels and page settings; saved as a project archive.

The archive is a zip of ``story.json`` and PNG images. Loading never extracts anything: entries are read by name,
names must be the ones ``story.json`` lists under ``characters/`` or ``panels/``, sizes and counts are bounded, so
a malformed or hostile archive (path traversal, zip bombs, wrong types) is refused with a clear message.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .layout import BORDER_RANGE, GUTTER_RANGE, LAYOUTS, PAGE_SIZES
from .script import MAX_CHARACTERS_PER_PANEL, MAX_LINE_CHARS, MAX_PANELS, POSITIONS, PanelSpec, parse_script

ARCHIVE_VERSION = 1
MAX_ARCHIVE_ENTRIES = 2000
MAX_ARCHIVE_BYTES = 512 * 2**20
MAX_IMAGE_PIXELS = 40_000_000
NAME = re.compile(r"^[\w][\w .'-]{0,39}$")
MAX_TITLE_CHARS = 200
SAFE_NAME = re.compile(r"^(characters|panels)/[0-9]{1,4}/[a-z_]{1,20}\.png$")
STYLES = {
    "none": ("", ""),
    "comic": ("comic book style, bold ink lines, flat colors", "photo, blurry"),
    "manga": ("manga style, black and white, screentone", "color, photo"),
    "watercolor": ("soft watercolor illustration", "photo, harsh lines"),
    "cinematic": ("cinematic lighting, detailed background", "flat, blurry"),
}


def check_name(name: str) -> str:
    """A character's name as the script refers to it ([Mia]); ValueError saying what is wrong."""
    name = (name or "").strip() if isinstance(name, str) else name
    if not isinstance(name, str) or not name:
        raise ValueError("Give the character a name (it is how the script refers to them, e.g. [Mia]).")
    if name.upper() == "NC":
        raise ValueError("NC is reserved for panels without a character; choose another name.")
    if not NAME.match(name) or "[" in name or "]" in name or "," in name:
        raise ValueError(f"{name!r} is not a usable name: up to 40 letters, digits, spaces, - or ' (no [ ] or ,).")
    return name


@dataclass
class Character:
    name: str
    reference: Image.Image
    sheet: Image.Image | None = None
    accepted: bool = False
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    colour: float | None = None  # the colour correction the sheet was drawn with (None: the preset's)
    review: Image.Image | None = None  # canvas with mask and pose drawn over it
    revision: int = 0  # counts the sheets this character has had: panels drawn from an older one are stale


@dataclass
class Panel:
    spec: PanelSpec
    seed: int | None = None
    locked: bool = False
    prompt: str | None = None  # an edit of spec.prompt
    image: Image.Image | None = None
    mask: np.ndarray | None = None  # the figures (all characters) in the panel
    scores: dict[str, float] = field(default_factory=dict)  # per character: appearance against their sheet
    drifted: bool = False  # a character well below their other panels: worth a redraw
    sheet_revisions: dict[str, int] = field(default_factory=dict)  # per character: the revision it was drawn from

    @property
    def text(self) -> str:
        return self.prompt if self.prompt else self.spec.prompt

    @property
    def consistency(self) -> float | None:
        """The panel's weakest character score (None without characters or before drawing)."""
        return min(self.scores.values()) if self.scores else None


@dataclass
class Story:
    title: str = "Untitled story"
    characters: dict[str, Character] = field(default_factory=dict)
    script: str = ""
    style: str = "comic"
    negative_prompt: str = ""
    panels: list[Panel] = field(default_factory=list)
    layout: str = "4-panel grid"
    page_size: str = "A4"
    gutter: int = 24
    border: int = 5

    def accepted(self) -> dict[str, Character]:
        return {n: c for n, c in self.characters.items() if c.accepted and c.sheet is not None}

    def is_stale(self, panel: Panel) -> bool:
        """A drawn panel one of whose characters has accepted another sheet since it was drawn."""
        if panel.image is None:
            return False
        for name in panel.spec.characters:
            character, drawn_from = self.characters.get(name), panel.sheet_revisions.get(name)
            if character is not None and character.accepted and drawn_from is not None \
                    and drawn_from != character.revision:
                return True
        return False

    def to_draw(self) -> list[int]:
        """The panels "Draw panels" draws: not drawn yet, or stale."""
        return [i for i, p in enumerate(self.panels) if p.image is None or self.is_stale(p)]


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_archive(story: Story) -> bytes:
    """The project archive (zip bytes)."""
    files: dict[str, bytes] = {}
    characters = []
    for i, c in enumerate(story.characters.values()):
        entry = {"name": c.name, "accepted": c.accepted, "seed": c.seed, "steps": c.steps, "guidance": c.guidance,
                 "colour": c.colour, "revision": c.revision, "files": {}}
        for key in ("reference", "sheet", "review"):
            image = getattr(c, key)
            if image is not None:
                name = f"characters/{i}/{key}.png"
                files[name] = _png(image)
                entry["files"][key] = name
        characters.append(entry)
    panels = []
    for i, p in enumerate(story.panels):
        entry = {"spec": p.spec.to_dict(), "seed": p.seed, "locked": p.locked, "prompt": p.prompt,
                 "scores": p.scores, "drifted": p.drifted, "sheet_revisions": p.sheet_revisions, "files": {}}
        if p.image is not None:
            files[f"panels/{i}/image.png"] = _png(p.image)
            entry["files"]["image"] = f"panels/{i}/image.png"
        if p.mask is not None:
            files[f"panels/{i}/mask.png"] = _png(Image.fromarray((np.clip(p.mask, 0, 1) * 255).astype(np.uint8)))
            entry["files"]["mask"] = f"panels/{i}/mask.png"
        panels.append(entry)
    meta = {"format": "serialgen-studio-project", "version": ARCHIVE_VERSION, "title": story.title,
            "script": story.script, "style": story.style, "negative_prompt": story.negative_prompt,
            "layout": story.layout, "page_size": story.page_size, "gutter": story.gutter, "border": story.border,
            "characters": characters, "panels": panels}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("story.json", json.dumps(meta, indent=1))
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


class ArchiveError(ValueError):
    pass


def _read_image(z: zipfile.ZipFile, name, mode="RGB") -> Image.Image:
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        raise ArchiveError(f"refusing the archive entry {name!r}: not a project image path")
    try:
        info = z.getinfo(name)
    except KeyError:
        raise ArchiveError(f"the archive lists {name} but does not contain it") from None
    if info.file_size > 64 * 2**20:
        raise ArchiveError(f"{name} is too large ({info.file_size} bytes)")
    try:
        with Image.open(io.BytesIO(z.read(name))) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ArchiveError(f"{name} is too large ({im.width}x{im.height})")
            return im.convert(mode)
    except ArchiveError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ArchiveError(f"{name} is not a readable PNG ({exc})") from None


def _expect(value, kind, what):
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ArchiveError(f"story.json: {what} should be {getattr(kind, '__name__', kind)}, got {type(value).__name__}")
    return value


def _optional(value, kind, what):
    return None if value is None else _expect(value, kind, what)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ArchiveError(f"story.json: {message}")


def _per_character(entry: dict, key: str, legacy_key: str, names: list[str], kind) -> dict:
    """A panel's per-character values (``{name: value}``); archives before group panels kept one value."""
    if key in entry:
        values = _expect(entry[key], dict, f"a panel's {key}")
        _check(all(k in names and isinstance(v, kind) and not isinstance(v, bool) for k, v in values.items()),
               f"a panel's {key} are malformed")
        return values
    legacy = entry.get(legacy_key)
    if legacy is None or not names:
        return {}
    return {names[0]: _expect(legacy, kind, f"a panel's {legacy_key}")}


def load_archive(data: bytes) -> Story:
    """The story of a project archive; ArchiveError (a ValueError) says what is wrong with a bad one."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ArchiveError("this is not a project archive (not a zip file)") from None
    with z:
        infos = z.infolist()
        if len(infos) > MAX_ARCHIVE_ENTRIES:
            raise ArchiveError(f"the archive has {len(infos)} entries; a project has at most {MAX_ARCHIVE_ENTRIES}")
        if sum(i.file_size for i in infos) > MAX_ARCHIVE_BYTES:
            raise ArchiveError("the archive unpacks to more than 512 MB; refusing it")
        for info in infos:
            if info.filename != "story.json" and not SAFE_NAME.match(info.filename):
                raise ArchiveError(f"unexpected entry {info.filename!r} in the archive (only story.json and "
                                   "characters/N/*.png, panels/N/*.png belong in a project)")
        try:
            meta = json.loads(z.read("story.json"))
        except KeyError:
            raise ArchiveError("the archive has no story.json: it is not a SerialGen Studio project") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArchiveError(f"story.json is not valid JSON ({exc})") from None
        except RecursionError:
            raise ArchiveError("story.json is nested too deeply to be a SerialGen Studio project") from None
        if not isinstance(meta, dict) or meta.get("format") != "serialgen-studio-project":
            raise ArchiveError("story.json is not a SerialGen Studio project")
        if meta.get("version") != ARCHIVE_VERSION:
            raise ArchiveError(f"project version {meta.get('version')!r} is not supported (expected {ARCHIVE_VERSION})")
        story = Story(
            title=_expect(meta.get("title", ""), str, "title"), script=_expect(meta.get("script", ""), str, "script"),
            style=_expect(meta.get("style", "comic"), str, "style"),
            negative_prompt=_expect(meta.get("negative_prompt", ""), str, "negative_prompt"),
            layout=_expect(meta.get("layout", "4-panel grid"), str, "layout"),
            page_size=_expect(meta.get("page_size", "A4"), str, "page_size"),
            gutter=_expect(meta.get("gutter", 24), int, "gutter"), border=_expect(meta.get("border", 5), int, "border"))
        # the same checks as the studio's own fields: an archive cannot hold what the studio would refuse
        _check(len(story.title) <= MAX_TITLE_CHARS, f"the title is over {MAX_TITLE_CHARS} characters")
        _check(story.style in STYLES, f"unknown style {story.style!r}")
        _check(len(story.negative_prompt) <= MAX_LINE_CHARS, "the negative prompt is too long")
        _check(story.layout in LAYOUTS, f"unknown layout {story.layout!r}")
        _check(story.page_size in PAGE_SIZES, f"unknown page size {story.page_size!r}")
        _check(GUTTER_RANGE[0] <= story.gutter <= GUTTER_RANGE[1], f"gutter {story.gutter} is out of range")
        _check(BORDER_RANGE[0] <= story.border <= BORDER_RANGE[1], f"border {story.border} is out of range")
        for entry in _expect(meta.get("characters", []), list, "characters"):
            entry = _expect(entry, dict, "a character")
            files = _expect(entry.get("files", {}), dict, "character files")
            if "reference" not in files:
                raise ArchiveError("story.json: a character has no reference image")
            try:
                name = check_name(_expect(entry.get("name"), str, "character name"))
            except ArchiveError:
                raise
            except ValueError as exc:
                raise ArchiveError(f"story.json: a character's name is refused: {exc}") from None
            _check(name not in story.characters, f"the character {name} appears twice")
            story.characters[name] = Character(
                name=name, reference=_read_image(z, files["reference"]),
                sheet=_read_image(z, files["sheet"]) if "sheet" in files else None,
                review=_read_image(z, files["review"]) if "review" in files else None,
                accepted=bool(entry.get("accepted", False)), seed=_optional(entry.get("seed"), int, "a seed"),
                steps=_optional(entry.get("steps"), int, "steps"),
                guidance=_optional(entry.get("guidance"), (int, float), "guidance"),
                colour=_optional(entry.get("colour"), (int, float), "a colour correction"),
                revision=_expect(entry.get("revision", 0), int, "a character revision"))
        if story.script.strip():
            try:
                parse_script(story.script, list(story.characters))
            except ValueError as exc:
                raise ArchiveError(f"the project's script is refused: {exc}") from None
        panel_entries = _expect(meta.get("panels", []), list, "panels")
        _check(len(panel_entries) <= MAX_PANELS, f"{len(panel_entries)} panels; a story has at most {MAX_PANELS}")
        for entry in panel_entries:
            entry = _expect(entry, dict, "a panel")
            spec = dict(_expect(entry.get("spec"), dict, "panel spec"))
            if "character" in spec:  # archives before group panels: one character per panel
                legacy = spec.pop("character")
                spec["characters"] = [] if legacy is None else [legacy]
            try:
                panel_spec = PanelSpec(**spec)
            except TypeError as exc:
                raise ArchiveError(f"story.json: a panel spec is malformed ({exc})") from None
            _check(isinstance(panel_spec.prompt, str) and 0 < len(panel_spec.prompt) <= MAX_LINE_CHARS,
                   "a panel's prompt is empty or too long")
            names = _expect(panel_spec.characters, list, "a panel's characters")
            _check(len(names) <= MAX_CHARACTERS_PER_PANEL and all(isinstance(n, str) for n in names)
                   and len(set(names)) == len(names),
                   f"a panel names {names!r}: at most {MAX_CHARACTERS_PER_PANEL} different characters")
            for name in names:
                _check(name in story.characters, f"a panel names {name!r}, who is not one of the project's characters")
            _check(isinstance(panel_spec.positions, list) and len(panel_spec.positions) == len(names)
                   and all(p is None or p in POSITIONS.values() for p in panel_spec.positions),
                   "a panel's positions are malformed")
            speech = _expect(panel_spec.speech, list, "a panel's speech")
            _check(all(isinstance(x, str) and len(x) <= MAX_LINE_CHARS for x in speech), "a panel's speech is malformed")
            _check(isinstance(panel_spec.speakers, list) and len(panel_spec.speakers) == len(speech)
                   and all(x is None or x in names for x in panel_spec.speakers),
                   "a panel's speakers are not its characters")
            prompt = _optional(entry.get("prompt"), str, "a panel prompt")
            _check(prompt is None or len(prompt) <= MAX_LINE_CHARS, "a panel's edited prompt is too long")
            files = _expect(entry.get("files", {}), dict, "panel files")
            mask = None
            if "mask" in files:
                mask = np.asarray(_read_image(z, files["mask"], "L"), np.float32) / 255.0
            scores = _per_character(entry, "scores", "consistency", names, (int, float))
            revisions = _per_character(entry, "sheet_revisions", "sheet_revision", names, int)
            if "sheet_revisions" not in entry and "sheet_revision" not in entry:  # older archives: current sheets
                revisions = {name: story.characters[name].revision for name in names}
            story.panels.append(Panel(spec=panel_spec, seed=_optional(entry.get("seed"), int, "a panel seed"),
                                      locked=bool(entry.get("locked")), sheet_revisions=revisions,
                                      prompt=prompt, mask=mask, drifted=bool(entry.get("drifted")),
                                      scores={k: float(v) for k, v in scores.items()},
                                      image=_read_image(z, files["image"]) if "image" in files else None))
    return story

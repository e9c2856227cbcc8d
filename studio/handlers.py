"""The studio's events: what each button of the UI does (``Handlers``) and the named, stateless API (``Api``).

Layout and wiring live in ``studio.ui``; the work itself in ``studio.service``. Model work goes through the two pure
functions of ``ModelWork`` (inputs in, images out): on a ZeroGPU Space they run in another process, so they never
touch a story; the handlers update the story with what they return.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import gradio as gr
from PIL import Image

from . import service
from .errors import friendly
from .export import TempFiles, pages_to_cbz, pages_to_pdf, pages_to_png_zip
from .gpu import gpu, on_zero_gpu
from .script import parse_script
from .story import Character, Panel, Story, save_archive

PLACEHOLDER = (235, 235, 235)


class ModelWork:
    """The engine's work as pure functions (ZeroGPU-aware), or a clear message when no models are loaded."""

    def __init__(self, engine, status: str = ""):
        self.engine, self.status = engine, status

        @gpu(duration=lambda *a, **k: 30)
        def standardize(image, seed, steps, guidance, colour, progress=None, cancel=None):
            return service.standardize(self.need(), image, seed, steps, guidance, colour, progress or service._noop,
                                       cancel)

        @gpu(duration=lambda prompts, *a, **k: int(min(120, 20 + 2 * len(prompts))))
        def render(prompts, sheets, regions, seeds, negative, steps, strength, progress=None, cancel=None):
            return service.render_panels(self.need(), prompts, sheets, regions, seeds, negative, steps, strength,
                                         progress or service._noop, cancel)

        if on_zero_gpu():  # callbacks cannot cross into the GPU process: no step progress or cancel there
            self.standardize = lambda *args: standardize(*args[:5])
            self.render = lambda *args: render(*args[:7])
        else:
            self.standardize, self.render = standardize, render

    def need(self):
        if self.engine is None:
            raise ValueError(f"No models are loaded. {self.status}")
        return self.engine

    def figure_mask(self, image):
        return self.engine.figure_mask(image) if self.engine is not None else None


@dataclass
class Cancels:
    """One flag per browser session: Cancel sets it, the running job's sampling steps see it and stop."""

    flags: dict[str, threading.Event] = field(default_factory=dict)

    def start(self, request: gr.Request | None) -> threading.Event:
        flag = self.flags.setdefault(_session(request), threading.Event())
        flag.clear()
        return flag

    def cancel(self, request: gr.Request | None) -> None:
        self.flags.setdefault(_session(request), threading.Event()).set()


def _session(request) -> str:
    return getattr(request, "session_hash", None) or "-"


# ------------------------------------------------------------------------------------------------ views of a story
def characters_table(story: Story) -> list[list]:
    return [[c.name, "accepted" if c.accepted else ("sheet ready" if c.sheet is not None else "-"), c.seed]
            for c in story.characters.values()]


def tags(spec) -> str:
    """A panel's characters as the script writes them: [Mia][Kai:right], or [NC]."""
    return "".join(f"[{name}{':' + where if where else ''}]" for name, where in zip(spec.characters, spec.positions)) \
        or "[NC]"


def gallery(story: Story) -> list[tuple]:
    out = []
    for i, p in enumerate(story.panels):
        label = f"{i + 1}. {tags(p.spec)} {p.text}" + (f" (seed {p.seed}{', locked' if p.locked else ''})"
                                                      if p.seed is not None else "")
        if story.is_stale(p):
            label += " | drawn from an older sheet: Draw panels redraws it"
        elif p.scores:
            label += " | looks like the sheet: " + ", ".join(f"{name} {score:.2f}" for name, score in p.scores.items()) \
                + (" - drifted, redraw?" if p.drifted else "")
        out.append((p.image if p.image is not None else Image.new("RGB", (128, 192), PLACEHOLDER), label))
    return out


def panel_table(story: Story) -> list[list]:
    return [[p.spec.index + 1, tags(p.spec), p.text,
             " / ".join(f"{who}: {said}" if who else said for who, said in zip(p.spec.speakers, p.spec.speech)),
             p.spec.caption or ""] for p in story.panels]


class Handlers:
    """The UI's events, per browser session (the story is that session's ``gr.State``)."""

    def __init__(self, work: ModelWork, files: TempFiles, cancels: Cancels):
        self.work, self.files, self.cancels = work, files, cancels

    # ------------------------------------------------------------------------------------------------ characters
    @friendly
    def standardize(self, story, name, image, seed, steps, strength, colour, request: gr.Request = None,
                    progress=gr.Progress()):
        if image is None:
            raise ValueError("Upload a picture of the character first (or pick an example).")
        name = service.check_name(name)
        flag = self.cancels.start(request)
        result = self.work.standardize(image, seed, steps, strength, colour, lambda f, t: progress(f, desc=t),
                                       flag.is_set)
        if result["note"]:
            gr.Warning(result["note"])
        service.set_character(story, name, result, service.steps_value(steps), strength, colour)
        # the seed box keeps what the person typed (-1 stays random); the seed used is shown here and in the table
        return (story, result["reference"], result["review"], result["sheet"], characters_table(story),
                f"**{name}**: sheet ready (seed {result['seed']}). Accept it, or regenerate with another seed.")

    def regenerate(self, story, name, image, steps, strength, colour, request: gr.Request = None,
                   progress=gr.Progress()):
        return self.standardize(story, name, image, -1, steps, strength, colour, request, progress)

    @friendly
    def accept(self, story, name):
        name = service.check_name(name)
        character = story.characters.get(name)
        if character is None or character.sheet is None:
            raise ValueError(f"{name} has no sheet yet: standardize a picture first.")
        character.accepted = True
        stale = sum(story.is_stale(p) for p in story.panels)
        note = (f" {stale} panel{'s' * (stale != 1)} drawn from {name}'s earlier sheet will be redrawn by "
                "**Draw panels**." if stale else "")
        return story, characters_table(story), f"**{name}** accepted: use `[{name}]` in the script.{note}"

    @friendly
    def remove(self, story, name):
        name = (name or "").strip()
        if name not in story.characters:
            raise ValueError(f"There is no character called {name!r}.")
        del story.characters[name]
        return story, characters_table(story), f"{name} removed."

    @friendly
    def preview(self, image):
        if image is None:
            return None
        reference, note = service.read_reference(image)
        if note:
            gr.Warning(note)
        return reference

    def pick(self, story, evt: gr.SelectData):
        names = list(story.characters)
        if evt.index is None or evt.index[0] >= len(names):
            return gr.update(), gr.update(), gr.update(), gr.update()
        c: Character = story.characters[names[evt.index[0]]]
        return c.name, c.reference, c.review, c.sheet

    def cancel(self, request: gr.Request = None):
        self.cancels.cancel(request)

    # ------------------------------------------------------------------------------------------------ panels
    @friendly
    def check(self, story, script, style, negative):
        specs = service.parse(story, script)
        story.script, story.style, story.negative_prompt = script, style, negative or ""
        service.sync_panels(story, specs)
        return story, panel_table(story), gallery(story), f"{len(specs)} panels, ready to draw."

    @friendly
    def draw(self, story, script, style, negative, seed, steps, strength, request: gr.Request = None,
             progress=gr.Progress()):
        story, table, shown, _ = self.check(story, script, style, negative)
        todo = story.to_draw()
        if not todo:
            yield story, table, shown, "All panels are drawn. Redraw single panels below."
            return
        rest = len(todo) - service.MAX_PANELS_PER_REQUEST
        todo = todo[:service.MAX_PANELS_PER_REQUEST]
        yield story, table, shown, f"Drawing {len(todo)} panels..."
        flag = self.cancels.start(request)
        drawn = 0
        for chunk in service.draw_panels(None, story, todo, seed, steps, strength,
                                         progress=lambda f, t: progress(f, desc=t), render=self.work.render,
                                         cancel=flag.is_set):
            drawn += len(chunk)
            more = f" Press **Draw panels** again for the other {rest}." if rest > 0 and drawn == len(todo) else ""
            yield story, table, gallery(story), f"{drawn} of {len(todo)} panels drawn.{more}"

    @friendly
    def redraw(self, story, index, prompt, lock, steps, strength, request: gr.Request = None, progress=gr.Progress()):
        if not story.panels:
            raise ValueError("There are no panels yet: write the script and press Check script first.")
        i = service.number(index, "panel", 1, len(story.panels), 1, integer=True) - 1
        panel = story.panels[i]
        new_prompt = (prompt or "").strip()
        if len(new_prompt) > service.MAX_PROMPT_CHARS:
            raise ValueError(f"The prompt is over {service.MAX_PROMPT_CHARS} characters.")
        edited = new_prompt if new_prompt and new_prompt != panel.spec.prompt else panel.prompt
        before = (panel.prompt, panel.locked)
        panel.prompt, panel.locked = edited, bool(lock)
        try:
            flag = self.cancels.start(request)
            list(service.draw_panels(None, story, [i], None, steps, strength, progress=lambda f, t: progress(f, desc=t),
                                     render=self.work.render, cancel=flag.is_set))
        except BaseException:
            panel.prompt, panel.locked = before  # a failed redraw leaves the panel as it was
            raise
        return story, gallery(story), panel_table(story), f"Panel {i + 1} redrawn (seed {panel.seed})."

    def select_panel(self, story, evt: gr.SelectData):
        i = evt.index if isinstance(evt.index, int) else 0
        if i >= len(story.panels):
            return gr.update(), gr.update(), gr.update()
        p = story.panels[i]
        return i + 1, p.text, p.locked

    # ------------------------------------------------------------------------------------------------ pages, files
    @friendly
    def pages(self, story, layout, page_size, gutter, border):
        settings = service.page_settings(layout, page_size, gutter, border)
        pages = service.make_pages(story, *settings)
        story.layout, story.page_size, story.gutter, story.border = settings
        return story, [(p, f"page {i + 1}") for i, p in enumerate(pages)]

    @friendly
    def export(self, story, kind):
        if kind == "project archive":
            return self.files.write("story.serialgen.zip", save_archive(story))
        pages = service.make_pages(story)
        if kind == "PDF":
            return self.files.write("story.pdf", pages_to_pdf(pages, story.title))
        if kind == "CBZ":
            return self.files.write("story.cbz", pages_to_cbz(pages, story.title))
        if kind == "PNG pages":
            return self.files.write("pages-png.zip", pages_to_png_zip(pages))
        raise ValueError(f"Export as {kind!r}? Choose PDF, CBZ, PNG pages or project archive.")

    @friendly
    def load(self, story, file):
        if file is None:
            raise ValueError("Choose a project archive (.zip) to open.")
        loaded = service.read_archive(file)
        return (loaded, characters_table(loaded), loaded.script, loaded.style, loaded.negative_prompt,
                panel_table(loaded), gallery(loaded), f"Opened **{loaded.title}**: {len(loaded.characters)} "
                f"characters, {len(loaded.panels)} panels.")


class Api:
    """The named API endpoints: explicit inputs, no session state, the same limits and messages as the UI."""

    EXPORT_FORMATS = ("pdf", "cbz", "png", "archive")

    def __init__(self, work: ModelWork, files: TempFiles):
        self.work, self.files = work, files

    @friendly
    def standardize(self, image, seed=None, steps=None, guidance=None, colour=None):
        """A character sheet from one picture: (sheet, review, target_pose, info {seed, note}). seed -1 or empty:
        random; colour: the colour correction after the model, 0-1 (empty: the preset's)."""
        if image is None:
            raise ValueError("image is required: give the picture of the character")
        r = self.work.standardize(image, seed, steps, guidance, colour)
        return r["sheet"], r["review"], r["target_pose"], {"seed": r["seed"], "note": r["note"]}

    def _story(self, sheets, names, script, options: dict) -> Story:
        """A story of accepted sheets and a parsed script (``options``: checked by ``service.panel_options``)."""
        names = [n.strip() for n in (names or "").split(",") if n.strip()]
        files = sheets or []
        if len(files) > service.MAX_SHEETS_PER_REQUEST:
            raise ValueError(f"{len(files)} sheets; give at most {service.MAX_SHEETS_PER_REQUEST} per request")
        if len(names) != len(files):
            raise ValueError(f"{len(files)} sheets but {len(names)} names: give one name per sheet, comma-separated")
        story = Story(style=options["style"], negative_prompt=options["negative_prompt"])
        for name, file in zip(names, files):
            sheet, _ = service.read_upload(file, "sheet", min_side=16)
            story.characters[service.check_name(name)] = Character(name, sheet, sheet=sheet, accepted=True)
        service.sync_panels(story, service.parse(story, script))
        return story

    @friendly
    def panels(self, sheets, names, script, seed=None, options=None):
        """Panels for a script: (panels, info {panels: [{prompt, seed, characters, scores}]}). options: {steps,
        strength, style, negative_prompt}; seed -1 or empty: random. A script line may name up to three
        characters ([Mia][Kai] ...)."""
        options = service.panel_options(options)
        story = self._story(sheets, names, script, options)
        list(service.draw_panels(None, story, list(range(len(story.panels))), seed, options["steps"],
                                 options["strength"], render=self.work.render))
        return gallery(story), {"panels": [{"prompt": p.text, "seed": p.seed, "characters": p.spec.characters,
                                            "scores": p.scores} for p in story.panels]}

    @friendly
    def page(self, panels, script, layout, page_size, gutter, border):
        """Comic pages from panel images (with the script's speech and captions): a gallery of PNG pages."""
        settings = service.page_settings(layout, page_size, gutter, border)
        files = panels or []
        if len(files) > service.MAX_PANELS_PER_REQUEST * 4:
            raise ValueError(f"{len(files)} panels; give at most {service.MAX_PANELS_PER_REQUEST * 4} per request")
        images = [service.read_upload(f, "panel", min_side=16)[0] for f in files]
        specs = parse_script(script, None) if script and script.strip() else []
        story = Story()
        for i, image in enumerate(images):
            spec = specs[i] if i < len(specs) else service.PanelSpec(index=i, line=0, characters=[], prompt="")
            story.panels.append(Panel(spec=spec, image=image, mask=self.work.figure_mask(image)))
        pages = service.make_pages(story, *settings)
        return [(p, f"page {i + 1}") for i, p in enumerate(pages)]

    @friendly
    def export(self, pages, fmt, title):
        """Pages (images) as one file: pdf, cbz, png (a zip of PNG pages) or archive (a project archive that opens
        in the studio, the pages as its panels)."""
        fmt = (fmt or "").strip().lower()
        if fmt not in self.EXPORT_FORMATS:
            raise ValueError(f"format {fmt!r}: choose one of {', '.join(self.EXPORT_FORMATS)}")
        title = (title or "SerialGen story").strip()[:200]
        files = pages or []
        if not files:
            raise ValueError("no pages given: upload the page images to export")
        if len(files) > service.MAX_PAGES_PER_REQUEST:
            raise ValueError(f"{len(files)} pages; export at most {service.MAX_PAGES_PER_REQUEST} per request")
        images = [service.read_upload(f, "page", min_side=16)[0] for f in files]
        if fmt == "pdf":
            return self.files.write("story.pdf", pages_to_pdf(images, title))
        if fmt == "cbz":
            return self.files.write("story.cbz", pages_to_cbz(images, title))
        if fmt == "png":
            return self.files.write("pages-png.zip", pages_to_png_zip(images))
        story = Story(title=title, panels=[Panel(spec=service.PanelSpec(index=i, line=0, characters=[],
                                                                         prompt=f"page {i + 1}"), image=image)
                                           for i, image in enumerate(images)])
        return self.files.write("story.serialgen.zip", save_archive(story))

"""The Gradio comic studio. Talks to the engine only through its public API (via ``studio.service``); no torch.

Tabs follow the work: Characters (upload, standardize, review, accept) -> Script -> Panels -> Pages -> Export.
Every person's story lives in their own ``gr.State``. The named API endpoints (``/standardize``, ``/panels``,
``/page``, ``/export``) take explicit inputs and need no session state, so ``gradio_client`` scripts can use them.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import gradio as gr
from PIL import Image

from . import service
from .export import page_pngs, pages_to_cbz, pages_to_pdf
from .gpu import gpu
from .layout import LAYOUTS, PAGE_SIZES
from .script import parse_script
from .story import STYLES, Character, Panel, Story, load_archive, save_archive

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
EXAMPLE_SCRIPT = """[Mia] walking down a city street, smiling "What a day!" # Monday morning.
[Mia] running through the rain, surprised "Wait for me!"
[NC] an empty street at night # Later that night...
[Mia] sitting in a room, laughing"""


def _examples() -> list[list]:
    rows = [[str(p), p.stem.capitalize()] for p in sorted(EXAMPLES.glob("*.png"))]
    try:  # a real photo that ships with scikit-image (NASA, public domain): an upper-body reference
        from skimage import data

        path = Path(tempfile.gettempdir()) / "serialgen_astronaut.png"
        if not path.exists():
            Image.fromarray(data.astronaut()).save(path)
        rows.append([str(path), "Eileen"])
    except Exception:  # noqa: BLE001 - optional example
        pass
    return rows


def _errors(fn):
    """Turns the engine's and the studio's ValueErrors into a clear message in the UI (the state stays as it was)."""
    import functools
    import inspect

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
        return gen

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
    return wrapper


def _seed(value) -> int | None:
    """A seed field: -1 (or empty) means a random seed."""
    return None if value in (None, "") or int(value) < 0 else int(value)


def _characters_table(story: Story) -> list[list]:
    return [[c.name, "accepted" if c.accepted else ("sheet ready" if c.sheet is not None else "-"), c.seed]
            for c in story.characters.values()]


def _gallery(story: Story) -> list[tuple]:
    out = []
    for i, p in enumerate(story.panels):
        label = f"{i + 1}. [{p.spec.character or 'NC'}] {p.text}" + (f" (seed {p.seed}{', locked' if p.locked else ''})"
                                                                    if p.seed is not None else "")
        if p.consistency is not None:
            label += f" | looks like the sheet: {p.consistency:.2f}" + (" - drifted, redraw?" if p.drifted else "")
        out.append((p.image if p.image is not None else Image.new("RGB", (128, 192), (235, 235, 235)), label))
    return out


def _panel_table(story: Story) -> list[list]:
    return [[p.spec.index + 1, p.spec.character or "NC", p.text, " / ".join(p.spec.speech), p.spec.caption or ""]
            for p in story.panels]


def _tmp(name: str, data: bytes) -> str:
    folder = Path(tempfile.mkdtemp(prefix="serialgen_"))
    (folder / name).write_bytes(data)
    return str(folder / name)


def build_demo(engine, status: str = "") -> gr.Blocks:
    """``engine``: an ``engine.Engine`` (or None, then ``status`` says why nothing can be generated)."""
    sdefaults = engine.preset.standardize_defaults if engine is not None else {}
    pdefaults = engine.preset.defaults if engine is not None else {}

    def need_engine():
        if engine is None:
            raise ValueError(f"No models are loaded. {status}")
        return engine

    # ---------------------------------------------------------------- GPU work (ZeroGPU-aware)
    @gpu(duration=lambda *a, **k: 30)
    def run_standardize(image, seed, steps, guidance, progress=None):
        return service.standardize(need_engine(), image, seed, steps, guidance, progress or service._noop)

    @gpu(duration=lambda story, indices=None, *a, **k: int(min(120, 20 + 2 * len(indices or story.panels))))
    def run_panels(story, indices=None, seed=None, steps=None, strength=None, progress=None):
        return list(service.draw_panels(need_engine(), story, indices, seed, steps, strength,
                                        progress=progress or service._noop))

    # ---------------------------------------------------------------- characters
    @_errors
    def on_standardize(story, name, image, seed, steps, strength, progress=gr.Progress()):
        if image is None:
            raise ValueError("Upload a picture of the character first (or pick an example).")
        name = service.check_name(name)
        result = run_standardize(image, _seed(seed), int(steps), float(strength),
                                 lambda f, t: progress(f, desc=t))
        if result["note"]:
            gr.Warning(result["note"])
        service.set_character(story, name, result, int(steps), float(strength))
        return (story, result["reference"], result["review"], result["sheet"], _characters_table(story),
                f"**{name}**: sheet ready (seed {result['seed']}). Accept it, or regenerate with another seed.",
                result["seed"])

    def on_regenerate(story, name, image, steps, strength, progress=gr.Progress()):
        return on_standardize(story, name, image, -1, steps, strength, progress)

    @_errors
    def on_accept(story, name):
        name = service.check_name(name)
        character = story.characters.get(name)
        if character is None or character.sheet is None:
            raise ValueError(f"{name} has no sheet yet: standardize a picture first.")
        character.accepted = True
        return story, _characters_table(story), f"**{name}** accepted: use `[{name}]` in the script."

    @_errors
    def on_remove(story, name):
        name = (name or "").strip()
        if name not in story.characters:
            raise ValueError(f"There is no character called {name!r}.")
        del story.characters[name]
        return story, _characters_table(story), f"{name} removed."

    @_errors
    def on_preview(image):
        if image is None:
            return None
        reference, note = service.read_reference(image)
        if note:
            gr.Warning(note)
        return reference

    def on_pick(story, evt: gr.SelectData):
        names = list(story.characters)
        if evt.index is None or evt.index[0] >= len(names):
            return gr.update(), gr.update(), gr.update(), gr.update()
        c: Character = story.characters[names[evt.index[0]]]
        return c.name, c.reference, c.review, c.sheet

    # ---------------------------------------------------------------- script and panels
    @_errors
    def on_check(story, script, style, negative):
        specs = service.parse(story, script)
        story.script, story.style, story.negative_prompt = script, style, negative or ""
        service.sync_panels(story, specs)
        return story, _panel_table(story), _gallery(story), f"{len(specs)} panels, ready to draw."

    @_errors
    def on_draw(story, script, style, negative, seed, steps, strength, progress=gr.Progress()):
        story, table, gallery, _ = on_check(story, script, style, negative)
        todo = [i for i, p in enumerate(story.panels) if p.image is None]
        if not todo:
            yield story, table, gallery, "All panels are drawn. Redraw single panels below."
            return
        yield story, table, gallery, f"Drawing {len(todo)} panels..."
        base_seed = _seed(seed)
        for start in range(0, len(todo), 4):  # batches of 4, shown as they finish
            chunk = todo[start:start + 4]
            run_panels(story, chunk, base_seed, int(steps), float(strength),
                       lambda f, t, s=start: progress((s + f * len(chunk)) / len(todo), desc="drawing panels"))
            yield story, table, _gallery(story), f"{min(start + 4, len(todo))} of {len(todo)} panels drawn."

    @_errors
    def on_redraw(story, index, prompt, lock, steps, strength, progress=gr.Progress()):
        i = int(index or 0) - 1
        if not 0 <= i < len(story.panels):
            raise ValueError(f"There is no panel {index}: choose 1 to {len(story.panels)} (check the script first).")
        panel = story.panels[i]
        if prompt and prompt.strip() and prompt.strip() != panel.spec.prompt:
            if len(prompt) > service.MAX_PROMPT_CHARS:
                raise ValueError(f"The prompt is over {service.MAX_PROMPT_CHARS} characters.")
            panel.prompt = prompt.strip()
        panel.locked = bool(lock)
        run_panels(story, [i], None, int(steps), float(strength), lambda f, t: progress(f, desc=t))
        return story, _gallery(story), _panel_table(story), f"Panel {i + 1} redrawn (seed {panel.seed})."

    def on_select_panel(story, evt: gr.SelectData):
        i = evt.index if isinstance(evt.index, int) else 0
        if i >= len(story.panels):
            return gr.update(), gr.update(), gr.update()
        p = story.panels[i]
        return i + 1, p.text, p.locked

    # ---------------------------------------------------------------- pages and export
    @_errors
    def on_pages(story, layout, page_size, gutter, border):
        story.layout, story.page_size, story.gutter, story.border = layout, page_size, int(gutter), int(border)
        pages = service.make_pages(story)
        return story, [(p, f"page {i + 1}") for i, p in enumerate(pages)]

    @_errors
    def on_export(story, kind):
        if kind == "project archive":
            return _tmp("story.serialgen.zip", save_archive(story))
        pages = service.make_pages(story)
        if kind == "PDF":
            return _tmp("story.pdf", pages_to_pdf(pages, story.title))
        if kind == "CBZ":
            return _tmp("story.cbz", pages_to_cbz(pages, story.title))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for i, png in enumerate(page_pngs(pages), start=1):
                z.writestr(f"page-{i:03d}.png", png)
        return _tmp("pages-png.zip", buf.getvalue())

    @_errors
    def on_load(story, file):
        if file is None:
            raise ValueError("Choose a project archive (.zip) to open.")
        data = Path(file).read_bytes()
        loaded = load_archive(data)
        return (loaded, _characters_table(loaded), loaded.script, loaded.style, loaded.negative_prompt,
                _panel_table(loaded), _gallery(loaded), f"Opened **{loaded.title}**: {len(loaded.characters)} "
                f"characters, {len(loaded.panels)} panels.")

    # ---------------------------------------------------------------- stateless API
    @_errors
    def api_standardize(image, seed, steps, guidance):
        if image is None:
            raise ValueError("image is required")
        r = run_standardize(image, None if seed is None else int(seed), None if not steps else int(steps),
                            None if guidance is None else float(guidance))
        return r["sheet"], r["review"], r["target_pose"], {"seed": r["seed"], "note": r["note"]}

    @_errors
    def api_panels(sheets, names, script, seed, options):
        options = options or {}
        names = [n.strip() for n in (names or "").split(",") if n.strip()]
        files = sheets or []
        if len(names) != len(files):
            raise ValueError(f"{len(files)} sheets but {len(names)} names: give one name per sheet, comma-separated")
        story = Story(style=options.get("style", "none"), negative_prompt=options.get("negative_prompt", ""))
        for name, file in zip(names, files):
            sheet, _ = service.read_reference(file)
            story.characters[service.check_name(name)] = Character(name, sheet, sheet=sheet, accepted=True)
        service.sync_panels(story, service.parse(story, script))
        run_panels(story, None, None if seed is None else int(seed), options.get("steps"), options.get("strength"))
        return _gallery(story), {"panels": [{"prompt": p.text, "seed": p.seed, "character": p.spec.character}
                                            for p in story.panels]}

    @_errors
    def api_page(panels, script, layout, page_size, gutter, border):
        images = [service.read_reference(f)[0] for f in (panels or [])]
        specs = parse_script(script, None) if script and script.strip() else []
        story = Story(layout=layout or "4-panel grid", page_size=page_size or "A4",
                      gutter=int(gutter if gutter is not None else 24), border=int(border if border is not None else 5))
        for i, image in enumerate(images):
            spec = specs[i] if i < len(specs) else service.PanelSpec(index=i, line=0, character=None, prompt="")
            story.panels.append(Panel(spec=spec, image=image, mask=engine.figure_mask(image) if engine else None))
        pages = service.make_pages(story)
        return [(p, f"page {i + 1}") for i, p in enumerate(pages)]

    @_errors
    def api_export(pages, fmt, title):
        images = [Image.open(f).convert("RGB") for f in (pages or [])]
        title = title or "SerialGen story"
        if fmt == "pdf":
            return _tmp("story.pdf", pages_to_pdf(images, title))
        if fmt == "cbz":
            return _tmp("story.cbz", pages_to_cbz(images, title))
        raise ValueError(f"format {fmt!r}: choose pdf or cbz")

    # ---------------------------------------------------------------- layout
    with gr.Blocks(title="SerialGen Studio") as demo:
        story = gr.State(Story())
        gr.Markdown("# SerialGen Studio\nOne picture of a character in; a comic where they stay themselves out.")
        engine_text = (engine.describe().splitlines()[0] + (f" - {engine.why}" if engine.why else "")
                       if engine is not None else status)
        gr.Markdown(f"**Models:** {engine_text}", elem_id="engine-status")

        with gr.Tab("1. Characters"):
            with gr.Row():
                with gr.Column(scale=1):
                    # a File (not an Image) upload: our own checks then name what is wrong with a bad file
                    char_image = gr.File(label="Picture of the character (photo or drawing)", file_types=["image"],
                                         type="filepath", height=120, elem_id="char-image")
                    char_name = gr.Textbox(label="Name", placeholder="Mia", max_length=40, elem_id="char-name")
                    gr.Examples(_examples(), [char_image, char_name], label="Or pick an example")
                    with gr.Row():
                        char_seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, minimum=-1)
                        char_steps = gr.Slider(1, 50, value=sdefaults.get("num_inference_steps", 20), step=1,
                                               label="Steps")
                        char_strength = gr.Slider(1.0, 10.0, value=sdefaults.get("guidance_scale", 3.5), step=0.5,
                                                  label="Strength (guidance)")
                    with gr.Row():
                        btn_std = gr.Button("Standardize", variant="primary", elem_id="btn-standardize")
                        btn_regen = gr.Button("Regenerate (new seed)")
                    with gr.Row():
                        btn_accept = gr.Button("Accept sheet", variant="primary", elem_id="btn-accept")
                        btn_remove = gr.Button("Remove", variant="stop")
                with gr.Column(scale=2):
                    char_status = gr.Markdown("Upload a picture, name the character and press **Standardize**.",
                                              elem_id="char-status")
                    with gr.Row():
                        view_ref = gr.Image(label="Reference", interactive=False, height=320)
                        view_review = gr.Image(label="Detected figure and pose", interactive=False, height=320)
                        view_sheet = gr.Image(label="Character sheet", interactive=False, height=320)
                    char_table = gr.Dataframe(headers=["name", "status", "seed"], label="Characters (click to view)",
                                              interactive=False, value=[])

        with gr.Tab("2. Script"):
            with gr.Row():
                with gr.Column(scale=2):
                    script = gr.Textbox(label="One line per panel", lines=10, value=EXAMPLE_SCRIPT, max_length=100_000,
                                        elem_id="script",
                                        info='[Name] what happens "speech" # caption   |   [NC] a panel without a '
                                             "character")
                with gr.Column(scale=1):
                    style = gr.Dropdown(list(STYLES), value="comic", label="Style")
                    negative = gr.Textbox(label="Negative prompt", placeholder="blurry, extra limbs", max_length=500)
                    btn_check = gr.Button("Check script", elem_id="btn-check")
            script_status = gr.Markdown(elem_id="script-status")
            panel_table = gr.Dataframe(headers=["#", "character", "prompt", "speech", "caption"], interactive=False,
                                       value=[])

        with gr.Tab("3. Panels"):
            with gr.Row():
                panel_seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, minimum=-1)
                panel_steps = gr.Slider(1, 50, value=pdefaults.get("num_inference_steps", 20), step=1, label="Steps")
                panel_strength = gr.Slider(0.0, 1.5, value=pdefaults.get("adapter_scale", 1.0), step=0.05,
                                           label="Character strength")
                btn_draw = gr.Button("Draw panels", variant="primary", elem_id="btn-draw")
            panel_status = gr.Markdown(elem_id="panel-status")
            gallery = gr.Gallery(label="Panels (click one to edit it)", columns=4, height=520, allow_preview=True,
                                 object_fit="contain",
                                 elem_id="panel-gallery")
            with gr.Row():
                edit_index = gr.Number(label="Panel", value=1, precision=0, minimum=1)
                edit_prompt = gr.Textbox(label="Prompt", scale=3, max_length=600)
                edit_lock = gr.Checkbox(label="Lock seed")
                btn_redraw = gr.Button("Redraw panel")

        with gr.Tab("4. Pages"):
            with gr.Row():
                layout = gr.Dropdown([k for k in LAYOUTS], value="4-panel grid", label="Layout")
                page_size = gr.Dropdown(list(PAGE_SIZES), value="A4", label="Page size")
                gutter = gr.Slider(0, 80, value=24, step=2, label="Gutter")
                border = gr.Slider(0, 16, value=5, step=1, label="Border")
                btn_pages = gr.Button("Make pages", variant="primary", elem_id="btn-pages")
            pages = gr.Gallery(label="Pages", columns=2, height=900, object_fit="contain", elem_id="pages")

        with gr.Tab("5. Export"):
            with gr.Row():
                export_kind = gr.Radio(["PDF", "CBZ", "PNG pages", "project archive"], value="PDF", label="Export as")
                btn_export = gr.Button("Export", variant="primary")
            export_file = gr.File(label="Download")
            with gr.Row():
                archive = gr.File(label="Open a project archive", file_types=[".zip"])
                btn_load = gr.Button("Open project")

        with gr.Row(visible=False):  # the named API (explicit inputs; no session state)
            a_image = gr.File(type="filepath")
            a_seed, a_steps, a_guidance = gr.Number(), gr.Number(), gr.Number()
            a_sheet, a_review, a_target = gr.Image(type="pil"), gr.Image(type="pil"), gr.Image(type="pil")
            a_info = gr.JSON()
            a_std = gr.Button()
            a_sheets, a_names, a_script, a_options = gr.File(file_count="multiple"), gr.Textbox(), gr.Textbox(), \
                gr.JSON()
            a_panels_out, a_panels_info = gr.Gallery(), gr.JSON()
            a_pan = gr.Button()
            a_panel_files, a_layout, a_size = gr.File(file_count="multiple"), gr.Textbox(), gr.Textbox()
            a_gutter, a_border = gr.Number(), gr.Number()
            a_pages_out = gr.Gallery()
            a_page = gr.Button()
            a_page_files, a_format, a_title = gr.File(file_count="multiple"), gr.Textbox(), gr.Textbox()
            a_file = gr.File()
            a_exp = gr.Button()

        def ui(name):  # UI events: callable per session (tests, power users) but left out of the API docs
            return {"api_name": f"ui_{name}", "api_visibility": "undocumented"}

        std_out = [story, view_ref, view_review, view_sheet, char_table, char_status, char_seed]
        btn_std.click(on_standardize, [story, char_name, char_image, char_seed, char_steps, char_strength], std_out,
                      **ui("standardize"))
        btn_regen.click(on_regenerate, [story, char_name, char_image, char_steps, char_strength], std_out,
                        **ui("regenerate"))
        char_image.change(on_preview, [char_image], [view_ref], **ui("preview"))
        btn_accept.click(on_accept, [story, char_name], [story, char_table, char_status], **ui("accept"))
        btn_remove.click(on_remove, [story, char_name], [story, char_table, char_status], **ui("remove"))
        char_table.select(on_pick, [story], [char_name, view_ref, view_review, view_sheet], **ui("pick"))
        btn_check.click(on_check, [story, script, style, negative], [story, panel_table, gallery, script_status],
                        **ui("check"))
        btn_draw.click(on_draw, [story, script, style, negative, panel_seed, panel_steps, panel_strength],
                       [story, panel_table, gallery, panel_status], **ui("draw"))
        gallery.select(on_select_panel, [story], [edit_index, edit_prompt, edit_lock], **ui("select_panel"))
        btn_redraw.click(on_redraw, [story, edit_index, edit_prompt, edit_lock, panel_steps, panel_strength],
                         [story, gallery, panel_table, panel_status], **ui("redraw"))
        btn_pages.click(on_pages, [story, layout, page_size, gutter, border], [story, pages], **ui("pages"))
        btn_export.click(on_export, [story, export_kind], [export_file], **ui("export"))
        btn_load.click(on_load, [story, archive], [story, char_table, script, style, negative, panel_table, gallery,
                                                   panel_status], **ui("load"))

        a_std.click(api_standardize, [a_image, a_seed, a_steps, a_guidance], [a_sheet, a_review, a_target, a_info],
                    api_name="standardize")
        a_pan.click(api_panels, [a_sheets, a_names, a_script, a_seed, a_options], [a_panels_out, a_panels_info],
                    api_name="panels")
        a_page.click(api_page, [a_panel_files, a_script, a_layout, a_size, a_gutter, a_border], [a_pages_out],
                     api_name="page")
        a_exp.click(api_export, [a_page_files, a_format, a_title], [a_file], api_name="export")
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo

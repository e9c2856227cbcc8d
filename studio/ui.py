"""The Gradio comic studio. Talks to the engine only through its public API (via ``studio.service``); no torch.

Tabs follow the work: Characters (upload, standardize, review, accept) -> Script -> Panels -> Pages -> Export.
Every person's story lives in their own ``gr.State``. The named API endpoints (``/standardize``, ``/panels``,
``/page``, ``/export``) take explicit inputs and need no session state, so ``gradio_client`` scripts can use them.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image

from . import service
from .export import TempFiles
from .handlers import Api, Cancels, Handlers, ModelWork
from .layout import BORDER_RANGE, GUTTER_RANGE, LAYOUTS, PAGE_SIZES
from .story import STYLES, Story

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
EXAMPLE_SCRIPT = """[Mia] walking down a city street, smiling "What a day!" # Monday morning.
[Mia] running through the rain, surprised "Wait for me!"
[NC] an empty street at night # Later that night...
[Mia] sitting in a room, laughing
// two or three characters in one panel (accept Kai first): [Mia][Kai:right] on a bench Mia: "Hi!" Kai: "Hello." """


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


# What ``demo.launch`` needs besides host and port: Gradio's own upload cap (the largest upload we take, a project
# archive; images have their own, smaller limit in ``service.read_upload``), and no Gradio banner.
LAUNCH_OPTIONS = {"max_file_size": service.MAX_ARCHIVE_UPLOAD_BYTES, "quiet": True}


def build_demo(engine, status: str = "", files: TempFiles | None = None) -> gr.Blocks:
    """``engine``: an ``engine.Engine`` (or None, then ``status`` says why nothing can be generated). The layout and
    its wiring; each event's code is a method of ``studio.handlers.Handlers`` (UI) or ``Api`` (named API)."""
    sdefaults = engine.preset.standardize_defaults if engine is not None else {}
    pdefaults = engine.preset.defaults if engine is not None else {}
    work, files = ModelWork(engine, status), files or TempFiles()
    h, api = Handlers(work, files, Cancels()), Api(work, files)

    # ---------------------------------------------------------------- layout
    # Gradio's cache of served files is cleaned hourly (files older than an hour go)
    with gr.Blocks(title="SerialGen Studio", delete_cache=(3600, 3600)) as demo:
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
                    examples = _examples()
                    gr.Examples(examples, [char_image, char_name], label="Or pick an example",
                                example_labels=[name for _, name in examples])
                    with gr.Row():
                        char_seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, minimum=-1)
                        char_steps = gr.Slider(1, service.MAX_STEPS, value=sdefaults.get("num_inference_steps", 20), step=1,
                                               label="Steps")
                        char_strength = gr.Slider(*service.GUIDANCE_RANGE, value=sdefaults.get("guidance_scale", 3.5), step=0.5,
                                                  label="Strength (guidance)")
                    # the sheet's part colours moved toward the picture's (Stage I's colour_match); turned down
                    # where a bag or scarf over a part would tint it
                    char_colour = gr.Slider(*service.COLOUR_RANGE, value=sdefaults.get("colour_match", 0.0), step=0.1,
                                            label="Colour correction", elem_id="char-colour",
                                            info="0: the model's colours; 1: each body part takes the picture's "
                                                 "colour. Turn down if a bag or scarf tints a part.")
                    with gr.Row():
                        btn_std = gr.Button("Standardize", variant="primary", elem_id="btn-standardize")
                        btn_regen = gr.Button("Regenerate (new seed)")
                        btn_cancel_std = gr.Button("Cancel", variant="secondary", elem_id="btn-cancel-standardize")
                    with gr.Row():
                        btn_accept = gr.Button("Accept sheet", variant="primary", elem_id="btn-accept")
                        btn_remove = gr.Button("Remove", variant="stop")
                with gr.Column(scale=2):
                    char_status = gr.Markdown("Upload a picture, name the character and press **Standardize**.",
                                              elem_id="char-status")
                    with gr.Row():
                        view_ref = gr.Image(label="Reference", interactive=False, height=320, format="png")
                        view_review = gr.Image(label="Detected figure and pose", interactive=False, height=320,
                                               format="png")
                        view_sheet = gr.Image(label="Character sheet", interactive=False, height=320, format="png")
                    char_table = gr.Dataframe(headers=["name", "status", "seed"], label="Characters (click to view)",
                                              interactive=False, value=[])

        with gr.Tab("2. Script"):
            with gr.Row():
                with gr.Column(scale=2):
                    script = gr.Textbox(label="One line per panel", lines=10, value=EXAMPLE_SCRIPT, max_length=100_000,
                                        elem_id="script",
                                        info='[Name] what happens "speech" # caption   |   [Mia][Kai:right] together '
                                             'Mia: "Hi!" (up to three)   |   [NC] no character')
                with gr.Column(scale=1):
                    style = gr.Dropdown(list(STYLES), value="comic", label="Style")
                    negative = gr.Textbox(label="Negative prompt", placeholder="blurry, extra limbs", max_length=500)
                    btn_check = gr.Button("Check script", elem_id="btn-check")
            script_status = gr.Markdown(elem_id="script-status")
            panel_table = gr.Dataframe(headers=["#", "characters", "prompt", "speech", "caption"], interactive=False,
                                       value=[])

        with gr.Tab("3. Panels"):
            with gr.Row():
                panel_seed = gr.Number(label="Seed (-1: random)", value=-1, precision=0, minimum=-1)
                panel_steps = gr.Slider(1, service.MAX_STEPS, value=pdefaults.get("num_inference_steps", 20), step=1, label="Steps")
                panel_strength = gr.Slider(*service.STRENGTH_RANGE, value=pdefaults.get("adapter_scale", 1.0), step=0.05,
                                           label="Character strength")
                btn_draw = gr.Button("Draw panels", variant="primary", elem_id="btn-draw")
                btn_cancel_draw = gr.Button("Cancel", variant="secondary", elem_id="btn-cancel-draw")
            panel_status = gr.Markdown(elem_id="panel-status")
            gallery = gr.Gallery(label="Panels (click one to edit it)", columns=4, height=520, allow_preview=True,
                                 object_fit="contain", format="png", elem_id="panel-gallery")
            with gr.Row():
                edit_index = gr.Number(label="Panel", value=1, precision=0, minimum=1)
                edit_prompt = gr.Textbox(label="Prompt", scale=3, max_length=600)
                edit_lock = gr.Checkbox(label="Lock seed")
                btn_redraw = gr.Button("Redraw panel")

        with gr.Tab("4. Pages"):
            with gr.Row():
                layout = gr.Dropdown([k for k in LAYOUTS], value="4-panel grid", label="Layout")
                page_size = gr.Dropdown(list(PAGE_SIZES), value="A4", label="Page size")
                gutter = gr.Slider(*GUTTER_RANGE, value=24, step=2, label="Gutter")
                border = gr.Slider(*BORDER_RANGE, value=5, step=1, label="Border")
                btn_pages = gr.Button("Make pages", variant="primary", elem_id="btn-pages")
            pages = gr.Gallery(label="Pages", columns=2, height=900, object_fit="contain", format="png",
                               elem_id="pages")

        with gr.Tab("5. Export"):
            with gr.Row():
                export_kind = gr.Radio(["PDF", "CBZ", "PNG pages", "project archive"], value="PDF", label="Export as")
                btn_export = gr.Button("Export", variant="primary")
            export_file = gr.File(label="Download")
            with gr.Row():
                archive = gr.File(label="Open a project archive", file_types=[".zip"])
                btn_load = gr.Button("Open project")

        with gr.Row(visible=False):  # the named API's components (explicit inputs; no session state)
            a_image = gr.File(type="filepath", label="image")
            a_seed, a_steps, a_guidance = gr.Number(label="seed"), gr.Number(label="steps"), gr.Number(label="guidance")
            a_colour = gr.Number(label="colour")
            a_sheet, a_review = gr.Image(type="pil", format="png", label="sheet"), \
                gr.Image(type="pil", format="png", label="review")
            a_target, a_info = gr.Image(type="pil", format="png", label="target_pose"), gr.JSON(label="info")
            a_sheets = gr.File(file_count="multiple", label="sheets")
            a_names, a_script, a_options = gr.Textbox(label="names"), gr.Textbox(label="script"), \
                gr.JSON(label="options")
            a_panels_out, a_panels_info = gr.Gallery(format="png", label="panels"), gr.JSON(label="info")
            a_panel_files = gr.File(file_count="multiple", label="panels")
            a_layout, a_size = gr.Textbox(label="layout"), gr.Textbox(label="page_size")
            a_gutter, a_border = gr.Number(label="gutter"), gr.Number(label="border")
            a_pages_out = gr.Gallery(format="png", label="pages")
            a_page_files, a_format, a_title = gr.File(file_count="multiple", label="pages"), \
                gr.Textbox(label="format"), gr.Textbox(label="title")
            a_file = gr.File(label="file")
            a_buttons = [gr.Button() for _ in range(4)]

        def ui(name, gpu_work=False):  # UI events: callable per session (tests, power users), not in the API docs
            extra = {"concurrency_id": "gpu"} if gpu_work else {}
            return {"api_name": f"ui_{name}", "api_visibility": "undocumented", **extra}

        # Every event that runs a model shares one queue ("gpu", one at a time; the engine also holds a lock), so
        # the UI's and the API's calls never run one pipeline at once.
        std_out = [story, view_ref, view_review, view_sheet, char_table, char_status]
        std_events = [
            btn_std.click(h.standardize, [story, char_name, char_image, char_seed, char_steps, char_strength,
                                          char_colour], std_out, **ui("standardize", True)),
            btn_regen.click(h.regenerate, [story, char_name, char_image, char_steps, char_strength, char_colour],
                            std_out, **ui("regenerate", True))]
        btn_cancel_std.click(h.cancel, None, None, cancels=std_events, **ui("cancel_standardize"))
        char_image.change(h.preview, [char_image], [view_ref], **ui("preview"))
        btn_accept.click(h.accept, [story, char_name], [story, char_table, char_status], **ui("accept"))
        btn_remove.click(h.remove, [story, char_name], [story, char_table, char_status], **ui("remove"))
        char_table.select(h.pick, [story], [char_name, view_ref, view_review, view_sheet], **ui("pick"))
        btn_check.click(h.check, [story, script, style, negative], [story, panel_table, gallery, script_status],
                        **ui("check"))
        draw_events = [
            btn_draw.click(h.draw, [story, script, style, negative, panel_seed, panel_steps, panel_strength],
                           [story, panel_table, gallery, panel_status], **ui("draw", True)),
            btn_redraw.click(h.redraw, [story, edit_index, edit_prompt, edit_lock, panel_steps, panel_strength],
                             [story, gallery, panel_table, panel_status], **ui("redraw", True))]
        btn_cancel_draw.click(h.cancel, None, None, cancels=draw_events, **ui("cancel_draw"))
        gallery.select(h.select_panel, [story], [edit_index, edit_prompt, edit_lock], **ui("select_panel"))
        btn_pages.click(h.pages, [story, layout, page_size, gutter, border], [story, pages], **ui("pages"))
        btn_export.click(h.export, [story, export_kind], [export_file], **ui("export"))
        btn_load.click(h.load, [story, archive], [story, char_table, script, style, negative, panel_table, gallery,
                                                  panel_status], **ui("load"))

        a_std, a_pan, a_page, a_exp = a_buttons
        a_std.click(api.standardize, [a_image, a_seed, a_steps, a_guidance, a_colour],
                    [a_sheet, a_review, a_target, a_info],
                    api_name="standardize", concurrency_id="gpu")
        a_pan.click(api.panels, [a_sheets, a_names, a_script, a_seed, a_options], [a_panels_out, a_panels_info],
                    api_name="panels", concurrency_id="gpu")
        a_page.click(api.page, [a_panel_files, a_script, a_layout, a_size, a_gutter, a_border], [a_pages_out],
                     api_name="page")
        a_exp.click(api.export, [a_page_files, a_format, a_title], [a_file], api_name="export")
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo

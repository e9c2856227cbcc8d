"""The Gradio app. Talks to the engine only through its public API; no torch code here.

This is the studio's first shell: engine status and a Panels tab (sheet + prompts -> panels) with a named API
endpoint. Characters, story script, pages and export come with the studio issue.
"""

from __future__ import annotations

import gradio as gr

MAX_PANELS_PER_CALL = 16


def _prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise gr.Error("Write at least one panel prompt (one per line).")
    if len(prompts) > MAX_PANELS_PER_CALL:
        raise gr.Error(f"{len(prompts)} prompts: at most {MAX_PANELS_PER_CALL} panels per call; split the script.")
    return prompts


def build_demo(engine, status: str = "") -> gr.Blocks:
    """``engine`` is an ``engine.Engine`` or ``None`` (then ``status`` says why nothing can be generated)."""
    defaults = engine.preset.defaults if engine is not None else {}

    def generate(sheet, prompts_text, seed, steps, adapter_scale, progress=gr.Progress()):
        if engine is None:
            raise gr.Error(f"No models are loaded: {status}")
        prompts = _prompts(prompts_text)
        if sheet is None:
            raise gr.Error("Upload an accepted character sheet first.")

        def on_step(pipe, step, timestep, tensors):
            done = pipe.current_run * pipe.num_timesteps + step + 1
            progress(done / max(1, pipe.num_runs * pipe.num_timesteps), desc="drawing panels")
            return {}

        try:
            output = engine.generate_panels(
                prompts, sheet=sheet, seeds=int(seed), num_inference_steps=int(steps),
                adapter_scale=float(adapter_scale), callback_on_step_end=on_step,
            )
        except ValueError as exc:  # the engine's clear input errors
            raise gr.Error(str(exc)) from None
        gallery = [(image, f"{i + 1}. {p} (seed {s})") for i, (image, p, s) in
                   enumerate(zip(output.images, output.prompts, output.seeds))]
        return gallery, {"prompts": output.prompts, "seeds": output.seeds}

    with gr.Blocks(title="SerialGen Studio") as demo:
        gr.Markdown("# SerialGen Studio\nOne picture of a character in, consistent comic panels out.")
        status_text = engine.describe() if engine is not None else status
        gr.Markdown(f"```\n{status_text}\n```", elem_id="engine-status")
        with gr.Tab("Panels"):
            with gr.Row():
                with gr.Column():
                    sheet = gr.Image(label="Character sheet", type="pil", image_mode="RGB")
                    prompts = gr.Textbox(label="Panel prompts (one per line)", lines=4,
                                         placeholder="running through the rain, laughing\nwaving from a balcony")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
                        steps = gr.Slider(1, 50, value=defaults.get("num_inference_steps", 20), step=1, label="Steps")
                        scale = gr.Slider(0.0, 1.5, value=defaults.get("adapter_scale", 1.0), step=0.05,
                                          label="Character strength")
                    run = gr.Button("Draw panels", variant="primary", interactive=engine is not None)
                with gr.Column():
                    gallery = gr.Gallery(label="Panels", columns=2)
                    info = gr.JSON(label="Prompts and seeds")
        run.click(generate, [sheet, prompts, seed, steps, scale], [gallery, info], api_name="panels")
    demo.queue(max_size=16, default_concurrency_limit=1)
    return demo

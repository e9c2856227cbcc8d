"""Stage II speed and memory: per-panel latency and peak memory of PersonalizePipeline, next to stock diffusers.

    # full-size SDXL + ViT-H/14 with random weights (no download), as in the issue's target table (GPU):
    python benchmarks/bench_personalize.py --model random-full --device cuda --dtype bfloat16 --panels 4
    python benchmarks/bench_personalize.py --model random-full --device cuda --dtype bfloat16 --panels 4 --low-vram
    # the same code path at a CPU-sized config:
    python benchmarks/bench_personalize.py --model random-small --width 256 --height 384 --panels 4
    # a preset's real weights:
    python benchmarks/bench_personalize.py --model preset --preset demo

"stock" is diffusers' StableDiffusionXLPipeline + load_ip_adapter (same weights, scheduler, prompts, seeds, sheet),
called the way its docs show: one call with the prompt list and the sheet as ip_adapter_image. "ours" is the
warm PersonalizePipeline call (sheet embeddings cached, all panels in one batch); "ours cold" includes encoding.
The numbers printed are measured on the machine that runs this; nothing is estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import add_model_args, build_random, timed  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from engine import IPAdapterModules, PersonalizePipeline, load_engine  # noqa: E402
from engine.preprocess.image import clip_processor  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"
TOKENIZER = ROOT / "tests" / "fixtures" / "clip-tokenizer"  # timing does not depend on the vocabulary
PROMPTS = [
    "running through the rain, laughing",
    "sitting at a cafe table, reading a book",
    "waving from a balcony at night",
    "jumping over a puddle in a park",
    "standing on a beach at sunset, side view",
    "drawing at a desk in a classroom",
    "looking surprised in a snowy street",
    "dancing in a forest clearing",
]


def random_components(config_name: str, device, dtype) -> dict:
    cfg = json.loads((CONFIGS / f"{config_name}.json").read_text())
    tokenizer = CLIPTokenizer(str(TOKENIZER / "vocab.json"), str(TOKENIZER / "merges.txt"), model_max_length=77)
    enc = cfg["image_encoder"]
    return {
        "unet": build_random(UNet2DConditionModel, cfg["unet"], device, dtype, 0),
        "vae": build_random(AutoencoderKL, cfg["vae"], device, dtype, 1),
        "text_encoder": build_random(CLIPTextModel, CLIPTextConfig(**cfg["text_encoder"]), device, dtype, 2),
        "text_encoder_2": build_random(CLIPTextModelWithProjection, CLIPTextConfig(**cfg["text_encoder_2"]), device, dtype, 3),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                   timestep_spacing="leading"),
        "image_encoder": build_random(CLIPVisionModelWithProjection, CLIPVisionConfig(**enc), device, dtype, 4),
        "feature_extractor": clip_processor(enc["image_size"]),
    }


def sheet_image(width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), (255, 255, 255))
    img.paste((200, 60, 60), (width // 3, height // 5, 2 * width // 3, 9 * height // 10))
    img.paste((240, 200, 170), (5 * width // 12, height // 16, 7 * width // 12, height // 5))
    return img


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, guidance=5.0)
    parser.add_argument("--panels", type=int, default=4, help="panels per call (one batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--low-vram", action="store_true", help="model CPU offload + VAE slicing/tiling")
    parser.add_argument("--image-guidance", type=float, default=None,
                        help="our panels with guidance on the sheet apart from the text's (three UNet passes; stock "
                             "diffusers has no such option, so its row keeps two)")
    parser.add_argument("--reference-scale", type=float, default=0.0,
                        help="our panels with reference attention (one more UNet pass a step; stock has none)")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock diffusers comparison")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_grad_enabled(False)
    load_start = time.perf_counter()
    if args.model == "preset":
        engine = load_engine(args.preset, device=args.device, dtype=args.dtype, low_vram=args.low_vram or None)
        ours = engine.personalize
        components = dict(ours.components)
        adapter_state = IPAdapterModules.from_unet(ours.unet).h94_state_dict()
    else:
        components = random_components("sdxl_full" if args.model == "random-full" else "sdxl_small", device, dtype)
        ours = PersonalizePipeline(**components)
        adapter = IPAdapterModules.install(ours.unet, image_embed_dim=components["image_encoder"].config.hidden_size,
                                           seed=0)
        adapter_state = adapter.h94_state_dict()
        if args.low_vram and device.type == "cuda":
            ours.to("cpu")
            ours.enable_model_cpu_offload(device=device)
            ours.vae.enable_slicing()
            ours.vae.enable_tiling()
    ours.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - load_start

    prompts = (PROMPTS * ((args.panels + len(PROMPTS) - 1) // len(PROMPTS)))[: args.panels]
    seeds = list(range(args.panels))
    sheet = sheet_image(args.width, args.height)
    common = dict(num_inference_steps=args.steps, height=args.height, width=args.width, guidance_scale=args.guidance)

    def run_ours():
        ours(prompts, sheet=sheet, seeds=seeds, output_type="pil", image_guidance_scale=args.image_guidance,
             reference_scale=args.reference_scale, **common)

    ours.clear_sheet_cache()
    cold_s, _ = timed(run_ours, device, 1)
    warm_s, ours_peak = timed(run_ours, device, args.repeats)
    rows = [{"pipeline": "ours (cached sheet)", "batch_s": warm_s, "peak_gb": ours_peak},
            {"pipeline": "ours cold (encodes sheet)", "batch_s": cold_s, "peak_gb": None}]

    if not args.no_stock:
        stock_components = {k: v for k, v in components.items()}
        stock = StableDiffusionXLPipeline(**stock_components, add_watermarker=False)
        stock.set_progress_bar_config(disable=True)
        # ours and stock share the UNet: load_ip_adapter re-installs the same weights (identical processors).
        stock.load_ip_adapter(
            {"image_proj": {k[len("image_proj."):]: v for k, v in adapter_state.items() if k.startswith("image_proj.")},
             "ip_adapter": {k[len("ip_adapter."):]: v for k, v in adapter_state.items() if k.startswith("ip_adapter.")}},
            subfolder="", weight_name="", image_encoder_folder=None,
        )
        stock.unet.to(device=device if not args.low_vram else "cpu", dtype=dtype)

        def run_stock():
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            stock(prompt=prompts, ip_adapter_image=sheet, generator=gens, **common)

        stock_s, stock_peak = timed(run_stock, device, args.repeats)
        rows.append({"pipeline": "stock SDXL + load_ip_adapter", "batch_s": stock_s, "peak_gb": stock_peak})

    name = args.model if args.model != "preset" else f"preset {args.preset}"
    print(f"\nStage II benchmark: {name}, {args.width}x{args.height}, {args.steps} steps, CFG {args.guidance}, "
          f"{'' if args.image_guidance is None else f'image guidance {args.image_guidance} (ours), '}"
          f"{'' if not args.reference_scale else f'reference attention {args.reference_scale} (ours), '}"
          f"{args.panels} panels/call, {str(dtype).replace('torch.', '')} on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else f' ({os.cpu_count()} cores)'}"
          f"{', low-VRAM switches' if args.low_vram else ''}; load {load_s:.1f} s; median of {args.repeats}")
    memory = "peak GPU GiB" if device.type == "cuda" else "peak RSS GiB (process)"
    print(f"| pipeline | s / batch | s / panel | {memory} |\n|---|---|---|---|")
    for row in rows:
        row["panel_s"] = row["batch_s"] / args.panels
        peak = f"{row['peak_gb']:.2f}" if row["peak_gb"] is not None else "-"
        print(f"| {row['pipeline']} | {row['batch_s']:.3f} | {row['panel_s']:.3f} | {peak} |")
    if not args.no_stock:
        print(f"ratio ours/stock per panel: {rows[0]['panel_s'] / rows[-1]['panel_s']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()

"""Stage I speed and memory: latency and peak memory of one standardization (reference -> sheet).

    # the full-size SD1.5 ReferenceNet + denoiser + ViT-L/14 + VAE with random weights (no download), GPU:
    python benchmarks/bench_standardize.py --model random-full --device cuda --dtype bfloat16
    # the same code path at a CPU-sized config:
    python benchmarks/bench_standardize.py --model random-small --width 256 --height 384
    # a preset's real weights:
    python benchmarks/bench_standardize.py --model preset --preset demo

The reference pass (t = 0), 20 DDIM steps with CFG (the unconditional half in the same UNet batch), VAE encode and
decode are all inside the timed call; detectors are not (they depend on the preset). Measured, not estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import add_model_args, build_random, timed  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

from engine import PoseGuider, ReferenceConditioner, StandardizePipeline, load_engine  # noqa: E402
from trainer.synthetic import render_sample  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"


def random_pipeline(config_name: str, device, dtype) -> StandardizePipeline:
    cfg = json.loads((CONFIGS / f"{config_name}.json").read_text())
    reference_unet = build_random(UNet2DConditionModel, cfg["unet"], device, dtype, 0)
    denoising_unet = build_random(UNet2DConditionModel, cfg["unet"], device, dtype, 1)
    pose_guider = PoseGuider(cfg["unet"]["block_out_channels"][0],
                             block_out_channels=tuple(cfg["pose_guider"]["block_out_channels"])).to(device, dtype)
    conditioner = ReferenceConditioner.for_unet(reference_unet).to(device, dtype)
    return StandardizePipeline(
        vae=build_random(AutoencoderKL, cfg["vae"], device, dtype, 2),
        image_encoder=build_random(CLIPVisionModelWithProjection, CLIPVisionConfig(**cfg["image_encoder"]), device,
                                   dtype, 3),
        reference_unet=reference_unet, denoising_unet=denoising_unet, pose_guider=pose_guider,
        reference_conditioner=conditioner,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                clip_sample=False),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser, guidance=3.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    if args.model == "preset":
        pipe = load_engine(args.preset, device=args.device, dtype=args.dtype, stages=("standardize",)).standardize
        pipe.set_detectors()
    else:
        pipe = random_pipeline("sd15_full" if args.model == "random-full" else "sd15_small", device, dtype)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    sample = render_sample(3, 1, (args.width, args.height))
    mask = np.asarray(sample.mask, np.float32) / 255.0

    def run():
        pipe(sample.image, mask=mask, reference_pose=sample.keypoints, height=args.height, width=args.width,
             num_inference_steps=args.steps, guidance_scale=args.guidance, seed=0)

    run()  # warm-up
    seconds, peak = timed(run, device, args.repeats)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} cores"
    memory = "peak GPU GiB" if device.type == "cuda" else "peak RSS GiB (process)"
    print(f"\nStage I benchmark: {args.model if args.model != 'preset' else 'preset ' + args.preset}, "
          f"{args.width}x{args.height}, {args.steps} steps, CFG {args.guidance}, {str(dtype).replace('torch.', '')} "
          f"on {device} ({where}); load {load_s:.1f} s; median of {args.repeats}")
    print(f"| s / sheet | {memory} |\n|---|---|\n| {seconds:.3f} | {peak:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "seconds": seconds, "peak_gb": peak}, indent=2))
    return seconds, peak


if __name__ == "__main__":
    main()

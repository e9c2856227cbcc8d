"""Measuring the models on held-out synthetic characters (ground truth known exactly).

    python -m trainer.evaluate stage1 --standardizer runs/demo/standardizer/pipeline [--n 40] [--size 128x192]

Stage I: PSNR and SSIM of the sheet against the ground-truth standard render, next to a trivial baseline that
ignores the reference (the mean standard image of training characters).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from engine.metrics import psnr, ssim

from .synthetic import render_sample
from .synthetic.character import character_ids


def mean_standard(size: tuple[int, int], n: int = 200) -> Image.Image:
    """The trivial baseline: the average standard render over ``n`` training characters."""
    acc = np.zeros((size[1], size[0], 3), np.float64)
    for cid in character_ids("train", n):
        acc += np.asarray(render_sample(cid, 0, size).standard, np.float64)
    return Image.fromarray(np.clip(np.rint(acc / n), 0, 255).astype(np.uint8))


def standardization_quality(pipe, n: int = 40, size=(128, 192), steps: int = 20, guidance: float = 3.5,
                            seed: int = 0, examples: int = 0):
    """Mean PSNR/SSIM of ``pipe`` (a StandardizePipeline) on ``n`` test characters, with ground-truth mask and pose,
    and of the mean-standard baseline; also returns up to ``examples`` (reference, sheet, truth) triples."""
    w, h = size
    baseline = mean_standard(size)
    scores = {"psnr": [], "ssim": [], "baseline_psnr": [], "baseline_ssim": []}
    shown = []
    for i, cid in enumerate(character_ids("test", n)):
        sample = render_sample(cid, 50_000 + i, size)
        out = pipe(sample.image, mask=np.asarray(sample.mask, np.float32) / 255.0, reference_pose=sample.keypoints,
                   height=h, width=w, num_inference_steps=steps, guidance_scale=guidance, seed=seed + i)
        scores["psnr"].append(psnr(out.sheet, sample.standard))
        scores["ssim"].append(ssim(out.sheet, sample.standard))
        scores["baseline_psnr"].append(psnr(baseline, sample.standard))
        scores["baseline_ssim"].append(ssim(baseline, sample.standard))
        if len(shown) < examples:
            shown.append((sample.image, out.sheet, sample.standard))
    result = {k: float(np.mean(v)) for k, v in scores.items()}
    result.update(n=n, size=list(size), steps=steps, guidance=guidance)
    return result, shown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    st = sub.add_parser("stage1")
    st.add_argument("--standardizer", required=True, help="a saved StandardizePipeline folder")
    st.add_argument("--n", type=int, default=40)
    st.add_argument("--size", default="128x192")
    st.add_argument("--steps", type=int, default=20)
    st.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    from engine.pipelines.standardize import StandardizePipeline

    pipe = StandardizePipeline.from_pretrained(args.standardizer)
    pipe.set_progress_bar_config(disable=True)
    w, h = (int(v) for v in args.size.split("x"))
    result, _ = standardization_quality(pipe, args.n, (w, h), args.steps)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

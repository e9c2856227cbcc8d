"""Make the demo models: the whole recipe, in order, resumable, then packaged into assets/models/demo.

    python -m trainer.make_demo                      # GPU: the configs in trainer/configs/*_demo.yaml
    python -m trainer.make_demo --steps-scale 0.05   # a 2-core CPU run (shorter; the model card says so)
    python -m trainer.make_demo --stages package     # only (re)package and re-measure what is trained

Stages: clip -> vae -> base -> standardizer -> pairs (our Stage I standardizes synthetic images) -> personalizer
-> package (fp16 copies in assets/models/demo, Stage I PSNR/SSIM on held-out characters vs the mean-standard
baseline, an example grid, and the model card). A finished stage is skipped; a killed one resumes.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "trainer" / "configs"
RUNS = ROOT / "runs" / "demo"
STAGES = ("clip", "vae", "base", "standardizer", "pairs", "personalizer", "pose_detector", "mask_detector",
          "package")
OUTPUTS = {"clip": RUNS / "clip" / "image_encoder", "vae": RUNS / "vae" / "vae", "base": RUNS / "base" / "sdxl",
           "standardizer": RUNS / "standardizer" / "pipeline", "pairs": RUNS / "pairs" / "metadata.jsonl",
           "personalizer": RUNS / "personalizer" / "adapter" / "ip-adapter.safetensors",
           "pose_detector": RUNS / "pose_detector" / "pose.onnx", "mask_detector": RUNS / "mask_detector" / "mask.onnx"}


def _config_args(name: str, scale: float) -> list[str]:
    config = yaml.safe_load((CONFIGS / f"{name}_demo.yaml").read_text())
    args = ["--config", str(CONFIGS / f"{name}_demo.yaml")]
    if scale != 1.0:
        steps = max(10, int(config["max_train_steps"] * scale))
        args += ["--max_train_steps", str(steps), "--checkpointing_steps", str(max(5, steps // 4)),
                 "--validation_steps", str(max(5, steps // 2))]
    return args


def run_stage(stage: str, args) -> None:
    from . import (build_pairs, train_clip, train_detectors, train_personalizer, train_standardizer,
                   train_text_to_image, train_vae)
    from .synthetic.__main__ import main as synthetic_main

    trainers = {"clip": train_clip, "vae": train_vae, "base": train_text_to_image, "standardizer": train_standardizer,
                "personalizer": train_personalizer, "pose_detector": train_detectors, "mask_detector": train_detectors}
    if stage in trainers:
        module = trainers[stage]
        module.main(module.parse_args(_config_args(stage, args.steps_scale)))
    elif stage == "pairs":
        images = RUNS / "images"
        if not (images / "info.json").is_file():
            synthetic_main(["export", "--split", "train", "--n", str(args.pairs), "--size", "128x192", "--out",
                            str(images), "--workers", "2"])
        build_pairs.main(build_pairs.parse_args(["--standardizer", str(OUTPUTS["standardizer"]), "--images",
                                                 str(images), "--out", str(RUNS / "pairs"), "--size", "128x192",
                                                 "--ground-truth"]))


def package(args, timings: dict) -> Path:
    """fp16 copies into assets/models/demo, measured quality, example grid, model card."""
    import torch

    from engine.pipelines import PersonalizePipeline, StandardizePipeline
    from transformers import CLIPVisionModelWithProjection

    from .common import image_grid
    from .evaluate import standardization_quality
    from .synthetic import render_sample
    from .synthetic.character import character_ids

    demo = ROOT / "assets" / "models" / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    std = StandardizePipeline.from_pretrained(OUTPUTS["standardizer"])
    std.to(torch.float16).save_pretrained(demo / "standardize")
    base = PersonalizePipeline.from_pretrained(OUTPUTS["base"])
    base.to(torch.float16).save_pretrained(demo / "personalize")
    CLIPVisionModelWithProjection.from_pretrained(RUNS / "clip" / "image_encoder").to(torch.float16).save_pretrained(
        demo / "image_encoder")
    (demo / "adapter").mkdir(exist_ok=True)
    shutil.copy(OUTPUTS["personalizer"], demo / "adapter" / "ip-adapter.safetensors")
    (demo / "detectors").mkdir(exist_ok=True)
    for kind in ("pose", "mask"):
        shutil.copy(OUTPUTS[f"{kind}_detector"], demo / "detectors" / f"{kind}.onnx")
    size_mb = sum(p.stat().st_size for p in demo.rglob("*") if p.is_file()) / 2**20

    from engine import load_engine

    engine = load_engine("demo", device="cpu")
    quality, shown = standardization_quality(engine.standardize, n=args.eval_n, examples=2)
    prompts = ["running, laughing, side view, full body, on a beach", "sitting, sad, front view, full body, in a room",
               "waving, smiling, three-quarter view, half body, in a park", "jumping, surprised, front view, in the snow"]
    rows = []
    for i, cid in enumerate(character_ids("test", 3)):
        ref = render_sample(cid, 7 + i, (128, 192)).image
        start = time.perf_counter()
        sheet = engine.standardize_reference(ref, seed=i).sheet
        panels = engine.generate_panels(prompts, sheet=sheet, seeds=i).images
        timings.setdefault("example_seconds", []).append(round(time.perf_counter() - start, 2))
        rows.append([ref, sheet, *panels])
    (demo / "figures").mkdir(exist_ok=True)
    image_grid(rows, (128, 192)).save(demo / "figures" / "examples.png")
    image_grid([list(t) for t in shown], (128, 192)).save(demo / "figures" / "stage1.png")
    detectors = {kind: json.loads((OUTPUTS[f"{kind}_detector"].parent / "detector_accuracy.json").read_text())
                 for kind in ("pose", "mask")}
    card = {"quality_stage1": quality, "detectors": detectors, "size_mb": round(size_mb, 2), "timings": timings,
            "hardware": _hardware(), "steps_scale": args.steps_scale}
    (demo / "model_card.json").write_text(json.dumps(card, indent=2))
    (demo / "README.md").write_text(model_card(card))
    return demo


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores)"


def model_card(card: dict) -> str:
    q = card["quality_stage1"]
    lines = [
        "# SerialGen demo models", "",
        "Small models trained by `python -m trainer.make_demo` on the synthetic world, loaded by `--preset demo`.",
        f"Hardware: {card['hardware']}; steps scale {card['steps_scale']} of the configs in `trainer/configs/`.",
        f"Size on disk: {card['size_mb']} MB (fp16).", "",
        "| stage | wall time (s) |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in card["timings"].items() if k != "example_seconds"], "",
        f"## Stage I on {q['n']} held-out test characters ({q['size'][0]}x{q['size'][1]}, {q['steps']} DDIM steps)", "",
        "| | PSNR (dB) | SSIM |", "|---|---|---|",
        f"| our Stage I | {q['psnr']:.2f} | {q['ssim']:.3f} |",
        f"| mean standard image (trivial baseline) | {q['baseline_psnr']:.2f} | {q['baseline_ssim']:.3f} |", "",
        "Targets: SSIM >= 0.85, PSNR >= 22 dB.", "",
        "Detectors on held-out renders: " + json.dumps(card["detectors"]), "",
        "![stage 1](figures/stage1.png)", "", "Reference -> sheet -> four panels:", "",
        "![examples](figures/examples.png)", "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.make_demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every config's max_train_steps")
    parser.add_argument("--pairs", type=int, default=20000, help="synthetic images standardized into Stage II pairs")
    parser.add_argument("--eval-n", type=int, default=40)
    parser.add_argument("--force", action="store_true", help="rerun stages whose output exists")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; choose from {STAGES}")
    timings_path = RUNS / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for stage in stages:
        if stage == "package":
            print(package(args, timings))
            continue
        if OUTPUTS[stage].exists() and not args.force:
            print(f"{stage}: done ({OUTPUTS[stage]})")
            continue
        start = time.perf_counter()
        run_stage(stage, args)
        timings[stage] = round(time.perf_counter() - start + timings.get(stage, 0), 1)
        RUNS.mkdir(parents=True, exist_ok=True)
        timings_path.write_text(json.dumps(timings, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build Stage II training pairs: standardize a folder of images with a Stage I model (paper section 3.4).

    python -m trainer.build_pairs --standardize runs/standardize/pipeline --images data/train --out data/pairs
    accelerate launch -m trainer.build_pairs ...   # the images are split across processes

``--images`` is a folder written by ``python -m trainer.synthetic export`` (its ``metadata.jsonl`` gives captions,
and with ``--ground-truth`` masks and keypoints), or any folder of images with optional ``NAME.txt`` captions.
Writes ``NNNNNN_sheet.png`` (the standardized reference), ``NNNNNN_target.png`` (the image) and ``metadata.jsonl``
(sheet, target, caption, source) to ``--out``; with ``--ground-truth`` also the target's figure mask
(``NNNNNN_mask.png``, for the adapter's ``figure_loss_weight``) and its body-part labels where the export has them
(``NNNNNN_labels.png``, for ``lower_loss_weight``). With ``--latents`` each sheet's latents (scaled, as
the denoiser made them) are kept too (``NNNNNN_sheet.safetensors``) and, with ``--ground-truth``, the character's true
standard render (``NNNNNN_standard.png``): the pairs a Stage I decoder is fitted on (``train_vae`` ``latent_pairs``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--standardize", required=True, help="a saved StandardizePipeline folder")
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", default="128x192", help="WxH of sheet and target (Stage I's training size)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--colour-match", type=float, default=0.0, help="the pipeline's colour correction after the "
                        "model (0..1; the demo preset's is 0.5): sheets as the studio draws them")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--ground-truth", action="store_true", help="use the export's masks/keypoints, no detectors")
    parser.add_argument("--latents", action="store_true", help="also keep each sheet's latents (and, with "
                        "--ground-truth, the true standard render): pairs for train_vae latent_pairs")
    parser.add_argument("--vae", default=None, help="decode the sheets with this VAE instead of the pipeline's (Stage "
                        "I's own decoder, make_demo's sheet_decoder: the same encoder and latent space)")
    parser.add_argument("--pose-estimator", default=None, help="a StandardPoseEstimator folder (make_demo's "
                        "standard_pose): each sheet in its character's own standard pose, as the studio draws it")
    parser.add_argument("--average-pose", action="store_true", help="draw every sheet in the average body's standard "
                        "pose even where the pipeline has a pose_estimator (what the studio's uploads get)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto", help="auto (the studio's: float32 on the CPU), float32, float16, "
                        "bfloat16; a shipped fp16 folder is upcast on the CPU, where fp16 math is slow")
    return parser.parse_args(argv)


def list_items(folder: Path, ground_truth: bool) -> list[dict]:
    """[{image, caption, mask?, keypoints?}] from an export (metadata.jsonl) or a plain folder."""
    records = sorted(folder.glob("shard-*/metadata.jsonl")) or sorted(folder.glob("metadata.jsonl"))
    items = []
    if records:
        for path in records:
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                item = {"image": str(folder / rec["files"]["image"]), "caption": rec.get("caption", "")}
                if ground_truth:
                    item["mask"] = str(folder / rec["files"]["mask"])
                    item["keypoints"] = rec["keypoints"]
                    if "labels" in rec["files"]:
                        item["labels"] = str(folder / rec["files"]["labels"])
                    if "standard" in rec["files"]:
                        item["standard"] = str(folder / rec["files"]["standard"])
                items.append(item)
        return items
    if ground_truth:
        raise ValueError("--ground-truth needs an export folder with metadata.jsonl")
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = path.with_suffix(".txt")
        items.append({"image": str(path), "caption": txt.read_text().strip() if txt.is_file() else ""})
    return items


def load_standardize(folder, device, dtype: str = "auto"):
    """A saved StandardizePipeline on ``device`` in the dtype the studio would run it in there (``resolve_dtype``):
    the shipped demo folder is stored in fp16, which on the CPU would otherwise run fp16 kernels (several times
    slower than fp32 there, measured on build_pairs)."""
    from engine.devices import resolve_dtype
    from engine.pipelines.standardize import StandardizePipeline

    import torch

    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device, "standardize")
    return StandardizePipeline.from_pretrained(folder, dtype=torch_dtype).to(device)


def main(args) -> Path:
    import torch
    from accelerate import PartialState
    from safetensors.torch import save_file

    state = PartialState()
    folder, out = Path(args.images), Path(args.out)
    if not folder.is_dir():
        raise ValueError(f"--images {folder} is not a folder")
    if args.latents and args.colour_match:
        raise ValueError("--latents keeps the model's latents, before any colour correction: leave --colour-match "
                         "out with --latents")
    items = list_items(folder, args.ground_truth)[: args.limit]
    if not items:
        raise ValueError(f"no images found in {folder}")
    pipe = load_standardize(args.standardize, args.device or state.device, args.dtype)
    if args.vae:
        from .common import adopt_decoder

        adopt_decoder(pipe, args.vae, strict=True)
    if args.pose_estimator and args.average_pose:
        raise ValueError("--pose-estimator draws each character's own standard pose, --average-pose the average "
                         "body's: give one of them")
    if args.average_pose:
        pipe.register_modules(pose_estimator=None)
    if args.pose_estimator:
        from engine.models import StandardPoseEstimator

        pipe.register_modules(pose_estimator=StandardPoseEstimator.from_pretrained(args.pose_estimator).to(
            pipe.device))
    pipe.set_progress_bar_config(disable=True)
    w, h = (int(v) for v in args.size.lower().split("x"))
    out.mkdir(parents=True, exist_ok=True)
    indices = list(range(len(items)))
    records = []
    with state.split_between_processes(indices) as mine:
        for index in mine:
            item = items[index]
            image = Image.open(item["image"]).convert("RGB")
            mask = keypoints = None
            if args.ground_truth:
                mask = np.asarray(Image.open(item["mask"]), np.float32) / 255.0
                keypoints = np.asarray(item["keypoints"], np.float64)
            with torch.no_grad():
                result = pipe(image, mask=mask, reference_pose=keypoints, height=h, width=w,
                              num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed + index,
                              colour_match=args.colour_match,
                              output_type="latent" if args.latents else "pil")
            sheet_name, target_name = f"{index:06d}_sheet.png", f"{index:06d}_target.png"
            record = {"index": index, "sheet": sheet_name, "target": target_name, "caption": item["caption"],
                      "source": item["image"], "seed": result.seed}
            sheet = result.sheet
            if args.latents:
                latents, sheet = sheet, pipe.decode_sheet(sheet)
                record["latents"] = f"{index:06d}_sheet.safetensors"
                save_file({"latents": latents[0].float().cpu().contiguous()}, out / record["latents"])
                if "standard" in item:
                    record["standard"] = f"{index:06d}_standard.png"
                    Image.open(item["standard"]).convert("RGB").resize((w, h), Image.Resampling.LANCZOS).save(
                        out / record["standard"])
            if mask is not None:  # the target's figure, for a figure-weighted adapter loss (train_personalizer)
                record["mask"] = f"{index:06d}_mask.png"
                Image.fromarray(np.uint8(np.clip(mask, 0, 1) * 255)).resize((w, h), Image.Resampling.BILINEAR).save(
                    out / record["mask"])
            if "labels" in item:  # the target's body parts, for a part-weighted adapter loss (lower_loss_weight)
                record["labels"] = f"{index:06d}_labels.png"
                Image.open(item["labels"]).resize((w, h), Image.Resampling.NEAREST).save(out / record["labels"])
            sheet.save(out / sheet_name)
            image.resize((w, h), Image.Resampling.LANCZOS).save(out / target_name)
            records.append(record)
    (out / f"metadata-{state.process_index}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    state.wait_for_everyone()
    if state.is_main_process:
        merged = []
        for part in sorted(out.glob("metadata-*.jsonl")):
            merged += [json.loads(line) for line in part.read_text().splitlines() if line]
            part.unlink()
        merged.sort(key=lambda r: r["index"])
        (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in merged))
    return out


if __name__ == "__main__":
    main(parse_args())

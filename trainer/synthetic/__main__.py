"""The synthetic world from the command line (numpy + Pillow only).

    python -m trainer.synthetic export --split train --n 10000 --size 128x192 --out data/synthetic/train
    python -m trainer.synthetic preview --n 16 --out grid.png [--size 256x384] [--split test]
    python -m trainer.synthetic standard-pose --out assets/standard_pose.json

export writes shards of ``--shard-size`` samples: ``shard-00000/000000_image.png`` (+ ``_mask``, ``_labels``,
``_pose``), ``shard-00000/metadata.jsonl`` (one JSON per sample: files, caption, appearance, attributes, keypoints)
and each character's standard render once in ``standard/{id}.png`` (+ ``_mask``, ``_pose``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .character import character_ids
from .render import render_sample


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like WIDTHxHEIGHT (e.g. 128x192), got {text!r}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small: at least 32x32")
    return w, h


def _jobs(split: str, n: int, scenes_per_character: int, first_character: int, seed: int):
    num_chars = -(-n // scenes_per_character)
    ids = character_ids(split, num_chars, start=first_character)
    return [(ids[i // scenes_per_character], seed * 1_000_003 + i % scenes_per_character) for i in range(n)]


def _export_one(args):
    index, (cid, scene_seed), size, out, shard_size = args
    sample = render_sample(cid, scene_seed, size)
    shard = out / f"shard-{index // shard_size:05d}"
    stem = f"{index:06d}"
    files = {}
    for key, image in (("image", sample.image), ("mask", sample.mask), ("labels", sample.labels),
                       ("pose", sample.pose_map)):
        name = f"{stem}_{key}.png"
        image.save(shard / name)
        files[key] = f"{shard.name}/{name}"
    standard = out / "standard" / f"{cid}.png"
    if not standard.exists():  # written once per character (identical for all its scenes)
        for image, name in ((sample.standard_mask, f"{cid}_mask.png"), (sample.standard_pose_map, f"{cid}_pose.png"),
                            (sample.standard, f"{cid}.png")):
            tmp = out / "standard" / f".{name}.{os.getpid()}.png"  # workers may race: write, then rename
            image.save(tmp)
            os.replace(tmp, out / "standard" / name)
    files.update(standard=f"standard/{cid}.png", standard_mask=f"standard/{cid}_mask.png",
                 standard_pose=f"standard/{cid}_pose.png")
    return index, {
        "index": index, "character_id": cid, "scene_seed": scene_seed, "split": sample.split, "files": files,
        "caption": sample.caption, "appearance": sample.appearance, "attributes": sample.attributes,
        "keypoints": np.round(sample.keypoints, 2).tolist(),
        "standard_keypoints": np.round(sample.standard_keypoints, 2).tolist(),
    }


class Progress:
    def __init__(self, total: int, label: str):
        self.total, self.label, self.start, self.done = total, label, time.perf_counter(), 0

    def update(self, k: int = 1):
        self.done += k
        rate = self.done / max(1e-9, time.perf_counter() - self.start)
        bar = "#" * int(30 * self.done / self.total)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {rate:.1f}/s")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def export(args) -> Path:
    out = Path(args.out)
    jobs = _jobs(args.split, args.n, args.scenes_per_character, args.first_character, args.seed)
    (out / "standard").mkdir(parents=True, exist_ok=True)
    for shard in range(-(-args.n // args.shard_size)):
        (out / f"shard-{shard:05d}").mkdir(exist_ok=True)
    work = [(i, job, args.size, out, args.shard_size) for i, job in enumerate(jobs)]
    records: dict[int, dict] = {}
    progress = Progress(len(work), f"export {args.split}")
    if args.workers > 1:
        with Pool(args.workers) as pool:
            for index, record in pool.imap_unordered(_export_one, work, chunksize=8):
                records[index] = record
                progress.update()
    else:
        for item in work:
            index, record = _export_one(item)
            records[index] = record
            progress.update()
    for shard in range(-(-args.n // args.shard_size)):
        lines = [json.dumps(records[i]) for i in sorted(records) if i // args.shard_size == shard]
        (out / f"shard-{shard:05d}" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    (out / "info.json").write_text(json.dumps({
        "split": args.split, "n": args.n, "size": list(args.size), "scenes_per_character": args.scenes_per_character,
        "first_character": args.first_character, "seed": args.seed, "shards": -(-args.n // args.shard_size),
    }, indent=2))
    return out


def preview(args) -> Path:
    """A contact sheet: one row per sample of (image, standard, mask, pose map) with the caption under it."""
    w, h = args.size
    jobs = _jobs(args.split, args.n, 1, args.first_character, args.seed)
    font = ImageFont.load_default(size=max(10, w // 18))
    caption_h = max(14, w // 12)
    rows = []
    for cid, scene_seed in jobs:
        s = render_sample(cid, scene_seed, (w, h))
        row = Image.new("RGB", (4 * w, h + caption_h), (255, 255, 255))
        for k, tile in enumerate((s.image, s.standard, s.mask.convert("RGB"), s.pose_map)):
            row.paste(tile, (k * w, 0))
        ImageDraw.Draw(row).text((4, h + 2), f"#{cid}: {s.caption}", fill=(20, 20, 20), font=font)
        rows.append(row)
    cols = 2 if len(rows) > 4 else 1
    n_rows = -(-len(rows) // cols)
    sheet = Image.new("RGB", (cols * 4 * w + (cols - 1) * 8, n_rows * (h + caption_h)), (255, 255, 255))
    for i, row in enumerate(rows):
        sheet.paste(row, ((i // n_rows) * (4 * w + 8), (i % n_rows) * (h + caption_h)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def standard_pose(args) -> Path:
    """Writes the standard target pose (the A-pose of an average body) for engine.preprocess.standard."""
    from dataclasses import replace

    from .character import make_character
    from .render import STANDARD_HEAD_H, STANDARD_HEAD_Y, _standard_placement, render_figure
    from .skeleton import STANDARD_POSE

    w, h = 512, 768
    average = replace(make_character(0), height=1.0, build=1.05, head_size=1.03)
    fig = render_figure(average, dict(STANDARD_POSE), "front", False, "neutral", (w, h), _standard_placement((w, h)))
    kp = fig.keypoints
    data = {
        "description": "SerialGen standard pose: A-pose, front view; (dx, y, visible) in canvas heights, dx from the"
                       " centre line; head = (dx, y, height) of the head centre",
        "head": [0.0, STANDARD_HEAD_Y, STANDARD_HEAD_H],
        "keypoints": [[round((x - w / 2) / h, 5), round(y / h, 5), int(v)] for x, y, v in kp.tolist()],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.synthetic", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("export", "preview"):
        p = sub.add_parser(name)
        p.add_argument("--split", default="train" if name == "export" else "test", choices=["train", "val", "test"])
        p.add_argument("--n", type=int, required=name == "export", default=16)
        p.add_argument("--size", type=parse_size, default=(128, 192) if name == "export" else (192, 288))
        p.add_argument("--out", required=True)
        p.add_argument("--first-character", type=int, default=0)
        p.add_argument("--seed", type=int, default=0, help="scene seed offset")
    sp = sub.add_parser("standard-pose", help="write the standard target pose JSON (assets/standard_pose.json)")
    sp.add_argument("--out", default="assets/standard_pose.json")
    exp = sub.choices["export"]
    exp.add_argument("--scenes-per-character", type=int, default=10)
    exp.add_argument("--shard-size", type=int, default=1000)
    exp.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if args.command == "standard-pose":
        print(standard_pose(args))
        return 0
    if args.n < 1:
        parser.error("--n must be at least 1")
    path = export(args) if args.command == "export" else preview(args)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

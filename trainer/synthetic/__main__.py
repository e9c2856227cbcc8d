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


def _hand(wrist: np.ndarray, elbow: np.ndarray, length: float, inward: float) -> list[list[float]]:
    """21 hand points (wrist, then thumb, index, middle, ring, little finger from base to tip) of a relaxed open
    hand hanging along the forearm's direction; ``inward`` (+1 / -1) is the side of the body's centre line."""
    d = (wrist - elbow) / max(1e-6, float(np.hypot(*(wrist - elbow))))
    n = np.array([-d[1], d[0]]) * inward  # across the palm, toward the body
    points = [wrist]
    palm = 0.45 * length
    for finger, (across, size) in enumerate(((0.55, 0.55), (0.3, 0.95), (0.08, 1.0), (-0.14, 0.92), (-0.34, 0.75))):
        if finger == 0:  # the thumb starts at the wrist side of the palm and points down and in
            base = wrist + d * palm * 0.25 + n * across * palm
            direction = (d + 0.6 * n) / np.hypot(*(d + 0.6 * n))
        else:
            base = wrist + d * palm + n * across * palm
            direction = d
        step = (length - palm) * size / 3
        points += [base + direction * step * k for k in range(4)]
    return [[float(x), float(y)] for x, y in points]


def _face(cx: float, cy: float, hh: float) -> list[list[float]]:
    """68 landmarks of a neutral frontal face (the iBUG 300-W layout) in a head of height ``hh`` centred at
    (cx, cy): a procedural mean face (jaw, brows, nose, eyes, mouth) for the standard target's face dots."""
    pts = []
    for k in range(17):  # jaw, from the right ear (image left) round the chin to the left ear
        t = np.pi * k / 16
        pts.append((cx - 0.38 * hh * np.cos(t), cy - 0.02 * hh + 0.45 * hh * np.sin(t)))
    for side in (-1, 1):  # brows, image left to right
        xs = np.linspace(0.3, 0.06, 5) if side < 0 else np.linspace(0.06, 0.3, 5)
        pts += [(cx + side * x, cy - 0.19 * hh - 0.03 * hh * np.sin(np.pi * (x - 0.06) / 0.24)) for x in xs * hh]
    pts += [(cx, cy + (-0.12 + 0.065 * k) * hh) for k in range(4)]  # nose bridge
    pts += [(cx + x * hh, cy + (0.13 + (0.01 if abs(x) < 0.05 else 0)) * hh) for x in np.linspace(-0.08, 0.08, 5)]
    for side in (-1, 1):  # eyes: outer corner, upper two, inner corner, lower two (clockwise from image left)
        ex, ey, w, h = cx + side * 0.16 * hh, cy - 0.09 * hh, 0.12 * hh, 0.035 * hh
        pts += [(ex - w / 2, ey), (ex - w / 6, ey - h), (ex + w / 6, ey - h), (ex + w / 2, ey), (ex + w / 6, ey + h),
                (ex - w / 6, ey + h)]
    mx, my = cx, cy + 0.26 * hh
    for k in range(12):  # mouth, outer lip: from the left corner over the top and back along the bottom
        t = np.pi - 2 * np.pi * k / 12
        pts.append((mx + 0.12 * hh * np.cos(t), my - 0.04 * hh * np.sin(t)))
    for k in range(8):  # inner lip
        t = np.pi - 2 * np.pi * k / 8
        pts.append((mx + 0.08 * hh * np.cos(t), my - 0.012 * hh * np.sin(t)))
    return [[float(x), float(y)] for x, y in pts]


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
    hh = STANDARD_HEAD_H * h
    # the whole-body target (DWPose's layout: left hand, right hand, 68 face points) for weights trained on it
    hands = _hand(kp[7, :2], kp[6, :2], 0.8 * hh, inward=1) + _hand(kp[4, :2], kp[3, :2], 0.8 * hh, inward=-1)
    face = _face(w / 2, STANDARD_HEAD_Y * h, hh)

    def rel(points):
        return [[round((x - w / 2) / h, 5), round(y / h, 5), 1] for x, y in points]

    data = {
        "description": "SerialGen standard pose: A-pose, front view; (dx, y, visible) in canvas heights, dx from the"
                       " centre line; head = (dx, y, height) of the head centre; hands (left, right: 21 points each)"
                       " and face (68 landmarks) complete DWPose's whole-body layout",
        "head": [0.0, STANDARD_HEAD_Y, STANDARD_HEAD_H],
        "keypoints": [[round((x - w / 2) / h, 5), round(y / h, 5), int(v)] for x, y, v in kp.tolist()],
        "hands": rel(hands),
        "face": rel(face),
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

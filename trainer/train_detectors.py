"""Train the demo preset's small detectors on synthetic renders and export them to ONNX.

    python -m trainer.train_detectors --config trainer/configs/pose_detector_demo.yaml   # detector: pose
    python -m trainer.train_detectors --config trainer/configs/mask_detector_demo.yaml   # detector: mask

``pose``: a CNN regressor, white-letterboxed image (1, 3, H, W) in [-1, 1] -> (1, 18, 3) OpenPose-18 (x / W, y / H,
visibility probability): the layout ``engine.preprocess.detectors.OnnxKeypointDetector`` reads.
``mask``: a small U-Net, (1, 3, H, W) in [-1, 1] (sides multiples of 32) -> (1, 1, H, W) figure alpha: the layout
``OnnxMattingDetector`` reads (MODNet's). Writes ``pose.onnx`` / ``mask.onnx`` and ``detector_accuracy.json``
(held-out: mean keypoint error in pixels and visibility accuracy, or mask IoU).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .common import (
    COMMON_DEFAULTS,
    base_parser,
    ema_weights,
    end_training,
    load_config,
    prepare_training,
    setup_accelerator,
    synthetic_batches,
    training_loop,
)
from .synthetic import on_photo, render_sample, sample_scene, without_person
from .synthetic.render import real_photo
from .synthetic.character import character_ids

DEFAULTS = {**COMMON_DEFAULTS, "detector": "pose", "resolution": [128, 192], "num_characters": 20000,
            "train_batch_size": 32, "learning_rate": 1e-3, "channels": [16, 32, 64, 128], "use_ema": False,
            "num_validation_samples": 64,
            # the share of training pictures with no person in them (scenes, animals, things; no keypoints): the
            # pose detector learns to say "no person", so the studio refuses a cat photo instead of making a sheet
            "negative_fraction": 0.0,
            # of those negatives, the share that are crops of real photographs without people; and the share of
            # pictures *with* a person whose figure is put on such a photo (blurred, with grain), so that a photo's
            # look is no shortcut for "no person": the detector has to find the figure
            "photo_negative_share": 0.0, "photo_positive_fraction": 0.0}


class NoPersonNegatives:
    """A data-worker transform: a ``fraction`` of samples become a picture with no person in it (of those, a
    ``photo_share`` a crop of a real photograph), and a ``photo_positive`` share of the others keep their figure on
    a photograph (a picklable module-level callable; every choice is deterministic in the sample)."""

    def __init__(self, fraction: float, photo_share: float = 0.0, photo_positive: float = 0.0):
        self.fraction, self.photo_share, self.photo_positive = fraction, photo_share, photo_positive

    def __call__(self, sample):
        rng = np.random.default_rng([sample.character_id, sample.scene_seed, 11])
        if rng.random() < self.fraction:
            return without_person(sample, kind="photo" if rng.random() < self.photo_share else None)
        return on_photo(sample) if rng.random() < self.photo_positive else sample


# Real photographs no detector is trained on (they ship with scikit-image and Gradio, so CI has them): animals that
# are not people (the cat among them), a tower and a motorcycle; and two pictures of people. The synthetic
# negatives and the training photo crops (``PHOTO_NEGATIVES``, ``ANIMAL_NEGATIVES``) never include them.
HELD_OUT_PHOTOS = {"chelsea": False, "cheetah2.jpg": False, "stereo_motorcycle": False, "tower.jpg": False,
                   "astronaut": True, "camera": True}


def held_out_photo(name: str):
    """One of ``HELD_OUT_PHOTOS`` as an RGB PIL image."""
    from PIL import Image

    return Image.fromarray(real_photo(name))


def _block(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(4, c_out), nn.SiLU())


class PoseRegressor(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        layers, c = [], 3
        for ch in channels:
            layers += [_block(c, ch, 2), _block(ch, ch)]
            c = ch
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Linear(c * 4, 18 * 3)

    def forward(self, x):
        f = F.adaptive_avg_pool2d(self.backbone(x), 2).flatten(1)
        out = self.head(f).view(-1, 18, 3)
        return torch.cat([torch.sigmoid(out[..., :2]), torch.sigmoid(out[..., 2:])], dim=-1)


class MaskUNet(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 128)):
        super().__init__()
        self.down, c = nn.ModuleList(), 3
        for ch in channels:
            self.down.append(nn.Sequential(_block(c, ch, 2), _block(ch, ch)))
            c = ch
        self.up = nn.ModuleList()
        for ch, skip in zip(reversed(channels[:-1]), reversed(channels[:-1])):
            self.up.append(nn.Sequential(_block(c + skip, ch), _block(ch, ch)))
            c = ch
        self.out = nn.Conv2d(c, 1, 3, padding=1)

    def forward(self, x):
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return torch.sigmoid(F.interpolate(self.out(x), scale_factor=2, mode="bilinear", align_corners=False))


def export_onnx(model: nn.Module, kind: str, size: tuple[int, int], path: Path) -> Path:
    w, h = size
    dummy = torch.zeros(1, 3, h, w)
    axes = {"input": {2: "h", 3: "w"}, "output": {2: "h", 3: "w"}} if kind == "mask" else None
    torch.onnx.export(model.eval().float().cpu(), (dummy,), str(path), input_names=["input"], output_names=["output"],
                      dynamo=False, opset_version=17, dynamic_axes=axes)
    return path


@torch.no_grad()
def held_out_accuracy(kind: str, onnx_path: Path, n: int, size, split: str = "val",
                      threshold: float | None = None, figure: Path | None = None) -> dict:
    """The exported detector through the engine's own ONNX wrapper, on held-out renders of ``split`` (and, for the
    pose detector, held-out pictures without a person and real photographs, drawn with its verdicts to ``figure``)."""
    from engine.preprocess.detectors import OnnxKeypointDetector, OnnxMattingDetector

    det = (OnnxKeypointDetector(onnx_path, **({} if threshold is None else {"threshold": threshold}))
           if kind == "pose" else OnnxMattingDetector(onnx_path, reference_size=max(size)))
    errors, vis_hits, ious, found = [], [], [], []
    for i, cid in enumerate(character_ids(split, n)):
        s = render_sample(cid, 20_000 + i, size)
        if kind == "pose":
            kp = det(s.image)
            truth = s.keypoints
            found.append(kp is not None)
            if kp is None:
                vis_hits += [False] * 18
                continue
            both = (kp[:, 2] > 0) & (truth[:, 2] > 0)
            errors += list(np.hypot(*(kp[both, :2] - truth[both, :2]).T))
            vis_hits += list((kp[:, 2] > 0) == (truth[:, 2] > 0))
        else:
            pred, truth = det(s.image) > 0.5, np.asarray(s.mask) > 127
            ious.append((pred & truth).sum() / max(1, (pred | truth).sum()))
    if kind == "pose":
        kinds = ("scene", "close-up", "texture")  # held-out synthetic pictures without a person
        refused = [det(without_person(render_sample(cid, 30_000 + i, size), kind=kinds[i % 3]).image) is None
                   for i, cid in enumerate(character_ids(split, n))]
        head_only = [f for f, cid, i in zip(found, character_ids(split, n), range(n))
                     if sample_scene(cid, 20_000 + i).framing == "head only"]
        report = {"mean_keypoint_error_px": float(np.mean(errors)) if errors else None,
                  "visibility_accuracy": float(np.mean(vis_hits)), "person_found": float(np.mean(found)),
                  "head_only_found": float(np.mean(head_only)) if head_only else None, "head_only_n": len(head_only),
                  "no_person_refused": float(np.mean(refused)), "n": n, "size": list(size), "split": split,
                  "threshold": det.threshold}
        try:  # real photographs never trained on: should each be refused (False) or found (True)?
            photos = {name: held_out_photo(name) for name in HELD_OUT_PHOTOS}
        except (ImportError, StopIteration):  # scikit-image or Gradio's pictures missing: no photo check
            return report
        found = {name: det(image) for name, image in photos.items()}
        report["held_out_photos"] = {name: kp is not None for name, kp in found.items()}
        report["held_out_photos_right"] = float(np.mean([(found[name] is not None) == person
                                                         for name, person in HELD_OUT_PHOTOS.items()]))
        if figure is not None:
            photo_verdicts(photos, found).save(figure)
        return report
    return {"mask_iou": float(np.mean(ious)), "n": n, "size": list(size)}


def photo_verdicts(photos: dict, found: dict, height: int = 160):
    """One tile per held-out photo: the picture, the points the detector found, and its verdict (green where it is
    right: a person found in a picture of people, "no person" in the others; red where it is wrong)."""
    from PIL import Image, ImageDraw

    tiles = []
    for name, image in photos.items():
        r = height / image.size[1]
        kp = found[name]
        verdict = "no person" if kp is None else f"person, {int(kp[:, 2].sum())} points"
        label = f"{name.removesuffix('.jpg')}: {verdict}"
        width = max(1, round(image.size[0] * r))
        tile = Image.new("RGB", (max(width, 6 * len(label) + 6), height + 18), "white")
        tile.paste(image.resize((width, height), Image.Resampling.BILINEAR))
        draw = ImageDraw.Draw(tile)
        for x, y, v in ([] if kp is None else kp):
            if v > 0:
                draw.ellipse([x * r - 3, y * r - 3, x * r + 3, y * r + 3], fill=(255, 220, 0), outline="black")
        right = (kp is not None) == HELD_OUT_PHOTOS[name]
        draw.text((3, height + 3), label, fill=(0, 140, 0) if right else (200, 0, 0))
        tiles.append(tile)
    sheet = Image.new("RGB", (sum(t.size[0] for t in tiles) + 4 * len(tiles), height + 18), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.size[0] + 4
    return sheet


def main(args) -> Path:
    config = load_config(args, DEFAULTS)
    kind = config["detector"]
    if kind not in ("pose", "mask"):
        raise ValueError(f"detector {kind!r}: choose pose or mask")
    accelerator, out, _ = setup_accelerator(config)
    model = (PoseRegressor if kind == "pose" else MaskUNet)(channels=tuple(config["channels"]))
    model, optimizer, lr_scheduler, ema, start = prepare_training(accelerator, config, model, {kind: ""})
    w, h = config["resolution"]
    negatives = (NoPersonNegatives(config["negative_fraction"], config["photo_negative_share"],
                                   config["photo_positive_fraction"])
                 if config["negative_fraction"] > 0 or config["photo_positive_fraction"] > 0 else None)
    loader = synthetic_batches(accelerator, config, start, transform=negatives)

    def loss_fn(batch):
        x = batch["image"].to(accelerator.device)
        if kind == "mask":
            return F.binary_cross_entropy(model(x).clamp(1e-6, 1 - 1e-6), batch["mask"].to(accelerator.device))
        pred = model(x)
        kp = batch["keypoints"].to(accelerator.device)
        goal = kp[..., :2] / torch.tensor([w, h], device=kp.device)
        vis = kp[..., 2]
        coord = (F.l1_loss(pred[..., :2], goal, reduction="none").sum(-1) * vis).sum() / vis.sum().clamp(min=1)
        return coord * 10 + F.binary_cross_entropy(pred[..., 2].clamp(1e-6, 1 - 1e-6), vis)

    training_loop(accelerator=accelerator, config=config, model=model, optimizer=optimizer,
                  lr_scheduler=lr_scheduler, batches=loader, loss_fn=loss_fn, start_step=start, ema=ema,
                  ema_module=lambda: accelerator.unwrap_model(model))
    path = out / f"{kind}.onnx"
    if accelerator.is_main_process:
        # without accelerate's mixed-precision forward wrapper: the ONNX graph is traced in fp32
        with ema_weights(accelerator.unwrap_model(model, keep_fp32_wrapper=False), ema) as final:
            final.save_pretrained(out / kind)
            export_onnx(final, kind, (w, h), path)
        (out / "detector_accuracy.json").write_text(json.dumps(
            held_out_accuracy(kind, path, config["num_validation_samples"], (w, h), figure=out / "held_out_photos.png"),
            indent=2))
    end_training(accelerator)
    return path


def parse_args(argv=None):
    return base_parser(__doc__.split("\n\n")[0]).parse_args(argv)


if __name__ == "__main__":
    main(parse_args())

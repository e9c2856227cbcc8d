"""Fit Stage I's standard-pose estimator: a character's own standard pose from its reference's keypoints.

    python -m trainer.fit_standard_pose --out runs/demo/standard_pose

Renders scenes of training characters (their keypoints and their standard render's keypoints), takes the standard
poses' principal directions (``num_components``; height and build hold 99.9% of their variance), and trains
``engine.models.StandardPoseEstimator``'s MLP to predict each scene's coordinates along them from
``proportion_features`` of the scene's keypoints and (``--mask``, the default) ``width_features`` of its foreground
mask, hidden from ``--mask-drop`` of the scenes so that it also estimates without one (MSE in standard deviations,
AdamW). Validation characters score the estimate against the truth and the average body's pose (RMS keypoint error
in pixels at 128x192; also with the mask hidden); written to ``OUT/metrics.json``, the estimator to
``OUT/pose_estimator``. Deterministic in ``--seed``; a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from engine.models import StandardPoseEstimator
from engine.preprocess.standard import PROPORTION_FEATURES, standard_units

from .common import demo_detectors
from .synthetic import render_sample
from .synthetic.character import character_ids

SIZE = (128, 192)  # where the errors are reported (the demo's sheet size); the estimate is in canvas-height units


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--characters", type=int, default=6000, help="training characters")
    parser.add_argument("--scenes", type=int, default=2, help="scenes of each training character")
    parser.add_argument("--val-characters", type=int, default=200)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--num-components", type=int, default=2)
    parser.add_argument("--mask", action=argparse.BooleanOptionalAction, default=True,
                        help="also read the limbs' widths across the foreground mask (width_features)")
    parser.add_argument("--mask-drop", type=float, default=0.1, help="share of training scenes shown without a mask")
    parser.add_argument("--copies", type=int, default=0, help="jittered copies of each training scene's keypoints")
    parser.add_argument("--noise", type=float, default=0.03, help="keypoint noise, up to this x the figure's size")
    parser.add_argument("--drop", type=float, default=0.1, help="chance a jittered keypoint is dropped")
    parser.add_argument("--detectors", default=None, metavar="DIR",
                        help="read each scene's keypoints and mask with the demo detectors in DIR (pose.onnx, "
                             "mask.onnx), as the studio reads an upload, instead of the ground truth: whether a "
                             "detector's findings tell the proportions (the demo's do not: docs/training.md)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def jitter(keypoints: np.ndarray, rng: np.random.Generator, noise: float, drop: float) -> np.ndarray:
    """``keypoints`` as a pose detector might give them: each moved by Gaussian noise of a random std up to
    ``noise`` x the figure's size (its visible keypoints' bounding-box diagonal), and each dropped (not visible) with
    probability ``drop``. The ground truth is exact; the studio's detector is not, and an estimator fitted to exact
    points alone read the detector's few-pixel errors on the small head segments as impossible bodies."""
    kp = np.array(keypoints, np.float64)
    seen = kp[:, 2] > 0
    if seen.sum() < 2:
        return kp
    size = np.hypot(*(kp[seen, :2].max(0) - kp[seen, :2].min(0)))
    kp[:, :2] += rng.normal(0.0, rng.uniform(0.0, noise) * size, (len(kp), 2))
    kp[rng.random(len(kp)) < drop, 2] = 0.0
    return kp


def scenes(split: str, characters: int, per_character: int, seed: int, estimator: StandardPoseEstimator,
           copies: int = 0, noise: float = 0.0, drop: float = 0.0, mask_drop: float = 0.0,
           detectors: tuple | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F), standard poses in canvas-height units (N, 18, 2)) of rendered scenes: each scene's exact
    keypoints and ``copies`` jittered ones (``jitter``); the features are what ``estimator`` reads
    (``StandardPoseEstimator.features``; for one that reads the mask, without it for ``mask_drop`` of them). With
    ``detectors`` (pose, mask) the keypoints and mask are what they find in the scene's image instead; a scene where
    no person is found is left out, as the pipeline then has no keypoints to estimate from."""
    features, targets = [], []
    rng = np.random.default_rng(seed)
    for k, cid in enumerate(character_ids(split, characters)):
        for j in range(per_character):
            sample = render_sample(cid, seed * 1_000_003 + 200_000 + per_character * k + j, SIZE)
            target = standard_units(SIZE, sample.standard_keypoints)
            found, found_mask = sample.keypoints, np.asarray(sample.mask, np.float32) / 255.0
            if detectors is not None:
                found, found_mask = detectors[0](sample.image), detectors[1](sample.image)
                if found is None:
                    continue
            for c in range(1 + copies):
                kp = found if c == 0 else jitter(found, rng, noise, drop)
                mask = None
                if estimator.config.reads_mask and rng.random() >= mask_drop:
                    mask = found_mask
                features.append(estimator.features(kp, mask))
                targets.append(target)
    return np.stack(features), np.stack(targets).astype(np.float32)


def rms_pixels(pred: np.ndarray, truth: np.ndarray) -> float:
    """RMS keypoint error in pixels of a 128x192 canvas, of poses in canvas-height units."""
    return float(np.sqrt(((pred - truth) ** 2).sum(-1).mean()) * SIZE[1])


def fit(args) -> tuple[StandardPoseEstimator, dict]:
    torch.manual_seed(args.seed)
    model = StandardPoseEstimator(hidden_size=args.hidden_size, num_components=args.num_components,
                                  reads_mask=args.mask)
    detectors = demo_detectors(args.detectors) if args.detectors else None
    x_train, y_train = scenes("train", args.characters, args.scenes, args.seed, model, args.copies, args.noise,
                              args.drop, args.mask_drop, detectors)
    x_both, y_both = scenes("val", args.val_characters, 1, args.seed + 1, model, 1, args.noise, args.drop,
                            detectors=detectors)
    (x_val, y_val), x_noisy = (x_both[0::2], y_both[0::2]), x_both[1::2]  # each scene's exact and jittered points
    flat = y_train.reshape(len(y_train), -1)
    mean = flat.mean(0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    basis = vt[: args.num_components]
    coefficients = (flat - mean) @ basis.T
    scale = coefficients.std(0)
    with torch.no_grad():
        model.mean.copy_(torch.from_numpy(mean.reshape(18, 2)))
        model.basis.copy_(torch.from_numpy(basis.reshape(-1, 18, 2)))
        model.scale.copy_(torch.from_numpy(scale))
        model.limit.copy_(torch.from_numpy(np.abs(coefficients / scale).max(0)))
    x, target = torch.from_numpy(x_train), torch.from_numpy(coefficients / scale).float()
    optimizer = torch.optim.AdamW(model.mlp.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        index = torch.randint(0, len(x), (args.batch_size,), generator=generator)
        loss = ((model.mlp(x[index]) - target[index]) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    x_unmasked = x_val.copy()
    x_unmasked[:, PROPORTION_FEATURES:] = 0.0  # the validation scenes without their mask
    with torch.no_grad():
        estimate = model(torch.from_numpy(x_val)).numpy()
        noisy = model(torch.from_numpy(x_noisy)).numpy()
        unmasked = model(torch.from_numpy(x_unmasked)).numpy()
    explained = float((coefficients.var(0).sum()) / ((flat - mean) ** 2).sum(1).mean())
    metrics = {"val_rms_px": rms_pixels(estimate, y_val), "val_rms_px_jittered": rms_pixels(noisy, y_val),
               "val_rms_px_without_mask": rms_pixels(unmasked, y_val),
               "val_rms_px_average_body": rms_pixels(np.broadcast_to(standard_units(), y_val.shape), y_val),
               "val_rms_px_mean_pose": rms_pixels(np.broadcast_to(mean.reshape(18, 2), y_val.shape), y_val),
               "variance_in_components": explained, "train_scenes": len(x_train), "val_scenes": len(x_val),
               "steps": args.steps, "last_loss": loss.item()}
    return model, metrics


def main(args) -> Path:
    out = Path(args.out)
    model, metrics = fit(args)
    model.save_pretrained(out / "pose_estimator")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))
    return out / "pose_estimator"


if __name__ == "__main__":
    main(parse_args())

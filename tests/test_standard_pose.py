"""Each character's own standard pose: proportion features, the estimator, its fitter and the pipeline reading it."""

import json

import numpy as np
import pytest
import torch
from components import random_pose_guider, tiny_stage1_components

from engine import StandardizePipeline
from engine.models import StandardPoseEstimator
from engine.preprocess.pose import draw_pose_map
from engine.preprocess.standard import (
    PROPORTION_FEATURES,
    PROPORTION_SEGMENTS,
    WIDTH_FEATURES,
    WIDTH_SEGMENTS,
    proportion_features,
    standard_keypoints,
    standard_units,
    width_features,
)
from trainer.synthetic import render_sample

SIZE = (128, 192)


def test_proportion_features_ignore_where_and_how_large_the_figure_is_and_see_its_proportions():
    kp = render_sample(5, 3, SIZE).keypoints.astype(np.float64)
    kp[:, 2] = 1.0
    features = proportion_features(kp)
    assert features.shape == (PROPORTION_FEATURES,)
    moved = kp.copy()
    moved[:, :2] = kp[:, :2] * 2.5 + [40.0, -13.0]
    np.testing.assert_allclose(proportion_features(moved), features, atol=1e-3)
    long_legs = kp.copy()
    for knee, ankle, hip in ((9, 10, 8), (12, 13, 11)):  # legs 30% longer below the hips
        long_legs[[knee, ankle], 1] = kp[hip, 1] + 1.3 * (kp[[knee, ankle], 1] - kp[hip, 1])
    shin = PROPORTION_SEGMENTS.index((9, 10))
    assert proportion_features(long_legs)[shin] > features[shin] + 0.15
    hidden = kp.copy()
    hidden[10, 2] = 0  # the right ankle not seen: its segment reads 0 and is marked invisible
    out = proportion_features(hidden)
    assert out[shin] == 0 and out[2 * len(PROPORTION_SEGMENTS) + 1 + shin] == 0
    with pytest.raises(ValueError, match=r"\(18, 3\)"):
        proportion_features(np.zeros((5, 3)))


def _stick_figure(scale: float, limb_width: float) -> tuple[np.ndarray, np.ndarray]:
    """The standard pose's keypoints at ``scale`` x a 128x192 canvas and a mask of its limbs drawn ``limb_width``
    pixels thick (x ``scale``), the torso a filled quadrilateral, the head a disc round the nose."""
    from PIL import Image, ImageDraw

    size = (round(128 * scale), round(192 * scale))
    kp = standard_keypoints(size)
    image = Image.new("L", size, 0)
    draw = ImageDraw.Draw(image)
    draw.polygon([tuple(kp[i, :2]) for i in (2, 5, 11, 8)], fill=255)
    r = 8 * scale
    draw.ellipse([kp[0, 0] - r, kp[0, 1] - r, kp[0, 0] + r, kp[0, 1] + r], fill=255)
    for a, b in WIDTH_SEGMENTS[:8]:
        draw.line([tuple(kp[a, :2]), tuple(kp[b, :2])], fill=255, width=round(limb_width * scale))
    return kp, np.asarray(image, np.float32) / 255.0


def test_width_features_measure_the_limbs_thickness_whatever_the_figures_size():
    kp, mask = _stick_figure(1.0, 6)
    features = width_features(kp, mask)
    assert features.shape == (WIDTH_FEATURES,)
    measured = WIDTH_FEATURES // 2
    assert (features[measured:] == 1.0).all()  # every segment, the torso and the head
    a, b = np.array(PROPORTION_SEGMENTS).T
    mean = np.log(np.hypot(*(kp[a, :2] - kp[b, :2]).T)).mean()
    np.testing.assert_allclose(np.exp(features[:8] + mean), 6.0, atol=0.75)  # the limbs, to the rasterising
    big_kp, big_mask = _stick_figure(2.5, 6)
    np.testing.assert_allclose(width_features(big_kp, big_mask)[:8], features[:8], atol=0.15)
    _, thick = _stick_figure(1.0, 9)
    assert (width_features(kp, thick)[:8] > features[:8] + 0.25).all()  # log(9 / 6) = 0.41
    hidden = kp.copy()
    hidden[4, 2] = 0  # the right wrist not seen: the forearm is not measured
    assert width_features(hidden, mask)[1] == 0 and width_features(hidden, mask)[measured + 1] == 0
    assert not width_features(kp, None).any()  # no mask: nothing measured
    np.testing.assert_allclose(width_features(kp, mask * 255), features)  # a 0..255 mask reads the same


def test_an_untrained_estimator_draws_the_average_body():
    estimator = StandardPoseEstimator()
    kp = render_sample(5, 3, SIZE).keypoints
    for size in (SIZE, (512, 768), (100, 100)):
        np.testing.assert_allclose(estimator.keypoints(kp, size), standard_keypoints(size), atol=1e-4)


def test_the_estimate_stays_within_the_fitted_bodies():
    estimator = StandardPoseEstimator()
    with torch.no_grad():
        estimator.basis[0, 10, 1] = 0.1  # the right ankle's height along the first direction
        estimator.limit.fill_(2.0)
        estimator.mlp[-1].bias[0] = 50.0  # an impossible body, as a reference unlike the training ones can ask for
    out = estimator(torch.zeros(1, PROPORTION_FEATURES))
    assert out[0, 10, 1].item() == pytest.approx(estimator.mean[10, 1].item() + 0.2, abs=1e-6)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from trainer import fit_standard_pose

    out = tmp_path_factory.mktemp("standard_pose")
    folder = fit_standard_pose.main(fit_standard_pose.parse_args(
        ["--out", str(out), "--characters", "800", "--scenes", "1", "--val-characters", "60", "--steps", "800"]))
    return folder, json.loads((out / "metrics.json").read_text())


def test_the_fitted_estimator_finds_each_characters_proportions_better_than_the_average_body(fitted):
    folder, metrics = fitted
    assert metrics["variance_in_components"] > 0.99  # height and build: two directions hold the standard poses
    assert metrics["val_rms_px"] < 0.75 * metrics["val_rms_px_average_body"]
    # the mask's limb widths tell the build: without them (as with no mask) the same estimator is further off
    assert metrics["val_rms_px"] < metrics["val_rms_px_without_mask"] < metrics["val_rms_px_average_body"]
    estimator = StandardPoseEstimator.from_pretrained(folder)
    assert estimator.config.reads_mask and estimator.mlp[0].in_features == PROPORTION_FEATURES + WIDTH_FEATURES
    assert ((estimator.limit > 1.0) & (estimator.limit < 4.0)).all()  # the fitted bodies' range, in deviations
    sample = render_sample(7, 11, SIZE)
    truth = sample.standard_keypoints[:, :2]
    mask = np.asarray(sample.mask, np.float32) / 255.0
    error = np.hypot(*(estimator.keypoints(sample.keypoints, SIZE, mask)[:, :2] - truth).T).mean()
    assert error < np.hypot(*(standard_keypoints(SIZE)[:, :2] - truth).T).mean()



def test_the_fitter_reads_scenes_as_the_studio_does_with_detectors():
    """``fit_standard_pose --detectors DIR``: each scene's features come from the keypoints and mask the demo
    detectors find in its image (the studio's upload path), not from the ground truth; scenes where no person is
    found are left out."""
    from trainer.fit_standard_pose import SIZE as FIT_SIZE
    from trainer.common import demo_detectors
    from trainer.fit_standard_pose import scenes
    from trainer.synthetic.character import character_ids

    detectors = demo_detectors("assets/models/demo/detectors")
    estimator = StandardPoseEstimator(reads_mask=True)
    found, truth = (scenes("train", 4, 1, 3, estimator, detectors=d)[0] for d in (detectors, None))
    expected = []
    for k, cid in enumerate(character_ids("train", 4)):
        sample = render_sample(cid, 3 * 1_000_003 + 200_000 + k, FIT_SIZE)
        keypoints = detectors[0](sample.image)
        if keypoints is not None:
            expected.append(estimator.features(keypoints, detectors[1](sample.image)))
    assert len(expected) >= 3 and np.allclose(found, np.stack(expected))
    assert len(truth) == 4  # from the ground truth every scene counts, and reads other keypoints
    assert not np.allclose(found[:, :PROPORTION_FEATURES], truth[: len(found), :PROPORTION_FEATURES])

def _pipe(estimator=None):
    components = {**tiny_stage1_components(), "pose_guider": random_pose_guider()}
    pipe = StandardizePipeline(**components, pose_estimator=estimator)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_pipeline_draws_the_estimated_standard_pose_from_given_keypoints_unless_told_otherwise(tmp_path):
    estimator = StandardPoseEstimator()
    with torch.no_grad():  # a "tall" direction: every point below the neck moves down by 8% of the height
        tall = torch.zeros(18, 2)
        tall[2:14, 1] = 0.08
        estimator.basis[0] = tall
        estimator.mlp[-1].bias[0] = 1.0
    sample = render_sample(3, 1, SIZE)
    kwargs = {"mask": np.asarray(sample.mask, np.float32) / 255.0, "reference_pose": sample.keypoints,
              "height": 96, "width": 64, "num_inference_steps": 2, "seed": 0, "output_type": "np"}
    pipe = _pipe(estimator)
    out = pipe(sample.image, **kwargs)
    expected = standard_keypoints((64, 96))
    expected[2:14, 1] += 0.08 * 96
    np.testing.assert_allclose(pipe.target_keypoints(out.keypoints, (64, 96)), expected, atol=1e-4)
    assert np.array_equal(np.asarray(out.target_pose_map), np.asarray(draw_pose_map(expected, (64, 96))))
    plain = _pipe()(sample.image, **kwargs)
    assert np.array_equal(np.asarray(plain.target_pose_map), np.asarray(draw_pose_map(standard_keypoints((64, 96)),
                                                                                     (64, 96))))
    assert np.abs(out.sheet.astype(int) - plain.sheet.astype(int)).max() > 0  # the pose guider saw another pose
    # keypoints a detector found are too imprecise to read proportions from: the average body's pose then
    pipe.set_detectors(pose=lambda image: sample.keypoints, mask=lambda image: kwargs["mask"])
    detected = pipe(sample.image, **{k: v for k, v in kwargs.items() if k not in ("mask", "reference_pose")})
    assert np.array_equal(np.asarray(detected.target_pose_map), np.asarray(plain.target_pose_map))
    pipe.set_detectors()
    given = standard_keypoints((64, 96))  # an explicit target pose wins
    np.testing.assert_array_equal(pipe.target_keypoints(out.keypoints, (64, 96), given), given)
    np.testing.assert_array_equal(pipe.target_keypoints(None, (64, 96)), given)  # no reference pose: the standard
    pipe.save_pretrained(tmp_path / "std")
    again = StandardizePipeline.from_pretrained(tmp_path / "std")
    again.set_progress_bar_config(disable=True)
    assert isinstance(again.pose_estimator, StandardPoseEstimator)
    np.testing.assert_array_equal(again(sample.image, **kwargs).sheet, out.sheet)
    torch.testing.assert_close(again.pose_estimator.mean, torch.from_numpy(standard_units()).float())

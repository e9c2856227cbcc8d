"""Stage I's colour hint: the reference's part colours painted along the target pose, and the pose guider reading it."""

import numpy as np
import pytest
import torch
from components import random_pose_guider, tiny_stage1_components

from engine import StandardizePipeline
from engine.models import PoseGuider
from engine.preprocess.colour_hint import HINT_CHANNELS, colour_hint, part_colours
from trainer.synthetic import reference_on_canvas, render_sample
from trainer.synthetic.figure import LABELS

SIZE = (128, 192)


def _label_colour(image, labels, label):
    pixels = np.asarray(image, np.float32)[np.asarray(labels) == label]
    return np.median(pixels, axis=0)


@pytest.mark.parametrize("cid", [3, 17, 40])
def test_the_standard_render_as_its_own_reference_paints_its_own_colours(cid):
    """Read from the standard render and painted on its own pose, the hint is the render's colour where it paints
    (the torso's pixels are the top's)."""
    sample = render_sample(cid, 0, SIZE)
    hint = colour_hint(sample.standard, np.asarray(sample.standard_mask, np.float32) / 255.0,
                       sample.standard_keypoints, sample.standard_keypoints)
    assert hint.shape == (HINT_CHANNELS, SIZE[1], SIZE[0]) and hint.dtype == np.float32
    painted = hint[3] > 0.5
    assert painted.mean() > 0.05  # torso, limbs and head: a good part of the figure
    truth = np.asarray(sample.standard, np.float32).transpose(2, 0, 1) / 255.0
    torso = painted & (np.asarray(sample.standard_labels) == LABELS["top"])
    assert torso.sum() > 50
    error = np.abs(np.median(hint[:3][:, torso], 1) - np.median(truth[:, torso], 1)).max()  # patterns: medians
    assert error < 0.04, error
    assert np.all(hint[:3][:, ~painted] == 0)


def test_a_scene_reference_carries_its_top_and_bottom_colours_to_the_standard_pose():
    """From posed scenes on the pipeline's canvas, the torso's painted colour is the character's top colour (as the
    truth shows it), closer to its own than to the other characters'."""
    tops, truths = [], []
    for i, cid in enumerate((3, 17, 40, 52)):
        sample = reference_on_canvas(render_sample(cid, 100 + i, SIZE))
        colours = part_colours(np.asarray(sample.image, np.float32), np.asarray(sample.mask, np.float32) / 255.0,
                               sample.keypoints)
        if "torso" not in colours:
            continue
        tops.append(colours["torso"])
        truths.append(_label_colour(sample.standard, sample.standard_labels, LABELS["top"]))
    assert len(tops) >= 3
    distance = np.abs(np.array(tops)[:, None] - np.array(truths)[None]).mean(-1)
    assert np.median(np.diag(distance)) < 20, distance  # scenes tint and shade the figure a little
    assert np.all(distance.argmin(1) == np.arange(len(tops))), distance


def test_the_hint_paints_only_what_the_reference_shows():
    sample = render_sample(3, 0, SIZE)
    mask = np.asarray(sample.standard_mask, np.float32) / 255.0
    target = sample.standard_keypoints
    assert not colour_hint(sample.standard, mask, None, target).any()  # no pose: nothing to read
    assert not colour_hint(sample.standard, np.zeros_like(mask), sample.standard_keypoints, target).any()  # no figure
    head_only = np.array(sample.standard_keypoints, np.float64)
    head_only[2:, 2] = 0  # only nose and neck visible
    hint = colour_hint(sample.standard, mask, head_only, target)
    painted = hint[3] > 0.5
    whole = colour_hint(sample.standard, mask, sample.standard_keypoints, target)[3] > 0.5
    assert 0 < painted.sum() < 0.25 * whole.sum()
    assert not painted[np.asarray(sample.standard_labels) == LABELS["lower"]].any()  # no trousers were seen
    off_canvas = np.array(sample.standard_keypoints, np.float64)
    off_canvas[:, 0] += 10 * SIZE[0]  # every keypoint outside the picture
    assert not colour_hint(sample.standard, mask, off_canvas, target).any()


def test_a_pose_guider_given_a_hint_computes_what_it_did_until_the_hint_is_trained():
    guider = random_pose_guider()
    hinted = PoseGuider.with_hint(guider, HINT_CHANNELS)
    assert hinted.config.hint_channels == HINT_CHANNELS and guider.config.hint_channels == 0
    pose = torch.rand(2, 3, 96, 64)
    hint = torch.rand(2, HINT_CHANNELS, 96, 64)
    with torch.no_grad():
        before = guider(pose)
        torch.testing.assert_close(hinted(torch.cat([pose, hint], 1)), before, rtol=0, atol=0)
        hinted.hint_proj.weight.normal_()
        after = hinted(torch.cat([pose, hint], 1))
        # the hint, area-averaged to the latent grid, through one conv added to what the pose gives
        expected = before + hinted.hint_proj(torch.nn.functional.avg_pool2d(hint, 8))
        torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)
        assert (after - before).abs().max() > 1e-3
    with pytest.raises(ValueError, match="already reads"):
        PoseGuider.with_hint(hinted, HINT_CHANNELS)


def test_the_pipeline_gives_a_hint_reading_stage1_the_hint_and_its_unconditional_pass_zeros():
    components = tiny_stage1_components()
    components["pose_guider"] = random_pose_guider()
    plain = StandardizePipeline(**components)
    wide = StandardizePipeline(**{**components, "pose_guider": PoseGuider.with_hint(components["pose_guider"], 4)})
    for pipe in (plain, wide):
        pipe.set_progress_bar_config(disable=True)
    sample = render_sample(3, 1, SIZE)
    kwargs = {"mask": np.asarray(sample.mask, np.float32) / 255.0, "reference_pose": sample.keypoints,
              "height": 96, "width": 64, "num_inference_steps": 2, "seed": 0, "output_type": "latent"}
    before = plain(sample.image, **kwargs).sheet
    torch.testing.assert_close(wide(sample.image, **kwargs).sheet, before, rtol=0, atol=1e-4)  # new channels at zero
    with torch.no_grad():
        wide.pose_guider.hint_proj.weight.normal_()
    assert (wide(sample.image, **kwargs).sheet - before).abs().max() > 1e-3  # the hint reaches the sheet

    # what the pose guider is given: the hint beside the pose map, zeros in the unconditional pass
    seen = []
    original = wide.pose_guider.forward
    wide.pose_guider.forward = lambda x: seen.append(x.clone()) or original(x)
    wide(sample.image, **{**kwargs, "guidance_scale": 3.0})
    (given,) = seen
    assert given.shape == (2, 7, 96, 64)
    torch.testing.assert_close(given[0, :3], given[1, :3])
    assert not given[0, 3:].any() and given[1, 6].sum() > 100
    canvas = wide.prepare_reference(sample.image, (64, 96), kwargs["mask"], sample.keypoints)
    from engine.preprocess.standard import standard_keypoints

    expected = colour_hint(canvas.image, canvas.mask, canvas.keypoints, standard_keypoints((64, 96)))
    np.testing.assert_allclose(given[1, 3:].numpy(), expected, atol=1e-6)


def test_colour_match_moves_each_painted_part_toward_the_reference_colour_and_leaves_the_rest():
    from engine.preprocess.colour_hint import match_colours

    h, w = 192, 128
    sheet = torch.ones(1, 3, h, w)  # white ...
    sheet[:, :, 60:120, 40:90] = 0.0  # ... with a grey block (0 in [-1, 1] is mid grey)
    hint = torch.zeros(4, h, w)
    hint[0, 70:110, 50:80] = 0.9  # the reference's part is red: (0.9, 0.1, 0.1) where painted
    hint[1:3, 70:110, 50:80] = 0.1
    hint[3, 70:110, 50:80] = 1.0
    torch.testing.assert_close(match_colours(sheet, hint, 0.0), sheet)
    torch.testing.assert_close(match_colours(sheet, torch.zeros(4, h, w), 0.5), sheet)
    half, full = match_colours(sheet, hint, 0.5), match_colours(sheet, hint, 1.0)
    centre = (slice(None), slice(None), slice(85, 95), slice(60, 70))
    rgb = lambda x: ((x[centre] + 1) / 2).mean((0, 2, 3))  # noqa: E731
    torch.testing.assert_close(rgb(half), torch.tensor([0.7, 0.3, 0.3]), atol=0.02, rtol=0)  # half way from grey
    torch.testing.assert_close(rgb(full), torch.tensor([0.9, 0.1, 0.1]), atol=0.02, rtol=0)
    far = (slice(None), slice(None), slice(0, 40), slice(None))  # well away from the painted part
    torch.testing.assert_close(half[far], sheet[far])


def test_the_pipeline_corrects_colours_only_when_asked_and_refuses_a_strength_out_of_range():
    pipe = StandardizePipeline(**tiny_stage1_components())
    pipe.set_progress_bar_config(disable=True)
    sample = render_sample(3, 1, SIZE)
    kwargs = {"mask": np.asarray(sample.mask, np.float32) / 255.0, "reference_pose": sample.keypoints,
              "height": 96, "width": 64, "num_inference_steps": 2, "seed": 0, "output_type": "np"}
    plain = pipe(sample.image, **kwargs)
    corrected = pipe(sample.image, colour_match=0.5, **kwargs)
    from engine.preprocess.standard import standard_keypoints

    hint = colour_hint(plain.canvas, np.asarray(plain.mask, np.float32) / 255.0, plain.keypoints,
                       standard_keypoints((64, 96)))
    diff = np.abs(corrected.sheet.astype(int) - plain.sheet.astype(int)).max(-1)
    assert diff[hint[3] > 0.5].mean() > 2  # the painted parts moved toward the reference's colours
    assert diff[:8].max() == 0  # the top rows, far from any part, did not
    torch.testing.assert_close(pipe(sample.image, colour_match=0.5, **{**kwargs, "output_type": "latent"}).sheet,
                               pipe(sample.image, **{**kwargs, "output_type": "latent"}).sheet)  # latents: untouched
    with pytest.raises(ValueError, match="colour_match must be between 0 and 1"):
        pipe(sample.image, colour_match=1.5, **kwargs)


def test_the_demo_preset_corrects_colours_half_way():
    from engine.presets import DEMO, FULL

    assert DEMO.standardize_defaults["colour_match"] == 0.5
    assert "colour_match" not in FULL.standardize_defaults

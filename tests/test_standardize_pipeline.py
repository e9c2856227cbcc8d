import numpy as np
import pytest
import torch
from components import tiny_sd_unet, tiny_stage1_components
from PIL import Image

from engine import StandardizePipeline
from engine.models import PoseGuider
from engine.models.animate_anyone import load_animate_anyone, load_strict
from engine.preprocess.canvas import fit_to_canvas, head_from_keypoints
from engine.preprocess.standard import standard_head, standard_keypoints, standard_pose_map
from trainer.synthetic import render_sample

SIZE = {"height": 96, "width": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def pipe():
    p = StandardizePipeline(**tiny_stage1_components())
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def sample():
    return render_sample(3, 1, (128, 192))


def test_sheet_and_intermediates(pipe, sample):
    out = pipe(sample.image, mask=sample.mask, reference_pose=sample.keypoints, seed=3, **SIZE)
    assert out.sheet.size == (64, 96) and out.canvas.size == (64, 96) and out.mask.size == (64, 96)
    assert out.reference_pose_map.size == (64, 96) and out.target_pose_map.size == (64, 96)
    assert out.keypoints.shape == (18, 3) and out.seed == 3
    np.testing.assert_array_equal(np.asarray(out.target_pose_map), np.asarray(standard_pose_map((64, 96))))
    again = pipe(sample.image, mask=sample.mask, reference_pose=sample.keypoints, seed=3, **SIZE)
    np.testing.assert_array_equal(np.asarray(out.sheet), np.asarray(again.sheet))
    other = pipe(sample.image, mask=sample.mask, reference_pose=sample.keypoints, seed=4, **SIZE)
    assert np.abs(np.asarray(out.sheet, int) - np.asarray(other.sheet, int)).max() > 0


def test_reference_changes_the_sheet(pipe, sample):
    a = pipe(sample.image, seed=1, **SIZE).sheet
    b = pipe(render_sample(40, 2, (128, 192)).image, seed=1, **SIZE).sheet
    assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() > 0


def test_bank_is_cleared_after_each_call(pipe, sample, monkeypatch):
    from engine.models import stage1

    banks = []
    original = stage1.StandardizeNet.encode_reference

    def spy(self, *args, **kwargs):
        bank = original(self, *args, **kwargs)
        banks.append(bank)
        return bank

    monkeypatch.setattr(stage1.StandardizeNet, "encode_reference", spy)
    pipe(sample.image, seed=1, **SIZE)
    pipe(sample.image, seed=1, **SIZE)
    assert len(banks) == 2 and banks[0] is not banks[1]
    assert all(not b.features and b.ref_index is None for b in banks)


def test_detectors_are_used_and_no_person_is_a_clear_error(pipe, sample):
    calls = []

    def pose(image):
        calls.append(image.size)
        return sample.keypoints

    pipe.set_detectors(pose=pose, mask=lambda image: np.asarray(sample.mask, np.float32) / 255.0)
    try:
        out = pipe(sample.image, seed=1, **SIZE)
        assert calls == [(128, 192)] and out.mask is not None and out.reference_pose_map is not None
        pipe.set_detectors(pose=lambda image: None)
        with pytest.raises(ValueError, match="no person found"):
            pipe(sample.image, seed=1, **SIZE)
    finally:
        pipe.set_detectors()


@pytest.mark.parametrize(
    "reference, kwargs, message",
    [
        ("no/such/file.png", {}, "does not exist"),
        (42, {}, "reference must be an image"),
        (Image.new("RGB", (40, 300)), {}, "too small"),
        (None, {"height": 100}, "height=100 must be a multiple of 8"),
        (None, {"seed": -2}, "seed=-2"),
        (None, {"reference_pose": np.zeros((17, 3))}, "reference_pose must be"),
        (None, {"mask": np.zeros((5, 5))}, "mask is 5x5 but the reference is 128x192"),
    ],
)
def test_bad_inputs(pipe, sample, reference, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(sample.image if reference is None else reference, **{**SIZE, **kwargs})


def test_decompression_bomb_and_huge_images_are_refused(pipe, tmp_path, monkeypatch):
    from engine.preprocess import image as image_mod

    monkeypatch.setattr(image_mod, "MAX_PIXELS", 10_000)
    with pytest.raises(ValueError, match="MP limit"):
        pipe(Image.new("RGB", (200, 200)), **SIZE)
    path = tmp_path / "bomb.png"
    Image.new("1", (3000, 3000)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    with pytest.raises(ValueError, match="too large to decode safely"):
        pipe(str(path), **SIZE)


# ---------------------------------------------------------------- canvas geometry


@pytest.mark.parametrize("cid,seed", [(3, 1), (8, 2), (21, 4), (30, 6)])
def test_canvas_puts_the_head_at_the_standard_place(cid, seed):
    s = render_sample(cid, seed, (300, 220))  # landscape input, any framing
    head = head_from_keypoints(s.keypoints)
    if head is None:
        pytest.skip("back view: no face to place")
    canvas = fit_to_canvas(s.image, (512, 768), np.asarray(s.mask, np.float32) / 255, s.keypoints)
    hx, hy, hh = standard_head((512, 768))
    cx, cy, ch = canvas.head
    assert canvas.image.size == (512, 768)
    fits = canvas.scale * 300 <= 512 * 1.2  # the head goes to its place unless the person would leave the canvas
    if ch > 0.9 * hh and fits:
        assert abs(cx - hx) < 0.05 * 512 and abs(cy - hy) < 0.05 * 768
    assert ch <= hh * 1.05  # never larger than the sheet's head
    ys, xs = np.nonzero(canvas.mask > 0.5)
    assert xs.min() >= 0 and xs.max() < 512 and ys.min() >= 0 and ys.max() < 768


def test_canvas_head_only_reference_lands_small_at_the_top():
    s = next(render_sample(c, 0, (200, 300)) for c in range(300)
             if render_sample(c, 0, (64, 96)).attributes["scene"]["framing"] == "head only"
             and render_sample(c, 0, (64, 96)).attributes["scene"]["view"] == "front")
    canvas = fit_to_canvas(s.image, (512, 768), np.asarray(s.mask, np.float32) / 255, s.keypoints)
    hx, hy, hh = standard_head((512, 768))
    cx, cy, ch = canvas.head
    assert abs(ch - hh) < 0.35 * hh and abs(cy - hy) < 0.06 * 768 and abs(cx - hx) < 0.06 * 512
    assert canvas.mask[int(0.5 * 768):].max() == 0  # nothing below: the sheet must draw the body


def test_canvas_without_keypoints_centres_the_person():
    img = Image.new("RGB", (400, 200), (255, 255, 255))
    mask = np.zeros((200, 400), np.float32)
    mask[50:150, 300:350] = 1
    canvas = fit_to_canvas(img, (512, 768), mask)
    ys, xs = np.nonzero(canvas.mask > 0.5)
    assert abs((xs.min() + xs.max()) / 2 - 256) < 4 and abs((ys.min() + ys.max()) / 2 - 384) < 4
    assert canvas.head is None and canvas.keypoints is None


def test_standard_keypoints_scale_with_the_canvas():
    a, b = standard_keypoints((512, 768)), standard_keypoints((128, 192))
    np.testing.assert_allclose(a[:, :2] / 4, b[:, :2], atol=1e-6)
    assert a[:, 2].all()


# ---------------------------------------------------------------- Animate Anyone weights


def test_animate_anyone_key_mapping_is_strict(tmp_path):
    src_ref, src_den = tiny_sd_unet(11), tiny_sd_unet(12)
    src_pose = PoseGuider(conditioning_embedding_channels=32, block_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        src_pose.conv_out.weight.normal_()
    # Moore's layout: plain state dicts in .pth files; a DDP prefix and stage-2 keys must not bother the loader, and
    # the released reference_unet.pth has no output head (Moore's reference UNet class drops it)
    released = {k: v for k, v in src_ref.state_dict().items() if not k.startswith(("conv_norm_out.", "conv_out."))}
    assert len(released) == len(src_ref.state_dict()) - 4
    torch.save(released, tmp_path / "reference_unet.pth")
    den = {f"module.{k}": v for k, v in src_den.state_dict().items()}
    den["module.down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight"] = torch.zeros(2)
    torch.save(den, tmp_path / "denoising_unet.pth")
    torch.save(src_pose.state_dict(), tmp_path / "pose_guider.pth")
    ref, denoise = tiny_sd_unet(0), tiny_sd_unet(0)
    pose = PoseGuider(conditioning_embedding_channels=32, block_out_channels=(8, 8, 16, 16))
    reports = load_animate_anyone(tmp_path, ref, denoise, pose)
    assert [r.name for r in reports] == ["reference_unet", "denoising_unet", "pose_guider"]
    assert len(reports[1].ignored) == 1
    for a, b in ((ref, src_ref), (denoise, src_den), (pose, src_pose)):
        for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
            assert k == k2 and (torch.equal(v, v2) or a is ref and k.startswith(("conv_norm_out.", "conv_out.")))
    # only those four, and only for the reference UNet, may be absent
    with pytest.raises(ValueError, match=r"denoising_unet: .*missing keys: conv_norm_out.bias, conv_norm_out.weight, "
                                         r"conv_out.bias, conv_out.weight"):
        load_strict(tiny_sd_unet(), released, "denoising_unet")
    del released["conv_in.bias"]
    with pytest.raises(ValueError, match=r"reference_unet: .*missing keys: conv_in.bias\)"):
        load_strict(tiny_sd_unet(), released, "reference_unet")

    bad = dict(src_ref.state_dict())
    bad["extra.weight"] = torch.zeros(1)
    del bad["conv_in.bias"]
    with pytest.raises(ValueError, match=r"missing keys: conv_in.bias.*unexpected keys: extra.weight"):
        load_strict(tiny_sd_unet(), bad, "reference_unet")
    wrong = dict(src_ref.state_dict())
    wrong["conv_in.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="shape mismatches: conv_in.weight"):
        load_strict(tiny_sd_unet(), wrong, "reference_unet")


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "exif"])
def test_references_in_any_mode(pipe, sample, mode, tmp_path):
    ref = sample.image.convert(mode) if mode != "exif" else None
    if mode == "exif":
        exif = Image.Exif()
        exif[0x0112] = 6
        path = tmp_path / "rotated.jpg"
        sample.image.rotate(90, expand=True).save(path, exif=exif)  # stored sideways, displayed upright
        ref = str(path)
    out = pipe(ref, seed=1, **SIZE)
    assert out.sheet.size == (64, 96) and out.canvas.mode == "RGB"
    if mode == "exif":  # upright after EXIF: the canvas matches the one of the upright original
        upright = pipe(sample.image, seed=1, **SIZE).canvas
        diff = np.abs(np.asarray(out.canvas, int) - np.asarray(upright, int)).mean()
        assert diff < 12  # JPEG noise only


def test_whole_body_standard_target_has_hands_at_the_wrists_and_a_face_in_the_head():
    from engine.preprocess.pose import FACE, HANDS, draw_pose_map

    size = (512, 768)
    body, whole = standard_keypoints(size), standard_keypoints(size, whole_body=True)
    assert whole.shape == (128, 3) and np.array_equal(whole[:18], body) and whole[:, 2].all()
    for hand, wrist in zip(HANDS, (7, 4)):  # left hand at the left wrist (image right), right at the right
        np.testing.assert_allclose(whole[hand][0, :2], body[wrist, :2])
        assert np.hypot(*(whole[hand][:, :2] - body[wrist, :2]).T).max() < 0.1 * 768  # within a hand's length
    hx, hy, hh = standard_head(size)
    face = whole[FACE, :2]
    assert (np.abs(face[:, 0] - hx) < 0.45 * hh).all() and (np.abs(face[:, 1] - hy) < 0.55 * hh).all()
    drawn = np.asarray(draw_pose_map(whole, size))
    body_only = np.asarray(draw_pose_map(body, size))
    white = (drawn == 255).all(-1)
    assert white.sum() > 100 and not (body_only == 255).all(-1).any()  # face dots, only in the whole-body map
    blue = (drawn == (0, 0, 255)).all(-1)
    assert blue[int(body[4, 1]):, :].sum() > blue[:int(body[4, 1]), :].sum()  # hand joints below the wrists


def test_a_whole_body_pipeline_draws_its_target_with_hands_and_face(sample):
    from engine.preprocess.pose import draw_pose_map

    pipe = StandardizePipeline(**tiny_stage1_components(), whole_body_pose=True)
    pipe.set_progress_bar_config(disable=True)
    keypoints = np.zeros((128, 3))
    keypoints[:18] = sample.keypoints
    out = pipe(sample.image, mask=sample.mask, reference_pose=keypoints, seed=3, **SIZE)
    np.testing.assert_array_equal(np.asarray(out.target_pose_map),
                                  np.asarray(draw_pose_map(standard_keypoints((64, 96), whole_body=True), (64, 96))))
    assert out.keypoints.shape == (128, 3)

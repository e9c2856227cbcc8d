import json

import numpy as np
import pytest
from PIL import Image

from engine.preprocess.pose import COLORS, draw_pose_map, flip_keypoints
from trainer.synthetic import (
    BODY_LABELS,
    EXPRESSIONS,
    FRAMINGS,
    LABELS,
    POSE_FAMILIES,
    SCENES,
    VIEWS,
    appearance_combinations,
    character_ids,
    make_character,
    render_sample,
    render_standard,
    sample_scene,
    split_of,
)
from trainer.synthetic.character import HAIR_STYLES
from trainer.synthetic.render import STANDARD_HEAD_H, STANDARD_HEAD_Y, _standard, render_background, tint
from trainer.synthetic.scenes import PHRASES

SIZE = (96, 144)


def arrays(sample):
    return [np.asarray(x) for x in (sample.image, sample.standard, sample.mask, sample.labels, sample.pose_map)]


def test_world_has_the_promised_variety():
    assert len(POSE_FAMILIES) >= 25 and len(HAIR_STYLES) >= 8 and len(SCENES) >= 10
    assert len(EXPRESSIONS) == 7 and set(VIEWS) == {"front", "three-quarter", "side", "back"}
    assert appearance_combinations() >= 10**6
    # ids really spread over the options
    chars = [make_character(i) for i in range(400)]
    assert len({c.hair_style for c in chars}) == len(HAIR_STYLES)
    assert len({(c.hair_style, c.hair_color, c.top, c.top_color, c.bottom, c.bottom_color) for c in chars}) == 400


def test_determinism_from_character_and_scene_seed():
    a, b = render_sample(7, 3, SIZE), render_sample(7, 3, SIZE)
    for x, y in zip(arrays(a), arrays(b)):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    assert a.caption == b.caption and a.attributes == b.attributes
    c = render_sample(7, 4, SIZE)
    assert np.abs(np.asarray(a.image, int) - np.asarray(c.image, int)).mean() > 5
    assert make_character(7) == make_character(7) and make_character(7) != make_character(8)


def test_splits_are_disjoint_and_sized():
    ids = {s: set(character_ids(s, 200)) for s in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    counts = {s: sum(split_of(i) == s for i in range(10000)) for s in ("train", "val", "test")}
    assert 8800 < counts["train"] < 9200 and 400 < counts["val"] < 600 and 400 < counts["test"] < 600
    assert all(split_of(i) == "test" for i in ids["test"])
    with pytest.raises(ValueError, match="split 'dev'"):
        character_ids("dev", 1)


def test_standard_render_is_identical_for_every_scene_of_a_character():
    first = np.asarray(render_sample(11, 0, SIZE).standard)
    _standard.cache_clear()  # re-rendered from scratch, not served from the cache
    for seed in (1, 2, 3):
        np.testing.assert_array_equal(np.asarray(render_sample(11, seed, SIZE).standard), first)
    assert np.abs(np.asarray(render_sample(12, 0, SIZE).standard, int) - first).max() > 0


@pytest.mark.parametrize("size", [(128, 192), (512, 768), (200, 300)])
def test_standard_render_puts_the_head_at_a_fixed_place(size):
    w, h = size
    for cid in (1, 5, 9, 40):
        image, mask, kp, pose = render_standard(cid, size)
        assert image.size == size and pose.size == size
        labels = np.asarray(render_sample(cid, 0, size).labels)  # scene labels are not the standard's: check kp
        head_y = (kp[14, 1] + kp[15, 1]) / 2
        assert abs(kp[0, 0] - w / 2) < 0.02 * w  # nose on the centre line
        assert abs(head_y - STANDARD_HEAD_Y * h) < STANDARD_HEAD_H * h * 0.4
        assert kp[:, 2].all()  # front view: all 18 keypoints visible
        corners = np.asarray(image)[[0, -1, 0, -1], [0, 0, -1, -1]]
        assert (corners == 255).all()  # white background
        assert labels.shape == (h, w)


def test_mask_covers_the_drawn_figure_and_only_it():
    checked = 0
    for cid, seed in [(3, 1), (4, 2), (21, 5), (30, 9), (44, 13), (52, 17)]:
        sample = render_sample(cid, seed, (128, 192))
        spec = sample_scene(cid, seed)
        background = tint(np.asarray(render_background(spec, (128, 192)), np.float32), spec.lighting)
        diff = np.abs(np.asarray(sample.image, np.float32) - np.rint(background)).max(axis=2)
        mask = np.asarray(sample.mask) > 0
        # outside the mask the image is the bare background, up to the half-covered anti-aliased rim
        outside = diff[~mask]
        assert (outside <= 1).mean() > 0.97 and outside.max() <= 140
        # inside, the figure replaced the background (a few pixels may match it by colour)
        assert (diff[mask] > 1).mean() > 0.9
        # the label map labels exactly the masked pixels
        labels = np.asarray(sample.labels)
        np.testing.assert_array_equal(labels > 0, mask)
        checked += 1
    assert checked == 6


def test_visible_keypoints_lie_on_the_figure():
    for cid in range(20):
        sample = render_sample(cid, cid + 100, (128, 192))
        mask = np.pad(np.asarray(sample.mask) > 0, 2)
        for i, (x, y, v) in enumerate(sample.keypoints):
            if not v or i in (16, 17):  # ears sit on the head's edge
                continue
            xi, yi = int(round(x)) + 2, int(round(y)) + 2
            assert mask[yi - 2 : yi + 3, xi - 2 : xi + 3].any(), (cid, i, sample.caption)


def test_face_keypoints_follow_the_view():
    seen = set()
    for cid in range(60):
        sample = render_sample(cid, 7, (128, 192))
        view = sample.attributes["scene"]["view"]
        kp = sample.keypoints
        if sample.attributes["scene"]["framing"] == "head only" or not kp[1, 2]:
            continue
        if view == "back":
            assert kp[[0, 14, 15], 2].sum() == 0
        if view == "front":
            assert kp[[0, 14, 15], 2].all()
        seen.add(view)
    assert {"front", "back"} <= seen


def test_caption_and_attributes_agree():
    from trainer.synthetic.render import EXPRESSION_WORDS, FRAMING_WORDS

    for cid in range(40):
        for seed in (0, 1):
            s = render_sample(cid, seed, (64, 96))
            scene, char = s.attributes["scene"], s.attributes["character"]
            caption = s.caption
            assert (POSE_FAMILIES[scene["pose"]][0] in caption) == (scene["framing"] != "head only")
            assert (EXPRESSION_WORDS[scene["expression"]] in caption) == (scene["view"] != "back")
            assert f"{scene['view']} view" in caption and FRAMING_WORDS[scene["framing"]] in caption
            assert PHRASES[scene["background"]] in caption
            if scene["time"] != "day":
                assert f"at {scene['time']}" in caption
            text = s.appearance
            assert char["top_color"] in text and char["top"] in text and char["skin"] in text
            assert char["hair_style"] == "bald" or (char["hair_color"] in text and (
                char["hair_style"] in text))
            for accessory in ("hat", "glasses", "scarf", "bag"):
                assert (accessory in text) == char[accessory]
            json.dumps(s.attributes)  # serialisable


def test_head_only_framing_hides_the_body():
    found = 0
    for cid in range(300):
        spec = sample_scene(cid, 0)
        if spec.framing != "head only":
            continue
        s = render_sample(cid, 0, (96, 144))
        labels = np.asarray(s.labels)
        assert np.isin(labels, [LABELS["head"], LABELS["hair"]]).mean() > 0.2  # seen from the back: mostly hair
        for body_label in (LABELS["top"], LABELS["lower"], LABELS["shoes"]):
            assert not (labels == body_label).any(), (cid, s.caption)
        # a hanging arm's elbow lies over a body unit (~half the frame here) below the crop; a raised one near or above it
        raised = (s.keypoints[[3, 4, 6, 7], 1] < 1.25 * labels.shape[0]).any()
        if not raised:  # arms show only when raised into the shot (cheering, waving), never hanging at the sides
            assert not np.isin(labels, [LABELS["arm"], LABELS["hand"]]).any(), (cid, s.caption)
        assert not s.keypoints[[8, 9, 10, 11, 12, 13], 2].any()
        found += 1
    assert found >= 20
    assert set(BODY_LABELS) == {LABELS[k] for k in ("top", "arm", "hand", "lower", "shoes")}


@pytest.mark.parametrize("pattern", ["stripes", "checks", "dots", "logo"])
def test_a_figure_drawn_far_past_the_canvas_costs_only_the_canvas(pattern):
    """A placement can blow the figure up by orders of magnitude (a crop whose box is almost empty: the placement
    divides by it); the top's pattern was drawn on a tile of the whole torso, gigabytes at such a scale (a
    MemoryError killed an adapter run). Now the tile covers the canvas at most."""
    import dataclasses

    from trainer.synthetic.character import make_character
    from trainer.synthetic.render import render_figure
    from trainer.synthetic.skeleton import STANDARD_POSE

    character = dataclasses.replace(make_character(0), pattern=pattern, top="t-shirt")

    def placement(scale):  # the torso's middle at the canvas centre
        def place(drawer):
            joints = drawer.sk.joints
            return scale, 0.0, (drawer.P(joints["neck"]) + drawer.P(joints["pelvis"])) / 2, (64, 96)
        return place

    far = render_figure(character, dict(STANDARD_POSE), "front", False, "neutral", (128, 192), placement(1e6))
    assert far.alpha.shape == (192, 128) and far.alpha.min() == 1.0  # the torso fills the canvas
    assert (far.labels == LABELS["top"]).all()


def test_every_framing_view_and_scene_occurs():
    specs = [sample_scene(c, s) for c in range(100) for s in range(4)]
    assert {s.framing for s in specs} == set(FRAMINGS)
    assert {s.view for s in specs} == set(VIEWS)
    assert {s.background for s in specs} == set(SCENES)
    assert {s.pose for s in specs} == set(POSE_FAMILIES)


def test_pose_map_colours_and_flip():
    kp = np.zeros((18, 3))
    kp[1] = (50, 40, 1)
    kp[2] = (30, 42, 1)
    pm = np.asarray(draw_pose_map(kp, (100, 150)))
    assert tuple(pm[40, 50]) == COLORS[1] and tuple(pm[42, 30]) == COLORS[2]
    assert tuple(pm[41, 40]) == tuple(int(c * 0.6) for c in COLORS[0])  # limb neck-r_shoulder in 60% colour
    assert pm[100, 50].sum() == 0
    flipped = flip_keypoints(kp, 100)
    assert tuple(flipped[5, :2]) == (69, 42) and flipped[2, 2] == 0
    with pytest.raises(ValueError, match="shape"):
        draw_pose_map(np.zeros((17, 3)), (10, 10))


def test_bad_arguments():
    with pytest.raises(ValueError, match="character id"):
        make_character(-1)
    with pytest.raises(ValueError, match="too small"):
        render_sample(1, 1, (16, 16))


def test_torch_dataset_and_stream():
    import torch

    from trainer.synthetic.dataset import SyntheticPairs, SyntheticStream

    ds = SyntheticPairs("val", num_characters=3, scenes_per_character=2, size=(64, 96))
    assert len(ds) == 6
    item = ds[3]
    assert item["image"].shape == (3, 96, 64) and item["standard"].shape == (3, 96, 64)
    assert item["mask"].shape == (1, 96, 64) and item["keypoints"].shape == (18, 3)
    assert -1.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["character_id"] == ds.ids[1] and split_of(item["character_id"]) == "val"
    torch.testing.assert_close(ds[3]["image"], item["image"])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 96, 64) and len(batch["caption"]) == 4
    stream = iter(SyntheticStream("train", num_characters=5, size=(64, 96), seed=1))
    a, b = next(stream), next(stream)
    assert a["image"].shape == (3, 96, 64) and (a["character_id"], a["scene_seed"]) != (b["character_id"], b["scene_seed"])


def test_export_and_preview_cli(tmp_path):
    from trainer.synthetic.__main__ import main

    out = tmp_path / "export"
    assert main(["export", "--split", "test", "--n", "5", "--size", "64x96", "--out", str(out), "--shard-size", "3",
                 "--scenes-per-character", "2"]) == 0
    lines = [json.loads(line) for shard in ("shard-00000", "shard-00001")
             for line in (out / shard / "metadata.jsonl").read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2, 3, 4]
    assert lines[0]["character_id"] == lines[1]["character_id"] != lines[2]["character_id"]
    for record in lines:
        for rel in record["files"].values():
            assert Image.open(out / rel).size == (64, 96)
        assert split_of(record["character_id"]) == "test" and len(record["keypoints"]) == 18
    again = render_sample(lines[4]["character_id"], lines[4]["scene_seed"], (64, 96))
    np.testing.assert_array_equal(np.asarray(Image.open(out / lines[4]["files"]["image"])), np.asarray(again.image))

    grid = tmp_path / "grid.png"
    assert main(["preview", "--n", "4", "--size", "64x96", "--out", str(grid)]) == 0
    img = Image.open(grid)
    assert img.size[0] == 4 * 64 and img.size[1] > 4 * 96
    with pytest.raises(SystemExit):
        main(["export", "--n", "2", "--size", "12", "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("ids", [[3, 40], [5, 60, 700]])
def test_group_scenes_give_each_character_its_own_visible_mask_in_its_slot(ids):
    from trainer.synthetic import render_group

    size = (192, 128)
    group = render_group(ids, 7, size)
    again = render_group(ids, 7, size)
    assert group.image.tobytes() == again.image.tobytes()  # deterministic
    assert group.layout == (["left", "right"] if len(ids) == 2 else ["left", "centre", "right"])
    masks = [np.asarray(m) > 0 for m in group.masks]
    assert all(m.sum() > 100 for m in masks)
    overlap = sum(m.astype(int) for m in masks)
    assert overlap.max() == 1  # a pixel belongs to at most one character
    slot = size[0] / len(ids)
    for i, m in enumerate(masks):  # each figure stands in its own part of the picture
        cx = np.nonzero(m)[1].mean()
        assert i * slot <= cx < (i + 1) * slot
    # the masks cover the figures: away from them the picture is the scene alone
    from PIL import ImageFilter

    from trainer.synthetic.render import render_background, sample_scene, tint

    spec = sample_scene(ids[0], 7)
    scene = np.rint(tint(np.asarray(render_background(spec, size), np.float32), spec.lighting))
    near = np.asarray(Image.fromarray((sum(masks) > 0).astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(7))) > 0
    diff = np.abs(np.asarray(group.image, int) - scene.astype(int)).max(-1)
    assert diff[~near].max() <= 1 and diff[np.logical_or.reduce(masks)].mean() > 10
    # the body-part labels: a part wherever a character is visible, none on the scene; each character's own parts
    from trainer.synthetic.figure import LABELS

    labels = np.asarray(group.labels)
    assert labels.shape == (size[1], size[0]) and labels[np.logical_or.reduce(masks)].min() > 0
    assert (labels[~near] == 0).all()
    for m in masks:
        assert {LABELS["head"], LABELS["top"]} <= set(np.unique(labels[m]).tolist())
    alone = render_group(ids[:1], 7, size)
    assert alone.caption.startswith("a person") and group.caption.startswith(("two", "three"))
    assert len(group.standards) == len(ids) and group.standards[0].size == size

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from studio import gpu, service


def test_zero_gpu_decorator_only_on_zero_gpu(monkeypatch):
    def fn(x):
        return x + 1

    assert gpu.gpu(lambda *a: 10)(fn) is fn  # no spaces package: unchanged
    calls = []
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: (lambda f: calls.append((duration(3), f)) or f)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert gpu.gpu(lambda *a: 10)(fn) is fn and calls == []  # spaces installed but not on ZeroGPU
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    gpu.gpu(lambda x: 10 + x)(fn)
    assert calls == [(13, fn)]  # the duration is computed from the request


def test_animated_reference_uses_the_first_frame_with_a_note(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (80, 120), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    image, note = service.read_reference(str(path))
    assert image.getpixel((1, 1)) == (255, 0, 0) and "first frame" in note
    with pytest.raises(ValueError, match="too small"):
        service.read_reference(Image.new("RGB", (50, 50)))


def test_review_image_dims_background_and_draws_pose():
    canvas = Image.new("RGB", (20, 30), (200, 200, 200))
    mask = Image.new("L", (20, 30), 0)
    mask.paste(255, (5, 5, 15, 25))
    pose = Image.new("RGB", (20, 30), (0, 0, 0))
    pose.putpixel((10, 10), (255, 0, 0))
    out = np.asarray(service.review_image(canvas, mask, pose))
    assert tuple(out[15, 7]) == (200, 200, 200) and out[1, 1].sum() < 3 * 200  # figure kept, background dimmed
    assert tuple(out[10, 10]) == (255, 0, 0)


@pytest.mark.parametrize("name, message", [("", "Give the character a name"), ("NC", "reserved"),
                                           ("Mia]", "not a usable name"), ("x" * 41, "not a usable name")])
def test_character_names(name, message):
    with pytest.raises(ValueError, match=message):
        service.check_name(name)
    assert service.check_name("  Mia Rose ") == "Mia Rose"


def test_uploads_open_only_allowlisted_formats(tmp_path):
    eps = tmp_path / "drawing.eps"  # Pillow would hand this to Ghostscript
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 150\nshowpage\n")
    with pytest.raises(ValueError, match=r"reference 'drawing.eps' is not a readable image: give a PNG, JPEG"):
        service.read_reference(str(eps))
    for fmt in ("PNG", "JPEG", "WEBP", "BMP"):
        path = tmp_path / f"ok.{fmt.lower()}"
        Image.new("RGB", (80, 120), (10, 200, 30)).save(path, format=fmt)
        image, _ = service.read_reference(str(path))
        assert image.size == (80, 120) and abs(image.getpixel((40, 60))[1] - 200) < 8


@pytest.mark.parametrize("value, expected", [(-1, None), (None, None), ("", None), (0, 0), (7.0, 7), ("12", 12)])
def test_one_meaning_of_a_seed(value, expected):
    assert service.seed_value(value) == expected


def test_a_seed_that_is_no_number_is_refused():
    with pytest.raises(ValueError, match="seed 'abc' is not a whole number"):
        service.seed_value("abc")
    with pytest.raises(ValueError, match="too large"):
        service.seed_value(2**40)


def test_options_and_numbers_are_checked():
    assert service.panel_options({"steps": 3, "strength": 0.5}) == {"steps": 3, "strength": 0.5, "style": "none",
                                                                     "negative_prompt": ""}
    for bad, message in [([1, 2], "options should be an object"), ({"steps": 2.5}, "steps should be a whole"),
                         ({"strength": float("nan")}, "strength nan is out of range"),
                         ({"style": "oil"}, "unknown style 'oil'"), ({"steps": True}, "steps should be a number")]:
        with pytest.raises(ValueError, match=message):
            service.panel_options(bad)


def test_export_files_older_than_their_age_are_cleaned(tmp_path):
    import os

    from studio.export import TempFiles

    files = TempFiles(tmp_path / "exports", max_age=60)
    first = files.write("story.pdf", b"%PDF old")
    os.utime(first, (0, 0))
    os.utime(os.path.dirname(first), (0, 0))
    second = files.write("story.pdf", b"%PDF new")
    assert not os.path.exists(first) and Path(second).read_bytes() == b"%PDF new"
    assert len(list((tmp_path / "exports").iterdir())) == 1


def test_cancel_stops_sampling_at_the_next_step(tiny_full_engine):
    from studio.script import PanelSpec
    from studio.story import Panel, Story

    story = Story(panels=[Panel(spec=PanelSpec(index=i, line=i + 1, characters=[], prompt=f"a street {i}"))
                          for i in range(2)])
    steps = []

    def progress(fraction, text):
        steps.append(fraction)

    with pytest.raises(service.Cancelled):
        list(service.draw_panels(tiny_full_engine, story, seed=1, steps=5, progress=progress,
                                 cancel=lambda: len(steps) >= 2))
    assert len(steps) == 2 and all(p.image is None for p in story.panels)  # nothing half-drawn is kept
    list(service.draw_panels(tiny_full_engine, story, seed=1, steps=2))
    assert all(p.image is not None for p in story.panels)


def test_on_zero_gpu_the_model_work_gets_only_picklable_inputs(monkeypatch, tiny_full_engine):
    import pickle

    from studio.handlers import ModelWork

    received = []

    def fake_gpu(duration):
        def wrap(fn):
            def run(*args, **kwargs):
                pickle.dumps((args, kwargs))  # what ZeroGPU does with the arguments
                received.append(len(args))
                return fn(*args, **kwargs)
            return run
        return wrap

    fake = types.ModuleType("spaces")
    fake.GPU = fake_gpu
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    work = ModelWork(tiny_full_engine)
    out = work.render(["a street"], [[]], [[]], [3], None, 2, None, lambda f, t: None, lambda: False)
    assert len(out["images"]) == 1 and received == [7]
    sheet = work.standardize("assets/examples/mia.png", 1, 2, 3.5, 0.5, lambda f, t: None, lambda: False)["sheet"]
    assert sheet.size == (64, 96) and received == [7, 5]


def test_group_panels_are_drawn_scored_per_character_and_go_stale_per_character(tiny_full_engine):
    from components import make_sheet

    from studio.story import Character, Story, load_archive, save_archive

    story = Story(style="none")
    for name, color in (("Mia", (200, 40, 40)), ("Kai", (40, 40, 200))):
        sheet = make_sheet(color)
        story.characters[name] = Character(name, sheet, sheet=sheet, accepted=True)
    script = '[Mia][Kai:left] on a bench Mia: "Hi!"\n[Kai] waving\n[NC] a street'
    service.sync_panels(story, service.parse(story, script))
    seen = []

    def render(prompts, sheets, regions, *rest):
        seen.append((prompts, [len(s) for s in sheets], regions))
        return service.render_panels(tiny_full_engine, prompts, sheets, regions, *rest)

    list(service.draw_panels(tiny_full_engine, story, seed=5, steps=2, render=render))
    assert seen == [(["two people, on a bench", "waving", "a street"], [2, 1, 0], [[None, "left"], [None], []])]
    group, single, empty = story.panels
    assert set(group.scores) == {"Mia", "Kai"} and set(single.scores) == {"Kai"} and empty.scores == {}
    assert all(-1 <= v <= 1 for v in group.scores.values()) and group.consistency == min(group.scores.values())
    assert group.sheet_revisions == {"Mia": 0, "Kai": 0}
    # a new accepted sheet for Kai makes both of Kai's panels stale, not the empty street
    story.characters["Kai"].revision += 1
    assert story.to_draw() == [0, 1]
    # the archive keeps who stands where, who says what, and the per-character scores
    loaded = load_archive(save_archive(story))
    assert loaded.panels[0].spec == group.spec and loaded.panels[0].scores == group.scores
    assert loaded.panels[0].spec.speakers == ["Mia"] and loaded.to_draw() == [0, 1]
    # the same script keeps the drawn panels; moving Kai redraws that panel only
    service.sync_panels(loaded, service.parse(loaded, script.replace("[Kai:left]", "[Kai]")))
    assert loaded.panels[0].image is None and loaded.panels[1].image is not None


def test_flag_drift_per_character_in_group_panels():
    from studio.script import PanelSpec
    from studio.story import Panel, Story

    story = Story()
    for i, (mia, kai) in enumerate([(0.9, 0.8), (0.91, 0.82), (0.89, 0.4), (0.5, 0.81)]):
        story.panels.append(Panel(PanelSpec(i, i + 1, ["Mia", "Kai"], "x"), scores={"Mia": mia, "Kai": kai}))
    service.flag_drift(story)
    assert [p.drifted for p in story.panels] == [False, False, True, True]


def test_the_colour_correction_is_the_persons_choice_and_the_presets_by_default(tiny_full_engine):
    """The Characters tab's "Colour correction" reaches Stage I's colour_match: empty keeps the preset's (the demo
    preset's 0.5), 0 is the model alone, another value moves the sheet's colours; the character keeps its value."""
    from studio.story import Story

    def sheet(colour):
        out = service.standardize(tiny_full_engine, "assets/examples/mia.png", 1, 2, 3.5, colour)
        return out, np.asarray(out["sheet"], np.int16)

    (result, preset), (_, half), (_, alone), (_, full) = (sheet(c) for c in (None, 0.5, 0.0, 1.0))
    assert tiny_full_engine.preset.standardize_defaults["colour_match"] == 0.5
    assert np.array_equal(preset, half)
    assert np.abs(alone - half).max() > 0 and np.abs(full - half).max() > 0
    with pytest.raises(ValueError, match="colour correction 1.5 is out of range: choose 0 to 1"):
        service.standardize(tiny_full_engine, "assets/examples/mia.png", 1, 2, 3.5, 1.5)
    story = Story()
    assert service.set_character(story, "Mia", result, 2, 3.5, 0.5).colour == 0.5

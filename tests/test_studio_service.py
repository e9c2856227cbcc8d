import sys
import types

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

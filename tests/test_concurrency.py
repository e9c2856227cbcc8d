"""Several callers at once (UI events, API calls, script threads) get exactly the images of the same calls made one
after another: the engine serialises model work (its lock) and no per-call state leaks between calls."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from components import make_sheet
from PIL import Image


def _calls(engine):
    sheet = make_sheet((200, 40, 40))
    reference = Image.open("assets/examples/mia.png")
    return [
        lambda: engine.generate_panels(["running"], sheet=[sheet], seeds=[1], num_inference_steps=2).images,
        lambda: engine.generate_panels(["a street", "waving"], sheet=[None, sheet], seeds=[2, 3],
                                       num_inference_steps=3, adapter_scale=0.5).images,
        lambda: [engine.standardize_reference(reference, seed=4, num_inference_steps=2).sheet],
        lambda: engine.generate_panels(["sitting"], sheet=None, seeds=[5], num_inference_steps=4,
                                       guidance_scale=2.0).images,
        lambda: [engine.standardize_reference(reference, seed=6, num_inference_steps=3, guidance_scale=2.0).sheet],
    ]


def test_threads_get_the_images_of_sequential_calls(tiny_full_engine):
    sequential = [call() for call in _calls(tiny_full_engine)]
    with ThreadPoolExecutor(max_workers=5) as pool:
        futures = [pool.submit(call) for call in _calls(tiny_full_engine) * 2]
        concurrent = [f.result() for f in futures]
    for i, images in enumerate(concurrent):
        expected = sequential[i % len(sequential)]
        assert len(images) == len(expected)
        for a, b in zip(images, expected):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"call {i}"

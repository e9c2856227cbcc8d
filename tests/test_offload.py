"""Every model call goes through a hooked ``forward`` (issue 14: ``--low-vram`` failed with FBDM/RPIM loaded).

Model CPU offload (accelerate) moves a component to the accelerator in a hook on its ``forward``; a method that
reads the weights directly finds them still on the CPU. Without a GPU this emulates that contract: a component's
parameters are NaN except while its own ``forward`` runs, so any use outside ``forward`` spoils the image, which
must equal the unhooked one. (The VAE is diffusers' own: its ``encode``/``decode`` carry ``apply_forward_hook``.)
"""

import numpy as np
import pytest
import torch
from components import make_sheet, tiny_stage1_components
from diffusers import AutoencoderKL

from engine import StandardizePipeline
from trainer.synthetic import render_sample


def park_outside_forward(pipe):
    handles = []
    for module in pipe.components.values():
        if not isinstance(module, torch.nn.Module) or isinstance(module, AutoencoderKL):
            continue
        params = [p for p in module.parameters() if p.is_floating_point()]
        real = [p.data for p in params]

        def park(*_, params=params):
            for p in params:
                p.data = torch.full_like(p.data, float("nan"))

        def unpark(*_, params=params, real=real):
            for p, data in zip(params, real):
                p.data = data

        park()
        handles.append(module.register_forward_pre_hook(unpark))
        handles.append(module.register_forward_hook(park))
        handles.append((unpark,))
    return handles


def unhook(handles):
    for h in handles:
        h[0]() if isinstance(h, tuple) else h.remove()


def test_stage1_with_fbdm_and_rpim_uses_each_model_only_through_forward():
    components = tiny_stage1_components(0)
    with torch.no_grad():  # make FBDM/RPIM matter (they start at zero)
        for p in components["reference_conditioner"].parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = StandardizePipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    assert "reference_conditioner" in pipe.model_cpu_offload_seq and "pose_guider" in pipe.model_cpu_offload_seq
    sample = render_sample(3, 1, (128, 192))
    kwargs = {"mask": sample.mask, "reference_pose": sample.keypoints, "seed": 3, "height": 96, "width": 64,
              "num_inference_steps": 2}
    expected = np.asarray(pipe(sample.image, **kwargs).sheet)
    handles = park_outside_forward(pipe)
    try:
        hooked = np.asarray(pipe(sample.image, **kwargs).sheet)
    finally:
        unhook(handles)
    np.testing.assert_array_equal(hooked, expected)


@pytest.mark.parametrize("reference_scale", [0.0, 20.0])  # reference attention runs the UNet once more a step
def test_stage2_uses_each_model_only_through_forward(tiny_full_engine, reference_scale):
    pipe = tiny_full_engine.personalize
    sheet = make_sheet((200, 40, 40))
    kwargs = {"prompt": ["running", "a street"], "sheet": [sheet, None], "seeds": [1, 2], "height": 96, "width": 64,
              "num_inference_steps": 2, "reference_scale": reference_scale}
    expected = [np.asarray(i) for i in pipe(**kwargs).images]
    pipe.clear_sheet_cache()  # the hooked run encodes the sheet again
    handles = park_outside_forward(pipe)
    try:
        hooked = [np.asarray(i) for i in pipe(**kwargs).images]
    finally:
        unhook(handles)
    for a, b in zip(hooked, expected):
        np.testing.assert_array_equal(a, b)

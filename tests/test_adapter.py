import numpy as np
import pytest
import torch
from components import make_sheet, tiny_sdxl_components
from diffusers.models.embeddings import IPAdapterFullImageProjection
from safetensors.torch import load_file, save_file

from engine.models import IPAdapterModules, read_adapter_file
from engine.pipelines import PersonalizePipeline

SIZE = {"height": 64, "width": 64, "num_inference_steps": 2, "output_type": "np"}


def test_install_creates_the_h94_full_layout():
    pipe = PersonalizePipeline(**tiny_sdxl_components())
    modules = IPAdapterModules.install(pipe.unet, image_embed_dim=32, seed=0)
    state = modules.h94_state_dict()
    cross = [n for n in pipe.unet.attn_processors if not n.endswith("attn1.processor")]
    assert {k for k in state if k.startswith("image_proj.")} == {
        f"image_proj.proj.{i}.{w}" for i in (0, 2, 3) for w in ("weight", "bias")
    }
    ids = sorted({int(k.split(".")[1]) for k in state if k.startswith("ip_adapter.")})
    assert ids == list(range(1, 2 * len(cross), 2))
    assert state["image_proj.proj.0.weight"].shape == (32, 32)  # clip hidden -> clip hidden
    assert state["image_proj.proj.2.weight"].shape == (64, 32)  # -> cross-attention dim
    assert isinstance(pipe.unet.encoder_hid_proj.image_projection_layers[0], IPAdapterFullImageProjection)


def test_install_initialises_ip_projections_from_text_projections():
    pipe = PersonalizePipeline(**tiny_sdxl_components())
    IPAdapterModules.install(pipe.unet, image_embed_dim=32)
    modules = dict(pipe.unet.named_modules())
    for name, proc in pipe.unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            attn = modules[name[: -len(".processor")]]
            torch.testing.assert_close(proc.to_k_ip[0].weight, attn.to_k.weight)
            torch.testing.assert_close(proc.to_v_ip[0].weight, attn.to_v.weight)


def test_trainable_parameters_are_exactly_the_adapter():
    pipe = PersonalizePipeline(**tiny_sdxl_components())
    base = {id(p) for p in pipe.unet.parameters()}
    modules = IPAdapterModules.install(pipe.unet, image_embed_dim=32)
    adapter = {id(p) for p in modules.parameters()}
    assert adapter and not adapter & base
    assert adapter <= {id(p) for p in pipe.unet.parameters()}  # installed: the UNet runs these very tensors


def test_save_then_load_ip_adapter_gives_identical_panels(tmp_path):
    trained = PersonalizePipeline(**tiny_sdxl_components())
    trained.set_progress_bar_config(disable=True)
    modules = IPAdapterModules.install(trained.unet, image_embed_dim=32, seed=7)
    with torch.no_grad():  # pretend training moved every adapter weight
        for p in modules.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = modules.save_pretrained(tmp_path)
    sheet = make_sheet()
    expected = trained(["a", "b"], sheet=sheet, seeds=[1, 2], **SIZE).images

    fresh = PersonalizePipeline(**tiny_sdxl_components())
    fresh.set_progress_bar_config(disable=True)
    fresh.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip-adapter.safetensors", image_encoder_folder=None)
    got = fresh(["a", "b"], sheet=sheet, seeds=[1, 2], **SIZE).images
    np.testing.assert_array_equal(got, expected)
    # and the export of the loaded adapter is the file we wrote
    again = IPAdapterModules.from_unet(fresh.unet).h94_state_dict()
    saved = load_file(path)
    assert again.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(again[key], saved[key], rtol=0, atol=0)


def test_read_adapter_file_rejects_other_layouts(tmp_path):
    save_file({"unet.down.weight": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="not in the h94 IP-Adapter layout"):
        read_adapter_file(tmp_path / "bad.safetensors")
    save_file({"image_proj.proj.0.weight": torch.zeros(2)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(ValueError, match="needs both"):
        read_adapter_file(tmp_path / "half.safetensors")


def test_from_unet_without_adapter_is_an_error():
    pipe = PersonalizePipeline(**tiny_sdxl_components())
    with pytest.raises(ValueError, match="no single IP-Adapter"):
        IPAdapterModules.from_unet(pipe.unet)

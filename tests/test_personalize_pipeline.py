import numpy as np
import pytest
import torch
from components import make_sheet, tiny_sdxl_components
from PIL import Image

from engine.models import IPAdapterModules
from engine.pipelines import PersonalizePipeline, SheetEmbeds

SIZE = {"height": 64, "width": 64, "num_inference_steps": 2}


def make_pipe(with_adapter=True, seed=0):
    pipe = PersonalizePipeline(**tiny_sdxl_components(seed))
    pipe.set_progress_bar_config(disable=True)
    if with_adapter:
        IPAdapterModules.install(pipe.unet, image_embed_dim=pipe.image_encoder.config.hidden_size, seed=1)
        # A freshly installed adapter copies to_k/to_v: make the MLP's effect strong enough to see in 2 steps.
        with torch.no_grad():
            for p in pipe.unet.encoder_hid_proj.parameters():
                p.mul_(3.0)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def run(pipe, prompts, **kw):
    kw = {**SIZE, "output_type": "np", **kw}
    return pipe(prompts, **kw)


def test_same_seed_same_image_and_different_seed_differs(pipe):
    sheet = make_sheet()
    a = run(pipe, "a girl running", sheet=sheet, seeds=5).images
    b = run(pipe, "a girl running", sheet=sheet, seeds=5).images
    c = run(pipe, "a girl running", sheet=sheet, seeds=6).images
    assert a.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-2


def test_batch_returns_images_in_prompt_order(pipe):
    sheet = make_sheet()
    prompts = ["running in the rain", "sitting at a desk", "waving on a beach"]
    batch = run(pipe, prompts, sheet=sheet, seeds=[11, 22, 33])
    assert batch.images.shape[0] == 3 and batch.prompts == prompts and batch.seeds == [11, 22, 33]
    for i, (prompt, seed) in enumerate(zip(prompts, [11, 22, 33])):
        single = run(pipe, prompt, sheet=sheet, seeds=seed).images[0]
        np.testing.assert_allclose(batch.images[i], single, atol=2e-4)
    # chunking the batch changes nothing either
    chunked = run(pipe, prompts, sheet=sheet, seeds=[11, 22, 33], max_batch_size=2).images
    np.testing.assert_allclose(chunked, batch.images, atol=2e-4)


def test_adapter_scale_zero_equals_no_adapter():
    plain = make_pipe(with_adapter=False)
    adapted = make_pipe(with_adapter=True)
    expected = run(plain, ["a knight", "a cat"], seeds=[1, 2]).images
    got = run(adapted, ["a knight", "a cat"], sheet=make_sheet(), seeds=[1, 2], adapter_scale=0.0).images
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # ...and the adapter does act at scale 1
    acting = run(adapted, ["a knight", "a cat"], sheet=make_sheet(), seeds=[1, 2], adapter_scale=1.0).images
    assert np.abs(acting - expected).max() > 1e-2


def test_panel_without_character_in_a_mixed_batch_is_plain_sdxl():
    plain = make_pipe(with_adapter=False)
    adapted = make_pipe(with_adapter=True)
    mixed = run(adapted, ["a knight", "an empty street"], sheet=[make_sheet(), None], seeds=[1, 2]).images
    expected = run(plain, "an empty street", seeds=2).images[0]
    np.testing.assert_allclose(mixed[1], expected, atol=1e-5)
    with_sheet = run(adapted, "a knight", sheet=make_sheet(), seeds=1).images[0]
    np.testing.assert_allclose(mixed[0], with_sheet, atol=2e-4)


def test_different_sheets_give_different_panels(pipe):
    red = run(pipe, "a person", sheet=make_sheet((220, 30, 30)), seeds=3).images
    blue = run(pipe, "a person", sheet=make_sheet((30, 30, 220), seed=9), seeds=3).images
    assert np.abs(red - blue).max() > 1e-2


def test_per_block_adapter_scale(pipe):
    sheet = make_sheet()
    full = run(pipe, "a person", sheet=sheet, seeds=3, adapter_scale=1.0).images
    off = run(pipe, "a person", sheet=sheet, seeds=3, adapter_scale=0.0).images
    up_only = run(pipe, "a person", sheet=sheet, seeds=3, adapter_scale={"up": {"block_0": [1.0]}}).images
    assert np.abs(up_only - full).max() > 1e-3 and np.abs(up_only - off).max() > 1e-3


def test_image_guidance_at_the_text_scale_is_the_two_pass_panel(pipe):
    """Three passes (negative / text / text + sheet) combined at image scale = text scale give the paper's two-pass
    panel; another image scale changes it, and the UNet then sees three copies of each panel."""
    sheet = make_sheet()
    two_pass = run(pipe, ["a person", "a dog"], sheet=sheet, seeds=[3, 4]).images
    batches = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        same = run(pipe, ["a person", "a dog"], sheet=sheet, seeds=[3, 4], image_guidance_scale=5.0).images
    finally:
        handle.remove()
    assert set(batches) == {6}  # two panels x three passes
    np.testing.assert_allclose(same, two_pass, atol=2e-4)
    stronger = run(pipe, ["a person", "a dog"], sheet=sheet, seeds=[3, 4], image_guidance_scale=9.0).images
    assert np.abs(stronger - two_pass).max() > 1e-2


def test_image_guidance_is_affine_in_its_scale(pipe):
    """One denoising step's latents are affine in the guided noise, which is affine in the image scale: the steps
    from scale 0 to 5 and from 5 to 10 are equal (the formula, not just a change)."""
    def latents(scale):
        return run(pipe, "a person", sheet=make_sheet(), seeds=2, num_inference_steps=1, output_type="latent",
                   image_guidance_scale=scale).images.float()

    low, mid, high = latents(0.0), latents(5.0), latents(10.0)
    assert (mid - low).abs().max() > 1e-3
    torch.testing.assert_close(high - mid, mid - low, atol=1e-4, rtol=0)


def test_image_guidance_leaves_panels_without_a_character_alone(pipe):
    plain = run(pipe, ["a knight", "an empty street"], sheet=[make_sheet(), None], seeds=[1, 2]).images
    guided = run(pipe, ["a knight", "an empty street"], sheet=[make_sheet(), None], seeds=[1, 2],
                 image_guidance_scale=9.0).images
    np.testing.assert_allclose(guided[1], plain[1], atol=1e-5)
    assert np.abs(guided[0] - plain[0]).max() > 1e-2


def test_reference_attention_reads_the_sheets_features_and_puts_the_processors_back(pipe):
    red = make_sheet((220, 30, 30))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 200, (72, 48, 3), dtype=np.uint8))
    before = {name: type(proc) for name, proc in pipe.unet.attn_processors.items()}
    prompts, seeds = ["a knight", "an empty street"], [1, 2]
    plain = run(pipe, prompts, sheet=[red, None], seeds=seeds).images
    off = run(pipe, prompts, sheet=[red, None], seeds=seeds, reference_scale=0.0).images
    np.testing.assert_array_equal(off, plain)
    ref_red = run(pipe, prompts, sheet=[red, None], seeds=seeds, reference_scale=20.0).images
    assert {name: type(proc) for name, proc in pipe.unet.attn_processors.items()} == before
    assert np.abs(ref_red[0] - plain[0]).max() > 1e-2  # the panel with the character reads the sheet's features
    np.testing.assert_allclose(ref_red[1], plain[1], atol=1e-5)  # the one without a character does not
    again = run(pipe, prompts, sheet=[red, None], seeds=seeds, reference_scale=20.0).images
    np.testing.assert_array_equal(again, ref_red)  # a seed still reproduces its panel
    # what is read is the sheet's pixels: a sheet with the same embeddings but other pixels draws another panel
    embeds = pipe.encode_sheet(red)
    other_pixels = SheetEmbeds(cond=embeds.cond, uncond=embeds.uncond, key=embeds.key, image=noise)
    ref_noise = run(pipe, "a knight", sheet=other_pixels, seeds=1, reference_scale=20.0).images
    assert np.abs(ref_noise[0] - ref_red[0]).max() > 1e-2
    hand_made = SheetEmbeds(cond=embeds.cond, uncond=embeds.uncond, key="hand-made")
    with pytest.raises(ValueError, match="reference attention needs the sheet's pixels"):
        run(pipe, "a knight", sheet=hand_made, seeds=1, reference_scale=20.0)
    assert {name: type(proc) for name, proc in pipe.unet.attn_processors.items()} == before


@pytest.mark.parametrize("image_guidance", [None, 7.0])
def test_guidance_rescale_pulls_the_guided_prediction_to_the_full_passs_spread(pipe, monkeypatch, image_guidance):
    from engine.pipelines import personalize

    seen, real = [], personalize.rescale_noise_cfg

    def spy(noise_cfg, noise_full, guidance_rescale):
        seen.append((noise_cfg.std().item(), noise_full.std().item(), guidance_rescale))
        return real(noise_cfg, noise_full, guidance_rescale)

    monkeypatch.setattr(personalize, "rescale_noise_cfg", spy)
    options = {"sheet": make_sheet(), "seeds": 4, "image_guidance_scale": image_guidance, "guidance_scale": 6.0}
    plain = run(pipe, "a knight", **options).images
    assert seen == []  # off by default, as in the paper
    rescaled = run(pipe, "a knight", guidance_rescale=1.0, **options).images
    assert len(seen) == SIZE["num_inference_steps"] and all(r == 1.0 for *_, r in seen)
    assert all(abs(cfg - full) > 1e-4 for cfg, full, _ in seen)  # guidance did widen the spread it now rescales
    assert np.abs(rescaled - plain).max() > 1e-2


def test_sheet_cache_hit_does_not_rerun_image_encoder(pipe):
    calls = []
    handle = pipe.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe.clear_sheet_cache()
        sheet = make_sheet(seed=42)
        run(pipe, ["a", "b"], sheet=sheet, seeds=0)
        first = len(calls)
        assert first == 2  # the sheet and the unconditional (blank) image, once each for two panels
        run(pipe, ["c", "d", "e"], sheet=sheet.copy(), seeds=0)  # same pixels, another object
        assert len(calls) == first
        run(pipe, "f", sheet=make_sheet(seed=43), seeds=0)  # new content: one more encode
        assert len(calls) == first + 1
    finally:
        handle.remove()


def test_sheet_embeds_can_be_passed_instead_of_image(pipe):
    sheet = make_sheet()
    embeds = pipe.encode_sheet(sheet)
    assert isinstance(embeds, SheetEmbeds) and embeds.cond.shape == (1, 65, 32)  # 64 patches + CLS, penultimate layer
    a = run(pipe, "x", sheet=sheet, seeds=1).images
    b = run(pipe, "x", sheet=embeds, seeds=1).images
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "CMYK", "array", "float-array"])
def test_sheet_in_any_mode(pipe, mode):
    rgb = make_sheet()
    sheet = {
        "RGBA": rgb.convert("RGBA"),
        "L": rgb.convert("L"),
        "P": rgb.convert("P"),
        "CMYK": rgb.convert("CMYK"),
        "array": np.asarray(rgb),
        "float-array": np.asarray(rgb).astype(np.float32) / 255.0,
    }[mode]
    out = run(pipe, "a person", sheet=sheet, seeds=1).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_transparent_sheet_is_composited_on_white(pipe):
    rgba = Image.new("RGBA", (48, 72), (0, 0, 0, 0))
    rgba.paste((10, 200, 10, 255), (16, 12, 32, 60))
    on_white = Image.new("RGB", (48, 72), (255, 255, 255))
    on_white.paste((10, 200, 10), (16, 12, 32, 60))
    assert pipe.encode_sheet(rgba).key == pipe.encode_sheet(on_white).key


def test_num_images_per_prompt_and_seed_rules(pipe):
    out = run(pipe, ["a", "b"], sheet=make_sheet(), seeds=[10, 20], num_images_per_prompt=2)
    assert out.images.shape[0] == 4 and out.seeds == [10, 11, 20, 21]
    single = run(pipe, "b", sheet=make_sheet(), seeds=21).images[0]
    np.testing.assert_allclose(out.images[3], single, atol=2e-4)
    drawn = run(pipe, "a", sheet=make_sheet(), seeds=None)
    again = run(pipe, "a", sheet=make_sheet(), seeds=drawn.seeds)
    np.testing.assert_array_equal(drawn.images, again.images)


def test_callback_on_step_end_sees_every_step(pipe):
    steps = []

    def callback(p, i, t, kwargs):
        steps.append((p.current_run, i, tuple(kwargs["latents"].shape)))
        return {}

    run(pipe, ["a", "b"], sheet=[make_sheet(), None], seeds=0, num_inference_steps=3, callback_on_step_end=callback)
    assert pipe.num_runs == 2
    assert [s[:2] for s in steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert steps[0][2] == (1, 4, 32, 32)


def test_pil_output(pipe):
    out = pipe("a person", sheet=make_sheet(), seeds=0, **SIZE)
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (64, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": []}, "prompt list is empty"),
        ({"prompt": ["ok", "  "]}, "prompt[1] is empty"),
        ({"prompt": "x" * 5000}, "prompt[0] has 5000 characters"),
        ({"prompt": 5}, "prompt must be a string"),
        ({"height": 65}, "height=65 must be a positive multiple of 8"),
        ({"width": 0}, "width=0 must be a positive multiple of 8"),
        ({"seeds": [1, 2, 3]}, "3 seeds for 2 prompts"),
        ({"seeds": -1}, "seeds=-1"),
        ({"sheet": "no/such/sheet.png"}, "does not exist"),
        ({"sheet": 12}, "sheet must be an image"),
        ({"sheet": np.zeros((4, 4, 7))}, "is not an image"),
        ({"sheet": [make_sheet()]}, "1 sheets for 2 prompts"),
        ({"negative_prompt": ["a"]}, "1 negative prompts for 2 prompts"),
        ({"num_inference_steps": 0}, "num_inference_steps=0"),
        ({"adapter_scale": "high"}, "adapter_scale='high'"),
        ({"image_guidance_scale": -1.0}, "image_guidance_scale=-1.0 must be None or a number >= 0"),
        ({"reference_scale": -0.5}, "reference_scale=-0.5 must be a number >= 0"),
        ({"guidance_rescale": 1.5}, "guidance_rescale=1.5 must be a number between 0 and 1; 0 switches it off"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, kwargs, message):
    call = {"prompt": ["a", "b"], "sheet": make_sheet(), "seeds": [1, 2], **SIZE, **kwargs}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        pipe(**call)


def test_sheet_without_adapter_is_an_error():
    with pytest.raises(ValueError, match="no adapter is loaded"):
        run(make_pipe(with_adapter=False), "a", sheet=make_sheet(), seeds=0)


def test_an_empty_negative_prompt_is_sdxls_zeroed_negative(pipe, monkeypatch):
    """As stock diffusers does for None (force_zeros_for_empty_prompt): zero negative embeddings, per panel."""
    from diffusers import StableDiffusionXLPipeline

    seen = []
    denoise = pipe._denoise

    def spy(**kwargs):
        seen.append((kwargs["negative_embeds"].clone(), kwargs["negative_pooled"].clone()))
        return denoise(**kwargs)

    monkeypatch.setattr(pipe, "_denoise", spy)
    mixed = run(pipe, ["a knight", "a cat"], seeds=[1, 2], negative_prompt=["", "blurry"]).images
    (embeds, pooled), = seen
    assert embeds[0].abs().max() == 0 and pooled[0].abs().max() == 0
    assert embeds[1].abs().max() > 0  # a written negative is encoded
    stock = StableDiffusionXLPipeline.encode_prompt(pipe, "a knight", device="cpu", negative_prompt=None)
    assert torch.equal(stock[1], torch.zeros_like(stock[1]))  # what stock does for None
    none = run(pipe, "a knight", seeds=1, negative_prompt=None).images[0]
    np.testing.assert_allclose(mixed[0], none, atol=2e-4)
    written = run(pipe, "a knight", seeds=1, negative_prompt="blurry").images[0]
    assert np.abs(written - none).max() > 1e-3


def _plus_file(pipe, folder, num_queries=4, hidden=64, seed=0):
    """An IP-Adapter Plus file (Resampler projection) in h94's layout, with tiny random weights: what `full` falls
    back to (ip-adapter-plus_sdxl_vit-h) until our own adapter is given."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    embed = pipe.image_encoder.config.hidden_size  # Plus reads the penultimate hidden states
    proj = IPAdapterPlusImageProjection(embed_dims=embed, output_dims=pipe.unet.config.cross_attention_dim,
                                        hidden_dims=hidden, heads=hidden // 64, num_queries=num_queries)  # depth 4, as h94
    for p in proj.parameters():
        p.data.normal_(0, 0.2)
    out = {}
    for key, value in proj.state_dict().items():  # diffusers -> h94 names (the inverse of diffusers' converter)
        h94 = key.replace(".ln0.", ".0.norm1.").replace(".ln1.", ".0.norm2.")
        h94 = h94.replace(".ff.0.", ".1.0.").replace(".ff.1.net.0.proj.", ".1.1.").replace(".ff.1.net.2.", ".1.3.")
        h94 = h94.replace(".attn.to_q.", ".0.to_q.").replace(".attn.to_out.0.", ".0.to_out.")
        if ".attn.to_k." in h94:
            v = proj.state_dict()[key.replace("to_k", "to_v")]
            out["image_proj." + h94.replace(".attn.to_k.", ".0.to_kv.")] = torch.cat([value, v])
        elif ".attn.to_v." not in h94:
            out["image_proj." + h94] = value
    cross = pipe.unet.config.cross_attention_dim
    names = [n for n in pipe.unet.attn_processors if n.endswith("attn2.processor")]
    modules = dict(pipe.unet.named_modules())
    for i, name in enumerate(names):
        width = modules[name[: -len(".processor")]].to_q.in_features
        out[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = torch.randn(width, cross) * 0.2
        out[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = torch.randn(width, cross) * 0.2
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "ip-adapter-plus.safetensors"))
    return proj


def test_ip_adapter_plus_fallback_runs_through_our_call(tmp_path):
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    pipe = make_pipe(with_adapter=False)
    expected = _plus_file(pipe, tmp_path)
    plain = run(pipe, ["a knight", "a cat"], seeds=[1, 2]).images
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip-adapter-plus.safetensors",
                         image_encoder_folder=None)
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    assert isinstance(layer, IPAdapterPlusImageProjection)
    loaded = layer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.state_dict().items())  # our h94 names are right
    red = run(pipe, ["a knight", "a cat"], sheet=make_sheet((220, 30, 30)), seeds=[1, 2]).images
    blue = run(pipe, ["a knight", "a cat"], sheet=make_sheet((30, 30, 220)), seeds=[1, 2]).images
    off = run(pipe, ["a knight", "a cat"], sheet=make_sheet((220, 30, 30)), seeds=[1, 2], adapter_scale=0.0).images
    assert np.abs(red - blue).max() > 1e-2 and np.abs(red - plain).max() > 1e-2  # the sheet is read
    np.testing.assert_allclose(off, plain, atol=1e-5)  # scale 0: plain SDXL
    embeds = pipe.encode_sheet(make_sheet((220, 30, 30)))  # Plus reads the penultimate hidden states, all tokens
    assert embeds.cond.shape[-1] == pipe.image_encoder.config.hidden_size and embeds.cond.shape[-2] > 1
    # several characters per panel through the Plus projection (what `full` runs): regional masks, deterministic
    group = [make_sheet((220, 30, 30)), make_sheet((30, 30, 220), seed=1)]
    two = run(pipe, "two knights", sheet=[group], seeds=4).images
    np.testing.assert_array_equal(two, run(pipe, "two knights", sheet=[group], seeds=4).images)
    swapped = run(pipe, "two knights", sheet=[group[::-1]], seeds=4).images
    assert np.abs(two - swapped).max() > 1e-3

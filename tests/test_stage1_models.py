import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from components import tiny_sd_unet, tiny_stage1_components

from engine.models.stage1 import (
    PoseGuider,
    ReferenceBank,
    ReferenceConditioner,
    StandardizeNet,
    pose_residual,
    self_attention_layers,
    set_reference_processors,
)

H, W = 8, 12  # latent size (image 64x96 with the /8 VAE)


def inputs(seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    return {
        "latents": torch.randn(batch, 4, H, W, generator=g),
        "ref": torch.randn(batch, 4, H, W, generator=g),
        "embeds": torch.randn(batch, 1, 32, generator=g),
        "target_pose": torch.rand(batch, 3, 8 * H, 8 * W, generator=g),
        "ref_pose": torch.rand(batch, 3, 8 * H, 8 * W, generator=g),
        "background": (torch.rand(batch, 1, 8 * H, 8 * W, generator=g) > 0.5).float(),
    }


def make_net(with_conditioner=True, seed=0):
    c = tiny_stage1_components(seed, with_conditioner)
    return StandardizeNet(c["reference_unet"], c["denoising_unet"], c["pose_guider"], c["reference_conditioner"])


@torch.no_grad()
def test_denoiser_without_reference_pass_equals_a_plain_unet():
    plain = tiny_sd_unet(1)
    net = make_net()
    x = inputs()
    t = torch.tensor([500])
    expected = plain(x["latents"], t, encoder_hidden_states=x["embeds"]).sample
    got = net(x["latents"], t, x["embeds"], target_pose=None, bank=None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_reading_the_reference_changes_the_output():
    net = make_net()
    x = inputs()
    t = torch.tensor([500])
    without = net(x["latents"], t, x["embeds"], x["target_pose"], bank=None)
    bank = net.encode_reference(x["ref"], x["embeds"])
    with_ref = net(x["latents"], t, x["embeds"], x["target_pose"], bank=bank)
    assert (with_ref - without).abs().max() > 1e-3
    other = net.encode_reference(inputs(seed=5)["ref"], x["embeds"])
    assert (net(x["latents"], t, x["embeds"], x["target_pose"], bank=other) - with_ref).abs().max() > 1e-3


@torch.no_grad()
def test_cfg_unconditional_half_uses_plain_self_attention():
    net = make_net()
    x = inputs()
    t = torch.tensor([500, 500])
    bank = net.encode_reference(x["ref"], x["embeds"])
    latents = torch.cat([x["latents"]] * 2)
    embeds = torch.cat([torch.zeros_like(x["embeds"]), x["embeds"]])
    out = net(latents, t, embeds, None, bank=bank, ref_index=torch.tensor([-1, 0]))
    uncond_plain = net(x["latents"], t[:1], embeds[:1], None, bank=None)
    cond_ref = net(x["latents"], t[:1], embeds[1:], None, bank=net.encode_reference(x["ref"], x["embeds"]))
    torch.testing.assert_close(out[:1], uncond_plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1:], cond_ref, rtol=0, atol=1e-5)


@torch.no_grad()
def test_zero_initialised_fbdm_rpim_give_exactly_the_baseline():
    base, full = make_net(with_conditioner=False), make_net(with_conditioner=True)
    x = inputs()
    t = torch.tensor([300])
    a = base(x["latents"], t, x["embeds"], x["target_pose"], base.encode_reference(x["ref"], x["embeds"]))
    bank = full.encode_reference(x["ref"], x["embeds"], x["background"], x["ref_pose"])
    b = full(x["latents"], t, x["embeds"], x["target_pose"], bank)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    # once trained (non-zero), mask and pose do change the result
    with torch.no_grad():
        for p in full.conditioner.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bank = full.encode_reference(x["ref"], x["embeds"], x["background"], x["ref_pose"])
    c = full(x["latents"], t, x["embeds"], x["target_pose"], bank)
    assert (c - a).abs().max() > 1e-4
    flipped = full.encode_reference(x["ref"], x["embeds"], 1 - x["background"], x["ref_pose"])
    assert (full(x["latents"], t, x["embeds"], x["target_pose"], flipped) - c).abs().max() > 1e-5


@torch.no_grad()
def test_mask_and_pose_reach_every_reference_self_attention_at_its_resolution():
    net = make_net()
    x = inputs()
    bank = net.encode_reference(x["ref"], x["embeds"], x["background"], x["ref_pose"], record_shapes=True)
    names = list(self_attention_layers(net.reference_unet))
    assert set(bank.applied) == set(names) == set(bank.features)
    for name, (hw, got_mask, got_pose) in bank.applied.items():
        level = 0 if name.startswith("down_blocks.0") or name.startswith("up_blocks.1") else 1
        assert hw == (H // 2**level, W // 2**level), name
        assert got_mask and got_pose and bank.features[name].shape[1] == hw[0] * hw[1]


@torch.no_grad()
def test_target_pose_is_added_after_conv_in_and_only_inside_the_context():
    net = make_net()
    with torch.no_grad():
        for p in net.pose_guider.conv_out.parameters():
            p.normal_(0, 0.1)
    x = inputs()
    t = torch.tensor([500])
    no_pose = net(x["latents"], t, x["embeds"], None, bank=None)
    with_pose = net(x["latents"], t, x["embeds"], x["target_pose"], bank=None)
    assert (with_pose - no_pose).abs().max() > 1e-4
    # the hook is inert outside a call: the raw UNet is unchanged
    raw = net.denoising_unet(x["latents"], t, encoder_hidden_states=x["embeds"]).sample
    torch.testing.assert_close(raw, no_pose, rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not match conv_in"):
        with pose_residual(torch.zeros(1, 32, 3, 3)):
            net.denoising_unet(x["latents"], t, encoder_hidden_states=x["embeds"])


@torch.no_grad()
def test_banks_are_per_call_and_threads_do_not_mix():
    net = make_net()
    a, b = inputs(1), inputs(2)
    t = torch.tensor([400])
    expected = {}
    for key, x in (("a", a), ("b", b)):
        expected[key] = net(x["latents"], t, x["embeds"], x["target_pose"], net.encode_reference(x["ref"], x["embeds"]))
    results, errors = {}, []

    def work(key, x):
        try:
            for _ in range(3):
                bank = net.encode_reference(x["ref"], x["embeds"])
                results[key] = net(x["latents"], t, x["embeds"], x["target_pose"], bank)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k, x)) for k, x in (("a", a), ("b", b))]
    [th.start() for th in threads]
    [th.join() for th in threads]
    assert not errors
    for key in ("a", "b"):
        torch.testing.assert_close(results[key], expected[key], rtol=0, atol=1e-5)


def test_pose_guider_with_another_factor_keeps_its_weights(tmp_path):
    """with_factor: the same weights downsampling by 4 (a /4 VAE's latents) or back by 8, where it computes exactly
    what the original did; a factor it cannot reach is refused; the factor survives save/from_pretrained."""
    torch.manual_seed(0)
    guider = PoseGuider(conditioning_embedding_channels=16, block_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        guider.conv_out.weight.normal_()
    pose = torch.rand(2, 3, 96, 64)
    assert guider.factor == 8 and guider(pose).shape == (2, 16, 12, 8)
    quarter = PoseGuider.with_factor(guider, 4)
    assert quarter.factor == 4 and quarter(pose).shape == (2, 16, 24, 16)
    for (k, v), (k2, v2) in zip(guider.state_dict().items(), quarter.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert not torch.allclose(F.avg_pool2d(quarter(pose), 2), guider(pose), atol=1e-3)  # another map, to train on
    torch.testing.assert_close(PoseGuider.with_factor(quarter, 8)(pose), guider(pose), rtol=0, atol=0)
    quarter.save_pretrained(tmp_path / "pg4")
    again = PoseGuider.from_pretrained(tmp_path / "pg4")
    assert again.factor == 4
    torch.testing.assert_close(again(pose), quarter(pose), rtol=0, atol=0)
    for factor in (3, 16):
        with pytest.raises(ValueError, match="power of"):
            PoseGuider.with_factor(guider, factor)


def test_models_round_trip_save_pretrained(tmp_path):
    guider = PoseGuider(conditioning_embedding_channels=32, block_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        guider.conv_out.weight.normal_()
    guider.save_pretrained(tmp_path / "pg")
    again = PoseGuider.from_pretrained(tmp_path / "pg")
    for (k, v), (k2, v2) in zip(guider.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    cond = ReferenceConditioner.for_unet(tiny_sd_unet(), pose_block_out_channels=(8, 8, 16, 16),
                                         pose_embedding_channels=16)
    cond.save_pretrained(tmp_path / "rc")
    loaded = ReferenceConditioner.from_pretrained(tmp_path / "rc")
    assert loaded.config.attention_names == cond.config.attention_names
    assert set(loaded.state_dict()) == set(cond.state_dict())
    no_rpim = ReferenceConditioner.for_unet(tiny_sd_unet(), use_rpim=False)
    assert not any(k.startswith("pose") for k in no_rpim.state_dict())


def test_reference_latent_path_adds_the_conv_of_the_resized_latent():
    """use_reference_latent: f~ gains conv(latent area-resized to the block's grid); zero until trained; the bank
    hands the reference latents to the conditioner."""
    torch.manual_seed(0)
    unet = tiny_sd_unet()
    cond = ReferenceConditioner.for_unet(unet, use_fbdm=False, use_rpim=False, use_reference_latent=True)
    name, i = next(iter(cond.index.items()))
    dim = cond.latent_projections[i].out_channels
    hidden, z = torch.randn(2, 4 * 6, dim), torch.randn(2, 4, 8, 12)
    torch.testing.assert_close(cond.condition(name, hidden, (4, 6), None, None, z), hidden, rtol=0, atol=0)
    with torch.no_grad():
        cond.latent_projections[i].weight.normal_()
        cond.latent_projections[i].bias.normal_()
    pooled = z.reshape(2, 4, 4, 2, 6, 2).mean((3, 5))  # area resize 8x12 -> 4x6
    expected = hidden + cond.latent_projections[i](pooled).flatten(2).transpose(1, 2)
    torch.testing.assert_close(cond.condition(name, hidden, (4, 6), None, None, z), expected)
    bank = ReferenceBank((8, 12), cond, reference_latents=z)
    torch.testing.assert_close(bank.write(name, hidden), expected)


def test_processors_keep_unet_state_dict_keys():
    unet = tiny_sd_unet()
    keys = set(unet.state_dict())
    set_reference_processors(copy.deepcopy(unet), "read")
    c = tiny_stage1_components()
    net = StandardizeNet(c["reference_unet"], c["denoising_unet"], c["pose_guider"], None)
    assert set(net.denoising_unet.state_dict()) == keys

"""The instruments that say whether the image embedding and Stage I's bank carry the character, and the training-only
attention loss (tiny seeded models; the numbers are checked, not just the shapes)."""

import numpy as np
import pytest
import torch
from components import tiny_stage1_components
from PIL import Image

from engine.models.stage1 import AttnProcessor2_0, BankAttention, ReferenceBank, StandardizeNet
from engine.pipelines import StandardizePipeline


def tiny_pipe(seed=0):
    pipe = StandardizePipeline(**tiny_stage1_components(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------ the embedding probe
def test_linear_probe_reads_a_separable_attribute_and_not_noise():
    from trainer.evaluate import linear_probe

    rng = np.random.default_rng(0)
    labels = [("red", "blue", "green")[i % 3] for i in range(300)]
    centres = {"red": [3, 0], "blue": [0, 3], "green": [-3, -3]}
    x = np.array([centres[y] for y in labels]) + rng.normal(0, 0.5, (300, 2))
    assert linear_probe(x[:200], labels[:200], x[200:], labels[200:]) > 0.95
    noise = rng.normal(0, 1, (300, 2))
    assert linear_probe(noise[:200], labels[:200], noise[200:], labels[200:]) < 0.5


class ColourEncoder(torch.nn.Module):
    """An 'encoder' whose embedding is the mean colour of a torso window of the square input (an oracle for the top
    colour of a standard render), or a constant."""

    def __init__(self, constant=False):
        super().__init__()
        self.constant = constant
        self.config = type("Config", (), {"image_size": 32})()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        torso = pixel_values[:, :, 9:13, 14:18].mean(dim=(2, 3))  # the sheet padded to 32x32: torso below the head
        embeds = torch.zeros_like(torso) if self.constant else torso
        return type("Out", (), {"image_embeds": embeds})()


def test_embedding_probe_scores_an_oracle_above_chance_and_a_constant_at_chance():
    from trainer.evaluate import embedding_probe

    oracle = embedding_probe(ColourEncoder().eval(), n_train=150, n_test=60, size=(64, 96), views=("sheet",))
    constant = embedding_probe(ColourEncoder(constant=True).eval(), n_train=150, n_test=60, size=(64, 96),
                               views=("sheet",))
    assert oracle["sheet"]["accuracy"]["top_color"] > 0.6 > oracle["sheet"]["chance"]["top_color"] + 0.3
    assert constant["sheet"]["accuracy"]["top_color"] <= constant["sheet"]["chance"]["top_color"] + 1e-9
    assert constant["sheet"]["effective_rank"] == 0 < oracle["sheet"]["effective_rank"] <= 3


def test_encoder_trainer_attribute_heads_and_frozen_text(tmp_path):
    """Two steps from trained towers: the heads are saved, the vision tower moves, the text tower (the base's) does
    not move at all."""
    import yaml
    from safetensors.torch import load_file
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from trainer import train_clip

    first = train_clip.main(train_clip.parse_args(["--config", str(_write(tmp_path / "a.yaml", {
        "output_dir": str(tmp_path / "a"), "resolution": [64, 96], "num_characters": 10, "train_batch_size": 4,
        "max_train_steps": 1, "checkpointing_steps": 1, "bpe_merges": 30,
        "text_config": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 1},
        "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 1,
                          "image_size": 32, "patch_size": 8}, "projection_dim": 16}, yaml))]))
    init = {"image_encoder": str(first / "image_encoder"), "text_encoder_2": str(first / "text_encoder_2"),
            "tokenizer": str(first / "tokenizer")}
    second = train_clip.main(train_clip.parse_args(["--config", str(_write(tmp_path / "b.yaml", {
        "output_dir": str(tmp_path / "b"), "resolution": [64, 96], "num_characters": 10, "train_batch_size": 4,
        "max_train_steps": 2, "checkpointing_steps": 2, "learning_rate": 1e-2, "init": init, "freeze_text": True,
        "attribute_weight": 1.0}, yaml))]))
    heads = load_file(second / "attribute_heads" / "diffusion_pytorch_model.safetensors")
    assert heads["heads.top_color.weight"].shape == (14, 16) and heads["heads.hair_style.weight"].shape == (10, 16)
    before, after = (CLIPTextModelWithProjection.from_pretrained(p / "text_encoder_2").state_dict()
                     for p in (first, second))
    assert all(torch.equal(before[k], after[k]) for k in before)
    vision_before, vision_after = (CLIPVisionModelWithProjection.from_pretrained(p / "image_encoder").state_dict()
                                   for p in (first, second))
    assert any(not torch.equal(vision_before[k], vision_after[k]) for k in vision_before)


def _write(path, config, yaml):
    path.write_text(yaml.safe_dump(config))
    return path


def test_visible_attributes_follow_the_framing():
    from trainer.synthetic import make_character, sample_scene
    from trainer.train_clip import attribute_targets, visible_attributes

    character = make_character(3).attributes()
    standard = visible_attributes(character, None)
    assert all(v is not None for k, v in standard.items() if k not in ("hair_color", "bottom", "bottom_color"))
    scene = sample_scene(3, 0).attributes()
    head_only = visible_attributes(character, {**scene, "framing": "head only", "view": "front"})
    assert head_only["top_color"] is None and head_only["shoes"] is None and head_only["skin"] == character["skin"]
    targets = attribute_targets([(character, {**scene, "framing": "head only", "view": "back"})])
    assert targets["top_color"].item() == -100 and targets["glasses"].item() == -100 and targets["hat"].item() >= 0


def test_encoder_pixels_follow_the_pipelines_views():
    """Without raw scenes every scene is the canvas figure on white, squashed; the standard render is padded."""
    from trainer.synthetic import render_sample
    from trainer.synthetic.render import reference_on_canvas
    from trainer.train_clip import _collate, encoder_pixels, pixel_values

    to_tensor = lambda im: torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1) / 127.5 - 1  # noqa: E731
    items = []
    for seed in (2, 3):  # an even and an odd scene seed
        s = reference_on_canvas(render_sample(5, seed, (64, 96)))
        items.append({"image": to_tensor(s.image), "standard": to_tensor(s.standard),
                      "mask": torch.from_numpy(np.asarray(s.mask, np.float32) / 255)[None], "caption": "",
                      "appearance": "", "attributes": {}, "scene_seed": seed})
    batch = _collate(items)
    figure = batch["image"] * batch["mask"] + (1 - batch["mask"])
    scenes = encoder_pixels(batch, np.array([False, False]), 16, raw_scenes=False, foreground_canvas=True)
    torch.testing.assert_close(scenes, pixel_values(figure, 16, pad=False))
    mixed = encoder_pixels(batch, np.array([True, False]), 16, raw_scenes=True, foreground_canvas=True)
    torch.testing.assert_close(mixed[0], pixel_values(batch["standard"][:1], 16)[0])  # a sheet, padded
    torch.testing.assert_close(mixed[1], pixel_values(figure[1:], 16, pad=False)[0])  # odd seed: on the canvas
    raw = encoder_pixels(batch, np.array([False, False]), 16, raw_scenes=True, foreground_canvas=True)
    torch.testing.assert_close(raw[0], pixel_values(batch["image"][:1], 16)[0])  # even seed: raw, with its background


# ------------------------------------------------------------------------------------------ Stage I's bank
class CopyOracle(torch.nn.Module):
    """Reads x0 straight from its reference latents (a copy task where the reference is the target) and returns the
    exact diffusion target: the ideal reader. Same call signature as StandardizeNet with ``reference``."""

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler = scheduler

    def forward(self, latents, timestep, image_embeds, target_pose, bank=None, ref_index=None, pose_features=None,
                reference=None):
        x0 = reference["reference_latents"][ref_index]
        noise = (latents - self.scheduler.alphas_cumprod[timestep].sqrt().view(-1, 1, 1, 1) * x0) / (
            1 - self.scheduler.alphas_cumprod[timestep]).sqrt().view(-1, 1, 1, 1)
        bank = ReferenceBank(latents.shape[-2:], record_attention=True)
        return self.scheduler.get_velocity(x0, noise, timestep) if self.scheduler.config.prediction_type == \
            "v_prediction" else noise, bank


def copy_task(sample):
    """The reference shown is the standard render itself."""
    import dataclasses

    return dataclasses.replace(sample, image=sample.standard, labels=sample.standard_labels)


def test_reference_reading_oracle_gap_is_positive():
    from diffusers import DDPMScheduler

    from trainer.evaluate import reference_reading

    pipe = tiny_pipe()
    oracle = CopyOracle(DDPMScheduler.from_config(pipe.scheduler.config))
    result = reference_reading(pipe, n=8, size=(64, 96), batch=4, net=oracle, transform=copy_task)
    assert result["loss_own"] < 1e-6  # every swapped sample is worse, so the gap is positive whatever t was drawn
    assert result["gap_bank"] > result["gap_bank_se"] > 0 and result["gap_both"] > 0


def test_reference_reading_with_the_bank_cut_scores_zero_gap():
    from trainer.evaluate import reference_reading

    pipe = tiny_pipe()
    reading = reference_reading(pipe, n=8, size=(64, 96), batch=4)
    assert 0 < reading["attention_entropy"] <= 1 and 0 < reading["attention_reference_share"] < 1
    assert reading["gap_bank"] != 0  # a random reader's prediction depends on whose bank it reads
    processors = {name: AttnProcessor2_0() for name in pipe.denoising_unet.attn_processors}
    pipe.denoising_unet.set_attn_processor(processors)  # the denoiser no longer reads the bank

    class Cut(StandardizeNet):
        def __init__(self, p):
            torch.nn.Module.__init__(self)
            self.reference_unet, self.denoising_unet = p.reference_unet, p.denoising_unet
            self.pose_guider, self.conditioner = p.pose_guider, p.reference_conditioner

    cut = reference_reading(pipe, n=8, size=(64, 96), batch=4, net=Cut(pipe))
    assert cut["gap_bank"] == 0 and cut["gap_bank_se"] == 0


def test_recording_the_attention_changes_no_prediction():
    """The attention loss is training-only: recording the attention gives the same prediction, and the pipeline never
    records."""
    c = tiny_stage1_components(0)
    net = StandardizeNet(c["reference_unet"], c["denoising_unet"], c["pose_guider"], c["reference_conditioner"])
    g = torch.Generator().manual_seed(0)
    latents, ref = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 4, 12, 8, generator=g)
    embeds = torch.randn(2, 1, 32, generator=g)
    t = torch.tensor([100, 900])
    ref_index = torch.tensor([0, -1])
    with torch.no_grad():
        plain = net(latents, t, embeds, None, net.encode_reference(ref, embeds), ref_index=ref_index)
        recorded, bank = net(latents, t, embeds, None, ref_index=ref_index,
                             reference={"reference_latents": ref, "image_embeds": embeds, "record_attention": True})
    torch.testing.assert_close(recorded, plain, rtol=1e-5, atol=1e-5)
    assert bank.attention and all(r.rows.tolist() == [0] for r in bank.attention.values())
    with torch.no_grad():  # a strided subset of the queries: the same rows of the same attention
        _, some = net(latents, t, embeds, None, ref_index=ref_index,
                      reference={"reference_latents": ref, "image_embeds": embeds, "record_attention": 10})
    for name, record in some.attention.items():
        full = bank.attention[name]
        assert len(record.queries) <= 10 and record.num_queries == full.log_probs.shape[-2]
        torch.testing.assert_close(record.log_probs, full.log_probs[:, :, record.queries], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(record.share, full.share[:, :, record.queries], rtol=1e-5, atol=1e-5)
    assert net.encode_reference(ref, embeds).attention is None  # the pipeline's path records nothing


def test_attention_correspondence_on_known_attention():
    from trainer.train_standardize import attention_correspondence

    labels = torch.zeros(1, 16, 16, dtype=torch.long)
    labels[:, :8] = 3  # top half "top", bottom half background; on a 2x2 token grid: tokens 0, 1 top; 2, 3 background
    bank = ReferenceBank((2, 2), record_attention=True)
    focused = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 4).clamp_min(1e-12).log()[None, None]
    bank.attention["a"] = BankAttention(torch.tensor([0]), focused, torch.full((1, 1, 4), 0.5))
    stats = attention_correspondence(bank, labels, labels)
    assert float(stats["loss"]) == pytest.approx(0, abs=1e-6) and float(stats["same_part_share"]) == pytest.approx(1)
    assert float(stats["same_part_uniform"]) == pytest.approx(0.5)
    bank.attention["a"] = BankAttention(torch.tensor([0]), torch.full((1, 1, 4, 4), 0.25).log(),
                                        torch.full((1, 1, 4), 0.5))
    stats = attention_correspondence(bank, labels, labels)
    assert float(stats["entropy"]) == pytest.approx(1) and float(stats["same_part_share"]) == pytest.approx(0.5)
    assert float(stats["loss"]) == pytest.approx(np.log(2))


def test_attention_loss_teaches_the_bank_where_to_look():
    """A few steps on the auxiliary loss alone move a random net's attention toward same-part reference tokens."""
    from trainer.train_standardize import attention_correspondence

    c = tiny_stage1_components(0)
    net = StandardizeNet(c["reference_unet"], c["denoising_unet"], c["pose_guider"], c["reference_conditioner"])
    g = torch.Generator().manual_seed(0)
    latents, ref = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 4, 12, 8, generator=g)
    embeds = torch.randn(2, 1, 32, generator=g)
    labels = torch.zeros(2, 96, 64, dtype=torch.long)
    labels[:, 10:40], labels[:, 40:80] = 1, 3
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    shares = []
    for _ in range(15):
        _, bank = net(latents, torch.tensor([500, 500]), embeds, None,
                      reference={"reference_latents": ref, "image_embeds": embeds, "record_attention": True})
        stats = attention_correspondence(bank, labels, labels)
        shares.append(float(stats["same_part_share"]))
        opt.zero_grad()
        stats["loss"].backward()
        opt.step()
    assert shares[-1] > shares[0] + 0.1


def test_recorded_read_is_the_attention_over_the_reference_alone():
    """``BankAttention.read``: what the recorded queries read from the reference tokens alone is that block's attention
    with the reference as its only keys and values (``to_out`` included)."""
    from engine.models.stage1 import _attention, self_attention_layers

    c = tiny_stage1_components(0)
    net = StandardizeNet(c["reference_unet"], c["denoising_unet"], c["pose_guider"], c["reference_conditioner"])
    g = torch.Generator().manual_seed(0)
    latents, ref = torch.randn(2, 4, 12, 8, generator=g), torch.randn(2, 4, 12, 8, generator=g)
    embeds = torch.randn(2, 1, 32, generator=g)
    inputs = {}
    layers = self_attention_layers(net.denoising_unet)
    hooks = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, name=name: inputs.__setitem__(name, args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for name, layer in layers.items()]
    with torch.no_grad():
        _, bank = net(latents, torch.tensor([100, 900]), embeds, None, ref_index=torch.tensor([1, 0]),
                      reference={"reference_latents": ref, "image_embeds": embeds, "record_attention": 10})
    for hook in hooks:
        hook.remove()
    assert bank.attention
    for name, record in bank.attention.items():
        expected = _attention(layers[name], inputs[name], bank.features[name][[1, 0]])
        torch.testing.assert_close(record.read, expected[:, record.queries], rtol=1e-4, atol=1e-5)


def test_read_loss_teaches_the_bank_to_carry_the_colour():
    """A few steps on the read loss alone make what the queries read from the bank predict the target's colours
    (two references of different colours: the loss can only fall by reading each sample's own reference)."""
    from trainer.train_standardize import BankReadHeads, bank_read_loss

    c = tiny_stage1_components(0)
    net = StandardizeNet(c["reference_unet"], c["denoising_unet"], c["pose_guider"], c["reference_conditioner"])
    heads = BankReadHeads.for_unet(net.denoising_unet)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 12, 8, generator=g)
    colours = torch.tensor([[0.8, -0.6, -0.6], [-0.6, -0.6, 0.8]])  # red, blue
    ref = colours[:, [0, 1, 2, 0]].view(2, 4, 1, 1).expand(2, 4, 12, 8).clone()  # a latent "painted" in each colour
    target = colours.view(2, 3, 1, 1).expand(2, 3, 96, 64).clone()
    embeds = torch.zeros(2, 1, 32)  # nothing about the colour in the context: only the bank can tell
    labels = torch.zeros(2, 96, 64, dtype=torch.long)
    labels[:, 10:80] = 3
    opt = torch.optim.Adam([*net.parameters(), *heads.parameters()], lr=3e-3)
    losses = []
    for _ in range(30):
        _, bank = net(latents, torch.tensor([500, 500]), embeds, None,
                      reference={"reference_latents": ref, "image_embeds": embeds, "record_attention": True})
        loss = bank_read_loss(bank, heads, target, labels, labels)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # a head that ignores the bank can at best predict the mean colour: an error of 0.327
    assert losses[-1] < 0.05 and losses[-1] < 0.2 * losses[0], losses


def test_own_character_retrieval():
    from trainer.evaluate import own_character_retrieval

    rng = np.random.default_rng(0)
    truths = [Image.fromarray(rng.integers(0, 255, (12, 8, 3), dtype=np.uint8)) for _ in range(16)]
    perfect = own_character_retrieval(truths, truths)
    assert perfect["retrieval"] == 1 and perfect["sheet_spread"] == pytest.approx(perfect["truth_spread"])
    same = own_character_retrieval([truths[0]] * 16, truths)
    assert same["retrieval"] <= 2 / 8 and same["sheet_spread"] == 0


def test_embedding_dropout_zeroes_only_the_denoisers_context():
    """``embedding_dropout``: a dropped sample's denoiser reads a zero image embedding but still its own bank (the
    ReferenceNet keeps the embedding); the others are predicted exactly as without it."""
    from diffusers import DDPMScheduler

    from trainer.train_standardize import denoise

    c = tiny_stage1_components(0)
    net = StandardizeNet(c["reference_unet"], c["denoising_unet"], c["pose_guider"], c["reference_conditioner"])
    g = torch.Generator().manual_seed(0)
    inputs = {"target": torch.randn(2, 4, 12, 8, generator=g), "reference_latents": torch.randn(2, 4, 12, 8, generator=g),
              "embeds": torch.randn(2, 1, 32, generator=g), "background": torch.rand(2, 1, 96, 64, generator=g),
              "reference_pose": torch.rand(2, 3, 96, 64, generator=g), "target_pose": None}
    noise, t, keep = torch.randn(2, 4, 12, 8, generator=g), torch.tensor([100, 900]), torch.tensor([True, True])
    scheduler = DDPMScheduler()
    with torch.no_grad():
        both, _ = denoise(net, scheduler, inputs, noise, t, keep)
        dropped, _ = denoise(net, scheduler, inputs, noise, t, keep, keep_embedding=torch.tensor([True, False]))
        noisy = scheduler.add_noise(inputs["target"], noise, t)
        bank = net.encode_reference(inputs["reference_latents"], inputs["embeds"], inputs["background"],
                                    inputs["reference_pose"])
        context = inputs["embeds"].clone()
        context[1] = 0
        expected = net(noisy, t, context, None, bank)
    torch.testing.assert_close(dropped[0], both[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dropped, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dropped[1], both[1], atol=1e-4)  # the embedding mattered, and was dropped

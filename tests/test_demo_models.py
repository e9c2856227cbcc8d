"""The shipped demo models (assets/models/demo, made by `python -m trainer.make_demo`): they load offline through the
same pipeline classes as `full`, fit the size budget, carry their model card, and run deterministically with inputs
that matter, Stage I draws what a sheet is (white ground, a figure where the standard pose puts it) and tells the
bundled characters apart. The rest of their quality is measured in the model card, not asserted here: the shipped
CPU-session models are below the demo-models issue's targets and, on PSNR/SSIM, the mean-standard baseline."""

import json

import numpy as np
import pytest

from engine.presets import DEMO_MODELS_DIR

CARD = DEMO_MODELS_DIR / "model_card.json"


@pytest.fixture(scope="module")
def demo():
    from engine import load_engine

    return load_engine("demo", device="cpu")


@pytest.fixture(scope="module")
def samples():
    from trainer.synthetic import render_sample
    from trainer.synthetic.character import character_ids

    return [render_sample(cid, 5, (128, 192)) for cid in character_ids("test", 2)]


def test_demo_models_fit_the_budget_and_carry_a_card():
    size = sum(f.stat().st_size for f in DEMO_MODELS_DIR.rglob("*") if f.is_file())
    assert size <= 40 * 2**20
    card = json.loads(CARD.read_text())
    quality = card["quality_stage1"]
    assert quality["n"] >= 20 and {"psnr", "ssim", "baseline_psnr", "baseline_ssim"} <= set(quality)
    assert card["timings"] and card["budgets"]["standardize"]["samples"] > 0
    assert f"{quality['psnr']:.2f}" in (DEMO_MODELS_DIR / "README.md").read_text()
    panels = card["panels"]  # the evaluation protocol's two-stage row and the base VAE's ceiling, measured at packaging
    assert panels["characters"] >= 5 and panels["seeds"] >= 4
    ceiling = panels["vae_ceiling"]["through_vae"]["appearance_acc"]
    assert 0 < panels["appearance_acc"] < ceiling < panels["vae_ceiling"]["rendered"]["appearance_acc"]
    card_text = (DEMO_MODELS_DIR / "README.md").read_text()
    assert f"| {panels['appearance_acc']:.3f} | {panels['text_acc']:.3f} |" in card_text


def test_demo_loads_every_component_from_the_shipped_folder(demo):
    report = demo.describe()
    assert "preset demo" in report
    for name in ("sdxl", "image_encoder", "adapter", "standardize", "pose_detector", "mask_detector"):
        line = next(line for line in report.splitlines() if line.startswith(name + " "))
        assert str(DEMO_MODELS_DIR) in line


def test_demo_stage1_is_deterministic_and_reads_the_reference(demo, samples):
    first = demo.standardize_reference(samples[0].image, seed=0).sheet
    again = demo.standardize_reference(samples[0].image, seed=0).sheet
    other = demo.standardize_reference(samples[1].image, seed=0).sheet
    assert first.size == (128, 192)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert np.abs(np.asarray(first, np.float32) - np.asarray(other, np.float32)).mean() > 1


def test_demo_stage1_draws_a_sheet_white_ground_and_standard_figure(demo, samples):
    """The sheet's border is white and its figure covers the standard render's figure (an epsilon-trained Stage I,
    the first shipped, sampled noise and fails both)."""
    for sample in samples:
        sheet = np.asarray(demo.standardize_reference(sample.image, seed=0).sheet, np.float32)
        border = np.concatenate([part.reshape(-1, 3) for part in (sheet[:8], sheet[-8:], sheet[:, :8], sheet[:, -8:])])
        assert border.mean() > 245
        drawn, truth = sheet.mean(-1) < 200, np.asarray(sample.standard_mask) > 127
        assert (drawn & truth).sum() / (drawn | truth).sum() > 0.4


def test_demo_panels_are_deterministic_and_follow_prompt_and_sheet(demo, samples):
    prompts = ["standing, front view, full body, on a beach", "standing, front view, full body, in the snow"]
    sheet, other_sheet = samples[0].standard, samples[1].standard
    first = demo.generate_panels(prompts, sheet=sheet, seeds=[3, 3]).images
    again = demo.generate_panels(prompts, sheet=sheet, seeds=[3, 3]).images
    swapped = demo.generate_panels(prompts, sheet=other_sheet, seeds=[3, 3]).images
    as_array = [np.asarray(im, np.float32) for im in (*first, *again, *swapped)]
    assert np.array_equal(as_array[0], as_array[2]) and np.array_equal(as_array[1], as_array[3])  # same call, same
    assert np.abs(as_array[0] - as_array[1]).mean() > 1  # the text matters
    assert np.abs(as_array[0] - as_array[4]).mean() > 0.5  # the sheet matters


def test_demo_base_guides_against_the_empty_prompt_it_trained_on(demo):
    """The demo base learned its unconditional prediction from the empty prompt's encoding (train_text_to_image), so
    guidance must subtract that, not SDXL's zeroed embeddings (with zeros every colour went blue and orange)."""
    assert demo.personalize.config.force_zeros_for_empty_prompt is False


def test_demo_stage1_tells_the_bundled_characters_apart(demo):
    """Kai (navy top, jeans), Leo (green top, purple skirt) and Mia get sheets a person tells apart at one seed (the
    demo-models issue: mean absolute difference >= 6 of 255 for every pair; the sheets of the Stage I shipped before
    the attribute-supervised encoder differed by 0.7 for Kai and Leo)."""
    from PIL import Image

    from engine.presets import ASSETS_DIR

    sheets = {name: np.asarray(demo.standardize_reference(Image.open(ASSETS_DIR / "examples" / f"{name}.png")
                                                          .convert("RGB"), seed=0).sheet, np.float32)
              for name in ("kai", "leo", "mia")}
    for a, b in (("kai", "leo"), ("kai", "mia"), ("leo", "mia")):
        assert np.abs(sheets[a] - sheets[b]).mean() >= 6, (a, b)
    card = json.loads(CARD.read_text())
    assert min(card["bundled"]["sheet_differences"].values()) >= 6
    assert card["quality_stage1"]["retrieval"] > 2 * card["quality_stage1"]["retrieval_chance"]


def test_demo_refuses_pictures_without_a_person(demo):
    """The demo pose detector learned "no person" from negatives (scenes, animals, things, textures): held-out
    pictures without people are refused with the engine's message, the bundled characters are not."""
    from PIL import Image

    from trainer.synthetic import render_sample, without_person
    from trainer.synthetic.character import character_ids

    refused = 0
    for i, cid in enumerate(character_ids("test", 30)):
        try:
            demo.standardize_reference(without_person(render_sample(cid, 50_000 + i, (128, 192))).image,
                                       num_inference_steps=1)
        except ValueError as exc:
            assert "no person found" in str(exc)
            refused += 1
    assert refused >= 28  # 0.993 on 300 held-out negatives (docs/training.md)
    for name in ("kai", "leo", "mia"):
        demo.standardize_reference(Image.open(DEMO_MODELS_DIR.parent.parent / "examples" / f"{name}.png"),
                                   num_inference_steps=1)


def test_demo_refuses_real_photos_without_a_person_and_finds_real_people(demo):
    """Real photographs the detector never trained on: the issue's cat, a cheetah cub and a motorcycle get the
    engine's "no person found"; the two photographs of people get a sheet (the tower, which still passes, is the
    documented miss in docs/training.md)."""
    from trainer.train_detectors import held_out_photo

    for name in ("chelsea", "cheetah2.jpg", "stereo_motorcycle"):
        with pytest.raises(ValueError, match="no person found"):
            demo.standardize_reference(held_out_photo(name), num_inference_steps=1)
    for name in ("astronaut", "camera"):
        demo.standardize_reference(held_out_photo(name), num_inference_steps=1)


def test_demo_colour_correction_brings_the_sheets_tops_closer_to_the_characters(demo, monkeypatch):
    """The preset's colour_match (0.5) after the shipped Stage I: on 8 held-out test characters (scenes, ground-truth
    mask and pose, as the card measures) the top's median colour in the sheet is closer to the truth's than the model
    alone draws it (measured: mean error 24 against 34 of 255), and the card reports both."""
    from engine.pipelines import standardize as standardize_module
    from trainer.synthetic import render_sample
    from trainer.synthetic.character import character_ids
    from trainer.synthetic.figure import LABELS

    # the correction runs after the model on its decoded sheet: one call gives both, the model's sheet as it reaches
    # match_colours (what colour_match=0 returns, the same seed's same latents) and the corrected one
    before = []
    real = standardize_module.match_colours
    monkeypatch.setattr(standardize_module, "match_colours",
                        lambda sheet, hint, strength: before.append(sheet.clone()) or real(sheet, hint, strength))
    assert demo.preset.standardize_defaults["colour_match"] == 0.5
    errors = {0.0: [], 0.5: []}
    for i, cid in enumerate(character_ids("test", 8)):
        sample = render_sample(cid, 50_000 + i, (128, 192))
        top = np.asarray(sample.standard_labels) == LABELS["top"]
        truth = np.median(np.asarray(sample.standard, np.float32)[top], axis=0)
        sheet = demo.standardize_reference(sample.image, mask=np.asarray(sample.mask, np.float32) / 255.0,
                                           reference_pose=sample.keypoints, seed=i, colour_match=0.5).sheet
        alone = demo.standardize._postprocess(before.pop(), "pil")
        for strength, drawn in ((0.5, sheet), (0.0, alone)):
            drawn = np.median(np.asarray(drawn, np.float32)[top], axis=0)
            errors[strength].append(np.abs(drawn - truth).mean())
    assert np.mean(errors[0.5]) < 0.85 * np.mean(errors[0.0]), errors
    card = json.loads(CARD.read_text())["quality_stage1"]
    assert card["colour_match"] == 0.5 and card["appearance_acc"] > card["model_alone"]["appearance_acc"]


def test_the_shipped_stage1_draws_each_character_at_its_own_height(demo):
    """The demo Stage I was trained on each character's own standard pose (its height and build); the shipped
    pipeline estimates it from the reference's keypoints where they are given, and its mask (``pose_estimator``).
    On 8 held-out test characters (scenes, ground-truth mask and pose, as the card measures) the estimated poses
    are nearer the truth's than the average body's, the sheets' figures grow with the characters (their heights
    follow the truth's; with the average body's pose for every character they did not: correlation -0.06 on the
    card's 40, 2026-12-05), and the sheets meet the PSNR and SSIM targets of a CPU run."""
    from trainer.synthetic import render_sample
    from trainer.synthetic.character import character_ids

    from engine.preprocess.standard import standard_keypoints, standard_pose_map

    stage1 = demo.standardize
    assert stage1.pose_estimator is not None
    from trainer.evaluate import psnr, ssim

    estimated, average, drawn, truth, scores = [], [], [], [], []
    for i, cid in enumerate(character_ids("test", 8)):
        sample = render_sample(cid, 50_000 + i, (128, 192))
        true_kp = sample.standard_keypoints[:, :2]
        mask = np.asarray(sample.mask, np.float32) / 255.0
        estimate = stage1.pose_estimator.keypoints(sample.keypoints, (128, 192), mask)
        estimated.append(np.abs(estimate[:, :2] - true_kp).mean())
        average.append(np.abs(standard_keypoints((128, 192))[:, :2] - true_kp).mean())
        sheet = demo.standardize_reference(sample.image, mask=mask, reference_pose=sample.keypoints, seed=i).sheet
        scores.append((psnr(sheet, sample.standard), ssim(sheet, sample.standard)))
        figure = (255 - np.asarray(sheet, np.int16)).max(-1) > 40  # not white
        rows = np.flatnonzero(figure.any(1))
        drawn.append(rows.max() - rows.min())
        rows = np.flatnonzero(np.asarray(sample.standard_mask).any(1))
        truth.append(rows.max() - rows.min())
    assert np.mean(estimated) < 0.7 * np.mean(average), (estimated, average)
    # from the demo detector's keypoints (off by about 6% of the figure) the pipeline keeps the average body's pose
    detected = demo.standardize_reference(sample.image, num_inference_steps=1)
    assert np.array_equal(np.asarray(detected.target_pose_map), np.asarray(standard_pose_map((128, 192))))
    assert np.corrcoef(drawn, truth)[0, 1] > 0.5, (drawn, truth)
    # the CPU targets for PSNR and SSIM hold on these 8 as on the card's 40 (21.45 dB / 0.887 measured here
    # when shipped on 2026-12-06; 21.24 / 0.883 on the card; the decoder shipped before read 20.33 / 0.844 there)
    psnr_mean, ssim_mean = np.mean(scores, 0)
    assert psnr_mean >= 20.0 and ssim_mean >= 0.85, scores

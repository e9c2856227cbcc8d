"""trainer.latent_basis: the colour-stretching latent basis, folded into a VAE and into a trained Stage I."""

import copy
import tempfile
import numpy as np
import pytest
import torch

from tests.components import tiny_stage1_components
from trainer.latent_basis import colour_boost, encode_posteriors, fold_into_stage1, fold_into_vae


def _anisotropic_latents(n=4000, seed=0):
    """Latent vectors whose principal variances are 0.01, 0.02, 0.7 and 3.0 along a random rotation."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    scales = torch.tensor([0.01, 0.02, 0.7, 3.0], dtype=torch.float64).sqrt()
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) * scales @ q.T + torch.tensor([1.0, -0.5, 0.3, 2.0],
                                                                                             dtype=torch.float64)
    return x.float(), q.float()


def test_colour_boost_raises_the_quiet_directions_to_the_floor_and_leaves_the_others():
    latents, q = _anisotropic_latents()
    w = colour_boost(latents, floor=0.5)
    torch.testing.assert_close(w, w.T)
    before = np.sort(np.linalg.eigvalsh(np.cov(latents.numpy().T)))
    after = np.sort(np.linalg.eigvalsh(np.cov((latents @ w.T).numpy().T)))
    np.testing.assert_allclose(after[:2], [0.5, 0.5], rtol=1e-3)  # stretched to the floor
    np.testing.assert_allclose(after[2:], before[2:], rtol=1e-3)  # untouched
    for k in (2, 3):  # the loud directions pass through W unchanged
        torch.testing.assert_close(w @ q[:, k], q[:, k], atol=0.02, rtol=0)
    torch.testing.assert_close(colour_boost(latents, floor=1e-4), torch.eye(4), atol=1e-5, rtol=0)  # nothing quiet


def test_a_folded_vae_encodes_to_the_new_basis_and_decodes_the_same_image():
    vae = tiny_stage1_components()["vae"]
    folded = copy.deepcopy(vae)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 64, 48, generator=g) * 2 - 1
    w = torch.tensor([[2.0, 0.5, 0, 0], [0.5, 3.0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    means, var = encode_posteriors(vae, images, batch=2)  # two batches, one of them short
    fold_into_vae(folded, w, var)
    with torch.no_grad():
        old, new = vae.encode(images).latent_dist, folded.encode(images).latent_dist
        torch.testing.assert_close(means, old.mean * vae.config.scaling_factor)
        torch.testing.assert_close(var, old.var.mean((0, 2, 3)))
        torch.testing.assert_close(new.mean, torch.einsum("dc,bchw->bdhw", w, old.mean), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(folded.decode(new.mean).sample, vae.decode(old.mean).sample, atol=1e-5, rtol=1e-4)
        # the posterior's spread: the old mean variance carried through W, the same at every position
        torch.testing.assert_close(new.var, ((w ** 2) @ var).view(1, 4, 1, 1).expand_as(new.var), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="quant_conv"):
        vae.register_to_config(use_quant_conv=False)
        fold_into_vae(vae, w)


def test_a_folded_stage1_reads_the_same_bank_and_predicts_w_times_what_it_did():
    """Given the same reference and the same noisy sheet, each written in the new basis (z' = W z, noise W e), the
    folded Stage I fills the same bank and predicts W times its old prediction, at every timestep."""
    from engine.models.stage1 import ReferenceConditioner, StandardizeNet

    c = tiny_stage1_components()
    conditioner = ReferenceConditioner.for_unet(c["reference_unet"], pose_block_out_channels=(8, 8, 16, 16),
                                                pose_embedding_channels=16, use_reference_latent=True)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in conditioner.parameters():  # zero-initialised parts made non-zero so that every fold matters
            p.add_(0.1 * torch.randn_like(p))
        for p in c["pose_guider"].conv_out.parameters():
            p.add_(0.1 * torch.randn_like(p))
    net = StandardizeNet(c["reference_unet"], c["denoising_unet"], c["pose_guider"], conditioner).eval()
    folded = copy.deepcopy(net)
    w = colour_boost(torch.randn(500, 4) * torch.tensor([0.1, 1.0, 0.05, 2.0]), floor=0.8)
    assert w.diagonal().max() > 3  # a real stretch
    fold_into_stage1(folded, w)

    def rotate(x):
        return torch.einsum("dc,bchw->bdhw", w, x)

    z_ref, z, noise = torch.randn(2, 4, 8, 6), torch.randn(2, 4, 8, 6), torch.randn(2, 4, 8, 6)
    embeds, pose = torch.randn(2, 1, 32), torch.rand(2, 3, 64, 48)
    background = (torch.rand(2, 1, 64, 48) > 0.5).float()
    with torch.no_grad():
        bank = net.encode_reference(z_ref, embeds, background, pose)
        bank_f = folded.encode_reference(rotate(z_ref), embeds, background, pose)
        for name, features in bank.features.items():
            torch.testing.assert_close(bank_f.features[name], features, atol=1e-4, rtol=1e-4)
        for a, s in ((1.0, 0.0), (0.8, 0.6), (0.0, 1.0)):
            t = torch.tensor([10, 500])
            old = net(a * z + s * noise, t, embeds, pose, bank=bank)
            new = folded(a * rotate(z) + s * rotate(noise), t, embeds, pose, bank=bank_f)
            torch.testing.assert_close(new, rotate(old), atol=1e-4, rtol=1e-4)
            assert (new - old).abs().max() > 1e-2  # the prediction is in the new basis, not the old one


def test_basis_between_recovers_the_fold_and_refuses_unrelated_vaes():
    from trainer.latent_basis import basis_between

    vae = tiny_stage1_components()["vae"]
    folded = copy.deepcopy(vae)
    w = torch.tensor([[2.0, 0.5, 0, 0], [0.5, 3.0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.5]])
    fold_into_vae(folded, w, torch.full((4,), 1e-4))
    torch.testing.assert_close(basis_between(vae, folded), w, atol=1e-4, rtol=1e-4)
    assert basis_between(vae, copy.deepcopy(vae)) is None
    with pytest.raises(ValueError, match="encoder"):
        basis_between(vae, tiny_stage1_components(seed=5)["vae"])


def test_a_decoder_fitted_in_the_old_basis_follows_a_folded_stage1():
    """adopt_decoder: Stage I's own decoder was fitted to the old basis; given a pipeline whose VAE is folded, it is
    folded the same way before it is swapped in, so the pipeline decodes a latent as that decoder decoded W^-1 of it."""
    from engine.pipelines import StandardizePipeline
    from trainer.common import adopt_decoder

    c = tiny_stage1_components()
    decoder = copy.deepcopy(c["vae"])
    with torch.no_grad():
        for p in decoder.decoder.parameters():  # a decoder-only fine-tune: same encoder, other decoder
            p.add_(0.05 * torch.randn_like(p))
    w = torch.tensor([[2.0, 0.5, 0, 0], [0.5, 3.0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.5]])
    fold_into_vae(c["vae"], w, torch.full((4,), 1e-4))
    pipe = StandardizePipeline(**c)
    with tempfile.TemporaryDirectory() as folder:
        decoder.save_pretrained(folder)
        assert adopt_decoder(pipe, folder, strict=True)
    z = torch.randn(1, 4, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(pipe.vae.decode(z).sample,
                                   decoder.decode(torch.einsum("dc,bchw->bdhw", torch.linalg.inv(w), z)).sample,
                                   atol=1e-4, rtol=1e-4)


def test_evaluate_stage1_measures_a_folded_run_with_the_shipped_decoder(tmp_path, monkeypatch, capsys):
    """``python -m trainer.evaluate stage1 --decoder VAE``: a training run's pipeline (folded into a basis) is measured
    through Stage I's own decoder, folded the same way; a VAE of another latent space is refused in one line."""
    from engine.pipelines import StandardizePipeline
    from trainer import evaluate

    c = tiny_stage1_components()
    decoder = copy.deepcopy(c["vae"])
    with torch.no_grad():
        for p in decoder.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    decoder.save_pretrained(tmp_path / "decoder")
    tiny_stage1_components(seed=5)["vae"].save_pretrained(tmp_path / "unrelated")
    w = torch.tensor([[2.0, 0.5, 0, 0], [0.5, 3.0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.5]])
    fold_into_vae(c["vae"], w, torch.full((4,), 1e-4))
    StandardizePipeline(**c).save_pretrained(tmp_path / "run")
    measured = []
    monkeypatch.setattr(evaluate, "standardization_quality", lambda pipe, *a, **k: measured.append(pipe) or ({}, []))
    monkeypatch.setattr(evaluate, "vae_ceiling", lambda *a, **k: {})
    args = ["stage1", "--standardize", str(tmp_path / "run"), "--n", "1", "--reading", "0", "--size", "48x64"]
    assert evaluate.main(args + ["--decoder", str(tmp_path / "decoder")]) == 0
    z = torch.randn(1, 4, 8, 6)
    with torch.no_grad():
        torch.testing.assert_close(measured[0].vae.decode(z).sample,
                                   decoder.decode(torch.einsum("dc,bchw->bdhw", torch.linalg.inv(w), z)).sample,
                                   atol=1e-4, rtol=1e-4)
    with pytest.raises(SystemExit):
        evaluate.main(args + ["--decoder", str(tmp_path / "unrelated")])
    assert "--decoder: " in capsys.readouterr().err and len(measured) == 1
    with pytest.raises(SystemExit):
        evaluate.main(args + ["--decoder", str(tmp_path / "missing")])
    assert "missing is not a VAE folder" in capsys.readouterr().err

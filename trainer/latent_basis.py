"""A latent basis in which the colours are as loud as the shapes.

The demo VAE spends its latent variance on brightness and layout: over the synthetic world its (scaled) latents have
two principal directions with variance 0.017-0.021 against 0.63 and 2.9 for the others, and those two carry the hue
(docs/training.md, "Weighting the loss toward the colour directions"). Under the diffusion noise a direction's
signal-to-noise ratio scales with its variance, so at every timestep the hue is about 50 times more drowned than the
shape; even the sampler's last steps see it under more noise than signal, and the sheet's colours come from one guess
instead of twenty refinements.

``colour_boost`` computes a linear map ``z' = W z`` that stretches every principal direction whose variance is under
``floor`` up to ``floor`` and leaves the others exactly as they are. It is linear, not affine (the stretch is about
the origin, so the latents' mean moves along the stretched directions): zero stays zero, so a convolution's zero
padding means the same in both bases and the folds below are exact at the borders too.

``fold_into_vae`` builds W into a VAE's ``quant_conv``/``post_quant_conv``, so the pipelines stay as they are: the VAE
simply encodes to, and decodes from, the new basis (encode -> decode gives the same image). ``fold_into_stage1``
rewrites a trained Stage I's input and output convolutions so that it starts from what it computed in the old basis:
exactly for the ReferenceNet and the reference-latent path (clean latents); the denoiser sees the old signal with
less noise along the stretched directions (the diffusion noise is isotropic in the new basis), which training adapts
it to. ``basis_between`` recovers W from two VAEs (an init's and the config's, a pipeline's and a decoder fitted in
the old basis), so a folded Stage I carries its basis in its own VAE and needs no side file.
"""
from __future__ import annotations

import torch
from torch import nn


def colour_boost(latents: torch.Tensor, floor: float) -> torch.Tensor:
    """latents (N, C) scaled latent vectors -> W (C, C): each principal direction's variance raised to at least
    ``floor``; directions already above it are untouched (W is symmetric, the identity on them)."""
    eigvals, eigvecs = torch.linalg.eigh(torch.cov(latents.double().T))
    gains = (floor / eigvals.clamp_min(1e-12)).clamp_min(1.0).sqrt()
    return (eigvecs @ torch.diag(gains) @ eigvecs.T).float()


@torch.no_grad()
def encode_posteriors(vae, images: torch.Tensor, batch: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` (N, 3, H, W) in [-1, 1], encoded in batches on the VAE's device and dtype, once -> (the posterior
    means scaled by the VAE's scaling factor, as the trainers scale latents; the mean posterior variance per channel,
    unscaled, ``fold_into_vae``'s ``posterior_var``)."""
    means, variances = [], []
    for i in range(0, len(images), batch):
        dist = vae.encode(images[i:i + batch].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean)
        variances.append(dist.var.mean((2, 3)))
    return torch.cat(means) * vae.config.scaling_factor, torch.cat(variances).mean(0)


@torch.no_grad()
def fold_into_vae(vae, w: torch.Tensor, posterior_var: torch.Tensor | None = None) -> None:
    """In place: ``vae`` encodes to ``W z`` and decodes from it. With ``posterior_var`` (the old mean variance per
    channel, ``encode_posteriors``) the posterior's log-variance becomes that variance carried through W, a constant
    per channel (a rotation mixes the channels; only the trainers draw samples of the posterior)."""
    if not (vae.config.use_quant_conv and vae.config.use_post_quant_conv):
        raise ValueError("fold_into_vae needs a VAE with quant_conv and post_quant_conv")
    c = w.shape[0]
    qc, pq = vae.quant_conv, vae.post_quant_conv
    w = w.to(qc.weight)
    qc.weight[:c, :, 0, 0] = w @ qc.weight[:c, :, 0, 0]
    qc.bias[:c] = w @ qc.bias[:c]
    if posterior_var is not None:
        qc.weight[c:] = 0
        qc.bias[c:] = ((w ** 2) @ posterior_var.to(w)).log()
    pq.weight[:, :, 0, 0] = pq.weight[:, :, 0, 0] @ torch.linalg.inv(w)


@torch.no_grad()
def _fold_input(conv: nn.Conv2d, w: torch.Tensor, channels: slice = slice(0, None)) -> None:
    """conv(z) == conv'(W z) on the latent channels ``channels`` of its input."""
    w_inv = torch.linalg.inv(w.to(conv.weight))
    conv.weight[:, channels] = torch.einsum("ocij,cd->odij", conv.weight[:, channels], w_inv)


@torch.no_grad()
def fold_into_stage1(net, w: torch.Tensor) -> None:
    """In place: a trained Stage I (``StandardizeNet``) moved to the basis ``W z``: the ReferenceNet's and the
    denoiser's ``conv_in`` and the reference-latent path read ``W^-1 z'``, the denoiser predicts ``W v``. Exact for the
    reference side; for the denoiser exact up to how it tells signal from noise (see the module docstring)."""
    c = w.shape[0]
    _fold_input(net.reference_unet.conv_in, w, slice(0, c))
    conditioner = net.conditioner
    if conditioner is not None and conditioner.config.use_reference_latent:
        for conv in conditioner.latent_projections:
            _fold_input(conv, w)
    _fold_input(net.denoising_unet.conv_in, w, slice(0, c))
    out = net.denoising_unet.conv_out
    w = w.to(out.weight)
    out.weight.copy_(torch.einsum("dc,cnij->dnij", w, out.weight))
    out.bias.copy_(w @ out.bias)


def _same_encoder(a, b, tol: float = 1e-3) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith("encoder.")]
    return all(k in sb and sa[k].shape == sb[k].shape
               and torch.allclose(sa[k].float(), sb[k].float(), rtol=tol, atol=tol) for k in keys)


@torch.no_grad()
def basis_between(old_vae, new_vae, tol: float = 1e-3) -> torch.Tensor | None:
    """W such that ``new_vae`` encodes to W times what ``old_vae`` encodes to, where ``new_vae`` is ``old_vae`` (or a
    decoder fine-tune of it) folded into a basis (``fold_into_vae``); None where both encode alike. Raises ValueError
    where the two do not share an encoder, or their latents are not related by a linear map (up to ``tol``, fp16
    weights)."""
    if not _same_encoder(old_vae, new_vae, tol) or old_vae.config.scaling_factor != new_vae.config.scaling_factor:
        raise ValueError("the two VAEs do not share an encoder and scaling factor: their latent spaces are unrelated")
    c = old_vae.config.latent_channels
    old = torch.cat([old_vae.quant_conv.weight[:c, :, 0, 0], old_vae.quant_conv.bias[:c, None]], 1).double()
    new = torch.cat([new_vae.quant_conv.weight[:c, :, 0, 0], new_vae.quant_conv.bias[:c, None]], 1).double()
    scale = old.abs().max()
    if torch.allclose(old, new, rtol=0, atol=tol * float(scale)):
        return None
    w = new @ torch.linalg.pinv(old)
    if (w @ old - new).abs().max() > tol * 4 * float(new.abs().max()):
        raise ValueError("the two VAEs' latents are not related by a linear map: not one VAE folded into a new basis")
    return w.float()

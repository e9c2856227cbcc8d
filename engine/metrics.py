"""Image quality metrics shared by the trainer, the benchmarks and the studio (numpy + scikit-image)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {array.dtype}")
    return array


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (inf when identical)."""
    x, y = _array(a).astype(np.float64), _array(b).astype(np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    mse = np.mean((x - y) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def ssim(a, b) -> float:
    """Structural similarity (Gaussian-weighted, as in Wang et al. 2004) of two uint8 RGB images."""
    from skimage.metrics import structural_similarity

    x, y = _array(a), _array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    return float(structural_similarity(x, y, channel_axis=-1 if x.ndim == 3 else None, data_range=255,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


# ---------------------------------------------------------------------------------------------------- paper metrics


def remove_background(image, mask, fill=(255, 255, 255)) -> Image.Image:
    """The figure on a plain background (the paper scores CLIP-I on background-removed images)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else _array(image), np.float32)
    m = np.asarray(mask, np.float32)
    if m.max() > 1.0:
        m = m / 255.0
    if m.shape != rgb.shape[:2]:
        raise ValueError(f"mask {m.shape} does not match image {rgb.shape[:2]}")
    out = rgb * m[..., None] + np.array(fill, np.float32) * (1 - m[..., None])
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _cosine_matrix(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True).clip(1e-12)
    return a @ b.T


class ClipScorer:
    """CLIP-I, CLIP-T and AP-CLIP-I (x100, as the paper reports them) with any transformers ``CLIPModel``
    (OpenCLIP ViT-H/14 in ``full``: laion/CLIP-ViT-H-14-laion2B-s32B-b79K; tiny random ones in tests)."""

    def __init__(self, model, processor, tokenizer, device="cpu", pad_square: bool = False):
        self.model, self.processor, self.tokenizer, self.device = model.eval().to(device), processor, tokenizer, device
        # pad_square: pad with white to a square first (how the demo CLIP was trained), instead of the processor's
        # centre crop, which cuts a 2:3 panel's head and feet
        self.pad_square = pad_square

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", **kwargs) -> "ClipScorer":
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        return cls(CLIPModel.from_pretrained(path, **kwargs), CLIPImageProcessor.from_pretrained(path, **kwargs),
                   CLIPTokenizer.from_pretrained(path, **kwargs), device)

    def image_features(self, images) -> np.ndarray:
        import torch

        with torch.no_grad():
            images = [im.convert("RGB") for im in images]
            if self.pad_square:
                from .preprocess.image import pad_to_square

                images = [pad_to_square(im) for im in images]
            pixels = self.processor(images, return_tensors="pt").pixel_values
            out = self.model.get_image_features(pixel_values=pixels.to(self.device))
            out = getattr(out, "pooler_output", out)
        return out.float().cpu().numpy()

    def text_features(self, texts) -> np.ndarray:
        import torch

        with torch.no_grad():
            tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt")
            out = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                               attention_mask=tokens.attention_mask.to(self.device))
            out = getattr(out, "pooler_output", out)
        return out.float().cpu().numpy()

    def clip_i(self, images, references) -> np.ndarray:
        """Per pair: 100 x cosine of image i and reference i."""
        a, b = self.image_features(images), self.image_features(references)
        return 100 * np.diag(_cosine_matrix(a, b))

    def clip_t(self, images, texts) -> np.ndarray:
        a, b = self.image_features(images), self.text_features(texts)
        return 100 * np.diag(_cosine_matrix(a, b))

    def ap_clip_i(self, images) -> float:
        """Mean pairwise CLIP-I over one character's panels (serial consistency)."""
        return average_pairwise(self.image_features(images)) * 100


def average_pairwise(features: np.ndarray) -> float:
    """Mean cosine over all distinct pairs of rows."""
    n = len(features)
    if n < 2:
        raise ValueError("average pairwise similarity needs at least two images")
    sims = _cosine_matrix(features, features)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


# ---------------------------------------------------------------------------------------------------- faces


def face_crop(image: Image.Image, keypoints: np.ndarray, size: int = 112) -> Image.Image | None:
    """A square face crop from OpenPose keypoints (eyes, nose, ears), or None when no face is visible."""
    kp = np.asarray(keypoints, float)
    face = [i for i in (0, 14, 15, 16, 17) if kp[i, 2] > 0]
    if len(face) < 2:
        return None
    pts = kp[face, :2]
    center = pts.mean(0)
    span = max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1]), 1.0) * 2.4
    box = (center[0] - span / 2, center[1] - span / 2 * 0.9, center[0] + span / 2, center[1] + span / 2 * 1.1)
    return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC, box=tuple(map(float, box)))


class ArcFaceEmbedder:
    """ArcFace embeddings through onnxruntime (insightface's w600k_r50.onnx layout: (1, 3, 112, 112) in
    [-1, 1] -> (1, 512)). With the ``insightface`` package, ``from_insightface`` uses its own detector + model."""

    def __init__(self, onnx_path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def __call__(self, face: Image.Image) -> np.ndarray:
        x = (np.asarray(face.convert("RGB").resize((112, 112)), np.float32) - 127.5) / 127.5
        inp = self.session.get_inputs()[0]
        return self.session.run(None, {inp.name: x.transpose(2, 0, 1)[None]})[0][0]


def face_similarity(embed, a: Image.Image | None, b: Image.Image | None) -> float | None:
    """Cosine of two face crops' embeddings (None when either has no face)."""
    if a is None or b is None:
        return None
    ea, eb = np.asarray(embed(a), np.float64), np.asarray(embed(b), np.float64)
    return float(ea @ eb / max(1e-12, np.linalg.norm(ea) * np.linalg.norm(eb)))

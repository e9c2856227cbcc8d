"""Pluggable detectors for Stage I: a pose detector (-> OpenPose-18 keypoints) and a mask detector (-> foreground).

``full``: DWPose through onnxruntime (yolox_l.onnx person detector + dw-ll_ucoco_384.onnx whole-body pose from
yzd-v/DWPose) and MODNet human matting (onnx/model.onnx of Xenova/modnet, Apache-2.0) for the mask.
``demo``: the small detectors our trainer makes. Synthetic data uses its ground truth and needs no detector.
Every detector is a callable on an RGB PIL image; a pose detector returns None when it finds no person.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image


class PoseDetector(Protocol):
    def __call__(self, image: Image.Image) -> np.ndarray | None: ...  # (18, 3) x, y, visible or None


class MaskDetector(Protocol):
    def __call__(self, image: Image.Image) -> np.ndarray: ...  # (H, W) float32 foreground in [0, 1]


def _session(path: str | Path):
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"ONNX model {path} does not exist")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=_providers())


def _providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


# COCO-17 (DWPose body) -> OpenPose-18; index 1 (neck) is the mean of the shoulders.
OPENPOSE_FROM_COCO = (0, None, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)


def coco_to_openpose(keypoints: np.ndarray, scores: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """(K>=17, 2) COCO(-wholebody) keypoints and scores -> (18, 3) OpenPose-18 with visibility."""
    out = np.zeros((18, 3))
    for i, j in enumerate(OPENPOSE_FROM_COCO):
        if j is None:
            out[i, :2] = keypoints[[5, 6]].mean(0)
            out[i, 2] = float(scores[5] > threshold and scores[6] > threshold)
        else:
            out[i, :2] = keypoints[j]
            out[i, 2] = float(scores[j] > threshold)
    return out


def _nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    order = scores.argsort()[::-1]
    keep = []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order.size:
        i = order[0]
        keep.append(int(i))
        xx0 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy0 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx1 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy1 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.clip(xx1 - xx0, 0, None) * np.clip(yy1 - yy0, 0, None)
        iou = inter / (area[i] + area[order[1:]] - inter + 1e-9)
        order = order[1:][iou <= threshold]
    return keep


# COCO-WholeBody (133 points) -> our whole-body layout after the 18 body points: left hand 91-111, right hand
# 112-132, face 23-90 (engine.preprocess.pose).
WHOLEBODY_REST = tuple(range(91, 112)) + tuple(range(112, 133)) + tuple(range(23, 91))


def coco_wholebody_to_keypoints(keypoints: np.ndarray, scores: np.ndarray, threshold: float = 0.3) -> np.ndarray:
    """(133, 2) COCO-WholeBody keypoints and scores -> (128, 3): OpenPose-18 body, two hands, 68 face landmarks."""
    rest = np.zeros((len(WHOLEBODY_REST), 3))
    rest[:, :2] = keypoints[list(WHOLEBODY_REST)]
    rest[:, 2] = scores[list(WHOLEBODY_REST)] > threshold
    return np.concatenate([coco_to_openpose(keypoints, scores, threshold), rest])


class DWPoseDetector:
    """DWPose: yolox person boxes, then the whole-body pose of the largest person: (128, 3) body, hands and face
    (what the Animate Anyone weights were trained on), or OpenPose-18 from a body-only pose model.

    Both ONNX models take BGR pictures (the reference code converts with OpenCV before calling them); the RTMPose
    normalisation constants below are applied to BGR as the reference code does."""

    def __init__(self, detector_onnx: str | Path, pose_onnx: str | Path, score_threshold: float = 0.3):
        self.det = _session(detector_onnx)
        self.pose = _session(pose_onnx)
        self.score_threshold = score_threshold

    # --- yolox
    def detect(self, rgb: np.ndarray) -> np.ndarray:
        """Person boxes (N, 4) x0, y0, x1, y1 in image pixels, largest first (``rgb``: the picture as the model
        takes it, BGR for DWPose's yolox)."""
        inp = self.det.get_inputs()[0]
        size = tuple(int(v) for v in inp.shape[2:4])  # (h, w), 640x640 for yolox_l
        h, w = rgb.shape[:2]
        r = min(size[0] / h, size[1] / w)
        padded = np.full((size[0], size[1], 3), 114, np.uint8)
        resized = np.asarray(Image.fromarray(rgb).resize((int(w * r), int(h * r)), Image.Resampling.BILINEAR))
        padded[: resized.shape[0], : resized.shape[1]] = resized
        tensor = padded.transpose(2, 0, 1)[None].astype(np.float32)
        out = self.det.run(None, {inp.name: tensor})[0][0].astype(np.float64)  # (A, 5 + classes)
        grids, strides = [], []
        for stride in (8, 16, 32):
            hs, ws = size[0] // stride, size[1] // stride
            xv, yv = np.meshgrid(np.arange(ws), np.arange(hs))
            grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
            strides.append(np.full((hs * ws, 1), stride))
        grid, stride = np.concatenate(grids), np.concatenate(strides)
        if out.shape[0] != grid.shape[0]:
            raise ValueError(f"person detector returned {out.shape[0]} anchors, expected {grid.shape[0]}")
        xy = (out[:, :2] + grid) * stride
        wh = np.exp(out[:, 2:4]) * stride
        scores = out[:, 4] * out[:, 5]  # objectness x person class
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1) / r
        keep = scores > 0.1
        boxes, scores = boxes[keep], scores[keep]
        if len(boxes) == 0:
            return np.zeros((0, 4))
        idx = [i for i in _nms(boxes, scores, 0.45) if scores[i] > self.score_threshold]
        boxes = boxes[idx]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes[np.argsort(-areas)]

    # --- RTMPose (SimCC)
    def estimate(self, rgb: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inp = self.pose.get_inputs()[0]
        in_h, in_w = (int(v) for v in inp.shape[2:4])  # 384x288 for dw-ll_ucoco_384
        center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
        scale = np.array([box[2] - box[0], box[3] - box[1]]) * 1.25
        aspect = in_w / in_h
        scale = np.array([scale[0], scale[0] / aspect]) if scale[0] > scale[1] * aspect else np.array(
            [scale[1] * aspect, scale[1]])
        x0, y0 = center - scale / 2
        # output pixel (u, v) samples input (x0 + u * sx, y0 + v * sy): a crop + resize, black outside
        crop = Image.fromarray(rgb).transform(
            (in_w, in_h), Image.Transform.AFFINE, (scale[0] / in_w, 0, x0, 0, scale[1] / in_h, y0),
            resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0),
        )
        x = (np.asarray(crop, np.float32) - np.array([123.675, 116.28, 103.53])) / np.array([58.395, 57.12, 57.375])
        simcc_x, simcc_y = self.pose.run(None, {inp.name: x.transpose(2, 0, 1)[None].astype(np.float32)})[:2]
        locs = np.stack([simcc_x[0].argmax(-1), simcc_y[0].argmax(-1)], -1).astype(np.float64) / 2.0  # split ratio 2
        scores = np.minimum(simcc_x[0].max(-1), simcc_y[0].max(-1))
        keypoints = locs / np.array([in_w, in_h]) * scale + center - scale / 2
        return keypoints, scores

    def __call__(self, image: Image.Image) -> np.ndarray | None:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])
        boxes = self.detect(bgr)
        if len(boxes) == 0:
            return None
        keypoints, scores = self.estimate(bgr, boxes[0])
        if len(keypoints) >= 133:
            return coco_wholebody_to_keypoints(keypoints, scores, self.score_threshold)
        return coco_to_openpose(keypoints, scores, self.score_threshold)


class OnnxMattingDetector:
    """Human matting through onnxruntime (MODNet layout: input (1, 3, H, W) in [-1, 1], sides multiples of 32,
    output (1, 1, H, W) alpha)."""

    def __init__(self, onnx_path: str | Path, reference_size: int = 512):
        self.session = _session(onnx_path)
        self.reference_size = reference_size

    def __call__(self, image: Image.Image) -> np.ndarray:
        w, h = image.size
        r = self.reference_size / max(w, h) if max(w, h) > self.reference_size else 1.0
        iw, ih = max(32, int(round(w * r / 32)) * 32), max(32, int(round(h * r / 32)) * 32)
        x = np.asarray(image.convert("RGB").resize((iw, ih), Image.Resampling.BILINEAR), np.float32) / 127.5 - 1.0
        inp = self.session.get_inputs()[0]
        alpha = self.session.run(None, {inp.name: x.transpose(2, 0, 1)[None]})[0][0, 0]
        alpha = Image.fromarray((np.clip(alpha, 0, 1) * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)
        return np.asarray(alpha, np.float32) / 255.0


class OnnxKeypointDetector:
    """A small keypoint regressor (the demo preset's, made by our trainer): input (1, 3, H, W) in [-1, 1] of the
    white-letterboxed image, output (1, 18, 3) = OpenPose-18 (x / W, y / H, visibility probability)."""

    # 0.3: measured on the shipped detectors (held-out renders; 2026-12-01, and again on the one retrained with real
    # photos on 2026-12-02: head-only references found 0.94 vs 0.88 at 0.5, pictures without a person refused 0.99
    # at either, real photos of a cat and a motorcycle refused at either); "no person" when under 2 points pass
    def __init__(self, onnx_path: str | Path, threshold: float = 0.3):
        self.session = _session(onnx_path)
        self.threshold = threshold

    def __call__(self, image: Image.Image) -> np.ndarray | None:
        inp = self.session.get_inputs()[0]
        in_h, in_w = (int(v) for v in inp.shape[2:4])
        w, h = image.size
        r = min(in_w / w, in_h / h)
        resized = image.convert("RGB").resize((max(1, round(w * r)), max(1, round(h * r))), Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (in_w, in_h), (255, 255, 255))
        ox, oy = (in_w - resized.size[0]) // 2, (in_h - resized.size[1]) // 2
        canvas.paste(resized, (ox, oy))
        x = np.asarray(canvas, np.float32) / 127.5 - 1.0
        out = self.session.run(None, {inp.name: x.transpose(2, 0, 1)[None]})[0][0].astype(np.float64)
        kp = np.zeros((18, 3))
        kp[:, 0] = (out[:, 0] * in_w - ox) / r
        kp[:, 1] = (out[:, 1] * in_h - oy) / r
        kp[:, 2] = (out[:, 2] > self.threshold).astype(float)
        return kp if kp[:, 2].sum() >= 2 else None


class WhiteBackgroundMask:
    """A fallback mask detector for drawings on a plain light background: pixels that differ from the border colour.
    Used only where no trained mask detector is configured."""

    def __init__(self, tolerance: float = 30.0):
        self.tolerance = tolerance

    def __call__(self, image: Image.Image) -> np.ndarray:
        rgb = np.asarray(image.convert("RGB"), np.float32)
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        bg = np.median(border, axis=0)
        return (np.abs(rgb - bg).max(-1) > self.tolerance).astype(np.float32)

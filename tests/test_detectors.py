"""DWPose and matting pre/post-processing, run through onnxruntime on tiny graphs with the real signatures."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from engine.preprocess.detectors import (
    OPENPOSE_FROM_COCO,
    DWPoseDetector,
    OnnxMattingDetector,
    WhiteBackgroundMask,
    coco_to_openpose,
)


def constant_model(path, input_name, input_shape, outputs: dict[str, np.ndarray]):
    """A graph whose outputs are constants (+ 0 * mean(input), so the input is used)."""
    nodes = [helper.make_node("ReduceMean", [input_name], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"])]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    graph_outputs = []
    for name, value in outputs.items():
        inits.append(numpy_helper.from_array(value.astype(np.float32), f"{name}_const"))
        nodes.append(helper.make_node("Add", [f"{name}_const", "nothing"], [name]))
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                              input_shape)], graph_outputs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def yolox_output(boxes_letterboxed):
    """(1, 8400, 6) raw yolox output with one confident person per given (cx, cy, w, h) on the 640 canvas."""
    out = np.full((8400, 6), -10.0)
    out[:, 4] = 0.0  # objectness 0
    offset = 80 * 80 + 40 * 40  # stride-32 anchors start here
    for k, (cx, cy, w, h) in enumerate(boxes_letterboxed):
        gx, gy = int(cx // 32), int(cy // 32)
        i = offset + gy * 20 + gx
        out[i] = [cx / 32 - gx, cy / 32 - gy, np.log(w / 32), np.log(h / 32), 0.95 - 0.1 * k, 0.9]
    return out[None]


def simcc_for(crop_points):
    """SimCC outputs (split ratio 2) putting the 17 body keypoints at crop_points (u, v) on the 288x384 crop."""
    sx, sy = np.zeros((1, 133, 576)), np.zeros((1, 133, 768))
    for k, (u, v) in enumerate(crop_points):
        sx[0, k, int(round(2 * u))] = 0.9
        sy[0, k, int(round(2 * v))] = 0.8
    return sx, sy


@pytest.fixture
def dwpose(tmp_path):
    # image 320x480 -> letterbox ratio 640/480; a person box centred at (160, 240) of 120x360 px
    r = 640 / 480
    det = constant_model(tmp_path / "yolox_l.onnx", "images", [1, 3, 640, 640],
                         {"output": yolox_output([(160 * r, 240 * r, 120 * r, 360 * r), (40 * r, 40 * r, 20, 20)])})
    # the crop covers center +- scale/2 with scale = box * 1.25 fixed to 288:384 -> 337.5 x 450
    rng = np.random.default_rng(0)
    crop_points = np.stack([rng.uniform(20, 268, 17), rng.uniform(20, 364, 17)], 1)
    sx, sy = simcc_for(crop_points)
    pose = constant_model(tmp_path / "dw-ll_ucoco_384.onnx", "input", [1, 3, 384, 288],
                          {"simcc_x": sx, "simcc_y": sy})
    return DWPoseDetector(det, pose), crop_points


def test_yolox_boxes_are_decoded_to_image_pixels(dwpose):
    detector, _ = dwpose
    boxes = detector.detect(np.zeros((480, 320, 3), np.uint8))
    assert boxes.shape == (2, 4)
    np.testing.assert_allclose(boxes[0], [100, 60, 220, 420], atol=0.6)  # largest first


def test_dwpose_keypoints_map_back_to_the_image(dwpose):
    detector, crop_points = dwpose
    kp = detector(Image.new("RGB", (320, 480)))
    scale_w, scale_h = 450 * 288 / 384, 450  # box 120x360 * 1.25 = 150x450, widened to 288:384
    expected = crop_points / np.array([288, 384]) * np.array([scale_w, scale_h]) + np.array([160, 240]) \
        - np.array([scale_w, scale_h]) / 2
    for i, j in enumerate(OPENPOSE_FROM_COCO):
        if j is not None:
            np.testing.assert_allclose(kp[i, :2], expected[j], atol=0.6)
    np.testing.assert_allclose(kp[1, :2], (expected[5] + expected[6]) / 2, atol=0.6)  # neck
    assert kp.shape == (128, 3) and kp[:18, 2].all() and not kp[18:, 2].any()  # hands and face scored 0 here


def test_dwpose_gives_hands_and_face_in_our_whole_body_layout(tmp_path):
    r = 640 / 480
    det = constant_model(tmp_path / "yolox_l.onnx", "images", [1, 3, 640, 640],
                         {"output": yolox_output([(160 * r, 240 * r, 120 * r, 360 * r)])})
    crop = np.stack([np.linspace(10, 278, 133), np.linspace(15, 370, 133)], 1)  # COCO-WholeBody point k at crop[k]
    sx, sy = simcc_for(crop)
    pose = constant_model(tmp_path / "p.onnx", "input", [1, 3, 384, 288], {"simcc_x": sx, "simcc_y": sy})
    kp = DWPoseDetector(det, pose)(Image.new("RGB", (320, 480)))
    scale = np.array([450 * 288 / 384, 450])
    image_points = crop / np.array([288, 384]) * scale + np.array([160, 240]) - scale / 2
    np.testing.assert_allclose(kp[18:39, :2], image_points[91:112], atol=0.6)  # left hand
    np.testing.assert_allclose(kp[39:60, :2], image_points[112:133], atol=0.6)  # right hand
    np.testing.assert_allclose(kp[60:128, :2], image_points[23:91], atol=0.6)  # 68 face landmarks
    assert kp[:, 2].all()


def test_dwpose_models_get_bgr_pictures(dwpose):
    detector, _ = dwpose
    seen = {}
    for name in ("det", "pose"):
        session = getattr(detector, name)

        class Spy:
            def __init__(self, session=session, name=name):
                self.session, self.name = session, name

            def get_inputs(self):
                return self.session.get_inputs()

            def run(self, outputs, feeds):
                seen[self.name] = next(iter(feeds.values()))
                return self.session.run(outputs, feeds)

        setattr(detector, name, Spy())
    detector(Image.new("RGB", (320, 480), (250, 10, 10)))  # a red picture
    letterboxed = seen["det"][0, :, 10, 10]
    assert letterboxed[0] < 20 and letterboxed[2] > 240  # channel 0 is blue
    crop = seen["pose"][0, :, 192, 144]
    np.testing.assert_allclose(crop, [(10 - 123.675) / 58.395, (10 - 116.28) / 57.12, (250 - 103.53) / 57.375],
                               atol=0.1)


def test_no_person_returns_none(tmp_path):
    det = constant_model(tmp_path / "d.onnx", "images", [1, 3, 640, 640], {"output": yolox_output([])})
    pose = constant_model(tmp_path / "p.onnx", "input", [1, 3, 384, 288],
                          {"simcc_x": np.zeros((1, 133, 576)), "simcc_y": np.zeros((1, 133, 768))})
    assert DWPoseDetector(det, pose)(Image.new("RGB", (100, 200))) is None


def test_coco_to_openpose_thresholds_and_neck():
    kp = np.arange(34, dtype=float).reshape(17, 2)
    scores = np.full(17, 0.9)
    scores[6] = 0.1
    out = coco_to_openpose(kp, scores)
    assert out[2, 2] == 0 and out[1, 2] == 0 and out[5, 2] == 1  # r_shoulder low -> neck invisible too
    np.testing.assert_allclose(out[14, :2], kp[2])  # r_eye is COCO 2


def test_matting_detector_returns_a_mask_at_image_size(tmp_path):
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1], keepdims=1),
             helper.make_node("Mul", ["m", "k"], ["s"]), helper.make_node("Sigmoid", ["s"], ["output"])]
    graph = helper.make_graph(
        nodes, "matte", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 1, "h", "w"])],
        [numpy_helper.from_array(np.array(-10.0, np.float32), "k")])
    path = tmp_path / "modnet.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    img = Image.new("RGB", (300, 500), (255, 255, 255))
    img.paste((0, 0, 0), (100, 100, 200, 400))
    mask = OnnxMattingDetector(path)(img)
    assert mask.shape == (500, 300)
    assert mask[250, 150] > 0.95 and mask[20, 20] < 0.05


def test_white_background_fallback():
    img = Image.new("RGB", (50, 80), (250, 250, 250))
    img.paste((20, 120, 200), (10, 10, 30, 60))
    mask = WhiteBackgroundMask()(img)
    assert mask[30, 20] == 1 and mask[5, 5] == 0


def test_missing_onnx_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        DWPoseDetector(tmp_path / "nope.onnx", tmp_path / "nope2.onnx")

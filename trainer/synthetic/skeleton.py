"""A small 3D rig: body proportions, pose families, forward kinematics and orthographic projection (numpy only).

Units are the body unit ``u`` (about one head height). Body frame: x to the character's left, y up, z forward.
A limb segment's direction comes from two angles in degrees: abduction ``ab`` (away from the body in the frontal
plane; 180 = straight up, negative = across the body) and flexion ``fl`` (towards the front). Projection rotates by
the view's yaw about y and drops depth: image x = x cos(yaw) + z sin(yaw), image y = -y, depth = -x sin(yaw) + z cos(yaw).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .character import Character

ARM_KEYS = ("sh_ab", "sh_fl", "el_ab", "el_fl")
LEG_KEYS = ("hip_ab", "hip_fl", "kn_ab", "kn_fl")


def _neutral() -> dict:
    angles = {"bow": 0.0, "side_lean": 0.0, "nod": 0.0, "tilt": 0.0, "lift": 0.0, "roll": 0.0}
    for side in ("r", "l"):
        angles.update({f"{side}_sh_ab": 8.0, f"{side}_sh_fl": 0.0, f"{side}_el_ab": 6.0, f"{side}_el_fl": 6.0})
        angles.update({f"{side}_hip_ab": 3.0, f"{side}_hip_fl": 0.0, f"{side}_kn_ab": 2.0, f"{side}_kn_fl": 0.0})
    return angles


def _arm(side, sh_ab, sh_fl, el_ab, el_fl):
    return {f"{side}_sh_ab": sh_ab, f"{side}_sh_fl": sh_fl, f"{side}_el_ab": el_ab, f"{side}_el_fl": el_fl}


def _leg(side, hip_ab, hip_fl, kn_ab, kn_fl):
    return {f"{side}_hip_ab": hip_ab, f"{side}_hip_fl": hip_fl, f"{side}_kn_ab": kn_ab, f"{side}_kn_fl": kn_fl}


# name -> (caption word, angles that differ from neutral, jitter in degrees, mirror allowed)
POSE_FAMILIES: dict[str, tuple[str, dict, float, bool]] = {
    "stand": ("standing", {}, 6, False),
    "walk": ("walking", {**_leg("r", 4, 24, 2, 2), **_leg("l", 4, -20, 2, -38), **_arm("r", 8, -22, 6, -6),
                          **_arm("l", 8, 22, 6, 34)}, 6, True),
    "run": ("running", {"bow": 12, **_leg("r", 4, 55, 2, -5), **_leg("l", 4, -30, 2, -95),
                         **_arm("r", 10, -40, 10, 40), **_arm("l", 10, 45, 10, 110)}, 7, True),
    "jump": ("jumping", {"lift": 1.2, **_leg("r", 10, 40, 6, -35), **_leg("l", 10, 40, 6, -35),
                          **_arm("r", 145, 0, 165, 0), **_arm("l", 145, 0, 165, 0)}, 10, False),
    "sit": ("sitting", {"lift": -1.4, **_leg("r", 8, 85, 4, 0), **_leg("l", 8, 85, 4, 0),
                         **_arm("r", 10, 25, 6, 75), **_arm("l", 10, 25, 6, 75)}, 6, False),
    "wave": ("waving", {**_arm("r", 100, 10, 165, 10), "tilt": 6}, 10, True),
    "point": ("pointing", {**_arm("r", 80, 35, 80, 40)}, 8, True),
    "arms_crossed": ("arms crossed", {**_arm("r", 12, 28, -80, 35), **_arm("l", 12, 28, -84, 42)}, 4, False),
    "hands_on_hips": ("hands on hips", {**_arm("r", 42, -8, -40, -5), **_arm("l", 42, -8, -40, -5),
                                        **_leg("r", 7, 0, 6, 0), **_leg("l", 7, 0, 6, 0)}, 5, False),
    "kneel": ("kneeling", {"lift": -1.45, **_leg("r", 4, 0, 2, -90), **_leg("l", 6, 88, 4, 0)}, 5, True),
    "dance": ("dancing", {"side_lean": 10, **_arm("r", 125, 10, 150, 10), **_arm("l", 60, 10, 20, 10),
                           **_leg("l", 28, 10, 20, 0)}, 14, True),
    "fight": ("in a fighting stance", {**_leg("r", 18, -14, 12, -8), **_leg("l", 18, 18, 8, 5),
                                       **_arm("r", 30, 55, 150, 30), **_arm("l", 25, 65, 155, 45)}, 6, True),
    "reach_up": ("reaching up", {"lift": 0.1, "nod": -15, **_arm("r", 170, 0, 175, 0), **_arm("l", 165, 0, 172, 0)},
                 6, False),
    "bow": ("bowing", {"bow": 60, "nod": 10, **_arm("r", 5, 60, 3, 62), **_arm("l", 5, 60, 3, 62)}, 6, False),
    "lie_down": ("lying down", {"roll": 90, **_arm("r", 14, 0, 10, 0), **_arm("l", 14, 0, 10, 0)}, 5, True),
    "cheer": ("cheering", {**_arm("r", 150, 5, 160, 5), **_arm("l", 150, 5, 160, 5), "nod": -8}, 8, False),
    "think": ("thinking", {"tilt": 8, **_arm("r", 22, 30, 175, 60), **_arm("l", 12, 25, -80, 35)}, 5, True),
    "salute": ("saluting", {**_arm("r", 92, 20, -150, 40)}, 5, True),
    "crouch": ("crouching", {"lift": -1.9, "bow": 25, **_leg("r", 14, 110, 8, -70), **_leg("l", 14, 110, 8, -70),
                              **_arm("r", 15, 50, 10, 70), **_arm("l", 15, 50, 10, 70)}, 6, False),
    "kick": ("kicking", {**_leg("r", 6, 80, 6, 78), **_arm("r", 60, -10, 70, -10), **_arm("l", 60, 10, 70, 10),
                          "bow": -5}, 8, True),
    "stretch": ("stretching", {**_arm("r", 90, 0, 92, 0), **_arm("l", 90, 0, 92, 0)}, 6, False),
    "shrug": ("shrugging", {"tilt": 10, **_arm("r", 24, 10, 78, 40), **_arm("l", 24, 10, 78, 40)}, 6, False),
    "clap": ("clapping", {**_arm("r", 12, 32, -58, 62), **_arm("l", 12, 32, -58, 62)}, 5, False),
    "phone": ("talking on the phone", {"tilt": 6, **_arm("r", 28, 25, -165, 25)}, 5, True),
    "cross_legs": ("standing with legs crossed", {"side_lean": 5, **_leg("r", -6, 0, -14, 0),
                                                  **_arm("r", 12, 0, 8, 0)}, 4, True),
    "look_up": ("looking up", {"nod": -28}, 5, False),
    "sit_cross": ("sitting cross-legged", {"lift": -3.0, **_leg("r", 70, 70, -72, 20), **_leg("l", 70, 70, -72, 20),
                                           **_arm("r", 14, 20, 12, 60), **_arm("l", 14, 20, 12, 60)}, 5, False),
    "balance": ("balancing on one leg", {**_leg("l", 5, 70, 4, -70), **_arm("r", 85, 0, 90, 0),
                                         **_arm("l", 85, 0, 90, 0)}, 6, True),
}

STANDARD_POSE = {**_neutral(), **_arm("r", 25, 0, 25, 0), **_arm("l", 25, 0, 25, 0), **_leg("r", 5, 0, 4, 0),
                 **_leg("l", 5, 0, 4, 0)}

VIEWS = {"front": 0.0, "three-quarter": 40.0, "side": 90.0, "back": 180.0}


def pose_angles(family: str, rng: np.random.Generator | None, mirror: bool = False) -> dict:
    """The joint angles of a pose family, jittered continuously by ``rng`` (None: the family's base pose)."""
    if family not in POSE_FAMILIES:
        raise ValueError(f"unknown pose family {family!r}; known: {sorted(POSE_FAMILIES)}")
    _, delta, jitter, _ = POSE_FAMILIES[family]
    angles = {**_neutral(), **delta}
    if rng is not None:
        for key in angles:
            if key == "lift":
                angles[key] += float(rng.normal(0, 0.05))
            elif key != "roll":
                angles[key] += float(rng.normal(0, jitter))
    if mirror:
        angles = {("l" + k[1:] if k.startswith("r_") else "r" + k[1:] if k.startswith("l_") else k): v
                  for k, v in angles.items()}
        angles["side_lean"], angles["tilt"], angles["roll"] = -angles["side_lean"], -angles["tilt"], -angles["roll"]
    return angles


@dataclass(frozen=True)
class Body:
    """Segment lengths and widths in body units, from a character's shape."""

    head_rx: float
    head_ry: float
    neck: float
    torso: float
    shoulder: float  # half width
    hip: float  # half width
    depth: float  # torso half depth
    upper_arm: float
    forearm: float
    thigh: float
    shin: float
    foot: float
    w_upper_arm: float
    w_forearm: float
    w_thigh: float
    w_shin: float

    @classmethod
    def of(cls, c: Character) -> "Body":
        h, b, s = c.height, c.build, c.head_size
        return cls(
            head_rx=0.43 * s, head_ry=0.5 * s, neck=0.28, torso=2.1 * h, shoulder=0.74 * b, hip=0.46 * b,
            depth=0.36 * b, upper_arm=1.18 * h, forearm=1.05 * h, thigh=1.5 * h, shin=1.42 * h, foot=0.42,
            w_upper_arm=0.34 * b, w_forearm=0.28 * b, w_thigh=0.5 * b, w_shin=0.38 * b,
        )


def direction(ab: float, fl: float, side: float) -> np.ndarray:
    a, f = math.radians(ab), math.radians(fl)
    return np.array([side * math.sin(a), -math.cos(a) * math.cos(f), math.cos(a) * math.sin(f)])


@dataclass
class Skeleton:
    """Joint positions in the body frame (3D) plus the head's orientation."""

    joints: dict[str, np.ndarray]
    head_center: np.ndarray
    head_up: np.ndarray  # unit vector from head centre to crown
    roll: float
    extra: dict = field(default_factory=dict)


def forward_kinematics(body: Body, angles: dict) -> Skeleton:
    j = {}
    pelvis = np.array([0.0, body.thigh + body.shin + angles["lift"], 0.0])
    bow, lean = math.radians(angles["bow"]), math.radians(angles["side_lean"])
    spine = np.array([math.sin(lean), math.cos(bow) * math.cos(lean), math.sin(bow) * math.cos(lean)])
    neck = pelvis + spine * body.torso
    j["pelvis"], j["neck"] = pelvis, neck
    for side, sign in (("r", -1.0), ("l", 1.0)):
        shoulder = neck + np.array([sign * body.shoulder, -0.12, 0.0])
        elbow = shoulder + body.upper_arm * direction(angles[f"{side}_sh_ab"], angles[f"{side}_sh_fl"], sign)
        wrist = elbow + body.forearm * direction(angles[f"{side}_el_ab"], angles[f"{side}_el_fl"], sign)
        hip = pelvis + np.array([sign * body.hip * 0.72, -0.1, 0.0])
        knee = hip + body.thigh * direction(angles[f"{side}_hip_ab"], angles[f"{side}_hip_fl"], sign)
        ankle = knee + body.shin * direction(angles[f"{side}_kn_ab"], angles[f"{side}_kn_fl"], sign)
        toe = ankle + np.array([0.0, -0.12, body.foot])
        j.update({f"{side}_shoulder": shoulder, f"{side}_elbow": elbow, f"{side}_wrist": wrist, f"{side}_hip": hip,
                  f"{side}_knee": knee, f"{side}_ankle": ankle, f"{side}_toe": toe})
    nod, tilt = math.radians(angles["nod"] + angles["bow"] * 0.6), math.radians(angles["tilt"] + angles["side_lean"])
    head_up = np.array([math.sin(tilt), math.cos(nod) * math.cos(tilt), math.sin(nod) * math.cos(tilt)])
    head_center = neck + spine * body.neck + head_up * body.head_ry
    return Skeleton(joints=j, head_center=head_center, head_up=head_up, roll=angles["roll"])


class Projector:
    """Body frame -> image plane (units, y down) for one yaw; keeps depth for drawing order."""

    def __init__(self, yaw_degrees: float, mirror_view: bool = False):
        self.yaw = math.radians(yaw_degrees) * (-1 if mirror_view else 1)
        self.c, self.s = math.cos(self.yaw), math.sin(self.yaw)

    def depth(self, p: np.ndarray) -> float:
        return float(-p[0] * self.s + p[2] * self.c)

    def __call__(self, p: np.ndarray) -> np.ndarray:
        return np.array([p[0] * self.c + p[2] * self.s, -p[1]])

    def facing(self, local_normal: np.ndarray) -> float:
        """Depth component of a body-frame direction: > 0 faces the camera."""
        return self.depth(local_normal)

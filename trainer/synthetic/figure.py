"""Drawing a posed character: layered parts sorted by depth, into a colour image and a body-part label map."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from .character import CLOTH_COLORS, HAIR_COLORS, SHOES, SKIN_TONES, Character
from .skeleton import Body, Projector, Skeleton

# Body-part labels of the label map (0 = background).
LABELS = {"background": 0, "head": 1, "hair": 2, "top": 3, "arm": 4, "hand": 5, "lower": 6, "shoes": 7,
          "accessory": 8}
BODY_LABELS = (LABELS["top"], LABELS["arm"], LABELS["hand"], LABELS["lower"], LABELS["shoes"])
EXPRESSIONS = ("neutral", "smile", "laugh", "sad", "angry", "surprised", "eyes closed")
LOGO_SHAPES = ("star", "heart", "circle", "triangle", "bolt")


def shade(color, factor: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * factor))) for c in color)


class Transform2D:
    """Similarity transform from projected body units (y down) to canvas pixels."""

    def __init__(self, scale: float, angle_degrees: float, center_from: np.ndarray, center_to: np.ndarray):
        a = math.radians(angle_degrees)
        self.m = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        self.scale, self.angle = scale, a
        self.t = np.asarray(center_to, float) - self.m @ np.asarray(center_from, float)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, float) @ self.m.T + self.t


class Canvas:
    """Draws every shape twice: in colour (with an outline) and as a label in the label map."""

    def __init__(self, color_image, label_image, outline: float):
        self.color_image = color_image
        self.color = ImageDraw.Draw(color_image)
        self.label = ImageDraw.Draw(label_image)
        self.outline = max(1, int(round(outline)))

    def polygon(self, points, fill, label, outline=True):
        pts = [tuple(p) for p in np.asarray(points, float).tolist()]
        if len(pts) < 3:
            return
        if outline:
            self.color.polygon(pts, fill=fill, outline=shade(fill, 0.55), width=self.outline)
        else:
            self.color.polygon(pts, fill=fill)
        if label is not None:
            self.label.polygon(pts, fill=label)

    def line(self, points, fill, width):
        self.color.line([tuple(p) for p in np.asarray(points, float).tolist()], fill=fill,
                        width=max(1, int(round(width))), joint="curve")


def ellipse_points(center, rx, ry, angle=0.0, n=28, t0=0.0, t1=2 * math.pi):
    t = np.linspace(t0, t1, n, endpoint=(t1 - t0) < 2 * math.pi - 1e-6)
    ca, sa = math.cos(angle), math.sin(angle)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return np.stack([center[0] + x * ca - y * sa, center[1] + x * sa + y * ca], axis=1)


def stadium(p0, p1, r0, r1, n=7):
    """A tapered capsule from p0 (radius r0) to p1 (radius r1), as one polygon."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    length = float(np.hypot(*d))
    a = math.atan2(d[1], d[0]) if length > 1e-6 else 0.0
    cap1 = ellipse_points(p1, r1, r1, a, n, -math.pi / 2, math.pi / 2)
    cap0 = ellipse_points(p0, r0, r0, a, n, math.pi / 2, 3 * math.pi / 2)
    return np.concatenate([cap1, cap0])


def clip_above(points: np.ndarray, v0: float, slope: float) -> np.ndarray:
    """Keeps the part of a convex polygon (local u, v coordinates) where v >= v0 + slope * u."""
    out = []
    n = len(points)
    for i in range(n):
        a, b = points[i], points[(i + 1) % n]
        da, db = a[1] - (v0 + slope * a[0]), b[1] - (v0 + slope * b[0])
        if da >= 0:
            out.append(a)
        if (da >= 0) != (db >= 0):
            t = da / (da - db)
            out.append(a + t * (b - a))
    return np.array(out) if out else np.zeros((0, 2))


class FigureDrawer:
    """Draws one character in one pose; returns OpenPose-18 keypoints (canvas pixels, visible flags)."""

    def __init__(self, character: Character, body: Body, skeleton: Skeleton, projector: Projector,
                 transform: Transform2D, expression: str = "neutral"):
        self.c, self.b, self.sk, self.proj, self.tf = character, body, skeleton, projector, transform
        self.expression = expression
        self.skin = SKIN_TONES[character.skin]
        self.hair = HAIR_COLORS[character.hair_color]
        self.top = CLOTH_COLORS[character.top_color]
        self.bottom = CLOTH_COLORS[character.bottom_color] if character.top != "dress" else self.top
        self.accent = CLOTH_COLORS[character.accent_color]
        self.px = transform.scale  # pixels per body unit

    # -------------------------------------------------------------- geometry helpers
    def P(self, p3):
        return self.tf(self.proj(np.asarray(p3, float))[None])[0]

    def J(self, name):
        return self.P(self.sk.joints[name])

    def depth(self, *names):
        return float(np.mean([self.proj.depth(self.sk.joints[n]) for n in names]))

    def head_frame(self):
        up = self.sk.head_up
        fwd = np.cross(np.array([1.0, 0.0, 0.0]), up)
        fwd /= np.linalg.norm(fwd)
        lat = np.cross(up, fwd)
        return lat, up, fwd

    def head_point(self, lx, ly, lz):
        lat, up, fwd = self.head_frame()
        b = self.b
        return self.sk.head_center + lat * lx * b.head_rx + up * ly * b.head_ry + fwd * lz * b.head_rx

    def head_2d(self):
        """Canvas centre, radii and in-plane angle of the head ellipse, and how much the face looks at us."""
        center = self.P(self.sk.head_center)
        up_img = self.P(self.sk.head_center + self.sk.head_up) - center
        angle = math.atan2(up_img[0], -up_img[1])
        _, _, fwd = self.head_frame()
        facing = self.proj.depth(fwd)
        side = float(np.sign(self.proj(fwd)[0] * math.cos(self.tf.angle))) or 1.0
        return center, self.b.head_rx * self.px, self.b.head_ry * self.px, angle, facing, side

    def local_to_canvas(self, uv, center, rx, ry, angle):
        """Head-local (u right, v up, in radii) to canvas."""
        uv = np.atleast_2d(np.asarray(uv, float))
        x, y = uv[:, 0] * rx, -uv[:, 1] * ry
        ca, sa = math.cos(angle), math.sin(angle)
        return np.stack([center[0] + x * ca - y * sa, center[1] + x * sa + y * ca], axis=1)

    # -------------------------------------------------------------- parts
    def parts(self):
        """(depth, draw function) for every part; drawn far to near."""
        c, parts, leg_depths = self.c, [], []
        for side in ("r", "l"):
            d = self.depth(f"{side}_hip", f"{side}_knee", f"{side}_ankle") - 0.05
            leg_depths.append(d)
            parts.append((d, lambda cv, s=side: self.draw_leg(cv, s)))
            d = self.depth(f"{side}_shoulder", f"{side}_elbow", f"{side}_wrist") + 0.03
            parts.append((d, lambda cv, s=side: self.draw_arm(cv, s)))
        torso_d = self.depth("neck", "pelvis")
        parts.append((torso_d - 0.02, self.draw_hips))
        parts.append((torso_d, self.draw_torso))
        if c.top == "dress" or c.bottom == "skirt":
            parts.append((max(torso_d, *leg_depths) + 0.01, self.draw_skirt))  # legs go under a skirt
        parts.append((torso_d + 0.015, self.draw_neck))
        if c.scarf:
            parts.append((torso_d + 0.025, self.draw_scarf))
        if c.bag:
            parts.append((torso_d + 0.02, self.draw_bag))
        head_d = self.proj.depth(self.sk.head_center) + 0.2
        back_hair = self.back_hair_parts()
        for point, fn in back_hair:
            parts.append((self.proj.depth(point) + (0.2 if self.proj.depth(point) > 0 else -0.3), fn))
        parts.append((head_d, self.draw_head))
        return parts

    def draw(self, canvas: Canvas):
        for _, fn in sorted(self.parts(), key=lambda item: item[0]):
            fn(canvas)

    def limb(self, cv, a, b, ra, rb, color, label, t0=0.0, t1=1.0):
        pa, pb = self.J(a), self.J(b)
        qa, qb = pa + (pb - pa) * t0, pa + (pb - pa) * t1
        r_a, r_b = ra + (rb - ra) * t0, ra + (rb - ra) * t1
        cv.polygon(stadium(qa, qb, r_a * self.px, r_b * self.px), color, label)

    def draw_leg(self, cv, s):
        c, b, L = self.c, self.b, LABELS["lower"]
        trousers = c.top != "dress" and c.bottom == "trousers"
        shorts = c.top != "dress" and c.bottom == "shorts"
        rt, rk, rs = b.w_thigh / 2, b.w_shin / 2 * 1.1, b.w_shin / 2 * 0.8
        self.limb(cv, f"{s}_hip", f"{s}_knee", rt, rk, self.bottom if trousers else self.skin, L)
        self.limb(cv, f"{s}_knee", f"{s}_ankle", rk, rs, self.bottom if trousers else self.skin, L)
        if shorts:
            self.limb(cv, f"{s}_hip", f"{s}_knee", rt * 1.08, rk * 1.1, self.bottom, L, 0.0, 0.62)
        ankle, toe = self.J(f"{s}_ankle"), self.J(f"{s}_toe")
        shoe = SHOES[c.shoes]
        cv.polygon(ellipse_points(ankle, 0.2 * self.px, 0.13 * self.px, n=14), shoe, LABELS["shoes"])
        cv.polygon(stadium(ankle, toe, 0.15 * self.px, 0.12 * self.px), shoe, LABELS["shoes"])

    def sleeve_extent(self) -> tuple[float, float]:
        """How much of (upper arm, forearm) the top covers."""
        return {"t-shirt": (0.55, 0.0), "long sleeve": (1.0, 0.92), "jacket": (1.0, 0.92), "hoodie": (1.0, 0.95),
                "dress": (0.3, 0.0), "tank top": (0.0, 0.0)}[self.c.top]

    def draw_arm(self, cv, s):
        b, A = self.b, LABELS["arm"]
        ru, re, rw = b.w_upper_arm / 2, b.w_forearm / 2 * 1.05, b.w_forearm / 2 * 0.8
        self.limb(cv, f"{s}_shoulder", f"{s}_elbow", ru, re, self.skin, A)
        self.limb(cv, f"{s}_elbow", f"{s}_wrist", re, rw, self.skin, A)
        upper, fore = self.sleeve_extent()
        sleeve = shade(self.top, 0.92) if self.c.top == "jacket" else self.top
        if upper > 0:
            self.limb(cv, f"{s}_shoulder", f"{s}_elbow", ru * 1.15, re * 1.15, sleeve, A, 0.0, upper)
        if fore > 0:
            self.limb(cv, f"{s}_elbow", f"{s}_wrist", re * 1.15, rw * 1.2, sleeve, A, 0.0, fore)
        elbow, wrist = self.J(f"{s}_elbow"), self.J(f"{s}_wrist")
        direction = (wrist - elbow) / max(1e-6, float(np.hypot(*(wrist - elbow))))
        hand = wrist + direction * 0.12 * self.px
        cv.polygon(ellipse_points(hand, 0.17 * self.px, 0.17 * self.px, n=14), self.skin, LABELS["hand"])

    def torso_corners(self, top_half_width, bottom_half_width, top_point, bottom_point, depth_scale=1.0):
        j, b = self.sk.joints, self.b
        spine = j["neck"] - j["pelvis"]
        spine = spine / np.linalg.norm(spine)
        lat = np.array([1.0, 0.0, 0.0])
        front = np.cross(lat, spine)
        pts = []
        for center, hw in ((top_point, top_half_width), (bottom_point, bottom_half_width)):
            for sx in (-1, 1):
                for sz in (-1, 1):
                    pts.append(self.P(center + lat * sx * hw + front * sz * b.depth * depth_scale))
        return np.array(pts)

    def draw_torso(self, cv):
        j, b, c = self.sk.joints, self.b, self.c
        top_w = b.shoulder * (0.8 if c.top == "tank top" else 1.02)
        pts = self.torso_corners(top_w, b.hip * 1.02, j["neck"] + np.array([0, -0.02, 0]), j["pelvis"])
        hull = convex_hull(pts)
        cv.polygon(hull, self.top, LABELS["top"])
        self.draw_pattern(cv, hull)
        if c.top in ("jacket", "hoodie") and self.proj.depth(np.cross([1.0, 0, 0], j["neck"] - j["pelvis"])) > 0.2:
            zip_line = [self.P(j["neck"] + np.array([0, -0.1, b.depth])), self.P(j["pelvis"] + np.array([0, 0, b.depth]))]
            cv.line(zip_line, shade(self.top, 0.6), 0.05 * self.px)
        if c.top == "hoodie":
            hood = self.P(j["neck"] + np.array([0, -0.15, -b.depth * 0.8]))
            cv.polygon(ellipse_points(hood, 0.55 * self.px, 0.22 * self.px, n=16), shade(self.top, 0.85),
                       LABELS["top"])

    def draw_pattern(self, cv, hull):
        c = self.c
        if c.pattern == "plain" or len(hull) < 3:
            return
        color = CLOTH_COLORS[c.pattern_color]
        j = self.sk.joints
        neck, pelvis = self.P(j["neck"]), self.P(j["pelvis"])
        axis = (neck - pelvis) / max(1e-6, float(np.hypot(*(neck - pelvis))))
        normal = np.array([-axis[1], axis[0]])
        lo, hi = np.floor(hull.min(0)), hull.max(0)
        reach = int(np.ceil(max(hi - lo))) + 2  # how far the stripes run: the whole torso
        if reach > 4 * max(cv.color_image.size):
            # a torso blown far past the canvas (a crop whose box is near empty: the placement divides by it) asked
            # for a tile of gigabytes (a MemoryError in the adapter's training): then the tile covers the canvas
            # only. Every other figure keeps its whole-torso tile, so the world's renders stay as they were.
            lo, hi = np.maximum(lo, 0), np.minimum(hi, cv.color_image.size)
            if (hi <= lo).any():
                return
        size = int(np.ceil(max(hi - lo))) + 2
        tile = Image.new("RGB", (size, size), self.top)
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).polygon([tuple(p - lo) for p in hull.tolist()], fill=255)
        draw = ImageDraw.Draw(tile)
        step = 0.32 * self.px
        center = (neck + pelvis) / 2 - lo
        if c.pattern == "logo":
            facing = self.proj.depth(np.cross([1.0, 0, 0], j["neck"] - j["pelvis"]))
            if facing > 0.3:
                self.draw_logo(draw, center + axis * 0.35 * self.px, 0.38 * self.px, color)
        elif c.pattern in ("stripes", "checks"):
            for k in range(-12, 13):
                p = center + axis * k * step
                draw.line([tuple(p - normal * reach), tuple(p + normal * reach)], fill=color,
                          width=max(1, int(step * 0.4)))
                if c.pattern == "checks":
                    q = center + normal * k * step
                    draw.line([tuple(q - axis * reach), tuple(q + axis * reach)], fill=color,
                              width=max(1, int(step * 0.4)))
        elif c.pattern == "dots":
            r = 0.07 * self.px
            for k in range(-8, 9):
                for m in range(-8, 9):
                    p = center + axis * k * step + normal * (m + 0.5 * (k % 2)) * step
                    draw.ellipse((p[0] - r, p[1] - r, p[0] + r, p[1] + r), fill=color)
        cv.color_image.paste(tile, (int(lo[0]), int(lo[1])), mask)
        cv.color.polygon([tuple(p) for p in hull.tolist()], outline=shade(self.top, 0.55), width=cv.outline)

    def draw_logo(self, draw, center, r, color):
        shape = LOGO_SHAPES[self.c.id % len(LOGO_SHAPES)]
        cx, cy = center
        if shape == "circle":
            draw.ellipse((cx - r * 0.7, cy - r * 0.7, cx + r * 0.7, cy + r * 0.7), fill=color)
        elif shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r * 0.9, cy + r * 0.7), (cx + r * 0.9, cy + r * 0.7)], fill=color)
        elif shape == "star":
            pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.sin(k * math.pi / 5),
                    cy - (r if k % 2 == 0 else r * 0.45) * math.cos(k * math.pi / 5)) for k in range(10)]
            draw.polygon(pts, fill=color)
        elif shape == "heart":
            draw.ellipse((cx - r, cy - r * 0.7, cx, cy + r * 0.1), fill=color)
            draw.ellipse((cx, cy - r * 0.7, cx + r, cy + r * 0.1), fill=color)
            draw.polygon([(cx - r * 0.95, cy - r * 0.15), (cx + r * 0.95, cy - r * 0.15), (cx, cy + r)], fill=color)
        else:  # bolt
            draw.polygon([(cx + r * 0.2, cy - r), (cx - r * 0.5, cy + r * 0.1), (cx, cy + r * 0.1),
                          (cx - r * 0.2, cy + r), (cx + r * 0.5, cy - r * 0.1), (cx, cy - r * 0.1)], fill=color)

    def draw_hips(self, cv):
        j, b, c = self.sk.joints, self.b, self.c
        color = self.bottom if c.bottom in ("trousers", "shorts") and c.top != "dress" else self.skin
        if c.top == "dress" or c.bottom == "skirt":
            color = self.bottom
        bottom = (j["r_hip"] + j["l_hip"]) / 2 + np.array([0, -0.25, 0])
        pts = self.torso_corners(b.hip, b.hip * 0.85, j["pelvis"] + np.array([0, 0.15, 0]), bottom, 0.9)
        cv.polygon(convex_hull(pts), color, LABELS["lower"])

    def draw_skirt(self, cv):
        j, c = self.sk.joints, self.c
        length = 0.9 if c.top == "dress" else 0.55
        waist = self.torso_corners(self.b.hip * 1.05, self.b.hip * 1.05, j["pelvis"] + np.array([0, 0.15, 0]),
                                   j["pelvis"] + np.array([0, 0.05, 0]))
        hem = []
        for s in ("r", "l"):
            hip, knee = j[f"{s}_hip"], j[f"{s}_knee"]
            p = self.P(hip + (knee - hip) * length)
            hem.append(p)
        hem = np.array(hem)
        center = hem.mean(0)
        spread = hem - center
        widen = np.array([[-1, 0], [1, 0]]) * 0.35 * self.px
        order = np.argsort(spread[:, 0])
        hem_pts = hem[order] + widen
        cv.polygon(convex_hull(np.concatenate([waist, hem_pts])), self.bottom, LABELS["lower"])

    def draw_neck(self, cv):
        base = self.J("neck")
        top = self.P(self.sk.head_center - self.sk.head_up * self.b.head_ry * 0.6)
        cv.polygon(stadium(base, top, 0.17 * self.px, 0.15 * self.px), self.skin, LABELS["head"])

    def draw_scarf(self, cv):
        j = self.sk.joints
        r, l = self.P(j["neck"] + np.array([-0.32, -0.08, 0.1])), self.P(j["neck"] + np.array([0.32, -0.08, 0.1]))
        cv.polygon(stadium(r, l, 0.16 * self.px, 0.16 * self.px), self.accent, LABELS["accessory"])
        if self.proj.depth(np.array([0.0, 0.0, 1.0])) > 0.2:
            end = self.P(j["neck"] + np.array([-0.22, -0.9, 0.35]))
            cv.polygon(stadium(r, end, 0.12 * self.px, 0.11 * self.px), shade(self.accent, 0.9), LABELS["accessory"])

    def draw_bag(self, cv):
        j = self.sk.joints
        start = self.P(j["l_shoulder"] + np.array([-0.1, 0.05, 0.3]))
        end = self.P(j["r_hip"] + np.array([-0.25, 0.1, 0.3]))
        cv.polygon(stadium(start, end, 0.05 * self.px, 0.05 * self.px), shade(self.accent, 0.7), LABELS["accessory"])
        box = self.P(j["r_hip"] + np.array([-0.35, 0.05, 0.2]))
        w, h = 0.38 * self.px, 0.3 * self.px
        corners = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) @ self.tf.m.T / self.tf.scale + box
        cv.polygon(corners, self.accent, LABELS["accessory"])

    # -------------------------------------------------------------- head, face, hair
    def hair_cap_line(self, facing, side):
        """Hairline in head-local coordinates: v >= v0 + slope * u is hair."""
        v0 = 0.25 - 0.72 * (1 - facing)
        slope = 0.9 * side * math.sqrt(max(0.0, 1 - facing**2))
        if self.c.hair_style == "bob":
            v0 -= 0.08
        return v0, slope

    def back_hair_parts(self):
        c = self.c
        if c.hair_style not in ("long", "bob", "ponytail", "twin tails", "bun"):
            return []
        parts = []
        if c.hair_style in ("long", "bob"):
            anchor = self.head_point(0, 0.0, -0.6)
            parts.append((anchor, lambda cv: self.draw_hair_curtain(cv, 3.4 if c.hair_style == "long" else 1.25)))
        elif c.hair_style == "ponytail":
            anchor = self.head_point(0, 0.25, -1.0)
            parts.append((anchor, lambda cv, a=anchor: self.draw_tail(cv, a, 2.2)))
        elif c.hair_style == "twin tails":
            for sx in (-1, 1):
                anchor = self.head_point(sx * 1.0, 0.3, -0.3)
                parts.append((anchor, lambda cv, a=anchor: self.draw_tail(cv, a, 2.0)))
        elif c.hair_style == "bun":
            anchor = self.head_point(0, 0.85, -0.6)
            parts.append((anchor, lambda cv, a=anchor: cv.polygon(
                ellipse_points(self.P(a), 0.3 * self.px, 0.3 * self.px, n=16), self.hair, LABELS["hair"])))
        return parts

    def draw_hair_curtain(self, cv, length):
        center, rx, ry, angle, _, _ = self.head_2d()
        width = 1.12
        uv = [(-width, 0.25), (width, 0.25), (width * 1.05, -length), (-width * 1.05, -length)]
        pts = self.local_to_canvas(uv, center, rx, ry, angle)
        top = ellipse_points(center, rx * 1.1, ry * 1.08, angle, 16, math.pi, 2 * math.pi)
        cv.polygon(convex_hull(np.concatenate([pts, top])), shade(self.hair, 0.9), LABELS["hair"])

    def draw_tail(self, cv, anchor3, length):
        a = self.P(anchor3)
        down = self.P(anchor3 + np.array([0, -length * 0.5, 0])) - a
        tip = a + down * 1.6
        cv.polygon(stadium(a, tip, 0.26 * self.px, 0.1 * self.px), self.hair, LABELS["hair"])

    def draw_head(self, cv):
        c = self.c
        center, rx, ry, angle, facing, side = self.head_2d()
        for sx in (-1, 1):  # ears
            ear = self.head_point(sx * 1.0, -0.1, 0.0)
            if self.proj.depth(ear - self.sk.head_center) > -0.25:
                cv.polygon(ellipse_points(self.P(ear), 0.13 * self.px, 0.18 * self.px, angle, 12),
                           self.skin, LABELS["head"])
        cv.polygon(ellipse_points(center, rx, ry, angle, 32), self.skin, LABELS["head"])
        if facing > 0.15:
            self.draw_face(cv, facing)
        self.draw_front_hair(cv, center, rx, ry, angle, facing, side)
        if c.glasses and facing > 0.15:
            self.draw_glasses(cv, facing)
        if c.hat:
            self.draw_hat(cv, center, rx, ry, angle)

    def feature(self, lx, ly, lz=None):
        if lz is None:
            lz = math.sqrt(max(0.0, 1 - lx * lx - ly * ly * 0.6))
        return self.P(self.head_point(lx, ly, lz))

    def draw_face(self, cv, facing):
        e, px = self.expression, self.px
        squeeze = max(0.35, facing)
        dark, mouth_color = (40, 30, 36), (150, 50, 60)
        eye_rx, eye_ry = 0.075 * px * squeeze, (0.13 if e == "surprised" else 0.1) * px
        brow_y = 0.33 if e == "surprised" else 0.24
        for sx in (-1, 1):
            center = self.feature(sx * 0.36, -0.02)
            if self.proj.depth(self.head_point(sx * 0.36, -0.02, 0.9) - self.sk.head_center) <= 0.05:
                continue
            if e in ("laugh", "eyes closed"):
                bend = -1 if e == "laugh" else 1
                pts = [center + np.array([dx * eye_rx * 1.3, bend * (abs(dx) - 1) * eye_ry * 0.5])
                       for dx in (-1, -0.5, 0, 0.5, 1)]
                cv.line(pts, dark, 0.045 * px)
            else:
                ry = eye_ry * (0.7 if e == "angry" else 1.0)
                cv.polygon(ellipse_points(center, eye_rx, ry, n=12), dark, None, outline=False)
                cv.polygon(ellipse_points(center + np.array([eye_rx * 0.3, -ry * 0.35]), eye_rx * 0.35, ry * 0.3,
                                          n=8), (250, 250, 250), None, outline=False)
            inner = {"sad": 0.08, "angry": -0.1, "surprised": 0.03}.get(e, 0.0)
            outer = {"sad": -0.05, "angry": 0.06}.get(e, 0.0)
            b0 = self.feature(sx * 0.2, brow_y + inner)
            b1 = self.feature(sx * 0.52, brow_y + outer)
            cv.line([b0, b1], shade(HAIR_COLORS[self.c.hair_color], 0.7), 0.05 * px)
        xs = np.linspace(-1, 1, 9)
        mouth = np.array([self.feature(dx * 0.22, -0.5) for dx in xs])
        curve = {"smile": 0.08, "sad": -0.06, "angry": -0.025}.get(e, 0.0) * px  # > 0: corners up
        if e == "laugh":
            open_depth = 0.17 * px * (1 - xs**2)[:, None] * np.array([[0.0, 1.0]])
            cv.polygon(np.concatenate([mouth, (mouth + open_depth)[::-1]]), mouth_color, None)
        elif e == "surprised":
            cv.polygon(ellipse_points(mouth[4], 0.09 * px * squeeze, 0.12 * px, n=14), mouth_color, None)
        else:
            bend = curve * (xs**2 - 0.5)[:, None] * np.array([[0.0, -1.0]])
            cv.line(mouth + bend, mouth_color, 0.045 * px)

    def draw_front_hair(self, cv, center, rx, ry, angle, facing, side):
        c = self.c
        if c.hair_style == "bald":
            return
        color = self.hair
        if c.hair_style == "buzz cut":
            color = tuple(int(0.55 * h + 0.45 * s) for h, s in zip(self.hair, self.skin))
        outline = np.stack([np.cos(t := np.linspace(0, 2 * math.pi, 40, endpoint=False)) * 1.06,
                            np.sin(t) * 1.06], axis=1)
        v0, slope = self.hair_cap_line(facing, side)
        cap = clip_above(outline, v0, slope)
        if len(cap) >= 3:
            cv.polygon(self.local_to_canvas(cap, center, rx, ry, angle), color, LABELS["hair"])
        if c.hair_style == "spiky":
            for k in range(-3, 4):
                base = np.array([k * 0.28, 0.85 - abs(k) * 0.08])
                tri = [base + np.array([-0.18, 0]), base + np.array([0.18, 0]), base + np.array([k * 0.06, 0.5])]
                cv.polygon(self.local_to_canvas(tri, center, rx, ry, angle), color, LABELS["hair"])
        elif c.hair_style == "curly":
            for t in np.linspace(0.15 * math.pi, 0.85 * math.pi, 7):
                p = self.local_to_canvas([(math.cos(t) * 1.0, math.sin(t) * 1.0)], center, rx, ry, angle)[0]
                cv.polygon(ellipse_points(p, 0.3 * rx, 0.3 * ry, n=12), color, LABELS["hair"])
        if c.hair_style in ("long", "bob") and facing > 0.3:
            for sx in (-1, 1):
                lock = [(sx * 0.85, 0.3), (sx * 1.12, 0.3), (sx * 1.12, -0.95), (sx * 0.9, -0.95)]
                cv.polygon(self.local_to_canvas(lock, center, rx, ry, angle), color, LABELS["hair"])

    def draw_glasses(self, cv, facing):
        frame = (30, 30, 36)
        centers = []
        for sx in (-1, 1):
            if self.proj.depth(self.head_point(sx * 0.36, 0, 0.9) - self.sk.head_center) > 0.05:
                center = self.feature(sx * 0.36, -0.02)
                centers.append(center)
                pts = ellipse_points(center, 0.16 * self.px * max(0.35, facing), 0.13 * self.px, n=16)
                cv.line(np.concatenate([pts, pts[:1]]), frame, 0.035 * self.px)
        if len(centers) == 2:
            cv.line(centers, frame, 0.03 * self.px)

    def draw_hat(self, cv, center, rx, ry, angle):
        brim = self.local_to_canvas([(0, 0.55)], center, rx, ry, angle)[0]
        cv.polygon(ellipse_points(brim, rx * 1.45, ry * 0.22, angle, 24), shade(self.accent, 0.85),
                   LABELS["accessory"])
        crown = [(-0.85, 0.55), (0.85, 0.55), (0.7, 1.35), (-0.7, 1.35)]
        cv.polygon(self.local_to_canvas(crown, center, rx, ry, angle), self.accent, LABELS["accessory"])

    # -------------------------------------------------------------- keypoints
    def keypoints(self) -> np.ndarray:
        """OpenPose-18 (x, y, visible); face points only when they face the camera."""
        j = self.sk.joints
        names = [None, "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "r_hip",
                 "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle"]
        kp = np.zeros((18, 3))
        for i, name in enumerate(names):
            if name is not None:
                kp[i] = (*self.P(j[name]), 1.0)
        face = {0: (0.0, -0.28, 1.0), 14: (-0.36, -0.02, 0.93), 15: (0.36, -0.02, 0.93), 16: (-1.0, -0.1, 0.0),
                17: (1.0, -0.1, 0.0)}
        for i, (lx, ly, lz) in face.items():
            p = self.head_point(lx, ly, lz)
            normal_depth = self.proj.depth(p - self.sk.head_center)
            visible = normal_depth > (0.05 if i < 16 else -0.25)
            kp[i] = (*self.P(p), float(visible))
        return kp


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain."""
    pts = sorted(map(tuple, np.asarray(points, float).tolist()))
    if len(pts) <= 2:
        return np.array(pts)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])

"""A pinhole camera on the ego vehicle and a painter's-algorithm renderer for highway-env scenes.

World frame (highway-env): x along the road, y to the right of travel, z up. Camera frame: x to the
right, y up, z forward (depth). The horizon sits at `horizon` × image height (no pitch), so ground
points project below it and farther objects project smaller and closer to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from drivekd.data.drivesim.world import COLOURS, Car, LaneGeometry, Snapshot

NEAR = 0.5  # m; geometry closer than this to the camera plane is clipped
MAX_RANGE = 120.0  # m; vehicles farther than this are not drawn
MIN_VISIBLE_PIXELS = 6  # a vehicle with fewer unoccluded pixels does not count as visible
SKY_TOP, SKY_HORIZON = (110, 160, 220), (200, 222, 240)
GRASS, ASPHALT, MARKING = (92, 128, 70), (92, 92, 96), (245, 245, 240)
STRIPE_LENGTH, STRIPE_PERIOD = 3.0, 8.0


@dataclass(frozen=True)
class Camera:
    name: str
    width: int
    height: int
    yaw: float  # relative to the ego heading: 0 front, pi rear
    mount: float  # metres along the ego heading from its centre
    hfov_deg: float = 70.0
    mount_height: float = 1.4
    horizon: float = 0.42

    @property
    def focal(self) -> float:
        return (self.width / 2) / math.tan(math.radians(self.hfov_deg) / 2)

    def pose(self, ego: Car) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Camera centre (world x, y) and its forward and right unit vectors on the ground plane."""
        h = ego.heading + self.yaw
        forward = np.array([math.cos(h), math.sin(h)])
        right = np.array([-math.sin(h), math.cos(h)])
        ego_dir = np.array([math.cos(ego.heading), math.sin(ego.heading)])
        centre = np.array([ego.x, ego.y]) + self.mount * ego_dir
        return centre, forward, right

    def to_camera(self, ego: Car, points: np.ndarray) -> np.ndarray:
        """(N, 3) world points (x, y, z) -> (N, 3) camera points (right, up, depth)."""
        centre, forward, right = self.pose(ego)
        d = points[:, :2] - centre
        return np.stack([d @ right, points[:, 2] - self.mount_height, d @ forward], axis=1)

    def project(self, cam: np.ndarray) -> np.ndarray:
        """(N, 3) camera points with depth > 0 -> (N, 2) pixel coordinates (u right, v down)."""
        f = self.focal
        u = self.width / 2 + f * cam[:, 0] / cam[:, 2]
        v = self.horizon * self.height - f * cam[:, 1] / cam[:, 2]
        return np.stack([u, v], axis=1)


def default_cameras(width: int, height: int) -> tuple[Camera, Camera]:
    return (
        Camera("CAM_FRONT", width, height, yaw=0.0, mount=1.5),
        Camera("CAM_BACK", width, height, yaw=math.pi, mount=-2.0),
    )


@dataclass
class Visible:
    """A vehicle that shows in a camera image: its unoccluded pixel count, box centre and size in [0, 1]."""

    car: Car
    pixels: int
    cx: float
    cy: float
    depth: float
    width: float
    height: float

    def tag(self, camera: str, k: int) -> str:
        return f"<c{k},{camera},{self.cx:.4f},{self.cy:.4f}>"


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a camera-space polygon (N, 3) to depth >= NEAR."""
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        a_in, b_in = a[2] >= NEAR, b[2] >= NEAR
        if a_in:
            out.append(a)
        if a_in != b_in:
            t = (NEAR - a[2]) / (b[2] - a[2])
            out.append(a + t * (b - a))
    return np.array(out) if out else np.zeros((0, 3))


def _shade(colour: tuple[int, int, int], k: float) -> tuple[int, int, int]:
    return tuple(int(max(0, min(255, c * k + (18 if k > 1 else 0)))) for c in colour)  # type: ignore[return-value]


class Renderer:
    def __init__(self, camera: Camera) -> None:
        self.cam = camera

    def render(self, snap: Snapshot) -> tuple[Image.Image, list[Visible]]:
        cam = self.cam
        img = Image.new("RGB", (cam.width, cam.height), GRASS)
        draw = ImageDraw.Draw(img)
        horizon_v = round(cam.horizon * cam.height)
        for v in range(horizon_v):
            t = v / max(1, horizon_v - 1)
            colour = tuple(int(a + (b - a) * t) for a, b in zip(SKY_TOP, SKY_HORIZON, strict=True))
            draw.line([(0, v), (cam.width, v)], fill=colour)
        for lane in snap.lanes:
            self._draw_lane(draw, snap.ego, lane)
        ids = Image.new("L", (cam.width, cam.height), 0)
        id_draw = ImageDraw.Draw(ids)
        boxes = [(c, c.index + 1) for c in snap.cars]
        boxes += [(_obstacle(x, y), 0) for x, y in snap.obstacles]
        drawn = []
        for car, ident in boxes:
            cam_pts = self.cam.to_camera(snap.ego, _box_corners(car))
            if cam_pts[:, 2].min() < NEAR or cam_pts[:, 2].mean() > MAX_RANGE:
                continue
            drawn.append((float(cam_pts[:, 2].mean()), car, ident, cam_pts))
        drawn.sort(key=lambda t: -t[0])  # far first: nearer boxes paint over (occlude) farther ones
        for _, car, ident, cam_pts in drawn:
            self._draw_box(draw, id_draw, car, ident, cam_pts)
        return img, self._visible(ids, {c.index + 1: (c, d) for d, c, i, _ in drawn if i})

    def _polygon(self, draw: ImageDraw.ImageDraw, cam_poly: np.ndarray, fill: object) -> None:
        clipped = _clip_near(cam_poly)
        if len(clipped) >= 3:
            pts = self.cam.project(clipped)
            draw.polygon([(float(u), float(v)) for u, v in pts], fill=fill, outline=fill)

    def _draw_lane(self, draw: ImageDraw.ImageDraw, ego: Car, lane: LaneGeometry) -> None:
        z = np.zeros((len(lane.s), 1))
        left = self.cam.to_camera(ego, np.hstack([lane.left, z]))
        right = self.cam.to_camera(ego, np.hstack([lane.right, z]))
        for i in range(len(lane.s) - 1):
            if max(left[i, 2], left[i + 1, 2], right[i, 2], right[i + 1, 2]) < NEAR:
                continue
            self._polygon(draw, np.array([left[i], left[i + 1], right[i + 1], right[i]]), ASPHALT)
        for side, border in ((0, lane.left), (1, lane.right)):
            kind = lane.line_types[side]
            if kind == 0:  # LineType.NONE
                continue
            self._draw_marking(draw, ego, border, lane.s, striped=kind == 1)

    def _draw_marking(
        self, draw: ImageDraw.ImageDraw, ego: Car, border: np.ndarray, s: np.ndarray, *, striped: bool
    ) -> None:
        half = 0.09
        for i in range(len(s) - 1):
            a, b = border[i], border[i + 1]
            seg = b - a
            length = float(np.linalg.norm(seg))
            if length < 1e-6:
                continue
            normal = np.array([-seg[1], seg[0]]) / length * half
            spans = [(0.0, 1.0)]
            if striped:
                spans = []
                start = s[i] - (s[i] % STRIPE_PERIOD)
                while start < s[i + 1]:
                    lo, hi = max(start, s[i]), min(start + STRIPE_LENGTH, s[i + 1])
                    if hi > lo:
                        spans.append(((lo - s[i]) / (s[i + 1] - s[i]), (hi - s[i]) / (s[i + 1] - s[i])))
                    start += STRIPE_PERIOD
            for t0, t1 in spans:
                p0, p1 = a + t0 * seg, a + t1 * seg
                quad = np.array([[*(p0 - normal), 0], [*(p1 - normal), 0], [*(p1 + normal), 0], [*(p0 + normal), 0]])
                cam_quad = self.cam.to_camera(ego, quad)
                if cam_quad[:, 2].max() >= NEAR:
                    self._polygon(draw, cam_quad, MARKING)

    def _draw_box(
        self, draw: ImageDraw.ImageDraw, id_draw: ImageDraw.ImageDraw, car: Car, ident: int, cam_pts: np.ndarray
    ) -> None:
        base = COLOURS.get(car.colour, (230, 120, 20))
        # corner order: 0-3 bottom (rear-left, front-left, front-right, rear-right), 4-7 top
        faces = {
            "rear": ([0, 3, 7, 4], 0.82),
            "front": ([1, 2, 6, 5], 0.82),
            "left": ([0, 1, 5, 4], 0.62),
            "right": ([3, 2, 6, 7], 0.62),
            "top": ([4, 5, 6, 7], 1.12),
        }
        centre = cam_pts.mean(axis=0)
        for name, (idx, k) in faces.items():
            face = cam_pts[idx]
            normal = face.mean(axis=0) - centre  # outward for a box
            if float(normal @ (-face.mean(axis=0))) <= 0:  # faces away from the camera
                continue
            self._polygon(draw, face, _shade(base, k))
            if ident:
                self._polygon(id_draw, face, ident)
            if name in ("rear", "front") and car.length > 0:
                self._draw_lamps(draw, car, face, rear=name == "rear")

    def _draw_lamps(self, draw: ImageDraw.ImageDraw, car: Car, face: np.ndarray, *, rear: bool) -> None:
        """Rear: brake lights (bright when braking), windscreen; front: headlights. Indicators amber."""
        bl, br, tr, tl = face  # bottom-left/right, top-right/left as seen on the face

        def at(u: float, v: float) -> np.ndarray:
            bottom = bl + u * (br - bl)
            top = tl + u * (tr - tl)
            return bottom + v * (top - bottom)

        def quad(u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
            return np.array([at(u0, v0), at(u1, v0), at(u1, v1), at(u0, v1)])

        self._polygon(draw, quad(0.12, 0.88, 0.55, 0.9), (40, 48, 60))  # window
        lamp = (255, 40, 40) if rear and car.braking else ((120, 20, 20) if rear else (235, 235, 200))
        self._polygon(draw, quad(0.02, 0.3, 0.25, 0.45), lamp)
        self._polygon(draw, quad(0.7, 0.98, 0.25, 0.45), lamp)
        if car.signal is not None:
            # seen from behind, the car's left is the face's `bl` side; seen from the front it flips
            on_bl_side = (car.signal == "left") == rear
            u0 = 0.0 if on_bl_side else 0.8
            self._polygon(draw, quad(u0, u0 + 0.2, 0.2, 0.5), (255, 165, 0))

    def _visible(self, ids: Image.Image, cars: dict[int, tuple[Car, float]]) -> list[Visible]:
        arr = np.asarray(ids)
        out = []
        for ident, (car, depth) in cars.items():
            ys, xs = np.nonzero(arr == ident)
            if len(xs) < MIN_VISIBLE_PIXELS:
                continue
            cx = (xs.min() + xs.max() + 1) / 2 / arr.shape[1]
            cy = (ys.min() + ys.max() + 1) / 2 / arr.shape[0]
            w = (xs.max() - xs.min() + 1) / arr.shape[1]
            h = (ys.max() - ys.min() + 1) / arr.shape[0]
            out.append(Visible(car, len(xs), float(cx), float(cy), depth, float(w), float(h)))
        out.sort(key=lambda v: v.depth)
        return out


def _box_corners(car: Car) -> np.ndarray:
    c, s = math.cos(car.heading), math.sin(car.heading)
    fwd, right = np.array([c, s]), np.array([-s, c])
    centre = np.array([car.x, car.y])
    hl, hw = car.length / 2, car.width / 2
    ground = [
        centre - hl * fwd - hw * right,  # rear-left
        centre + hl * fwd - hw * right,  # front-left
        centre + hl * fwd + hw * right,  # front-right
        centre - hl * fwd + hw * right,  # rear-right
    ]
    bottom = [np.array([p[0], p[1], 0.0]) for p in ground]
    top = [np.array([p[0], p[1], car.height]) for p in ground]
    return np.array(bottom + top)


def _obstacle(x: float, y: float) -> Car:
    """The merge lane's end barrier, drawn as a box that never counts as a vehicle."""
    return Car(-1, x, y, 0.0, 0.0, 0.0, 2.0, 2.0, 1.1, "barrier", "barrier", ("", "", 0), ("", "", 0))

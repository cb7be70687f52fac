"""DriveBench's robustness settings: 15 image corruptions in five groups, and the text-only setting.

DriveBench (Xie et al. 2025) scores a driving VLM on clean inputs, on 15 corruptions of its camera
images and on the questions alone. The corruptions come from ImageNet-C (Hendrycks & Dietterich
2019: brightness, fog, snow, saturate, motion and zoom blur), nuScenes-C (RoboBEV: low light, camera
crash, frame lost, colour quantisation) and video-corruption benchmarks (rain, bit error, H.265 at a
reduced average bitrate). They are written here with numpy and Pillow: `imagecorruptions`, the
maintained ImageNet-C package, does not import with our numpy 2 / scikit-image (it needs
`pkg_resources`, its fog uses `np.float_` and its blurs a removed scikit-image argument) and pulls in
opencv-python, and its randomness is numpy's global state, which cannot be made per-sample.

Every corruption is `function(image, severity, rng)`: it keeps the image's size and mode, and all its
randomness comes from `rng`, a numpy Generator seeded from a SHA-256 of (seed, corruption, severity,
sample id, image index, camera), so the same seed, sample and image give the same pixels on every
machine and run (`image_rng`). Severity runs from 1 (mild) to 5 (severe); `DEFAULT_SEVERITY` is 3.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from drivekd.data.sample import IMAGE_PLACEHOLDER, ImageRef, Sample
from drivekd.errors import DataError

DEFAULT_SEVERITY = 3
SEVERITIES = range(1, 6)
TEXT_ONLY = "text_only"

WEATHER = "weather and lighting"
OCCLUSION = "external occlusion"
SENSOR = "sensor failure"
MOTION = "motion blur"
TRANSMISSION = "data transmission"
GROUPS = (WEATHER, OCCLUSION, SENSOR, MOTION, TRANSMISSION)

Array = np.ndarray


def _pick(values: Sequence, severity: int):  # noqa: ANN202 - a level's parameters, of any type
    return values[severity - 1]


def _float(image: Image.Image) -> Array:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def _image(x: Array, like: Image.Image) -> Image.Image:
    """Back to an image of `like`'s mode (the corruptions work on RGB floats in [0, 1])."""
    out = Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8), "RGB")
    return out if like.mode == "RGB" else out.convert(like.mode)


def _hsv(image: Image.Image, change: Callable[[Array], Array]) -> Image.Image:
    """Apply `change` to the image's HSV channels (floats in [0, 1])."""
    hsv = np.asarray(image.convert("RGB").convert("HSV"), dtype=np.float32) / 255.0
    hsv = np.round(np.clip(change(hsv), 0, 1) * 255).astype(np.uint8)
    out = Image.fromarray(hsv, "HSV").convert("RGB")
    return out if image.mode == "RGB" else out.convert(image.mode)


# ---- weather and lighting -------------------------------------------------------------------------


def brightness(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """ImageNet-C's levels: the HSV value raised by 0.1 … 0.5."""
    c = _pick([0.1, 0.2, 0.3, 0.4, 0.5], severity)

    def lift(hsv: Array) -> Array:
        hsv[..., 2] += c
        return hsv

    return _hsv(image, lift)


def _poisson_gaussian(x: Array, severity: int, rng: np.random.Generator) -> Array:
    """Sensor noise of a dark exposure: photon (Poisson) then read (Gaussian) noise (nuScenes-C)."""
    photons = 10 * _pick([60, 25, 12, 5, 3], severity)
    x = np.clip(rng.poisson(x * photons) / photons, 0, 1)
    return x + rng.normal(scale=0.1 * _pick([0.08, 0.12, 0.18, 0.26, 0.38], severity), size=x.shape)


def low_light(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """nuScenes-C's: the range mapped to [0, c] through gamma 2 (c = 0.6 … 0.2), plus sensor noise."""
    x = _float(image)
    c = _pick([0.6, 0.5, 0.4, 0.3, 0.2], severity)
    low, high = float(x.min()), float(x.max())
    x = ((x - low) / max(high - low, 1e-6)) ** 2 * c
    return _image(_poisson_gaussian(x, severity, rng), image)


def _plasma(size: int, decay: float, rng: np.random.Generator) -> Array:
    """A `size` × `size` (a power of two) diamond-square fractal in [0, 1]: ImageNet-C's fog texture."""
    grid = np.zeros((size, size), dtype=np.float64)
    step, scale = size, 100.0
    while step >= 2:
        half = step // 2
        # squares: each cell's centre from its four corners (the grid wraps around)
        corners = grid[0:size:step, 0:size:step]
        mean = (
            corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1) + np.roll(np.roll(corners, -1, 0), -1, 1)
        ) / 4
        grid[half:size:step, half:size:step] = mean + rng.uniform(-scale, scale, mean.shape)
        # diamonds: each edge midpoint from its two corners and the two centres beside it
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        left = (corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1)) / 4
        top = (corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0)) / 4
        grid[half:size:step, 0:size:step] = left + rng.uniform(-scale, scale, left.shape)
        grid[0:size:step, half:size:step] = top + rng.uniform(-scale, scale, top.shape)
        step, scale = half, scale / decay
    grid -= grid.min()
    return grid / max(grid.max(), 1e-12)


def fog(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """ImageNet-C's: a fractal haze added, then the range compressed (contrast falls)."""
    strength, decay = _pick([(1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)], severity)
    x = _float(image)
    h, w = x.shape[:2]
    size = 1 << max(h, w, 2).bit_length()
    peak = float(x.max())
    x = x + strength * _plasma(size, decay, rng)[:h, :w, None]
    return _image(x * peak / (peak + strength), image)


def _motion_kernel_blur(x: Array, length: float, angle: float, sigma: float | None = None) -> Array:
    """The image smeared along a line of `length` pixels at `angle` degrees (edges repeated): the mean
    of shifted copies, weighted by a Gaussian of `sigma` pixels along the line when given (ImageNet-C's
    kernel), evenly otherwise."""
    steps = max(round(length), 1)
    h, w = x.shape[:2]
    pad = steps + 1
    padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    dy, dx = np.sin(np.radians(angle)), np.cos(np.radians(angle))
    out = np.zeros_like(x)
    total = 0.0
    for t in range(steps + 1):
        weight = 1.0 if sigma is None else float(np.exp(-(t**2) / (2 * sigma**2)))
        oy, ox = round(t * dy), round(t * dx)
        out += weight * padded[pad + oy : pad + oy + h, pad + ox : pad + ox + w]
        total += weight
    return out / total


def snow(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """ImageNet-C's: a flake layer (noise, enlarged, thresholded, smeared as flakes falling), the
    scene whitened under it."""
    loc, spread, zoom, threshold, length, keep = _pick(
        [(0.1, 0.3, 3, 0.5, 10, 0.8), (0.2, 0.3, 2, 0.5, 12, 0.7), (0.55, 0.3, 4, 0.9, 12, 0.7),
         (0.55, 0.3, 4.5, 0.85, 12, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 0.55)],
        severity,
    )  # fmt: skip
    x = _float(image)
    h, w = x.shape[:2]
    small = rng.normal(loc, spread, (max(int(h / zoom), 1), max(int(w / zoom), 1))).astype(np.float32)
    layer = np.asarray(Image.fromarray(small, "F").resize((w, h), Image.BILINEAR), dtype=np.float32)
    layer = np.where(layer < threshold, 0.0, layer)[..., None]
    layer = np.clip(_motion_kernel_blur(layer, length * min(h, w) / 224, rng.uniform(-135, -45)), 0, 1)
    gray = x.mean(axis=2, keepdims=True)
    x = keep * x + (1 - keep) * np.maximum(x, gray * 1.5 + 0.5)
    return _image(x + layer + np.rot90(layer, k=2), image)


def rain(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Slanted streaks (more and longer with severity), the view behind them blurred and its
    contrast lowered, after the rain of the video-corruption benchmarks DriveBench draws on."""
    x = _float(image)
    h, w = x.shape[:2]
    area_per_drop, length, darken = _pick(
        [(770, 10, 0.8), (770, 30, 0.8), (770, 60, 0.7), (500, 60, 0.6), (400, 80, 0.5)], severity
    )
    length = max(2, round(length * h / 900))  # the levels were set on 1600 × 900 nuScenes frames
    slant = int(rng.integers(-10, 11)) * length // 20
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(max(h * w // area_per_drop, 1)):
        x0 = int(rng.integers(min(0, -slant), max(w - slant, 1)))
        y0 = int(rng.integers(0, max(h - length, 1)))
        draw.line([(x0, y0), (x0 + slant, y0 + length)], fill=220, width=1)
    streak = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    blurred = _float(image.convert("RGB").filter(ImageFilter.BoxBlur(1)))
    x = np.clip(blurred + streak * (1 - blurred) * (1 - x.mean()), 0, 1) * streak + x * (1 - streak)
    mean = x.mean(axis=(0, 1), keepdims=True)
    return _image((x - mean) * darken + mean, image)


# ---- external occlusion ---------------------------------------------------------------------------


def _soft_disc_mask(h: int, w: int, cy: float, cx: float, ry: float, rx: float, softness: float) -> Array:
    yy, xx = np.mgrid[0:h, 0:w]
    distance = np.sqrt(((yy - cy) / max(ry, 1e-6)) ** 2 + ((xx - cx) / max(rx, 1e-6)) ** 2)
    return np.clip((1 - distance) / softness, 0, 1)


def water_splash(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Drops on the lens: round patches where the view is smeared (blurred, lightened) like light
    through water, more and larger with severity."""
    x = _float(image)
    h, w = x.shape[:2]
    drops, radius = _pick([(4, 0.06), (6, 0.08), (8, 0.10), (10, 0.12), (12, 0.14)], severity)
    smeared = _float(image.convert("RGB").filter(ImageFilter.GaussianBlur(max(2.0, 0.02 * min(h, w) * severity))))
    smeared = np.clip(smeared * 0.85 + 0.2, 0, 1)
    cover = np.zeros((h, w), dtype=np.float32)
    for _ in range(drops):
        r = radius * min(h, w) * rng.uniform(0.6, 1.4)
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        cover = np.maximum(cover, _soft_disc_mask(h, w, cy, cx, r, r * rng.uniform(0.8, 1.2), 0.3))
    cover = cover[..., None]
    return _image(x * (1 - cover) + smeared * cover, image)


def lens_obstacle(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Something stuck on the lens (mud, a leaf): a dark, blurred-edged blob over part of the view,
    larger with severity (about 4 % to 30 % of the image)."""
    x = _float(image)
    h, w = x.shape[:2]
    share = _pick([0.04, 0.08, 0.14, 0.22, 0.30], severity)
    ry = np.sqrt(share * h * w / np.pi * rng.uniform(0.6, 1.0))
    rx = share * h * w / np.pi / ry
    cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
    cover = (0.92 * _soft_disc_mask(h, w, cy, cx, ry, rx, 0.35))[..., None]
    colour = np.array([0.16, 0.13, 0.10]) * rng.uniform(0.7, 1.3)  # dark brown-grey: dirt
    return _image(x * (1 - cover) + colour * cover, image)


# ---- sensor failure -------------------------------------------------------------------------------


def _black(image: Image.Image) -> Image.Image:
    return Image.new(image.mode, image.size)


def camera_crash(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """nuScenes-C's: a crashed camera delivers black frames. Whether this camera is down is drawn per
    scene, not per question (`Corruption.per_scene`): a dead camera stays dead for all of a scene."""
    down = 1 - (5 / 6) ** severity  # nuScenes-C crashes `severity` of 6 cameras, drawn with replacement
    return _black(image) if rng.random() < down else image.copy()


def frame_lost(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """nuScenes-C's: each frame independently lost (black) with probability severity / 6."""
    return _black(image) if rng.random() < severity / 6 else image.copy()


# ---- motion blur ----------------------------------------------------------------------------------


def saturate(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Saturation scaled up (and raised), as ImageNet-C's levels 3 to 5; its levels 1 and 2
    desaturate, which would make severity non-monotone, so ours are milder increases."""
    scale, add = _pick([(1.3, 0.0), (1.6, 0.0), (2.0, 0.0), (5.0, 0.1), (20.0, 0.2)], severity)

    def boost(hsv: Array) -> Array:
        hsv[..., 1] = hsv[..., 1] * scale + add
        return hsv

    return _hsv(image, boost)


def motion_blur(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """ImageNet-C's: the image smeared along a line at a random angle (kernel radius 10-20 px, Gaussian
    sigma 3-15 px at 224 px wide), scaled to the image's width."""
    radius, sigma = _pick([(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)], severity)
    x = _float(image)
    scale = x.shape[1] / 224
    return _image(_motion_kernel_blur(x, radius * scale, rng.uniform(-45, 45), sigma * scale), image)


def zoom_blur(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """ImageNet-C's: the mean of the image and copies zoomed into its centre (up to 1.11 … 1.31 ×)."""
    factors = _pick(
        [np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02), np.arange(1, 1.26, 0.02),
         np.arange(1, 1.31, 0.03)],
        severity,
    )  # fmt: skip
    rgb = image.convert("RGB")
    w, h = rgb.size
    out = _float(rgb)
    for f in factors:
        cw, ch = w / f, h / f
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        out += _float(rgb.resize((w, h), Image.BILINEAR, box=box))
    return _image(out / (len(factors) + 1), image)


# ---- data transmission ----------------------------------------------------------------------------


def bit_error(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """Bits of the raw 8-bit raster flipped at random (bit error rate 1e-4 … 1e-2): an uncompressed
    link's errors. DriveBench damages a compressed video stream instead (ffmpeg's noise filter),
    which smears an error over a block; scattered pixels change here."""
    rate = _pick([1e-4, 3e-4, 1e-3, 3e-3, 1e-2], severity)
    raster = np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    flat = raster.reshape(-1)
    bits = flat.size * 8
    # at least one flip, so the corruption always shows (a tiny image would often draw none)
    where = rng.choice(bits, size=max(1, rng.binomial(bits, rate)), replace=False)
    np.bitwise_xor.at(flat, where // 8, (1 << (where % 8)).astype(np.uint8))
    out = Image.fromarray(raster, "RGB")
    return out if image.mode == "RGB" else out.convert(image.mode)


def color_quant(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """nuScenes-C's: each channel posterised to 5 … 1 bits."""
    out = ImageOps.posterize(image.convert("RGB"), _pick([5, 4, 3, 2, 1], severity))
    return out if image.mode == "RGB" else out.convert(image.mode)


# the video-corruption benchmark's ABR divisors of the source bitrate; a still image's "source" is
# taken as 1 bit per pixel, about a nuScenes JPEG frame's
H265_BITS_PER_PIXEL = 1.0
H265_DIVISORS = (2, 4, 8, 16, 32)


def h265_available() -> bool:
    """PyAV's wheels bundle FFmpeg with libx265: the real encoder, no system ffmpeg needed."""
    return importlib.util.find_spec("av") is not None


def _h265_roundtrip(image: Image.Image, bits: int) -> Image.Image:
    import av

    rgb = image.convert("RGB")
    w, h = rgb.size
    even = rgb.crop((0, 0, w + w % 2, h + h % 2))  # 4:2:0 needs even sides; the crop pads with black
    buffer = io.BytesIO()
    kbits = max(bits // 1000, 1)
    with av.open(buffer, "w", format="hevc") as out:
        stream = out.add_stream("libx265", rate=1)  # one frame a second: the bitrate is bits per frame
        stream.width, stream.height, stream.pix_fmt, stream.bit_rate = even.width, even.height, "yuv420p", bits
        # one thread pool-less encode: x265's output then depends on nothing but the input
        stream.options = {
            "x265-params": f"pools=none:frame-threads=1:log-level=none:vbv-maxrate={kbits}:vbv-bufsize={kbits}"
        }
        for packet in stream.encode(av.VideoFrame.from_image(even)):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(io.BytesIO(buffer.getvalue()), "r", format="hevc") as decoded:
        frame = next(decoded.decode(video=0)).to_image()
    return frame.crop((0, 0, w, h))


def h256_abr_compression(image: Image.Image, severity: int, rng: np.random.Generator) -> Image.Image:
    """H.265 (libx265) at an average bitrate of 1/2 … 1/32 of 1 bit per pixel, decoded back. Without
    PyAV (no H.265 encoder) a stand-in: JPEG at quality 30 … 4, which blocks like a starved codec but
    is not H.265; `--corruption list` and the prediction files say which ran."""
    divisor = _pick(H265_DIVISORS, severity)
    if h265_available():
        out = _h265_roundtrip(image, int(image.width * image.height * H265_BITS_PER_PIXEL / divisor))
    else:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=_pick([30, 18, 10, 6, 4], severity))
        out = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return out if image.mode == "RGB" else out.convert(image.mode)


# ---- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    name: str
    group: str
    description: str
    apply: Callable[[Image.Image, int, np.random.Generator], Image.Image]
    # drawn per scene rather than per question: a state of the car's sensors that lasts a scene
    per_scene: bool = False


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("brightness", WEATHER, "overexposed: HSV value raised (ImageNet-C)", brightness),
        Corruption("low_light", WEATHER, "night: darkened through gamma 2, with sensor noise (nuScenes-C)", low_light),
        Corruption("fog", WEATHER, "fractal haze, contrast compressed (ImageNet-C)", fog),
        Corruption("snow", WEATHER, "falling flakes, scene whitened (ImageNet-C)", snow),
        Corruption("rain", WEATHER, "slanted streaks, view blurred and dulled", rain),
        Corruption("water_splash", OCCLUSION, "water drops on the lens smear round patches", water_splash),
        Corruption("lens_obstacle", OCCLUSION, "a dark blob (dirt) covers 4-30% of the lens", lens_obstacle),
        Corruption(
            "camera_crash",
            SENSOR,
            "a camera is down for a whole scene: black (nuScenes-C)",
            camera_crash,
            per_scene=True,
        ),
        Corruption("frame_lost", SENSOR, "a frame is lost: black with probability severity/6 (nuScenes-C)", frame_lost),
        Corruption("saturate", SENSOR, "colour saturation scaled up (ImageNet-C)", saturate),
        Corruption("motion_blur", MOTION, "smeared along a line at a random angle (ImageNet-C)", motion_blur),
        Corruption("zoom_blur", MOTION, "averaged with copies zoomed into the centre (ImageNet-C)", zoom_blur),
        Corruption("bit_error", TRANSMISSION, "random bits of the raw raster flipped", bit_error),
        Corruption("color_quant", TRANSMISSION, "each channel posterised to 5-1 bits (nuScenes-C)", color_quant),
        Corruption("h256_abr_compression", TRANSMISSION, "", h256_abr_compression),
    )
}


def description(corruption: Corruption) -> str:
    """Its one-line description; for H.265, which encoder this installation has."""
    if corruption.name != "h256_abr_compression":
        return corruption.description
    if h265_available():
        return "H.265 (libx265 through PyAV) at 1/2-1/32 of 1 bit per pixel"
    return "STAND-IN, not H.265 (no encoder: pip install av): JPEG at quality 30-4"


def listing() -> str:
    """`drivekd eval --corruption list`: name, group and description, one corruption a line."""
    width = max(map(len, CORRUPTIONS))
    group_width = max(map(len, GROUPS))
    lines = [f"{'name':<{width}}  {'group':<{group_width}}  description"]
    lines += [f"{c.name:<{width}}  {c.group:<{group_width}}  {description(c)}" for c in CORRUPTIONS.values()]
    lines.append(f"severity: NAME:1 (mild) to NAME:5 (severe); NAME alone is NAME:{DEFAULT_SEVERITY}")
    return "\n".join(lines)


# ---- a setting: what the model is shown -----------------------------------------------------------


@dataclass(frozen=True)
class InputSetting:
    """A robustness setting: one corruption at one severity, or the questions without their images."""

    corruption: str | None = None
    severity: int = DEFAULT_SEVERITY
    text_only: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.text_only and self.corruption is not None:
            raise DataError("--text-only shows no images, so --corruption has nothing to corrupt: choose one")
        if self.corruption is not None and self.corruption not in CORRUPTIONS:
            raise DataError(f"unknown corruption {self.corruption!r}; valid: {', '.join(CORRUPTIONS)}")
        if self.severity not in SEVERITIES:
            raise DataError(f"corruption severity {self.severity} is not 1 to 5")

    @property
    def label(self) -> str:
        """What prediction files record: `fog:3`, `fog:3:seed-1`, `text_only`, `h256_abr_compression:3:jpeg-stand-in`."""
        if self.text_only:
            return TEXT_ONLY
        label = f"{self.corruption}:{self.severity}"
        if self.corruption == "h256_abr_compression" and not h265_available():
            label += ":jpeg-stand-in"
        if self.seed:  # another seed draws other pixels: not the same setting
            label += f":seed-{self.seed}"
        return label

    @property
    def group(self) -> str:
        return TEXT_ONLY if self.text_only else CORRUPTIONS[str(self.corruption)].group


def parse_corruption(spec: str, *, seed: int = 0) -> InputSetting:
    """`NAME` or `NAME:SEVERITY`; a DataError (one line, naming the bad value and the valid names)."""
    name, _, level = spec.strip().partition(":")
    if name not in CORRUPTIONS:
        raise DataError(f"--corruption: unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)} (or: list)")
    if not level:
        return InputSetting(name, DEFAULT_SEVERITY, seed=seed)
    if not re.fullmatch(r"[1-5]", level):
        raise DataError(f"--corruption {spec}: severity {level!r} is not an integer from 1 to 5")
    return InputSetting(name, int(level), seed=seed)


def image_rng(setting: InputSetting, key: str, index: int, camera: str) -> np.random.Generator:
    """The generator of one image's corruption: from a SHA-256 of its whole identity, never Python's
    `hash()` (salted per process), so every run and machine draws the same pixels."""
    text = "\x1f".join([str(setting.seed), str(setting.corruption), str(setting.severity), key, str(index), camera])
    return np.random.default_rng(int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "little"))


def corrupt_image(image: Image.Image, setting: InputSetting, sample: Sample, index: int) -> Image.Image:
    """Image `index` of `sample` as `setting` shows it."""
    corruption = CORRUPTIONS[str(setting.corruption)]
    # a scene-wide draw is keyed by the camera alone: another question may list the cameras otherwise
    key = f"scene:{sample.scene_id}" if corruption.per_scene else f"sample:{sample.id}"
    rng = image_rng(setting, key, -1 if corruption.per_scene else index, sample.images[index].camera)
    out = corruption.apply(image, setting.severity, rng)
    assert out.size == image.size and out.mode == image.mode, f"{corruption.name} changed the image's size or mode"
    return out


_PLACEHOLDER_LINE = re.compile(r"[^\S\n]*" + re.escape(IMAGE_PLACEHOLDER) + r"[^\S\n]*\n?")


def without_images(sample: Sample) -> Sample:
    """The text-only setting: no images, no placeholders. A line left holding only a camera's label
    (`CAM_FRONT: <image>`) goes with its image: the label would announce a picture that is not there."""
    lines = []
    for line in sample.question.split("\n"):
        if IMAGE_PLACEHOLDER in line:
            rest = line.replace(IMAGE_PLACEHOLDER, "").strip()
            if not rest or rest.rstrip(":") in {ref.camera for ref in sample.images}:
                continue
            line = rest
        lines.append(line)
    return dataclasses.replace(sample, images=[], question="\n".join(lines).strip())


def shown_samples(samples: Sequence[Sample], setting: InputSetting | None, folder: Path) -> list[Sample]:
    """The samples as the model is shown them under `setting`: text-only ones without images, corrupted
    ones with their images written (lossless PNG) to `folder`. The backends read images from files,
    so a corrupted image is handed over as one; the caller removes `folder` after the batch."""
    if setting is None:
        return list(samples)
    if setting.text_only:
        return [without_images(s) for s in samples]
    out = []
    for n, sample in enumerate(samples):
        refs = []
        for i, ref in enumerate(sample.images):
            try:
                with Image.open(ref.path) as im:
                    clean = im.convert("RGB")
            except OSError as e:
                raise DataError(f"sample {sample.id}: cannot read image {ref.path}: {e}") from e
            path = folder / f"{n:05d}-{i}.png"
            corrupt_image(clean, setting, sample, i).save(path, format="PNG", compress_level=1)
            refs.append(ImageRef(ref.camera, str(path)))
        out.append(dataclasses.replace(sample, images=refs))
    return out

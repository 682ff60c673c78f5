"""Procedural chest-radiograph phantom: anatomy geometry, its attenuation map and the exposure.

Coordinates. Every shape is defined in *anatomical* coordinates measured in units of the
image height: ``Y`` runs from 0 (top) to 1 (bottom), ``X`` is 0 on the patient's midline and
positive towards the image right, which is the patient's LEFT in the radiological convention
of a frontal (PA/AP) view. A per-image :class:`Grid` maps pixels to these coordinates with a
small rotation and offset, so the same anatomy (and the same findings, placed in lung-relative
coordinates) can be rendered into several images of one study at different sizes and poses.

Smooth structures are rendered at a working resolution (long side <= ``WORK_LONG_SIDE``) and
upsampled; noise is added at full resolution. This keeps a 2500 x 2000 image at ~0.1-0.3 s.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Smooth anatomy is computed at most at this long side, then bilinearly upsampled (why: all
# structures are smooth at this scale; full-resolution evaluation would cost ~25x more).
WORK_LONG_SIDE = 512
# Field of view height in cm (a 43 cm detector), used to state sizes in report sentences.
FIELD_HEIGHT_CM = 43.0
MAX_12BIT = 4095


class Side(str, enum.Enum):
    """The patient's side (RIGHT is drawn on the image LEFT for frontal views)."""

    RIGHT = "right"
    LEFT = "left"

    @property
    def sign(self) -> float:
        """Sign of anatomical X on this side of a frontal image."""
        return -1.0 if self is Side.RIGHT else 1.0


class View(str, enum.Enum):
    PA = "PA"
    AP = "AP"
    LL = "LL"

    @property
    def frontal(self) -> bool:
        return self is not View.LL


def smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def soft_inside(signed: np.ndarray, width: float) -> np.ndarray:
    """1 inside (signed < 0), 0 outside, with a sigmoid edge of `width` (anatomical units)."""
    return (0.5 - 0.5 * np.tanh(signed / (2.0 * width))).astype(np.float32)


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    a: float
    b: float

    def level(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """< 1 inside, 1 on the boundary."""
        return np.sqrt(((X - self.cx) / self.a) ** 2 + ((Y - self.cy) / self.b) ** 2)

    def signed(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Approximate signed distance (negative inside)."""
        return (self.level(X, Y) - 1.0) * min(self.a, self.b)


@dataclass(frozen=True)
class LungGeometry:
    """One lung field: an ellipse cut from below by the diaphragm dome.

    ``lateral_sign`` is +1 when the lateral chest wall is at larger X (patient's left lung on a
    frontal view; the posterior side on a lateral view).
    """

    ellipse: Ellipse
    lateral_sign: float
    apex_y: float
    dome_y: float
    costophrenic_y: float

    @property
    def height(self) -> float:
        return self.costophrenic_y - self.apex_y

    def base_y(self, X: np.ndarray) -> np.ndarray:
        """Diaphragm surface under this lung: highest at the dome, lowest at the costophrenic angle."""
        e = self.ellipse
        t = np.clip((X - e.cx) / (0.95 * e.a), -1.3, 1.3)
        return self.dome_y + (self.costophrenic_y - self.dome_y) * t * t

    def inside(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        return (self.ellipse.level(X, Y) < 1.0) & (Y < self.base_y(X))

    def point(self, u: float, v: float) -> tuple[float, float]:
        """Anatomical point at lung-relative (u: medial 0 -> lateral 1, v: apex 0 -> base 1)."""
        e = self.ellipse
        y = self.apex_y + v * self.height
        half = e.a * math.sqrt(max(1.0 - ((y - e.cy) / e.b) ** 2, 0.04))
        medial = e.cx - self.lateral_sign * half
        return medial + u * 2.0 * half * self.lateral_sign, y


@dataclass(frozen=True)
class Grid:
    """Anatomical coordinates of every pixel of a (height, width) image at working resolution."""

    height: int
    width: int
    X: np.ndarray
    Y: np.ndarray
    pixel: float  # size of one working pixel in anatomical units

    @staticmethod
    def make(height: int, width: int, rotation: float, offset: tuple[float, float]) -> Grid:
        rows = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
        cols = (np.arange(width, dtype=np.float32)[None, :] + 0.5 - width / 2.0) / height
        c, s = math.cos(rotation), math.sin(rotation)
        dx, dy = offset
        xr, yr = cols - dx, rows - 0.5 - dy
        X = (c * xr + s * yr).astype(np.float32)
        Y = (-s * xr + c * yr + 0.5).astype(np.float32)
        return Grid(height, width, X, Y, 1.0 / height)


@dataclass
class Layers:
    """Mutable rendering state a finding draws into (all arrays at working resolution)."""

    attenuation: np.ndarray  # float32, higher = denser (brighter on MONOCHROME2)
    markings: np.ndarray  # float32 lung vascular markings, added at the end
    markings_gain: np.ndarray  # float32, 0 where markings must vanish (pneumothorax)
    lung_soft: dict[Side, np.ndarray] = field(default_factory=dict)
    lung_hard: dict[Side, np.ndarray] = field(default_factory=dict)

    def composite(self) -> np.ndarray:
        return self.attenuation + self.markings * self.markings_gain


@dataclass(frozen=True)
class Anatomy:
    """Geometry of one patient's chest for one view (frontal or lateral)."""

    view: View
    lungs: dict[Side, LungGeometry]
    heart: Ellipse
    mediastinum_half_width: float
    trachea_x: float
    carina_y: float
    spine_x: float
    body_half_width: float
    hila: dict[Side, tuple[float, float]]
    gastric_bubble: Ellipse | None
    clavicles: bool
    arms: bool

    # -- masks shared by the renderer and the finding painters ---------------------------------
    def heart_mask(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        floor = max(lung.dome_y for lung in self.lungs.values()) + 0.02
        return (self.heart.level(X, Y) < 1.0) & (Y < floor)

    def mediastinum_mask(self, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """Superior mediastinum above the heart (the region a widened mediastinum occupies)."""
        top = self.lungs[Side.RIGHT].apex_y + 0.04
        bottom = self.heart.cy - 0.6 * self.heart.b
        if self.view.frontal:
            return (np.abs(X - self.trachea_x) < self.mediastinum_half_width) & (Y > top) & (Y < bottom)
        # Lateral: the anterior mediastinum in front of the trachea.
        return (X > self.trachea_x - 2.2 * self.mediastinum_half_width) & (X < self.trachea_x) & (Y > top) & (Y < bottom)


def sample_frontal(rng: np.random.Generator, ctr: float, mediastinum_scale: float = 1.0) -> Anatomy:
    """Frontal chest geometry with cardiothoracic ratio `ctr` (normal ~0.40-0.49)."""
    thorax = rng.uniform(0.29, 0.34)
    apex = rng.uniform(0.10, 0.15)
    cp_r = rng.uniform(0.70, 0.78)
    dome_r = cp_r - rng.uniform(0.07, 0.11)
    dome_l = dome_r + rng.uniform(0.01, 0.035)
    cp_l = max(cp_r + rng.uniform(0.0, 0.03), dome_l + 0.05)
    medial = rng.uniform(0.035, 0.05)
    lungs = {}
    for side, dome, cp in ((Side.RIGHT, dome_r, cp_r), (Side.LEFT, dome_l, cp_l)):
        a = (thorax - medial) / 2.0
        b = (cp - apex) / 1.44  # the ellipse is 0.9 a wide at the costophrenic angle
        lungs[side] = LungGeometry(Ellipse(side.sign * (medial + a), apex + b, a, b), side.sign, apex, dome, cp)
    heart_width = ctr * 2.0 * thorax * 0.95
    heart_b = rng.uniform(0.11, 0.14) * (1.0 + 1.5 * max(ctr - 0.47, 0.0))
    heart = Ellipse(rng.uniform(0.12, 0.18) * heart_width, dome_l - rng.uniform(0.0, 0.03), heart_width / 2.0, heart_b)
    carina = rng.uniform(0.30, 0.36)
    hila = {side: (side.sign * (medial + rng.uniform(0.04, 0.07)), carina + rng.uniform(0.03, 0.07)) for side in Side}
    bubble = None
    if rng.random() < 0.6:
        left = lungs[Side.LEFT]
        bubble = Ellipse(left.ellipse.cx + rng.uniform(-0.02, 0.03), dome_l + rng.uniform(0.04, 0.07), rng.uniform(0.03, 0.05), rng.uniform(0.018, 0.03))
    return Anatomy(
        view=View.PA,
        lungs=lungs,
        heart=heart,
        mediastinum_half_width=rng.uniform(0.05, 0.065) * mediastinum_scale,
        trachea_x=rng.uniform(-0.006, 0.006),
        carina_y=carina,
        spine_x=0.0,
        body_half_width=thorax + rng.uniform(0.05, 0.08),
        hila=hila,
        gastric_bubble=bubble,
        clavicles=True,
        arms=bool(rng.random() < 0.5),
    )


def sample_lateral(rng: np.random.Generator, ctr: float, mediastinum_scale: float = 1.0) -> Anatomy:
    """Lateral (LL) geometry: anterior on the image left, both lungs superimposed in one field."""
    depth = rng.uniform(0.25, 0.31)  # half the antero-posterior diameter
    apex = rng.uniform(0.09, 0.14)
    cp = rng.uniform(0.74, 0.82)  # posterior costophrenic sulcus
    dome = cp - rng.uniform(0.12, 0.17)
    a = depth * 0.82
    b = (cp - apex) / 1.44
    field_ = LungGeometry(Ellipse(rng.uniform(0.0, 0.03), apex + b, a, b), 1.0, apex, dome, cp)
    scale = ctr / 0.45
    heart = Ellipse(-depth * 0.35, dome + 0.01, 0.12 * scale, 0.13 * (0.6 + 0.4 * scale))
    carina = rng.uniform(0.30, 0.36)
    hila = {side: (rng.uniform(-0.01, 0.03), carina + rng.uniform(0.03, 0.06)) for side in Side}
    return Anatomy(
        view=View.LL,
        lungs={Side.RIGHT: field_, Side.LEFT: field_},
        heart=heart,
        mediastinum_half_width=rng.uniform(0.04, 0.05) * mediastinum_scale,
        trachea_x=rng.uniform(-0.02, 0.01),
        carina_y=carina,
        spine_x=depth * 0.72,
        body_half_width=depth + rng.uniform(0.03, 0.05),
        hila=hila,
        gastric_bubble=None,
        clavicles=False,
        arms=False,
    )


def _segment_distance(X: np.ndarray, Y: np.ndarray, points: list[tuple[float, float]]) -> np.ndarray:
    """Distance of every pixel to a polyline (vectorised over pixels, looped over segments)."""
    best = np.full(X.shape, np.inf, dtype=np.float32)
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=False):
        dx, dy = x1 - x0, y1 - y0
        length2 = max(dx * dx + dy * dy, 1e-12)
        t = np.clip(((X - x0) * dx + (Y - y0) * dy) / length2, 0.0, 1.0)
        dist = np.hypot(X - (x0 + t * dx), Y - (y0 + t * dy))
        np.minimum(best, dist, out=best)
    return best


def polyline_distance(X: np.ndarray, Y: np.ndarray, points: list[tuple[float, float]]) -> np.ndarray:
    return _segment_distance(X, Y, points)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean unit-std band-limited noise (Gaussian-filtered white noise)."""
    from scipy.ndimage import gaussian_filter

    noise = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_px, mode="reflect")
    std = float(noise.std()) or 1.0
    return (noise / std).astype(np.float32)


def render_anatomy(anatomy: Anatomy, grid: Grid, rng: np.random.Generator) -> Layers:
    """Attenuation of the normal chest (no findings); lungs are darker than the mediastinum."""
    X, Y = grid.X, grid.Y
    edge = max(0.004, 1.5 * grid.pixel)
    att = np.full(X.shape, 0.03, dtype=np.float32)

    # Body outline: neck at the top widening to the shoulders.
    half = 0.10 + (anatomy.body_half_width - 0.10) * smoothstep(0.0, 0.17, Y)
    body = soft_inside(np.abs(X - (anatomy.spine_x * 0.2 if not anatomy.view.frontal else 0.0)) - half, edge * 2)
    att += 0.50 * body
    if anatomy.arms:
        arm_x = anatomy.body_half_width + 0.06
        arm = soft_inside(np.abs(np.abs(X) - arm_x) - 0.045, edge * 3) * smoothstep(0.08, 0.16, Y)
        att += 0.30 * arm * (1 - body)

    lungs_union_soft = np.zeros_like(att)
    lung_soft: dict[Side, np.ndarray] = {}
    heart_soft = soft_inside(anatomy.heart.signed(X, Y), edge)
    if anatomy.view.frontal:
        med_soft = soft_inside(np.abs(X - anatomy.trachea_x) - anatomy.mediastinum_half_width, edge)
        med_soft *= (Y < anatomy.heart.cy).astype(np.float32)
        # Aortic knob: a bump on the patient's left at the level of the carina.
        knob = Ellipse(anatomy.mediastinum_half_width + 0.012, anatomy.carina_y - 0.04, 0.03, 0.025)
        med_soft = np.maximum(med_soft, soft_inside(knob.signed(X, Y), edge))
    else:
        med_soft = np.zeros_like(att)
    for side, lung in anatomy.lungs.items():
        if side in lung_soft:
            continue
        soft = soft_inside(lung.ellipse.signed(X, Y), edge) * soft_inside(Y - lung.base_y(X), edge)
        soft *= (1.0 - heart_soft) * (1.0 - med_soft)
        lung_soft[side] = soft
        lungs_union_soft = np.maximum(lungs_union_soft, soft)
    if not anatomy.view.frontal:
        lung_soft[Side.LEFT] = lung_soft[Side.RIGHT]

    # Abdomen below the diaphragm (denser than the chest wall soft tissue).
    lowest_base = np.minimum(anatomy.lungs[Side.RIGHT].base_y(X), anatomy.lungs[Side.LEFT].base_y(X))
    abdomen = soft_inside(lowest_base - Y, edge * 2) * body
    att += 0.14 * abdomen
    if anatomy.gastric_bubble is not None:
        att -= 0.22 * soft_inside(anatomy.gastric_bubble.signed(X, Y), edge) * abdomen
    heart_fade = soft_inside(Y - (anatomy.lungs[Side.LEFT].dome_y + 0.03), 0.02)
    att += 0.16 * np.maximum(heart_soft * heart_fade, med_soft) * body
    att -= 0.36 * lungs_union_soft

    # Trachea and main bronchi: air columns.
    tx, cy = anatomy.trachea_x, anatomy.carina_y
    if anatomy.view.frontal:
        airway = [(tx, 0.0), (tx, cy)]
        trachea = soft_inside(polyline_distance(X, Y, airway) - 0.011, edge)
        bronchi = np.maximum(
            soft_inside(polyline_distance(X, Y, [(tx, cy), anatomy.hila[Side.RIGHT]]) - 0.007, edge),
            soft_inside(polyline_distance(X, Y, [(tx, cy), anatomy.hila[Side.LEFT]]) - 0.007, edge),
        )
        att -= 0.12 * np.maximum(trachea, bronchi) * (1 - lungs_union_soft)
    else:
        trachea = soft_inside(polyline_distance(X, Y, [(tx - 0.03, 0.0), (tx, cy)]) - 0.012, edge)
        att -= 0.12 * trachea

    # Spine with vertebral bodies.
    if anatomy.view.frontal:
        spine = soft_inside(np.abs(X - anatomy.spine_x) - 0.034, edge * 2)
        vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * Y / 0.042)
        att += (0.08 + 0.05 * vertebrae) * spine * body
    else:
        spine = soft_inside(np.abs(X - anatomy.spine_x) - 0.05, edge * 2) * smoothstep(0.05, 0.12, Y)
        vertebrae = 0.5 + 0.5 * np.cos(2 * np.pi * Y / 0.05)
        att += (0.10 + 0.10 * vertebrae) * spine
        sternum = soft_inside(np.abs(X + anatomy.body_half_width - 0.025) - 0.01, edge) * smoothstep(0.15, 0.2, Y) * (Y < 0.6)
        att += 0.12 * sternum

    # Ribs: posterior arcs (brighter) and anterior arcs (fainter), periodic in a bent coordinate.
    r = np.abs(X - (anatomy.spine_x if anatomy.view.frontal else -anatomy.body_half_width))
    if not anatomy.view.frontal:
        r = r * 0.55
    apex = anatomy.lungs[Side.RIGHT].apex_y
    cp = max(lung.costophrenic_y for lung in anatomy.lungs.values())
    thorax_soft = soft_inside(r - (anatomy.body_half_width - 0.03), edge) * smoothstep(apex - 0.04, apex + 0.01, Y)
    thorax_soft *= soft_inside(Y - (cp + 0.02), edge * 2)
    rr = r - 0.03
    spacing = 0.052 + 0.006 * rng.random()
    t_post = (Y - (-0.25 * rr + 1.3 * rr * rr) - (apex - 0.02)) / spacing
    frac = t_post - np.floor(t_post)
    band = np.clip(1.0 - np.abs(frac - 0.25) / 0.24, 0.0, 1.0) ** 0.5
    cortex = np.clip(1.0 - np.abs(np.abs(frac - 0.25) - 0.2) / 0.05, 0.0, 1.0)
    thorax_soft *= body
    att += (0.06 * band + 0.04 * cortex) * thorax_soft * (t_post > 0) * (t_post < 10.5)
    t_ant = (Y - (0.45 * rr - 0.35 * rr * rr) - (apex + 0.03)) / (spacing * 1.25)
    frac_ant = t_ant - np.floor(t_ant)
    band_ant = np.clip(1.0 - np.abs(frac_ant - 0.3) / 0.18, 0.0, 1.0)
    att += 0.025 * band_ant * thorax_soft * (t_ant > 0) * (t_ant < 6)

    # Clavicles: gently curved thick bones from the sternal notch outwards and upwards.
    if anatomy.clavicles:
        for side in Side:
            s = side.sign
            y0 = apex + rng.uniform(0.03, 0.06)
            pts = [(s * 0.035, y0), (s * 0.12, y0 - 0.025), (s * 0.22, y0 - 0.05), (s * (anatomy.body_half_width - 0.01), y0 - 0.06)]
            dist = polyline_distance(X, Y, pts)
            att += 0.14 * soft_inside(dist - 0.012, edge) + 0.05 * soft_inside(np.abs(dist - 0.011) - 0.002, edge)

    # Lung vascular markings: zero-crossing ridges of band-limited noise look like branching
    # vessels; they are denser and thicker near the hila.
    sigma_px = max(0.012 / grid.pixel, 1.0)
    texture = smooth_noise(rng, X.shape, sigma_px)
    hilar = np.zeros_like(att)
    for hx, hy in anatomy.hila.values():
        hilar = np.maximum(hilar, np.exp(-((X - hx) ** 2 + (Y - hy) ** 2) / (2 * 0.11**2)))
    vessels = np.exp(-(texture**2) / (0.04 + 0.12 * hilar))
    markings = (0.05 * vessels + 0.05 * hilar) * lungs_union_soft

    lung_hard = {side: soft > 0.5 for side, soft in lung_soft.items()}
    return Layers(
        attenuation=att.astype(np.float32),
        markings=markings.astype(np.float32),
        markings_gain=np.ones_like(att),
        lung_soft=lung_soft,
        lung_hard=lung_hard,
    )


@dataclass(frozen=True)
class Exposure:
    """Per-image acquisition: window of attenuation mapped to the detector range, gamma, noise."""

    low: float
    high: float
    gamma: float
    noise: float
    max_value: int

    @staticmethod
    def sample(rng: np.random.Generator) -> Exposure:
        return Exposure(
            low=rng.uniform(0.0, 0.08),
            high=rng.uniform(0.85, 1.1),
            gamma=rng.uniform(0.8, 1.25),
            noise=rng.uniform(0.006, 0.02),
            max_value=int(rng.integers(3300, MAX_12BIT + 1)),
        )


def resize_float(image: np.ndarray, height: int, width: int) -> np.ndarray:
    if image.shape == (height, width):
        return image.astype(np.float32, copy=False)
    return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    if mask.shape == (height, width):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint16)).resize((width, height), Image.NEAREST)).astype(mask.dtype)


def expose(attenuation: np.ndarray, height: int, width: int, exposure: Exposure, rng: np.random.Generator) -> np.ndarray:
    """Full-resolution 12-bit MONOCHROME2 pixel values (uint16 in [0, 4095]); bright = dense."""
    full = resize_float(attenuation, height, width)
    full = full + exposure.noise * rng.standard_normal(full.shape, dtype=np.float32)
    scaled = np.clip((full - exposure.low) / (exposure.high - exposure.low), 0.0, 1.0) ** exposure.gamma
    return np.round(scaled * exposure.max_value).astype(np.uint16)


def work_shape(height: int, width: int) -> tuple[int, int]:
    scale = min(1.0, WORK_LONG_SIDE / max(height, width))
    return max(8, round(height * scale)), max(8, round(width * scale))

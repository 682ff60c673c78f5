"""Finding catalogue: what a synthetic study can show, where it is drawn and how it is described.

Each :class:`Finding` is one statement of a report about one CheXpert label. Positive findings
are drawn into the image and get a region mask (bit ``label.bit`` of the regions PNG);
uncertain ones ("possible ...", "cannot exclude ...") are drawn faintly but get *no* mask (the
report does not assert them); negated and unmentioned labels are not drawn. The mapping
finding -> region -> sentence is documented in docs/SYNTHETIC.md.

Placement is stored in lung-relative coordinates (``u`` medial->lateral, ``v`` apex->base,
see :meth:`LungGeometry.point`) so that every image of a study (frontal, second frontal,
lateral) draws the same finding in the corresponding place.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from mlip_dist.data.mimic import CHEXPERT_LABELS
from mlip_dist.data.synthetic.phantom import (
    FIELD_HEIGHT_CM,
    Anatomy,
    Ellipse,
    Grid,
    Layers,
    Side,
    polyline_distance,
    soft_inside,
)


class _ChexpertLabel(str, enum.Enum):
    """Base of :data:`Label`: a CheXpert label name whose ``bit`` is its index in the regions mask."""

    @property
    def bit(self) -> int:
        return CHEXPERT_LABELS.index(self.value)


# The 14 CheXpert labels in the MIMIC-CXR CSV column order, built from the one list the real-data
# reader uses (data.mimic.CHEXPERT_LABELS): Label.ATELECTASIS = "Atelectasis", ...,
# Label.SUPPORT_DEVICES = "Support Devices".
Label = _ChexpertLabel("Label", [(name.upper().replace(" ", "_"), name) for name in CHEXPERT_LABELS])
# The labels the generator can draw (No Finding, Fracture and Pleural Other are never drawn).
DRAWABLE: tuple[Label, ...] = (
    Label.ATELECTASIS,
    Label.CARDIOMEGALY,
    Label.CONSOLIDATION,
    Label.EDEMA,
    Label.ENLARGED_CARDIOMEDIASTINUM,
    Label.LUNG_LESION,
    Label.LUNG_OPACITY,
    Label.PLEURAL_EFFUSION,
    Label.PNEUMONIA,
    Label.PNEUMOTHORAX,
    Label.SUPPORT_DEVICES,
)
# The CheXpert competition findings (5x200 benchmark).
COMPETITION: tuple[Label, ...] = (
    Label.ATELECTASIS,
    Label.CARDIOMEGALY,
    Label.CONSOLIDATION,
    Label.EDEMA,
    Label.PLEURAL_EFFUSION,
)
# Study-level prevalence of a positive mention among abnormal studies (roughly MIMIC-CXR's).
PREVALENCE: dict[Label, float] = {
    Label.ATELECTASIS: 0.25,
    Label.CARDIOMEGALY: 0.25,
    Label.CONSOLIDATION: 0.10,
    Label.EDEMA: 0.15,
    Label.ENLARGED_CARDIOMEDIASTINUM: 0.05,
    Label.LUNG_LESION: 0.06,
    Label.LUNG_OPACITY: 0.25,
    Label.PLEURAL_EFFUSION: 0.30,
    Label.PNEUMONIA: 0.10,
    Label.PNEUMOTHORAX: 0.06,
    Label.SUPPORT_DEVICES: 0.30,
}
# Probability that a label that is not positive is explicitly negated in the report.
NEGATION_RATE: dict[Label, float] = {
    Label.ATELECTASIS: 0.05,
    Label.CARDIOMEGALY: 0.45,
    Label.CONSOLIDATION: 0.45,
    Label.EDEMA: 0.3,
    Label.ENLARGED_CARDIOMEDIASTINUM: 0.25,
    Label.LUNG_LESION: 0.08,
    Label.LUNG_OPACITY: 0.15,
    Label.PLEURAL_EFFUSION: 0.6,
    Label.PNEUMONIA: 0.2,
    Label.PNEUMOTHORAX: 0.6,
}
UNCERTAIN_RATE = 0.06


class Certainty(str, enum.Enum):
    POSITIVE = "positive"
    UNCERTAIN = "uncertain"
    NEGATIVE = "negative"

    @property
    def value_label(self) -> float:
        """CheXpert CSV value."""
        return {Certainty.POSITIVE: 1.0, Certainty.UNCERTAIN: -1.0, Certainty.NEGATIVE: 0.0}[self]


class Laterality(str, enum.Enum):
    RIGHT = "right"
    LEFT = "left"
    BILATERAL = "bilateral"

    @property
    def sides(self) -> tuple[Side, ...]:
        if self is Laterality.BILATERAL:
            return (Side.RIGHT, Side.LEFT)
        return (Side(self.value),)


class Zone(str, enum.Enum):
    UPPER = "upper"
    MIDDLE = "middle"
    LOWER = "lower"


class Severity(str, enum.Enum):
    SMALL = "small"
    MODERATE = "moderate"
    LARGE = "large"

    @property
    def index(self) -> int:
        return list(Severity).index(self)


class Device(str, enum.Enum):
    ET_TUBE = "endotracheal tube"
    CENTRAL_LINE = "central venous catheter"
    PACEMAKER = "pacemaker"
    ENTERIC_TUBE = "enteric tube"


# Lung-relative zone bands (v ranges); middle zone of the left lung is the lingula.
ZONE_V: dict[Zone, tuple[float, float]] = {
    Zone.UPPER: (0.12, 0.33),
    Zone.MIDDLE: (0.42, 0.58),
    Zone.LOWER: (0.66, 0.86),
}
# Focal airspace findings: (density added, blob scale) -- consolidation densest, opacity haziest.
FOCAL_STYLE: dict[Label, tuple[float, float]] = {
    Label.CONSOLIDATION: (0.30, 1.0),
    Label.PNEUMONIA: (0.24, 1.15),
    Label.LUNG_OPACITY: (0.16, 1.3),
}


@dataclass(frozen=True)
class Finding:
    """One report statement about one label, with everything needed to draw and describe it."""

    label: Label
    certainty: Certainty
    laterality: Laterality | None = None
    zone: Zone | None = None
    severity: Severity | None = None
    device: Device | None = None
    u: float = 0.5  # lung-relative placement (medial 0 -> lateral 1)
    v: float = 0.5  # (apex 0 -> base 1)
    extent: float = 0.05  # size in anatomical units (height fractions)
    angle: float = 0.0
    shape_seed: int = 0
    variant: int = 0  # phrasing / device sub-type choice

    @property
    def drawn_positive(self) -> bool:
        return self.certainty is Certainty.POSITIVE

    @property
    def size_cm(self) -> float:
        return round(2.0 * self.extent * FIELD_HEIGHT_CM, 1)


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def _lobe(rng: np.random.Generator, laterality: Laterality) -> tuple[Zone, float, float]:
    zone = Zone(rng.choice([z.value for z in Zone], p=[0.3, 0.2, 0.5]))
    lo, hi = ZONE_V[zone]
    u_lo, u_hi = (0.2, 0.5) if zone is Zone.MIDDLE else (0.3, 0.75)
    return zone, float(rng.uniform(lo, hi)), float(rng.uniform(u_lo, u_hi))


def sample_finding(label: Label, certainty: Certainty, rng: np.random.Generator) -> Finding:
    """A random instance of `label` (side, zone, size, placement, phrasing)."""
    seed = int(rng.integers(0, 2**31 - 1))
    variant = int(rng.integers(0, 1000))
    side = Laterality(rng.choice(["right", "left"]))
    if label in FOCAL_STYLE:
        zone, v, u = _lobe(rng, side)
        return Finding(label, certainty, side, zone, u=u, v=v, extent=float(rng.uniform(0.035, 0.07)), shape_seed=seed, variant=variant)
    if label is Label.LUNG_LESION:
        zone, v, u = _lobe(rng, side)
        mass = rng.random() < 0.25
        extent = float(rng.uniform(0.035, 0.06) if mass else rng.uniform(0.013, 0.026))
        return Finding(label, certainty, side, zone, Severity.LARGE if mass else Severity.SMALL, u=u, v=v, extent=extent, shape_seed=seed, variant=variant)
    if label is Label.PLEURAL_EFFUSION:
        lat = Laterality(rng.choice(["right", "left", "bilateral"], p=[0.35, 0.35, 0.3]))
        sev = Severity(rng.choice([s.value for s in Severity], p=[0.5, 0.35, 0.15]))
        depth = {Severity.SMALL: (0.10, 0.16), Severity.MODERATE: (0.2, 0.3), Severity.LARGE: (0.36, 0.5)}[sev]
        return Finding(label, certainty, lat, Zone.LOWER, sev, extent=float(rng.uniform(*depth)), shape_seed=seed, variant=variant)
    if label is Label.ATELECTASIS:
        lat = Laterality(rng.choice(["right", "left", "bilateral"], p=[0.3, 0.35, 0.35]))
        return Finding(label, certainty, lat, Zone.LOWER, u=float(rng.uniform(0.3, 0.65)), v=float(rng.uniform(0.72, 0.86)),
                       extent=float(rng.uniform(0.04, 0.07)), angle=float(rng.uniform(-0.3, 0.3)), shape_seed=seed, variant=variant)
    if label is Label.PNEUMOTHORAX:
        sev = Severity(rng.choice([s.value for s in Severity], p=[0.5, 0.3, 0.2]))
        depth = {Severity.SMALL: (0.02, 0.035), Severity.MODERATE: (0.05, 0.075), Severity.LARGE: (0.09, 0.13)}[sev]
        return Finding(label, certainty, side, Zone.UPPER, sev, extent=float(rng.uniform(*depth)), shape_seed=seed, variant=variant)
    if label in (Label.CARDIOMEGALY, Label.EDEMA):
        sev = Severity(rng.choice([s.value for s in Severity], p=[0.45, 0.4, 0.15]))
        lat = Laterality.BILATERAL if label is Label.EDEMA else None
        return Finding(label, certainty, lat, severity=sev, extent=float(rng.uniform(0.08, 0.12)), shape_seed=seed, variant=variant)
    if label is Label.ENLARGED_CARDIOMEDIASTINUM:
        return Finding(label, certainty, severity=Severity.MODERATE, extent=float(rng.uniform(1.45, 1.8)), shape_seed=seed, variant=variant)
    if label is Label.SUPPORT_DEVICES:
        device = Device(rng.choice([d.value for d in Device], p=[0.3, 0.35, 0.15, 0.2]))
        return Finding(label, certainty, device=device, u=float(rng.random()), v=float(rng.random()), shape_seed=seed, variant=variant)
    raise ValueError(f"label {label.value!r} cannot be drawn by the synthetic generator")


def cardiothoracic_ratio(findings: list[Finding], rng: np.random.Generator) -> float:
    """CTR implied by the findings: normal 0.40-0.49, enlarged by severity (faint if uncertain)."""
    for f in findings:
        if f.label is Label.CARDIOMEGALY and f.certainty is not Certainty.NEGATIVE:
            lo, hi = [(0.53, 0.56), (0.57, 0.61), (0.62, 0.67)][f.severity.index if f.severity else 0]
            if f.certainty is Certainty.UNCERTAIN:
                lo, hi = 0.50, 0.53
            return float(rng.uniform(lo, hi))
    return float(rng.uniform(0.40, 0.49))


def mediastinum_scale(findings: list[Finding]) -> float:
    for f in findings:
        if f.label is Label.ENLARGED_CARDIOMEDIASTINUM and f.certainty is not Certainty.NEGATIVE:
            return f.extent if f.certainty is Certainty.POSITIVE else 1.25
    return 1.0


# ----------------------------------------------------------------------------------------------
# Sentences
# ----------------------------------------------------------------------------------------------
def _lobe_name(side: Side, zone: Zone) -> str:
    if zone is Zone.MIDDLE:
        return "right middle lobe" if side is Side.RIGHT else "lingula"
    return f"{side.value} {zone.value} lobe"


def _pick(options: list[str], variant: int) -> str:
    return options[variant % len(options)]


def positive_sentence(f: Finding) -> str:
    """The sentence that asserts `f` (positive), naming side, zone and size as drawn."""
    lat = f.laterality.value if f.laterality else ""
    sev = f.severity.value if f.severity else ""
    if f.label in FOCAL_STYLE:
        lobe = _lobe_name(Side(lat), f.zone or Zone.LOWER)
        if f.label is Label.CONSOLIDATION:
            return _pick([f"Consolidation in the {lobe}.", f"There is focal consolidation in the {lobe}.", f"Dense {lobe} consolidation."], f.variant)
        if f.label is Label.PNEUMONIA:
            return _pick([f"Findings are consistent with {lobe} pneumonia.", f"{lobe.capitalize()} pneumonia.", f"There is pneumonia in the {lobe}."], f.variant)
        return _pick([f"Patchy opacity in the {lobe}.", f"There is a hazy opacity in the {lobe}.", f"Ill-defined {lobe} opacity."], f.variant)
    if f.label is Label.LUNG_LESION:
        lobe = _lobe_name(Side(lat), f.zone or Zone.UPPER)
        kind = "mass" if f.severity is Severity.LARGE else "nodule"
        return _pick([f"{f.size_cm:.1f} cm {kind} in the {lobe}.", f"There is a {f.size_cm:.1f} cm {kind} in the {lobe}.", f"A {lobe} {kind} measures {f.size_cm:.1f} cm."], f.variant)
    if f.label is Label.PLEURAL_EFFUSION:
        if f.laterality is Laterality.BILATERAL:
            return _pick([f"{sev.capitalize()} bilateral pleural effusions.", f"There are {sev} bilateral pleural effusions."], f.variant)
        return _pick([f"{sev.capitalize()} {lat} pleural effusion.", f"There is a {sev} {lat} pleural effusion.", f"A {sev} {lat} pleural effusion is present."], f.variant)
    if f.label is Label.ATELECTASIS:
        if f.laterality is Laterality.BILATERAL:
            return _pick(["Bibasilar atelectasis.", "There is bibasilar atelectasis.", "Linear atelectasis at both lung bases."], f.variant)
        return _pick([f"{lat.capitalize()} basilar atelectasis.", f"Linear atelectasis at the {lat} lung base.", f"There is {lat} basilar atelectasis."], f.variant)
    if f.label is Label.PNEUMOTHORAX:
        where = "apical " if f.severity is not Severity.LARGE else ""
        return _pick([f"{sev.capitalize()} {lat} {where}pneumothorax.", f"There is a {sev} {lat} {where}pneumothorax."], f.variant)
    if f.label is Label.CARDIOMEGALY:
        adverb = {"small": "mildly", "moderate": "moderately", "large": "severely"}[sev]
        adjective = {"small": "Mild", "moderate": "Moderate", "large": "Severe"}[sev]
        return _pick([f"{adjective} cardiomegaly.", f"The heart is {adverb} enlarged.", f"The cardiac silhouette is {adverb} enlarged."], f.variant)
    if f.label is Label.EDEMA:
        adjective = {"small": "mild", "moderate": "moderate", "large": "severe"}[sev]
        return _pick([f"{adjective.capitalize()} pulmonary edema.", f"There is {adjective} pulmonary edema.", f"{adjective.capitalize()} perihilar pulmonary edema."], f.variant)
    if f.label is Label.ENLARGED_CARDIOMEDIASTINUM:
        return _pick(["The mediastinum is widened.", "Widening of the superior mediastinum.", "The cardiomediastinal silhouette is enlarged."], f.variant)
    if f.label is Label.SUPPORT_DEVICES:
        return device_sentence(f)
    raise ValueError(f"no sentence for {f.label.value!r}")


def device_sentence(f: Finding) -> str:
    cm = 2 + int(f.v * 4)
    if f.device is Device.ET_TUBE:
        return _pick([f"Endotracheal tube terminates {cm} cm above the carina.", f"The endotracheal tube tip is {cm} cm above the carina."], f.variant)
    if f.device is Device.CENTRAL_LINE:
        where = "the mid SVC" if f.v < 0.6 else "the cavoatrial junction"
        via = "Right internal jugular" if f.u < 0.5 else "Left subclavian"
        return _pick([f"{via} central venous catheter terminates in {where}.", f"{via} line with tip in {where}."], f.variant)
    if f.device is Device.PACEMAKER:
        return _pick(["Left chest wall pacemaker with leads in the right atrium and right ventricle.", "Dual-lead pacemaker device overlies the left chest."], f.variant)
    return _pick(["Enteric tube courses below the diaphragm with the tip in the stomach.", "A nasogastric tube terminates in the stomach."], f.variant)


def uncertain_sentence(f: Finding) -> str:
    """A hedged mention ("possible ...", "cannot exclude ...") -> CheXpert -1."""
    text = positive_sentence(f).rstrip(".")
    phrase = {
        Label.PNEUMONIA: ["Cannot exclude pneumonia.", "Possible early pneumonia."],
        Label.CONSOLIDATION: ["Possible consolidation at the lung base.", "Consolidation cannot be excluded."],
        Label.LUNG_OPACITY: ["Possible subtle opacity.", "A subtle opacity cannot be excluded."],
        Label.PLEURAL_EFFUSION: ["Possible small pleural effusion.", "A trace pleural effusion cannot be excluded."],
        Label.PNEUMOTHORAX: ["Cannot exclude a tiny apical pneumothorax.", "Possible small pneumothorax."],
        Label.EDEMA: ["Possible mild pulmonary edema.", "Mild pulmonary edema cannot be excluded."],
        Label.CARDIOMEGALY: ["Possible mild cardiomegaly.", "The heart is possibly mildly enlarged."],
        Label.ATELECTASIS: ["Possible atelectasis at the lung bases.", "Minimal atelectasis cannot be excluded."],
        Label.LUNG_LESION: ["Possible small nodule.", "A small nodule cannot be excluded."],
        Label.ENLARGED_CARDIOMEDIASTINUM: ["Possible mediastinal widening.", "Mediastinal widening cannot be excluded."],
    }.get(f.label)
    if phrase is None:
        return f"Possible {text[0].lower()}{text[1:]}."
    return _pick(phrase, f.variant)


NEGATIONS: dict[Label, list[str]] = {
    Label.PLEURAL_EFFUSION: ["No pleural effusion.", "There is no pleural effusion.", "No large pleural effusion."],
    Label.PNEUMOTHORAX: ["No pneumothorax.", "There is no pneumothorax.", "No pneumothorax is seen."],
    Label.CONSOLIDATION: ["No focal consolidation.", "There is no focal consolidation."],
    Label.PNEUMONIA: ["No evidence of pneumonia.", "No radiographic evidence of pneumonia."],
    Label.EDEMA: ["No pulmonary edema.", "There is no pulmonary edema."],
    Label.CARDIOMEGALY: ["Heart size is normal.", "The heart is normal in size.", "No cardiomegaly."],
    Label.ENLARGED_CARDIOMEDIASTINUM: ["Mediastinal contours are normal.", "The mediastinum is not widened."],
    Label.LUNG_OPACITY: ["No focal opacity.", "No focal airspace opacity."],
    Label.ATELECTASIS: ["No atelectasis."],
    Label.LUNG_LESION: ["No pulmonary nodules or masses."],
}
# Sentences that negate several labels at once (as real reports often do).
COMBINED_NEGATIONS: list[tuple[str, tuple[Label, ...]]] = [
    ("No pleural effusion or pneumothorax.", (Label.PLEURAL_EFFUSION, Label.PNEUMOTHORAX)),
    ("There is no focal consolidation, pleural effusion or pneumothorax.", (Label.CONSOLIDATION, Label.PLEURAL_EFFUSION, Label.PNEUMOTHORAX)),
    ("No focal consolidation or pulmonary edema.", (Label.CONSOLIDATION, Label.EDEMA)),
]
FILLERS: list[str] = [
    "The lungs are well expanded.",
    "Hilar contours are unremarkable.",
    "Degenerative changes are seen in the thoracic spine.",
    "Lung volumes are low.",
    "The imaged upper abdomen is unremarkable.",
    "Surgical clips project over the upper abdomen.",
]


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------
def _blob(f: Finding, anatomy: Anatomy, grid: Grid, side: Side, scale: float) -> np.ndarray:
    """Smooth irregular blob (sum of Gaussians) centred at the finding's lung-relative place."""
    lung = anatomy.lungs[side]
    cx, cy = lung.point(f.u, f.v)
    shape_rng = np.random.default_rng(f.shape_seed)
    field = np.zeros(grid.X.shape, dtype=np.float32)
    count = int(shape_rng.integers(3, 6))
    for _ in range(count):
        ox, oy = shape_rng.normal(0.0, 0.6 * f.extent * scale, size=2)
        sigma = f.extent * scale * shape_rng.uniform(0.45, 0.8)
        field += np.exp(-((grid.X - cx - ox) ** 2 + (grid.Y - cy - oy) ** 2) / (2 * sigma * sigma)).astype(np.float32)
    peak = float(field.max())
    return field / peak if peak > 0 else field


def _ensure_nonempty(mask: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    if mask.any():
        return mask
    if fallback.any():
        return fallback
    raise AssertionError("synthetic finding region is empty at this image size")


def draw_finding(f: Finding, anatomy: Anatomy, grid: Grid, layers: Layers) -> np.ndarray:
    """Paint `f` into `layers` and return its boolean region mask (working resolution).

    Uncertain findings are painted at 40% strength; their mask is still returned (the caller
    decides that only positive findings enter the regions PNG).
    """
    X, Y = grid.X, grid.Y
    gain = 1.0 if f.certainty is Certainty.POSITIVE else 0.4
    edge = max(0.004, 1.5 * grid.pixel)
    mask = np.zeros(X.shape, dtype=bool)
    lat = f.laterality or Laterality.RIGHT

    if f.label in FOCAL_STYLE or f.label is Label.LUNG_LESION:
        side = lat.sides[0]
        if f.label is Label.LUNG_LESION:
            cx, cy = anatomy.lungs[side].point(f.u, f.v)
            radius = max(f.extent, 1.6 * grid.pixel)  # size_cm states the diameter 2 * extent
            dist = np.hypot(X - cx, Y - cy)
            layers.attenuation += gain * 0.32 * soft_inside(dist - radius, edge * 0.7)
            return _ensure_nonempty(dist < radius * 1.1, dist <= dist.min())
        density, scale = FOCAL_STYLE[f.label]
        blob = _blob(f, anatomy, grid, side, scale)
        inside = layers.lung_soft[side]
        layers.attenuation += gain * density * np.clip(blob * 1.6 - 0.3, 0.0, 1.0) * inside
        region = blob > 0.45
        return _ensure_nonempty(region & layers.lung_hard[side], region)

    if f.label is Label.PLEURAL_EFFUSION:
        for side in lat.sides:
            lung = anatomy.lungs[side]
            e = lung.ellipse
            lateral_frac = np.clip((X - e.cx) * lung.lateral_sign / e.a, 0.0, 1.0)
            level = lung.costophrenic_y - f.extent * lung.height - 0.3 * f.extent * lung.height * lateral_frac
            chest = (e.level(X, Y) < 1.03) & (Y < lung.base_y(X) + 0.01) & ~anatomy.heart_mask(X, Y)
            fluid = soft_inside(level - Y, 0.015) * soft_inside(e.signed(X, Y) - 0.005, edge)
            # Only above the diaphragm: fluid there has the density of the abdomen below it, so
            # the hemidiaphragm and the costophrenic angle lose their outline, as on real films.
            fluid *= soft_inside(Y - lung.base_y(X), edge)
            layers.attenuation += gain * 0.34 * fluid * (1.0 - anatomy.heart_mask(X, Y))
            layers.markings_gain *= 1.0 - 0.8 * fluid
            region = chest & (Y > level)
            mask |= _ensure_nonempty(region, chest & (Y > lung.costophrenic_y - 0.05))
        return mask

    if f.label is Label.ATELECTASIS:
        for k, side in enumerate(lat.sides):
            lung = anatomy.lungs[side]
            cx, cy = lung.point(f.u, f.v)
            angle = f.angle * (1 if k == 0 else -1) * lung.lateral_sign
            c, s = math.cos(angle), math.sin(angle)
            along = (X - cx) * c + (Y - cy) * s
            across = -(X - cx) * s + (Y - cy) * c
            thickness = max(0.2 * f.extent, 2.0 * grid.pixel)
            level = np.sqrt((along / f.extent) ** 2 + (across / thickness) ** 2)
            layers.attenuation += gain * 0.24 * soft_inside((level - 1.0) * thickness, edge * 0.6) * layers.lung_soft[side]
            band = level < 1.25
            mask |= _ensure_nonempty(band & layers.lung_hard[side], band)
        return mask

    if f.label is Label.PNEUMOTHORAX:
        side = lat.sides[0]
        lung = anatomy.lungs[side]
        e = lung.ellipse
        d = f.extent
        collapsed = Ellipse(e.cx - lung.lateral_sign * 0.5 * d, e.cy + 0.9 * d, max(e.a - d, 0.02), max(e.b - 1.1 * d, 0.05))
        limit = lung.apex_y + (0.55 if f.severity is not Severity.LARGE else 1.0) * lung.height
        gap = (e.level(X, Y) < 1.0) & (collapsed.level(X, Y) >= 1.0) & (Y < np.minimum(lung.base_y(X), limit))
        gap &= ~anatomy.heart_mask(X, Y) & ~anatomy.mediastinum_mask(X, Y)
        gap_soft = soft_inside(collapsed.signed(X, Y) * -1.0, edge) * layers.lung_soft[side] * soft_inside(Y - limit, 0.02)
        layers.attenuation -= gain * 0.10 * gap_soft
        layers.markings_gain *= 1.0 - gain * gap_soft
        pleural_line = soft_inside(np.abs(collapsed.signed(X, Y)) - 0.0025, edge * 0.5) * layers.lung_soft[side] * (Y < limit)
        layers.attenuation += gain * 0.10 * pleural_line
        return _ensure_nonempty(gap, (e.level(X, Y) < 1.0) & (Y < lung.apex_y + 0.05))

    if f.label is Label.CARDIOMEGALY:
        # The enlargement itself is in the anatomy (cardiothoracic_ratio); the region is the heart.
        return _ensure_nonempty(anatomy.heart_mask(X, Y), anatomy.heart.level(X, Y) < 1.0)

    if f.label is Label.ENLARGED_CARDIOMEDIASTINUM:
        return _ensure_nonempty(anatomy.mediastinum_mask(X, Y), anatomy.heart_mask(X, Y))

    if f.label is Label.EDEMA:
        amplitude = {Severity.SMALL: 0.09, Severity.MODERATE: 0.15, Severity.LARGE: 0.22}[f.severity or Severity.SMALL]
        haze = np.zeros(X.shape, dtype=np.float32)
        for hx, hy in anatomy.hila.values():
            sigma = f.extent * (1.0 + 0.3 * (f.severity.index if f.severity else 0))
            haze = np.maximum(haze, np.exp(-((X - hx) ** 2 + (Y - hy) ** 2) / (2 * sigma * sigma)))
        lungs = np.maximum(layers.lung_soft[Side.RIGHT], layers.lung_soft[Side.LEFT])
        layers.attenuation += gain * amplitude * haze * lungs
        layers.markings_gain *= 1.0 + 0.5 * gain * haze  # indistinct, engorged vessels
        hard = layers.lung_hard[Side.RIGHT] | layers.lung_hard[Side.LEFT]
        return _ensure_nonempty((haze > 0.4) & hard, haze > 0.4)

    if f.label is Label.SUPPORT_DEVICES:
        return _draw_device(f, anatomy, grid, layers, gain, edge)
    raise ValueError(f"cannot draw {f.label.value!r}")


def device_paths(f: Finding, anatomy: Anatomy) -> tuple[list[list[tuple[float, float]]], tuple[float, float] | None]:
    """Polylines (anatomical coordinates) of a device, and the pacemaker generator centre if any."""
    tx, carina = anatomy.trachea_x, anatomy.carina_y
    h = anatomy.heart
    if f.device is Device.ET_TUBE:
        tip = carina - (2 + int(f.v * 4)) / FIELD_HEIGHT_CM
        return [[(tx - (0.03 if not anatomy.view.frontal else 0.0), -0.02), (tx, tip)]], None
    if f.device is Device.CENTRAL_LINE:
        tip_y = carina + (0.01 + 0.04 * f.v if f.v < 0.6 else 0.07 + 0.02 * f.v)
        svc = (tx - 0.03, tip_y)
        if f.u < 0.5:
            return [[(tx - 0.09, -0.02), (tx - 0.075, 0.12), (tx - 0.04, 0.22), svc]], None
        return [[(0.34, 0.19), (0.2, 0.15), (0.06, 0.19), (tx - 0.01, 0.24), svc]], None
    if f.device is Device.PACEMAKER:
        generator = (0.17 + 0.08 * f.u, 0.13 + 0.05 * f.v)
        ra = (h.cx - 0.6 * h.a, h.cy - 0.4 * h.b)
        rv = (h.cx + 0.2 * h.a, h.cy + 0.35 * h.b)
        via = (tx + 0.02, carina - 0.05)
        return [[generator, via, (tx - 0.03, carina + 0.06), ra], [generator, via, (tx - 0.02, carina + 0.08), rv]], generator
    dome = anatomy.lungs[Side.LEFT].dome_y
    return [[(tx + 0.004, -0.02), (tx + 0.01, carina), (0.015, dome - 0.05), (0.04 + 0.08 * f.u, dome + 0.07)]], None


def _draw_device(f: Finding, anatomy: Anatomy, grid: Grid, layers: Layers, gain: float, edge: float) -> np.ndarray:
    X, Y = grid.X, grid.Y
    paths, generator = device_paths(f, anatomy)
    width = max(0.004, 1.0 * grid.pixel)
    mask = np.zeros(X.shape, dtype=bool)
    for path in paths:
        dist = polyline_distance(X, Y, path)
        layers.attenuation += gain * 0.45 * soft_inside(dist - width, edge * 0.4)
        # The region is a tube-wide corridor (not a one-pixel line) so grounding is measurable.
        mask |= dist < max(3.0 * width, 3.0 * grid.pixel)
    if generator is not None:
        gx, gy = generator
        box = np.maximum(np.abs(X - gx) / 0.035, np.abs(Y - gy) / 0.025)
        layers.attenuation += gain * 0.9 * soft_inside((box - 1.0) * 0.025, edge * 0.4)
        mask |= box < 1.15
    return _ensure_nonempty(mask, polyline_distance(X, Y, paths[0]) <= polyline_distance(X, Y, paths[0]).min())

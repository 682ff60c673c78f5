"""Synthetic MIMIC-CXR-like data: phantom chest radiographs, reports, labels, region masks.

Writes the real PhysioNet layouts (MIMIC-CXR DICOM or MIMIC-CXR-JPG) plus CheXpert, RSNA and
SIIM style evaluation sets, so the shard packer and the evaluation run on it unchanged.
See docs/SYNTHETIC.md for the formats and the finding -> region -> sentence mapping.
"""

from mlip_dist.data.synthetic.findings import CHEXPERT_LABELS, COMPETITION, Certainty, Finding, Label
from mlip_dist.data.synthetic.generator import ImageFormat, SyntheticConfig, generate, render_image
from mlip_dist.data.synthetic.layouts import rle_decode, rle_encode
from mlip_dist.data.synthetic.reports import Report, write_report

__all__ = [
    "CHEXPERT_LABELS",
    "COMPETITION",
    "Certainty",
    "Finding",
    "ImageFormat",
    "Label",
    "Report",
    "SyntheticConfig",
    "generate",
    "render_image",
    "rle_decode",
    "rle_encode",
    "write_report",
]

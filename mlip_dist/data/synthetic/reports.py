"""Report writer: turns a study's findings into a MIMIC-CXR style free-text report and labels.

Labels follow the CheXpert convention and agree with the text by construction: a positive
sentence gives 1.0, a hedged one ("possible ...", "cannot exclude ...") -1.0, a negated one
("No pleural effusion.") 0.0, a label the report does not mention is empty; "No Finding" is 1.0
when no label other than Support Devices is positive or uncertain (CheXpert's rule), else empty.

Layout variants mimic the real reports: FINDINGS + IMPRESSION, impression only, a combined
"FINDINGS AND IMPRESSION:" section, numbered impressions, hard-wrapped lines with a leading
space, headings in varied case and spacing, and a few reports with neither section (which
the pre-training pipeline must drop, METHOD.md Data).
"""

from __future__ import annotations

import dataclasses
import enum
import textwrap
from dataclasses import dataclass, field

import numpy as np

from mlip_dist.data.synthetic.findings import (
    COMBINED_NEGATIONS,
    DRAWABLE,
    FILLERS,
    NEGATION_RATE,
    NEGATIONS,
    PREVALENCE,
    UNCERTAIN_RATE,
    Certainty,
    Finding,
    Label,
    positive_sentence,
    sample_finding,
    uncertain_sentence,
)


class ReportStyle(str, enum.Enum):
    STANDARD = "standard"  # FINDINGS: + IMPRESSION:
    IMPRESSION_ONLY = "impression_only"
    COMBINED = "combined"  # FINDINGS AND IMPRESSION:
    NO_SECTIONS = "no_sections"  # neither heading: dropped downstream


STYLE_WEIGHTS = {ReportStyle.STANDARD: 0.66, ReportStyle.IMPRESSION_ONLY: 0.18, ReportStyle.COMBINED: 0.12, ReportStyle.NO_SECTIONS: 0.04}


@dataclass(frozen=True)
class Statement:
    """One sentence of the report and the labels it asserts."""

    text: str
    labels: tuple[tuple[Label, Certainty], ...]
    finding_index: int | None = None  # index into the study's findings it describes


@dataclass(frozen=True)
class Report:
    text: str
    labels: dict[str, float | None]  # CheXpert column -> 1.0 / 0.0 / -1.0 / None
    style: ReportStyle
    numbered: bool
    wrapped: bool
    # finding index -> the report sentences (whitespace-normalised) that assert it.
    sentences_by_finding: dict[int, list[str]] = field(default_factory=dict)


def sample_findings(
    rng: np.random.Generator,
    *,
    only: tuple[Label, ...] | None = None,
    normal_rate: float = 0.3,
) -> list[Finding]:
    """Findings of one study: positives, hedged mentions and negations (in report order).

    With `only`, exactly those labels are positive and nothing else is positive or uncertain
    (used to build "positive for this finding only" benchmark images).
    """
    findings: list[Finding] = []
    if only is not None:
        positives = list(only)
    elif rng.random() < normal_rate:
        positives = []
    else:
        positives = [label for label in DRAWABLE if rng.random() < PREVALENCE[label]]
        if not positives:
            positives = [DRAWABLE[int(rng.integers(len(DRAWABLE)))]]
    for label in positives:
        findings.append(sample_finding(label, Certainty.POSITIVE, rng))
        if label is Label.SUPPORT_DEVICES and only is None and rng.random() < 0.35:
            extra = sample_finding(label, Certainty.POSITIVE, rng)
            if extra.device is not findings[-1].device:
                findings.append(extra)
    for label in DRAWABLE:
        if label in positives or label is Label.SUPPORT_DEVICES:
            continue
        draw = rng.random()
        if only is None and draw < UNCERTAIN_RATE:
            findings.append(sample_finding(label, Certainty.UNCERTAIN, rng))
        elif draw < UNCERTAIN_RATE + NEGATION_RATE[label] * (1 - UNCERTAIN_RATE):
            findings.append(Finding(label, Certainty.NEGATIVE, variant=int(rng.integers(0, 1000))))
    return findings


def labels_from_statements(statements: list[Statement]) -> dict[str, float | None]:
    """CheXpert columns implied by the statements (positive > uncertain > negative)."""
    rank = {Certainty.POSITIVE: 3, Certainty.UNCERTAIN: 2, Certainty.NEGATIVE: 1}
    best: dict[Label, Certainty] = {}
    for statement in statements:
        for label, certainty in statement.labels:
            if label not in best or rank[certainty] > rank[best[label]]:
                best[label] = certainty
    values: dict[str, float | None] = {label.value: None for label in Label}
    for label, certainty in best.items():
        values[label.value] = certainty.value_label
    abnormal = any(
        certainty in (Certainty.POSITIVE, Certainty.UNCERTAIN)
        for label, certainty in best.items()
        if label is not Label.SUPPORT_DEVICES
    )
    values[Label.NO_FINDING.value] = None if abnormal else 1.0
    return values


def _statements(findings: list[Finding], rng: np.random.Generator) -> tuple[list[Statement], list[Statement]]:
    """(body statements in order, statements for a separate impression)."""
    positive: list[Statement] = []
    negative: list[Statement] = []
    negated = {f.label: f for f in findings if f.certainty is Certainty.NEGATIVE}
    for index, f in enumerate(findings):
        if f.certainty is Certainty.POSITIVE:
            positive.append(Statement(positive_sentence(f), ((f.label, f.certainty),), index))
        elif f.certainty is Certainty.UNCERTAIN:
            positive.append(Statement(uncertain_sentence(f), ((f.label, f.certainty),), index))
    # Combine negations when the report would naturally say them together.
    for text, labels in COMBINED_NEGATIONS:
        if all(label in negated for label in labels) and rng.random() < 0.5:
            negative.append(Statement(text, tuple((label, Certainty.NEGATIVE) for label in labels)))
            for label in labels:
                negated.pop(label)
    for label, f in negated.items():
        options = NEGATIONS[label]
        negative.append(Statement(options[f.variant % len(options)], ((label, Certainty.NEGATIVE),)))
    order = rng.permutation(len(negative))
    negative = [negative[i] for i in order]
    fillers = [Statement(text, ()) for text in rng.choice(FILLERS, size=int(rng.integers(0, 3)), replace=False)]
    body = positive + negative + fillers
    impression: list[Statement] = []
    for statement in positive:
        f = findings[statement.finding_index] if statement.finding_index is not None else None
        if f is not None and f.certainty is Certainty.POSITIVE:
            # The impression restates the finding in other words (another phrasing variant).
            reworded = dataclasses.replace(f, variant=f.variant + 1)
            impression.append(Statement(positive_sentence(reworded), statement.labels, statement.finding_index))
        else:
            impression.append(statement)
    if not impression:
        impression.append(Statement(["No acute cardiopulmonary process.", "No acute intrathoracic abnormality."][int(rng.integers(2))], ()))
    return body, impression


def _heading(name: str, rng: np.random.Generator) -> str:
    cased = [name.upper(), name.title(), name.upper()][int(rng.integers(3))]
    return cased + [":", " :", ":", ":  "][int(rng.integers(4))]


def _paragraph(sentences: list[str], wrap: int | None, separator: str) -> str:
    text = separator.join(sentences)
    if wrap is None:
        return " " + text
    return "\n".join(" " + line for line in textwrap.wrap(text, wrap, break_on_hyphens=False))


def _numbered(sentences: list[str], wrap: int | None) -> str:
    lines = []
    for number, sentence in enumerate(sentences, start=1):
        item = f"{number}. {sentence}"
        if wrap is None:
            lines.append(" " + item)
        else:
            lines.extend(" " + line for line in textwrap.wrap(item, wrap, subsequent_indent="    ", break_on_hyphens=False))
    return "\n".join(lines)


def write_report(findings: list[Finding], rng: np.random.Generator, *, exam: str, indication: str) -> Report:
    """Compose the report text for `findings`; see the module docstring for the variants."""
    body, impression = _statements(findings, rng)
    style = ReportStyle(rng.choice([s.value for s in STYLE_WEIGHTS], p=list(STYLE_WEIGHTS.values())))
    wrap = int(rng.integers(60, 79)) if rng.random() < 0.6 else None
    separator = "  " if rng.random() < 0.5 else " "
    numbered = False

    lines = ["                                 FINAL REPORT", f" EXAMINATION:  {exam}", "", f" INDICATION:  {indication}", ""]
    if rng.random() < 0.7:
        technique = "PA and lateral views of the chest." if "LAT" in exam else "Single frontal view of the chest."
        lines += [" TECHNIQUE:  " + technique, ""]
    lines += [" COMPARISON:  " + ["___.", "None.", "Chest radiograph from ___.", "___ and ___."][int(rng.integers(4))], ""]

    mentioned: list[Statement]
    if style is ReportStyle.STANDARD:
        numbered = len(impression) >= 2 and rng.random() < 0.5
        lines += [" " + _heading("findings", rng), "", _paragraph([s.text for s in body], wrap, separator), ""]
        lines += [" " + _heading("impression", rng), ""]
        lines.append(_numbered([s.text for s in impression], wrap) if numbered else _paragraph([s.text for s in impression], wrap, separator))
        mentioned = body + impression
    elif style is ReportStyle.IMPRESSION_ONLY:
        numbered = len(body) >= 2 and rng.random() < 0.4
        lines += [" " + _heading("impression", rng), ""]
        lines.append(_numbered([s.text for s in body], wrap) if numbered else _paragraph([s.text for s in body], wrap, separator))
        mentioned = body
    elif style is ReportStyle.COMBINED:
        lines += [" " + _heading("findings and impression", rng), "", _paragraph([s.text for s in body], wrap, separator)]
        mentioned = body
    else:
        lines += [" PORTABLE CHEST:", "", _paragraph([s.text for s in body], wrap, separator)]
        mentioned = body
    text = "\n".join(lines).rstrip() + "\n"

    by_finding: dict[int, list[str]] = {}
    for statement in mentioned:
        if statement.finding_index is not None and findings[statement.finding_index].certainty is Certainty.POSITIVE:
            sentences = by_finding.setdefault(statement.finding_index, [])
            if statement.text not in sentences:
                sentences.append(statement.text)
    return Report(text, labels_from_statements(mentioned), style, numbered, wrap is not None, by_finding)


INDICATIONS = [
    "___-year-old man with shortness of breath.",
    "___-year-old woman with cough and fever  // eval for pneumonia",
    "History: ___F with chest pain",
    "___M s/p line placement, assess position",
    "___-year-old with hypoxia.  // ?edema",
    "Follow-up of pleural effusion.",
    "___ with new ET tube placement.",
]


def sample_indication(rng: np.random.Generator) -> str:
    return INDICATIONS[int(rng.integers(len(INDICATIONS)))]

"""Radiology report parsing: FINDINGS / IMPRESSION sections and the sentence splitter.

Implements METHOD.md, Data: "Report text = FINDINGS + IMPRESSION sections (either may be
missing; a pair with neither is dropped and counted)" and the sentence rule "split on '. ',
enumerators like '1.', new lines; de-identification blanks ``___`` kept as a token; sentences
with fewer than 2 words are dropped; at most ``max_sentences`` per report".

Section rules (what :func:`parse_report` guarantees)
-----------------------------------------------------
* A heading is a line that starts (after optional spaces) with a *known* heading name, in any
  case and with any spacing, followed by a colon (``FINDINGS:``, ``Impression :``,
  ``FINDINGS  AND IMPRESSION:``); text after the colon on the same line belongs to the section.
  ``FINAL REPORT`` / ``ADDENDUM`` lines are headings without a colon. Unknown ``Word:`` prefixes
  (``Note: ...``) are body text, so a sentence is never mistaken for a heading.
* FINDINGS (``FINDING(S)``) -> ``findings``; IMPRESSION(S), CONCLUSION(S), SUMMARY -> ``impression``;
  a combined heading (``FINDINGS AND IMPRESSION``, ``FINDINGS/IMPRESSION``,
  ``IMPRESSION AND FINDINGS``) -> ``impression`` (stored once, never duplicated).
  Repeated headings of the same kind are concatenated in report order.
* All other known headings (INDICATION, HISTORY, TECHNIQUE, COMPARISON, EXAMINATION, WET READ,
  RECOMMENDATION(S), NOTIFICATION, ...) are parsed so their text is *excluded*.
* Fallback, when the report has no FINDINGS/IMPRESSION/CONCLUSION heading at all: the last
  paragraph (blank-line separated block) that does not start with a known heading is the
  impression; if every paragraph starts with a known non-target heading, the text that
  precedes the first heading is used; otherwise the report has neither section.
  (The MIMIC-CXR authors' section parser uses the same "last paragraph" rule.)
* Hard-wrapped lines inside a section are joined with a space; a line break is kept (as a
  sentence boundary) after a line that ends a sentence (``.``, ``:``, ``?``, ``!``), before an
  enumerated or bulleted line (``1.``, ``2)``, ``-``), and at paragraph breaks.
* Runs of 3 or more underscores are normalised to ``___``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLANK = "___"

_TARGET_HEADINGS: dict[str, str] = {
    "FINDINGS": "findings",
    "FINDING": "findings",
    "IMPRESSION": "impression",
    "IMPRESSIONS": "impression",
    "CONCLUSION": "impression",
    "CONCLUSIONS": "impression",
    "SUMMARY": "impression",
    "FINDINGS AND IMPRESSION": "impression",
    "FINDINGS AND IMPRESSIONS": "impression",
    "FINDINGS/IMPRESSION": "impression",
    "FINDINGS / IMPRESSION": "impression",
    "IMPRESSION AND FINDINGS": "impression",
    "IMPRESSION/FINDINGS": "impression",
}
# Headings whose text is not pre-training text (MIMIC-CXR report vocabulary).
_OTHER_HEADINGS = frozenset(
    {
        "INDICATION",
        "INDICATIONS",
        "HISTORY",
        "CLINICAL HISTORY",
        "CLINICAL INDICATION",
        "CLINICAL INFORMATION",
        "REASON FOR EXAM",
        "REASON FOR EXAMINATION",
        "REASON FOR STUDY",
        "TECHNIQUE",
        "COMPARISON",
        "COMPARISONS",
        "EXAMINATION",
        "EXAM",
        "TYPE OF EXAMINATION",
        "STUDY",
        "PROCEDURE",
        "REFERENCE EXAM",
        "WET READ",
        "RECOMMENDATION",
        "RECOMMENDATIONS",
        "RECOMMENDATION(S)",
        "NOTIFICATION",
        "ADDENDUM",
        "FINAL REPORT",
        "CLINICAL",
        "PA AND LATERAL CHEST",
    }
)
_NO_COLON_HEADINGS = frozenset({"FINAL REPORT", "ADDENDUM"})
_HEADING_RE = re.compile(r"^\s*([A-Za-z][A-Za-z()/& ]{0,40}?)\s*:\s?(.*)$")
_ENUM_LINE_RE = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*\u2022])\s+")
_UNDERSCORES_RE = re.compile(r"_{3,}")
# An enumerator ("1." / "2)") at the start of text or after whitespace, followed by whitespace.
_ENUM_RE = re.compile(r"(?:(?<=\s)|^)\d{1,2}[.)](?=\s)")
_SENTENCE_END_RE = re.compile(r"(?<=\.)\s+")
_WORD_RE = re.compile(r"[A-Za-z0-9]|___")


@dataclass(frozen=True)
class ReportSections:
    """The pre-training sections of one report; empty strings where a section is absent."""

    findings: str
    impression: str
    from_headings: bool  # False when the fallback (last paragraph) rule was used

    @property
    def is_empty(self) -> bool:
        return not (self.findings.strip() or self.impression.strip())

    @property
    def text(self) -> str:
        """Pre-training text: FINDINGS then IMPRESSION, separated by a newline (METHOD.md, Data)."""
        return "\n".join(part for part in (self.findings, self.impression) if part)


def _normalise_heading(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip()).upper()


def _classify_line(line: str) -> tuple[str | None, str]:
    """(section kind or 'other' or None for body text, remaining text on the line)."""
    stripped = line.strip()
    whole = _normalise_heading(stripped.rstrip(":"))
    if whole in _NO_COLON_HEADINGS:
        return "other", ""
    match = _HEADING_RE.match(line)
    if match is None:
        return None, line
    name = _normalise_heading(match.group(1))
    if name in _TARGET_HEADINGS:
        return _TARGET_HEADINGS[name], match.group(2)
    if name in _OTHER_HEADINGS:
        return "other", match.group(2)
    return None, line


def unwrap(lines: list[str]) -> str:
    """Join hard-wrapped lines; keep line breaks that are sentence or paragraph boundaries."""
    out: list[str] = []
    current = ""
    for raw in lines:
        line = _UNDERSCORES_RE.sub(BLANK, raw.strip())
        if not line:
            if current:
                out.append(current)
                current = ""
            continue
        if not current:
            current = line
        elif _ENUM_LINE_RE.match(line) or current.endswith((".", ":", "?", "!")):
            out.append(current)
            current = line
        else:
            current = f"{current} {line}"
    if current:
        out.append(current)
    return "\n".join(re.sub(r"[ \t]+", " ", part) for part in out)


def _paragraphs(lines: list[str]) -> list[list[str]]:
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]


def parse_report(text: str) -> ReportSections:
    """Extract FINDINGS and IMPRESSION from a free-text report (rules in the module docstring)."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    sections: dict[str, list[str]] = {"findings": [], "impression": []}
    preamble: list[str] = []
    current: str | None = None  # None = before any heading
    seen_target = False
    for line in lines:
        kind, rest = _classify_line(line)
        if kind is not None:
            current = kind
            if kind in sections:
                seen_target = True
                # A blank line separates repeated headings of the same kind.
                if sections[kind]:
                    sections[kind].append("")
                if rest.strip():
                    sections[kind].append(rest)
            continue
        if current is None:
            preamble.append(line)
        elif current in sections:
            sections[current].append(line)
    if seen_target:
        return ReportSections(unwrap(sections["findings"]), unwrap(sections["impression"]), True)

    # Fallback: last paragraph not introduced by a known heading.
    for block in reversed(_paragraphs(lines)):
        kind, _ = _classify_line(block[0])
        if kind is None:
            return ReportSections("", unwrap(block), False)
    return ReportSections("", unwrap(preamble), False)


def count_words(sentence: str) -> int:
    """Words are whitespace tokens with a letter or digit, or the de-identification blank."""
    return sum(1 for token in sentence.split() if _WORD_RE.search(token))


def split_sentences(text: str, max_sentences: int = 16, min_words: int = 2) -> list[str]:
    """METHOD.md, Data: split on new lines, enumerators ("1.", "2)") and ". ".

    Guarantees: enumerators are removed, ``___`` blanks are kept as tokens (runs of underscores
    become ``___``), internal whitespace is collapsed, sentences keep their final period,
    sentences with fewer than ``min_words`` words are dropped, at most ``max_sentences`` are
    returned, in report order.
    """
    sentences: list[str] = []
    text = _UNDERSCORES_RE.sub(BLANK, text)
    for line in text.splitlines():
        for item in _ENUM_RE.split(line):
            for piece in _SENTENCE_END_RE.split(item):
                sentence = " ".join(piece.split())
                if count_words(sentence) >= min_words:
                    sentences.append(sentence)
                    if len(sentences) >= max_sentences:
                        return sentences
    return sentences


def normalise_sentence(sentence: str) -> str:
    """Case- and punctuation-insensitive form used to match sentences across tools."""
    return " ".join(re.sub(r"[^a-z0-9_ ]+", " ", sentence.lower()).split())

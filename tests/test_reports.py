"""Report section parser and METHOD.md sentence splitter (mlip_dist.data.reports)."""

from __future__ import annotations

import pytest

from mlip_dist.data.reports import count_words, normalise_sentence, parse_report, split_sentences

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough  // ? pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 Lungs are well expanded and clear.  There is no focal consolidation,
 pleural effusion, or pneumothorax.  Heart size is
 normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_mimic_style_sections_and_wrapped_lines():
    sections = parse_report(MIMIC_STYLE)
    assert sections.from_headings
    assert sections.findings == (
        "Lungs are well expanded and clear. There is no focal consolidation, pleural effusion, "
        "or pneumothorax. Heart size is normal."
    )
    assert sections.impression == "No acute cardiopulmonary process."
    # INDICATION / COMPARISON text never leaks into the pre-training text.
    assert "cough" not in sections.text and sections.text.count("___") == 0
    assert sections.text == sections.findings + "\n" + sections.impression


@pytest.mark.parametrize(
    "heading",
    [
        "IMPRESSION:",
        "Impression:",
        "impression :",
        "  IMPRESSION  :",
        "IMPRESSIONS:",
        "CONCLUSION:",
        "Conclusions:",
    ],
)
def test_impression_heading_variants(heading):
    sections = parse_report(f"FINDINGS: Heart size is normal.\n{heading} No pneumothorax.\n")
    assert sections.findings == "Heart size is normal."
    assert sections.impression == "No pneumothorax."


@pytest.mark.parametrize(
    "heading",
    [
        "FINDINGS AND IMPRESSION:",
        "Findings and  Impression :",
        "FINDINGS/IMPRESSION:",
        "IMPRESSION AND FINDINGS:",
    ],
)
def test_combined_heading_is_stored_once_as_impression(heading):
    sections = parse_report(f"INDICATION: fever.\n\n{heading}\nMild pulmonary edema. No effusion.\n")
    assert sections.findings == ""
    assert sections.impression == "Mild pulmonary edema. No effusion."
    assert sections.text.count("edema") == 1


def test_numbered_impression_and_sentences():
    report = "IMPRESSION:\n1. Right lower lobe pneumonia.\n2. Small right\neffusion.\n3) ET tube 4 cm above carina."
    sections = parse_report(report)
    # A wrapped enumerated item is joined; each item stays on its own line.
    assert sections.impression.splitlines() == [
        "1. Right lower lobe pneumonia.",
        "2. Small right effusion.",
        "3) ET tube 4 cm above carina.",
    ]
    assert split_sentences(sections.text) == [
        "Right lower lobe pneumonia.",
        "Small right effusion.",
        "ET tube 4 cm above carina.",
    ]


def test_inline_enumerators_split():
    assert split_sentences("1. No pneumothorax. 2. Stable cardiomegaly 3. Lines unchanged.") == [
        "No pneumothorax.",
        "Stable cardiomegaly",
        "Lines unchanged.",
    ]


def test_unknown_colon_prefix_is_body_text():
    sections = parse_report("FINDINGS: Heart normal.\nNote: lungs are clear.\nIMPRESSION: Normal chest.")
    assert sections.findings == "Heart normal.\nNote: lungs are clear."


def test_repeated_headings_concatenate_in_order():
    sections = parse_report("IMPRESSION: First finding here.\n\nADDENDUM\nIMPRESSION: Second finding here.")
    assert sections.impression == "First finding here.\nSecond finding here."


def test_no_headings_uses_last_paragraph():
    report = "FINAL REPORT\nINDICATION: pneumonia?\n\nPA and lateral views obtained.\n\nNo acute process.\nStable heart."
    sections = parse_report(report)
    assert not sections.from_headings
    assert sections.findings == ""
    assert sections.impression == "No acute process.\nStable heart."


def test_no_headings_plain_body_is_impression():
    sections = parse_report("Lungs are clear. No effusion.")
    assert sections.impression == "Lungs are clear. No effusion."


def test_only_other_sections_is_empty():
    sections = parse_report("FINAL REPORT\nINDICATION: line placement.\nCOMPARISON: None.\n")
    assert sections.is_empty


def test_empty_impression_heading_with_findings():
    sections = parse_report("FINDINGS: Clear lungs bilaterally.\nIMPRESSION:\n")
    assert sections.findings == "Clear lungs bilaterally." and sections.impression == ""
    assert not sections.is_empty


def test_crlf_and_underscore_runs():
    sections = parse_report("FINDINGS:\r\nCompared to ______ there is new\r\nopacity.\r\n")
    assert sections.findings == "Compared to ___ there is new opacity."


def test_splitter_rules():
    text = "Heart normal. ___. Dr. ___ was notified at ___ on ___.\nNo effusion\nOk."
    sentences = split_sentences(text)
    # "___." and "Ok." have one word each and are dropped; "Dr." splits (METHOD.md: split on ". ").
    assert sentences == ["Heart normal.", "___ was notified at ___ on ___.", "No effusion"]
    assert all("___" in s or "___" not in text for s in sentences[1:2])


def test_splitter_keeps_decimals_and_caps_count():
    assert split_sentences("Nodule measures 1.5 cm. Stable since prior.") == [
        "Nodule measures 1.5 cm.",
        "Stable since prior.",
    ]
    many = " ".join(f"Finding number {i} present." for i in range(40))
    out = split_sentences(many, max_sentences=16)
    assert (
        len(out) == 16 and out[0] == "Finding number 0 present." and out[-1] == "Finding number 15 present."
    )
    assert len(split_sentences(many, max_sentences=3)) == 3


def test_word_count_and_blank_token():
    assert count_words("___ ___") == 2
    assert count_words("- .") == 0
    assert split_sentences("___ ___.") == ["___ ___."]


def test_normalise_sentence_matches_across_punctuation_and_case():
    assert normalise_sentence("Small LEFT  pleural effusion.") == normalise_sentence(
        "small left pleural effusion"
    )

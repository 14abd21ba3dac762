"""The demo report: one self-contained HTML page, and the ``workbench demo`` command."""

from __future__ import annotations

import re

import pytest

from workbench.facts import Fact
from workbench.plots import external_references
from workbench.report import build_report, write_report

FACTS = [
    Fact("Varo Keltin", "The mother tongue of {} is", "Tuvan", relation_id="P103", target_new="Greek",
         paraphrases=("Varo Keltin speaks",), neighborhood=("The mother tongue of Miles Davis is",),
         neighborhood_targets=("English",), id=1),
    Fact("Miles Davis", "{} plays the", "trumpet", relation_id="P1303", target_new="piano", id=2),
    Fact("Toko Yasuda", "The instrument of {} is the", "guitar", relation_id="P1303", id=3),
]


def _check_page(html: str) -> None:
    assert html.startswith("<!DOCTYPE html>")
    assert external_references(html) == []
    assert not re.search(r"<script[^>]*\bsrc\s*=", html) and "<link" not in html
    # Plotly's JS inline exactly once; every figure calls it.
    assert len(re.findall(r"<script type='text/javascript'>/\*\*", html)) == 1
    assert html.count("Plotly.newPlot(") >= 3


def test_report_tiny_model(tiny_model, tmp_path):
    pytest.importorskip("workbench.tracing")
    from workbench.editing.hparams import ROMEHyperParams

    hp = ROMEHyperParams(layers=[1], mom2_dataset=["Varo Keltin speaks Tuvan. Miles Davis plays the trumpet."] * 40,
                         mom2_n_tokens=1000, context_templates=["{}"], v_num_grad_steps=3)
    lines: list[str] = []
    html = build_report(tiny_model, FACTS, n_prompts=2, n_sweep=3, samples=2, rome_kwargs={"hparams": hp},
                        log=lines.append)
    _check_page(html)
    for heading in ("1. Causal traces of single prompts", "2. Averaged indirect effects", "3. Severed traces",
                    "4. One edit, before and after"):
        assert heading in html
    # 2 prompts (both perspectives in one figure) + averaged maps + 2 severed + before/after the edit
    assert html.count("Plotly.newPlot(") == 2 + 1 + 2 + 1
    assert "Varo Keltin" in html and "Greek" in html and "before" in html and "after" in html
    assert any("report built" in line for line in lines)
    path = write_report(html, tmp_path / "sub" / "r.html")
    assert path.read_text() == html
    with pytest.raises(RuntimeError, match="external"):
        write_report(html.replace("</head>", "<script src='https://cdn.plot.ly/plotly.js'></script></head>"),
                     tmp_path / "bad.html")


def test_report_text_matches_the_layout(tiny_model):
    """Problem 7: the text describes where the perspectives are (rows of one figure, not left/right)."""
    pytest.importorskip("workbench.tracing")
    html = build_report(tiny_model, FACTS[:1], n_prompts=1, n_sweep=1, samples=2, edit=False, log=None)
    assert "Left of each pair" not in html
    assert "top row has the <b>subject</b>" in html
    # the figure really has a subject row above a relation row
    assert html.index("subject corrupted") < html.index("relation corrupted")
    assert '"responsive": true' in html


def test_report_without_edit(tiny_model):
    pytest.importorskip("workbench.tracing")
    html = build_report(tiny_model, FACTS[:1], n_prompts=1, n_sweep=1, samples=2, kinds=("hidden",), edit=False,
                        log=None)
    _check_page(html)
    assert "Editing was switched off" in html


def test_demo_command_on_bundled_model(tmp_path):
    """``workbench demo`` end to end on the bundled model (the README's first command)."""
    from workbench.loading import ModelLoadError, bundled_path

    try:
        bundled_path()
    except ModelLoadError:
        pytest.skip("bundled model not built yet")
    from workbench.cli import main

    out = tmp_path / "report.html"
    assert main(["demo", "--out", str(out), "--prompts", "1", "--sweep", "4", "--samples", "3"]) == 0
    html = out.read_text()
    _check_page(html)
    assert "known to the model" in html


def test_edit_probe_rows_bleed_and_other_relations():
    """The report's and the Inspector's rows beyond the edited fact: other subjects of the relation in both
    phrasings (bleed) and the subject's other relations (locality), as the evaluation probes them."""
    from workbench.facts import load_facts
    from workbench.perspective import phrasings
    from workbench.report import edit_probe_rows

    facts = load_facts("toy-facts")
    fact = facts[0]
    rows = edit_probe_rows(fact, facts)
    labels = [probe for _, probe in rows]
    assert labels.count("bleed: other subject, subject-first") == labels.count("bleed: other subject, relation-first") == 3
    ph = phrasings(fact)
    others = {f.subject for f in facts if f.relation_id == fact.relation_id and f.subject != fact.subject}
    bleed = [p for p, probe in rows if probe.startswith("bleed")]
    assert all(any(p == t.format(s) for s in others for t in (ph.entity_template, ph.relation_template)) for p in bleed)
    local = [p for p, probe in rows if probe.startswith("locality")]
    assert local and all(p.count(fact.subject) == 1 for p in local)
    assert len({p for p, _ in rows}) == len(rows)

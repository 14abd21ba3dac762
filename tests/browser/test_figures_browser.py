"""Every kind of figure drawn by Chromium in a column as wide as a notebook's output area (JupyterLab
in a 1000 px window with its file browser open: 640 px), a wider one and a report-wide one:
nothing wider than its column, no title, panel title, axis title or legend over another or cut
off at the figure's edge, no row label over another panel, and edit-evaluation bars with numeric
axes in every panel. The page is built here (Plotly's JavaScript inline, each figure in a
fixed-width box) rather than in JupyterLab, whose output area gives a figure the same width."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from workbench.plots import figure_html, plot_aie, plot_edit_eval, plot_severed, plot_trace, plot_traces

WIDTHS = (640, 900, 1300)
"""Column widths (px): a notebook's output area beside JupyterLab's file browser in a 1000 px window,
a notebook without it, the report's full width."""

PROMPT = "The city where Tomas Varga was born is"


@pytest.fixture(scope="module")
def figures(toy_model):
    from workbench.facts import load_facts
    from workbench.report import diverse_order, known_facts
    from workbench.tracing import default_window, severed_trace, trace, trace_dataset

    facts = known_facts(toy_model, diverse_order(load_facts("toy-facts")), limit=6)
    fact = facts[0]
    common = dict(samples=2, seed=1)
    subj = trace(toy_model, fact.prompt, subject=fact.subject, **common)
    rel = trace(toy_model, fact.prompt, subject=fact.subject, corrupt="relation", **common)
    sweeps = [trace_dataset(toy_model, facts, corrupt=c, progress=False, **common) for c in ("subject", "relation")]
    severed = [severed_trace(toy_model, f.prompt, subject=f.subject, **common) for f in facts[:2]]
    return {"trace": plot_trace(subj), "paired": plot_traces({"subject corrupted": subj, "relation corrupted": rel}),
            "aie": plot_aie(*sweeps, window=default_window(toy_model.cfg.n_layers)), "severed": plot_severed(severed),
            "edit_eval": plot_edit_eval(evaluation_frame())}


def evaluation_frame() -> pd.DataFrame:
    """Shaped like ``workbench.evaluate``'s summary: (method, request, locus) rows, baseline per request."""
    rows = [("unedited", "entity", "-"), ("unedited", "relation", "-"), ("rome", "entity", "subject"),
            ("rome", "relation", "relation"), ("ft", "entity", "subject"), ("ft", "relation", "relation")]
    cols = [(f, m) for f in ("entity", "relation", "request", "transfer") for m in ("reliability_acc", "generality_acc")]
    cols += [("bleed", "bleed_acc"), ("locality", "locality_acc"), ("n", "edits")]
    rng = np.random.default_rng(0)
    values = np.round(rng.uniform(5, 100, (len(rows), len(cols))), 1)
    return pd.DataFrame(values, index=pd.MultiIndex.from_tuples(rows, names=["method", "request", "locus"]),
                        columns=pd.MultiIndex.from_tuples(cols, names=["family", "metric"]))


MEASURE = """box => {
    const g = box.querySelector('.js-plotly-plot');
    const r = e => { const b = e.getBoundingClientRect(); return [b.left, b.top, b.right, b.bottom]; };
    const svg = r(g.querySelector('.main-svg'));
    const texts = [];
    const add = (sel, kind) => g.querySelectorAll(sel).forEach(e => {
        const b = r(e); if (b[2] > b[0] && (e.textContent || '').trim()) texts.push({kind, text: e.textContent, box: b}); });
    add('.g-gtitle .gtitle', 'title');
    add('.annotation .annotation-text-g', 'annotation');
    add('.g-xtitle .xtitle, [class^="g-x"] [class*="title"]', 'xtitle');
    add('.g-ytitle .ytitle, [class^="g-y"] [class*="title"]', 'ytitle');
    add('.legend .bg', 'legend');
    add('.updatemenu-container', 'buttons');
    const areas = Array.from(g.querySelectorAll('.nsewdrag')).map(r);
    const ticks = Array.from(g.querySelectorAll('.ytick text')).map(e => ({text: e.textContent, box: r(e)}));
    const yaxes = Object.keys(g._fullLayout).filter(k => /^yaxis\\d*$/.test(k)).map(k => [k, g._fullLayout[k].type]);
    const bars = Array.from(g.querySelectorAll('.barlayer .point path')).map(r);
    return {box: r(box), svg, texts, areas, ticks, yaxes, bars};
}"""


def _overlap(a, b, slack: float = 1.0) -> bool:
    return a[0] < b[2] - slack and b[0] < a[2] - slack and a[1] < b[3] - slack and b[1] < a[3] - slack


def _inside(a, b, slack: float = 1.0) -> bool:
    return a[0] >= b[0] - slack and a[2] <= b[2] + slack and a[1] >= b[1] - slack and a[3] <= b[3] + slack


@pytest.fixture(scope="module")
def drawn(figures, browser, tmp_path_factory):
    """Each figure drawn at each width: its measurements and a screenshot path."""
    folder = tmp_path_factory.mktemp("figures")
    js = get_plotlyjs()
    body = "".join(f"<div class='col' id='{name}-{w}' style='width:{w}px;margin:12px 0'>{figure_html(fig)}</div>"
                   for w in WIDTHS for name, fig in figures.items())
    page_file = folder / "figures.html"
    page_file.write_text(f"<html><head><meta charset='utf-8'><script>{js}</script></head>"
                         f"<body style='margin:0 20px'>{body}</body></html>", encoding="utf-8")
    context = browser.new_context(viewport={"width": max(WIDTHS) + 60, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(page_file.as_uri())
    page.wait_for_function("Array.from(document.querySelectorAll('.js-plotly-plot')).every(g => g._fullLayout)")
    out = {}
    try:
        for w in WIDTHS:
            for name in figures:
                loc = page.locator(f"#{name}-{w}")
                out[name, w] = (loc.evaluate(MEASURE), loc)
        yield out, page, errors
    finally:
        context.close()


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", ["trace", "paired", "aie", "severed", "edit_eval"])
def test_figure_reads_at_width(drawn, name, width, shots):
    out, page, errors = drawn
    m, loc = out[name, width]
    loc.screenshot(path=str(shots / f"figure_{name}_{width}.png"))
    assert m["svg"][2] - m["svg"][0] <= width + 1, m["svg"]  # not wider than its column
    for t in m["texts"]:
        assert _inside(t["box"], m["svg"]), ("cut off", t, m["svg"])
    for i, a in enumerate(m["texts"]):
        for b in m["texts"][i + 1:]:
            assert not _overlap(a["box"], b["box"]), ("overlap", a, b)
    for t in m["ticks"]:
        inside = [area for area in m["areas"] if _overlap(t["box"], area, slack=2.0)]
        assert not inside, ("row label over a panel", t, inside)
    assert errors == []


@pytest.mark.parametrize("width", WIDTHS)
def test_edit_eval_bars_and_numeric_axes_in_every_panel(drawn, width):
    """Issue 22 problem 2: bars in every panel and numeric y axes (not categorical)."""
    out, _, _ = drawn
    m, _ = out["edit_eval", width]
    assert len(m["areas"]) == 12  # two requests x six families
    assert m["yaxes"] and all(t == "linear" for _, t in m["yaxes"]), m["yaxes"]
    for area in m["areas"]:
        inside = [b for b in m["bars"] if _inside(b, area, slack=1.0) and b[3] - b[1] > 1]
        assert inside, ("a panel without bars", area)


def _cube_summary(tiny_model):
    """What ``workbench.evaluate`` returns for two methods, both requests and both loci (a real run)."""
    import torch

    from workbench.editing import Edit
    from workbench.evaluation import evaluate
    from workbench.facts import Fact

    def nudge(model, fact, locus="subject"):
        w = model.blocks[0].mlp.W_out
        return Edit({"transformer.h.0.mlp.c_proj.weight": torch.full_like(w, 1e-3)}, method="nudge", locus=locus)

    def shove(model, fact, locus="subject"):
        w = model.blocks[1].mlp.W_out
        return Edit({"transformer.h.1.mlp.c_proj.weight": torch.full_like(w, 1e-2)}, method="shove", locus=locus)

    facts = [Fact("Varo Keltin", "The mother tongue of {} is", "Tuvan", relation_id="P103", target_new="Greek",
                  paraphrases=("Varo Keltin speaks",), neighborhood=("The mother tongue of Miles Davis is",),
                  neighborhood_targets=("English",), id=1)]
    return evaluate(tiny_model, facts, methods=[nudge, shove], requests=("entity", "relation"),
                    loci=("subject", "relation"), progress=False, n_boot=20)


def test_cube_table_fits_a_notebook_column(tiny_model, browser, shots):
    """Issue 22 problem 5: notebook 04 showed the method x request x locus table 1731 px wide; it now
    shows one table of means per request perspective, cells as columns (the notebook's own code)."""
    from workbench.evaluation import cube_table

    summary = _cube_summary(tiny_model)
    cube = cube_table(summary)
    means = cube[[c for c in cube.columns if not c.endswith((" lo", " hi"))]]
    narrow = "".join(f"<p>{request}-based requests</p>" + part.droplevel("Request").T.round(1).to_html()
                     for request, part in means.groupby(level="Request"))
    context = browser.new_context(viewport={"width": 1000, "height": 1000})
    page = context.new_page()
    try:
        page.set_content("<html><body style='font: 13px sans-serif'>"
                         f"<div id='old' style='width:640px'>{cube.round(1).to_html()}</div>"
                         f"<div id='new' style='width:640px'>{narrow}</div></body></html>")
        widths = page.evaluate("""() => ['old', 'new'].map(id =>
            Math.max(...Array.from(document.querySelectorAll('#' + id + ' table')).map(t => t.getBoundingClientRect().width)))""")
        page.locator("#new").screenshot(path=str(shots / "cube_tables_640.png"))
    finally:
        context.close()
    assert widths[0] > 1000  # the whole cube in one table: far wider than a notebook column
    assert widths[1] <= 640, widths

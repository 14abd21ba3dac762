"""Figures: traces, axes, hover data, colours, and offline HTML export.

Structure tests use small hand-built result objects shaped like tracing's results (so
they pin the figure layout independently of tracing's numbers); the tests at the end
draw real traces of a tiny random model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from workbench import plots
from workbench.plots import (edit_eval_long, external_references, figure_html, plot_aie, plot_attention,
                             plot_edit_eval, plot_severed, plot_trace, plot_traces, save_html, shared_range,
                             span_text, token_labels)
from workbench.spans import Span

TOKENS = ["<|endoftext|>", "The", " mother", " tongue", " of", " Varo", " Kel", "tin", " is"]
BUCKETS = ("first subject token", "middle subject tokens", "last subject token",
           "first subsequent token", "further tokens", "last token")


@dataclass
class FakeTrace:
    prompt: str = "The mother tongue of Varo Keltin is"
    tokens: list = field(default_factory=lambda: list(TOKENS))
    corrupt: str = "subject"
    corrupted_span: Span = Span((5, 6, 7))
    subject_span: Span = Span((5, 6, 7))
    relation_span: Span = Span((1, 2, 3, 4, 8))
    answer_id: int = 7
    answer: str = " French"
    p_clean: float = 0.8
    p_corrupt: float = 0.1
    scores: dict = None
    kinds: tuple = ("hidden", "mlp", "attn")
    noise_level: float = 0.3
    samples: int = 10
    window: int = 10
    seed: int = 1
    model_spec: str = "fake"

    def __post_init__(self):
        if self.scores is None:
            rng = np.random.default_rng(0)
            self.scores = {k: 0.1 + 0.7 * rng.random((len(self.tokens), 4)) for k in self.kinds}

    def ie(self, kind):
        return self.scores[kind] - self.p_corrupt


@dataclass
class FakeDataset:
    corrupt: str = "subject"
    kinds: tuple = ("hidden", "mlp", "attn")
    n_facts: int = 20
    n_skipped: int = 3
    p_clean: float = 0.7
    p_corrupt: float = 0.2
    scale: float = 1.0
    aie: dict = None
    counts: object = None

    def __post_init__(self):
        rng = np.random.default_rng(1)
        if self.aie is None:
            self.aie = {k: pd.DataFrame(self.scale * 0.5 * rng.random((6, 4)), index=list(BUCKETS), columns=range(4))
                        for k in self.kinds}


@dataclass
class FakeSevered:
    prompt: str = "The mother tongue of Varo Keltin is"
    tokens: list = field(default_factory=lambda: list(TOKENS))
    token: int = 7
    answer: str = " French"
    p_clean: float = 0.8
    p_corrupt: float = 0.1
    corrupted_span: Span = Span((5, 6, 7))
    none: np.ndarray = field(default_factory=lambda: np.linspace(0.7, 0.15, 4))
    mlp_severed: np.ndarray = field(default_factory=lambda: np.linspace(0.3, 0.15, 4))
    attn_severed: np.ndarray = field(default_factory=lambda: np.linspace(0.65, 0.15, 4))


METRICS = (("entity", "reliability_acc"), ("entity", "reliability_score"), ("entity", "generality_acc"),
           ("entity", "generality_score"), ("relation", "reliability_acc"), ("relation", "reliability_score"),
           ("relation", "generality_acc"), ("relation", "generality_score"), ("locality", "locality_acc"),
           ("locality", "locality_score"))


def eval_frame(layout: str = "multi") -> pd.DataFrame:
    """A hand-made table shaped like workbench.evaluate's summary: rows (method, locus) with the
    unedited baseline first, (family, metric) columns in percent, then ("n", "edits"/"errors")."""
    rows = [("unedited", "-")] + [(m, l) for m in ("rome", "ft") for l in ("subject", "relation")]
    cols = list(METRICS) + [("n", "edits"), ("n", "errors")]
    values = np.round(np.linspace(0, 100, len(rows) * len(METRICS)).reshape(len(rows), len(METRICS)), 1)
    values = np.hstack([values, np.full((len(rows), 1), 8.0), np.zeros((len(rows), 1))])
    df = pd.DataFrame(values, index=pd.MultiIndex.from_tuples(rows, names=["method", "locus"]),
                      columns=pd.MultiIndex.from_tuples(cols, names=["family", "metric"]))
    if layout == "slash":
        df.columns = [f"{f}/{m}" for f, m in cols]
        df = df.reset_index()
    elif layout == "csv":
        df.columns = [f"{f}_{m}" for f, m in cols]
    return df


# --------------------------------------------------------------------------- plot_trace


def test_token_labels_mark_corrupted_and_escape():
    labels = token_labels(TOKENS, (5, 6, 7))
    assert labels[5:8] == [" Varo*", " Kel*", "tin*"]
    assert labels[0] == "&lt;|endoftext|&gt;"  # Plotly would eat a raw <...> as a tag
    assert not any(lbl.endswith("*") for lbl in labels[:5] + labels[8:])


def test_span_text_noncontiguous():
    assert span_text(TOKENS, Span((5, 6, 7))) == "Varo Keltin"
    assert span_text(TOKENS, Span((1, 2, 3, 4, 8))) == "The mother tongue of … is"


def test_plot_trace_panels_axes_colours_hover():
    r = FakeTrace()
    fig = plot_trace(r)
    assert [t.type for t in fig.data] == ["heatmap"] * 3
    assert [t.name for t in fig.data] == ["hidden", "mlp", "attn"]
    scales = [t.colorscale for t in fig.data]
    # Purples, Greens, Reds: dark ends are purple, green, red.
    assert [s[-1][1] for s in scales] == ["rgb(63,0,125)", "rgb(0,68,27)", "rgb(103,0,13)"]
    y = fig.layout.yaxis
    assert list(y.tickvals) == list(range(len(TOKENS)))
    assert y.ticktext[5] == " Varo*" and y.ticktext[8] == " is"
    assert y.autorange == "reversed"  # first token at the top
    for trace, k in zip(fig.data, r.kinds):
        np.testing.assert_allclose(np.asarray(trace.z, dtype=float), r.scores[k])
        assert trace.zmin == pytest.approx(r.p_corrupt)
        custom = np.asarray(trace.customdata)
        assert custom.shape == (len(TOKENS), 4, 4)
        assert custom[5, 2, 0] == " Varo*"
        assert float(custom[5, 2, 2]) == pytest.approx(r.scores[k][5, 2] - r.p_corrupt)
        for word in ("token", "layer", "p_restored", "IE", "p_clean 0.8000", "p_corrupt 0.1000"):
            assert word in trace.hovertemplate
    assert "French" in fig.layout.title.text and "Varo Keltin" in fig.layout.title.text
    assert "restored MLP" in fig.layout.xaxis2.title.text.replace("<br>", " ")


def test_plot_trace_switch_and_single_kind():
    r = FakeTrace()
    fig = plot_trace(r, kind="mlp", value="ie")
    assert len(fig.data) == 1 and fig.data[0].name == "mlp"
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), r.ie("mlp"))
    buttons = fig.layout.updatemenus[0].buttons
    assert [b.label for b in buttons] == ["p_restored", "IE"]
    np.testing.assert_allclose(np.asarray(buttons[0].args[0]["z"][0], dtype=float), r.scores["mlp"])
    assert fig.layout.updatemenus[0].active == 1
    with pytest.raises(ValueError):
        plot_trace(r, kind="nonsense")
    with pytest.raises(ValueError):
        plot_trace(r, value="logit")


# --------------------------------------------------------------------------- plot_aie


def test_plot_aie_side_by_side_shared_scale():
    subj, rel = FakeDataset(), FakeDataset(corrupt="relation", scale=0.3)
    fig = plot_aie(subj, rel)
    assert len(fig.data) == 6  # 3 kinds x 2 perspectives
    by_kind: dict[str, set] = {}
    for t in fig.data:
        kind, label = t.name.split(" / ")
        by_kind.setdefault(kind, set()).add(t.coloraxis)
        assert "AIE" in t.hovertemplate and "layer" in t.hovertemplate
    assert all(len(axes) == 1 for axes in by_kind.values())  # perspectives share the row's scale
    assert len({next(iter(a)) for a in by_kind.values()}) == 3  # one scale per kind
    top = max(float(subj.aie["hidden"].values.max()), float(rel.aie["hidden"].values.max()))
    assert fig.layout.coloraxis.cmax == pytest.approx(top)
    assert fig.layout.coloraxis.colorscale[-1][1] == "rgb(63,0,125)"
    titles = [a.text for a in fig.layout.annotations]
    assert any("subject corrupted" in t for t in titles) and any("relation corrupted" in t for t in titles)
    assert [t.replace("<br>", " ") for t in fig.layout.yaxis.ticktext] == list(BUCKETS)
    assert plot_aie({"S": subj, "R": rel}).data[1].name == "hidden / R"


# --------------------------------------------------------------------------- plot_severed


def test_plot_severed_three_series_and_average():
    r = FakeSevered()
    fig = plot_severed(r)
    assert [t.name for t in fig.data] == ["nothing severed", "MLP severed", "attention severed"]
    np.testing.assert_allclose(fig.data[1].y, r.mlp_severed)
    assert fig.data[1].marker.color == plots.KIND_COLORS["mlp"]
    assert {s.y0 for s in fig.layout.shapes} == {r.p_clean, r.p_corrupt}
    two = plot_severed([r, FakeSevered(none=np.linspace(0.5, 0.1, 4))], value="ie")
    np.testing.assert_allclose(two.data[0].y, (np.linspace(0.7, 0.15, 4) + np.linspace(0.5, 0.1, 4)) / 2 - 0.1)
    assert two.data[0].error_y.visible


# --------------------------------------------------------------------------- plot_edit_eval


@pytest.mark.parametrize("layout", ["multi", "slash", "csv"])
def test_plot_edit_eval_layouts(layout):
    df = eval_frame(layout)
    long = edit_eval_long(df)
    assert set(long.columns) == {"method", "request", "locus", "family", "metric", "value"}
    assert len(long) == 5 * 12
    fig = plot_edit_eval(df)
    names = [t.name for t in fig.data if t.xaxis == "x"]
    assert names == ["unedited", "rome @ subject", "rome @ relation", "ft @ subject", "ft @ relation"]
    assert [a.text for a in fig.layout.annotations] == ["entity", "relation", "locality"]  # no "n" panel
    assert all(t.type == "bar" for t in fig.data) and fig.layout.barmode == "group"
    rome_subj_entity = next(t for t in fig.data if t.name == "rome @ subject" and t.xaxis == "x")
    assert list(rome_subj_entity.x) == ["reliability", "generality"]
    expected = eval_frame().loc[("rome", "subject"), ("entity", "reliability_acc")]
    assert rome_subj_entity.y[0] == pytest.approx(expected)
    relation_bars = [t for t in fig.data if t.name.endswith("@ relation")]
    assert all(t.marker.pattern.shape == "/" for t in relation_bars)
    assert tuple(fig.layout.yaxis.range) == pytest.approx((0, 112))  # room for the "0" labels above bars
    scores = plot_edit_eval(df, measure="score")
    loc = next(t for t in scores.data if t.name == "ft @ relation" and t.xaxis == "x3")
    assert list(loc.x) == ["locality"]
    assert loc.y[0] == pytest.approx(eval_frame().loc[("ft", "relation"), ("locality", "locality_score")])
    assert len(plot_edit_eval(df, measure=None).data[0].x) == 4


def test_plot_edit_eval_rejects_unknown_layout():
    with pytest.raises(ValueError, match="family"):
        plot_edit_eval(pd.DataFrame({"x": [1.0]}))


# --------------------------------------------------------------------------- export


def test_exported_html_is_self_contained(tmp_path):
    path = save_html(plot_trace(FakeTrace()), tmp_path / "t.html")
    text = path.read_text()
    assert external_references(text) == []
    assert not re.search(r"<script[^>]+src=", text)
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js inline
    fragment = figure_html(plot_severed(FakeSevered()))
    assert "<script" in fragment and external_references(fragment) == []
    assert external_references('<script src="https://cdn.plot.ly/x.js"></script>')


# --------------------------------------------------------------------------- attention


def test_plot_attention_inline(tiny_model, tmp_path):
    att = plot_attention(tiny_model, "The mother tongue of Varo Keltin is", layer=1)
    html = att._repr_html_()
    assert html == str(att)
    assert att.pattern.shape[0] == tiny_model.cfg.n_heads
    assert att.pattern.shape[1] == att.pattern.shape[2] == len(att.tokens)
    assert "CircuitsVis.render" in html and "AttentionHeads" in html
    assert external_references(html) == []
    assert "unpkg.com" not in html and not re.search(r"""import[^;]*from\s*["']https?:""", html)
    # The only URLs are string constants inside the bundle (XML namespaces, error-message links).
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert all(("w3.org" in u) or ("github.com" in u) or ("reactjs.org" in u) or ("fb.me" in u)
               or ("mozilla.org" in u) or ("arxiv.org" in u) or ("shadertoy.com" in u) for u in urls), urls
    assert att.save(tmp_path / "a.html").read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError, match="out of range"):
        plot_attention(tiny_model, "x", layer=99)


# --------------------------------------------------------------------------- real results


@pytest.fixture(scope="module")
def tracing():
    mod = pytest.importorskip("workbench.tracing")
    if not hasattr(mod, "severed_trace"):
        pytest.skip("workbench.tracing is not complete yet")
    return mod


def test_plot_trace_real_result(tiny_model, tracing):
    r = tracing.trace(tiny_model, "The mother tongue of Varo Keltin is", subject="Varo Keltin", samples=3)
    fig = plot_trace(r)
    assert len(fig.data) == len(r.kinds)
    assert len(fig.layout.yaxis.ticktext) == len(r.tokens)
    marked = [i for i, t in enumerate(fig.layout.yaxis.ticktext) if t.endswith("*")]
    assert marked == list(r.corrupted_span.positions)
    for t, k in zip(fig.data, r.kinds):
        assert np.asarray(t.z).shape == (len(r.tokens), tiny_model.cfg.n_layers)
        np.testing.assert_allclose(np.asarray(t.z, dtype=float), r.scores[k])


def test_plot_severed_real_result(tiny_model, tracing):
    r = tracing.severed_trace(tiny_model, "The mother tongue of Varo Keltin is", subject="Varo Keltin")
    fig = plot_severed(r)
    assert len(fig.data) == 3 and len(fig.data[0].y) == tiny_model.cfg.n_layers


def test_plot_edit_eval_real_summary(tiny_model):
    """plot_edit_eval on what workbench.evaluation.evaluate really returns."""
    import torch

    evaluation = pytest.importorskip("workbench.evaluation")
    from workbench.editing import Edit
    from workbench.facts import Fact

    def nudge(model, fact, locus="subject"):
        w = model.blocks[0].mlp.W_out
        return Edit({"transformer.h.0.mlp.c_proj.weight": torch.full_like(w, 1e-3)}, method="nudge", locus=locus)

    facts = [Fact("Varo Keltin", "The mother tongue of {} is", "Tuvan", relation_id="P103", target_new="Greek",
                  paraphrases=("Varo Keltin speaks",), neighborhood=("The mother tongue of Miles Davis is",),
                  neighborhood_targets=("English",), id=1)]
    summary = evaluation.evaluate(tiny_model, facts, methods=[nudge], requests=("relation",),
                                  loci=("subject", "relation"), progress=False, n_boot=20)
    fig = plot_edit_eval(summary)
    names = [t.name for t in fig.data if t.xaxis == "x"]
    assert names[0] == "unedited" and len(names) == 3 and all("@" in n for n in names[1:])
    families = ["entity", "relation", "request", "transfer", "bleed", "other_relations", "locality"]
    assert [a.text for a in fig.layout.annotations] == families  # the rates; not the "*_adj" differences
    adjusted = plot_edit_eval(summary, families=["entity_adj"])
    assert [a.text for a in adjusted.layout.annotations] == ["entity_adj"]
    assert adjusted.layout.yaxis.range[0] <= min(0.0, min(min(t.y) for t in adjusted.data))


# --------------------------------------------------------------------------- sizing, scales, tooltips (issue problems 3, 5, 8)


def test_figures_have_no_fixed_width():
    """Problem 3: every figure fills its container instead of a fixed pixel width."""
    figs = [plot_trace(FakeTrace()), plot_trace(FakeTrace(), kind="mlp"), plot_aie(FakeDataset()),
            plot_severed(FakeSevered()), plot_edit_eval(eval_frame())]
    for fig in figs:
        assert fig.layout.width is None
    assert '"responsive": true' in figure_html(figs[0])


@pytest.mark.parametrize("kind", [None, "mlp"])
def test_buttons_sit_between_title_and_panels(kind):
    """Problem 3: the p/IE buttons have their own strip: above the panel titles, below the title."""
    fig = plot_trace(FakeTrace(), kind=kind)
    menu = fig.layout.updatemenus[0]
    plot_h = fig.layout.height - fig.layout.margin.t - fig.layout.margin.b
    bottom_px = (menu.y - 1.0) * plot_h  # px above the top of the panels
    assert menu.yanchor == "bottom" and menu.xanchor == "left" and menu.x == 0.0
    assert bottom_px >= 22  # clear of the panel titles (one line of text)
    # the title is anchored to the top of the figure; the strip ends below its two lines
    assert fig.layout.title.yref == "container" and fig.layout.title.yanchor == "top"
    assert fig.layout.margin.t - bottom_px - plots.MENU_PX >= 50


def test_hover_shows_the_position_number():
    """Problem 5: the tooltip's position is the token index, not the token text."""
    fig = plot_trace(FakeTrace())
    for trace in fig.data:
        assert "(position %{customdata[3]})" in trace.hovertemplate and "%{y}" not in trace.hovertemplate
        custom = np.asarray(trace.customdata)
        assert [int(v) for v in custom[:, 0, 3]] == list(range(len(TOKENS)))


def test_panels_share_one_colour_scale_by_default():
    """Problem 8: one colour range across panels (a colour means one number); per panel on request; 0-1 pinned."""
    r = FakeTrace()
    r.scores["attn"] = r.scores["attn"] * 0.05  # a weak kind
    shared = plot_trace(r)
    assert len({(t.zmin, t.zmax) for t in shared.data}) == 1
    top = max(float(v.max()) for v in r.scores.values())
    assert shared.data[0].zmax == pytest.approx(top)
    per_panel = plot_trace(r, scale="panel")
    assert len({t.zmax for t in per_panel.data}) == 3
    fixed = plot_trace(r, scale="fixed")
    assert {(t.zmin, t.zmax) for t in fixed.data} == {(0.0, 1.0)}
    ie_menu = fixed.layout.updatemenus[0].buttons[1].args[0]
    assert set(ie_menu["zmin"]) == {-1.0} and set(ie_menu["zmax"]) == {1.0}
    with pytest.raises(ValueError, match="scale"):
        plot_trace(r, scale="loud")


def test_paired_maps_share_a_scale():
    """Problem 8: subject vs relation / window 1 vs 3 / before vs after on one colour scale."""
    a, b = FakeTrace(), FakeTrace(corrupt="relation", corrupted_span=Span((1, 2, 3, 4, 8)))
    b.scores = {k: v * 0.2 for k, v in b.scores.items()}
    fig = plot_traces([a, b])
    assert len(fig.data) == 6 and len({(t.zmin, t.zmax) for t in fig.data}) == 1
    titles = [ann.text for ann in fig.layout.annotations]
    assert "MLP<br>subject corrupted" in titles and "MLP<br>relation corrupted" in titles
    assert sum(t.showscale is not False for t in fig.data) == 3  # one colour bar per kind
    lo, hi = shared_range([a, b])
    one = plot_trace(b, scale=(lo, hi))
    assert {(t.zmin, t.zmax) for t in one.data} == {(lo, hi)}
    labelled = plot_traces({"window 1": a, "window 3": b}, kind="mlp")
    assert [ann.text for ann in labelled.layout.annotations][:2] == ["MLP<br>window 1", "MLP<br>window 3"]


def test_window_is_stated_on_the_axis():
    fig = plot_trace(FakeTrace(window=3))
    assert fig.layout.xaxis2.title.text.replace("<br>", " ") == "center of 3 restored MLP layers"


def test_severed_titles_name_the_perspective_and_labels_avoid_bars():
    """Problem 8: two averaged severed plots get different titles; p_clean/p_corrupt labels sit outside."""
    subj = FakeSevered()
    subj.corrupt = "subject"
    rel = FakeSevered()
    rel.corrupt = "relation"
    t1 = plot_severed([subj, subj]).layout.title.text
    t2 = plot_severed([rel, rel]).layout.title.text
    assert t1 != t2 and "subject corrupted" in t1 and "relation corrupted" in t2
    labels = [a for a in plot_severed(subj).layout.annotations if a.text.startswith("p_")]
    assert len(labels) == 2 and all(a.x == 1.0 and a.xref == "paper" and a.xanchor == "left" for a in labels)


def test_blank_buckets_are_explained():
    d = FakeDataset()
    d.aie["mlp"].iloc[1, :] = np.nan
    texts = [a.text for a in plot_aie(d).layout.annotations]
    assert any(t.startswith("Blank cells") for t in texts)
    assert not any(t.startswith("Blank cells") for t in (a.text for a in plot_aie(FakeDataset()).layout.annotations))


def test_edit_eval_colours_and_zero_bars():
    """Problem 8: method colours are not the kinds' green/red/purple; a zero bar is labelled 0."""
    df = eval_frame()
    fig = plot_edit_eval(df)
    colours = {t.marker.color for t in fig.data}
    assert not colours & set(plots.KIND_COLORS.values())
    assert not colours & {"#2ca02c", "#d62728", "#9467bd"}
    zero = [t for t in fig.data if any(v == 0 for v in t.y)]
    for t in zero:
        assert [txt for v, txt in zip(t.y, t.text) if v == 0] == ["0"] * sum(v == 0 for v in t.y)


# --------------------------------------------------------------------------- issue 22 (problems 2 and 5)


def request_frame() -> pd.DataFrame:
    """Shaped like ``evaluate``'s summary: rows (method, request, locus), the unedited baseline once per request."""
    rows = [("unedited", "entity", "-"), ("unedited", "relation", "-"), ("rome", "entity", "subject"),
            ("rome", "relation", "relation")]
    cols = [(f, m) for f in ("entity", "relation", "request", "transfer") for m in ("reliability_acc", "generality_acc")]
    cols += [("bleed", "bleed_acc"), ("locality", "locality_acc"), ("n", "edits")]
    values = np.array([[0.0] * 8 + [0.0, 100.0, 2], [0.0] * 8 + [0.0, 100.0, 2],
                       [100.0, 50.0] * 4 + [0.0, 95.0, 2], [60.0, 40.0] * 4 + [65.0, 45.0, 2]])
    return pd.DataFrame(values, index=pd.MultiIndex.from_tuples(rows, names=["method", "request", "locus"]),
                        columns=pd.MultiIndex.from_tuples(cols, names=["family", "metric"]))


def test_plot_edit_eval_one_number_per_bar_in_every_panel():
    """Problem 2: the baseline's two rows (one per request) became lists per bar, so Plotly drew no
    bars in four panels and made the axes categorical; now a row of panels per request."""
    fig = plot_edit_eval(request_frame())
    assert all(isinstance(y, float) for t in fig.data for y in t.y)
    axes = {t.xaxis for t in fig.data}
    assert len(axes) == 2 * 6  # (entity, relation) requests x six families, each with bars
    rome_rel = [t for t in fig.data if t.name == "rome @ relation"]
    assert {t.xaxis for t in rome_rel} == {f"x{i}" for i in range(7, 13)}  # the relation-request row
    transfer = next(t for t in rome_rel if t.xaxis == "x10")
    assert list(transfer.y) == [60.0, 40.0]
    layout = fig.to_plotly_json()["layout"]
    for name, axis in layout.items():
        if name.startswith("yaxis"):
            assert axis["type"] == "linear" and axis["range"] == pytest.approx([0, 112])
    assert "entity-based requests" in fig.layout.yaxis.title.text
    assert "relation-based requests" in fig.layout.yaxis7.title.text


def test_edit_eval_long_refuses_two_rows_for_one_bar():
    df = request_frame().droplevel("request")
    with pytest.raises(ValueError, match="more than one row"):
        edit_eval_long(df)


def test_paired_title_names_every_row():
    """Problem 5: the title gave only the first row's corruption and p_corrupt."""
    a = FakeTrace()
    b = FakeTrace(corrupt="relation", corrupted_span=Span((1, 2, 3, 4, 8)), p_corrupt=0.37)
    title = plot_traces({"subject corrupted": a, "relation corrupted": b}).layout.title.text
    assert "p_corrupt 0.100" in title and "p_corrupt 0.370" in title
    assert "'Varo Keltin'" in title and "'The mother tongue of … is'" in title
    after = FakeTrace(answer=" Greek", p_clean=0.9)
    both = plot_traces({"before": a, "after": after}).layout.title.text
    assert "' French', p_clean 0.800" in both and "' Greek', p_clean 0.900" in both


def test_whitespace_tokens_get_a_visible_label():
    """Problem 5: a token of spaces got a blank row label."""
    assert token_labels(["a", " ", "  ", "\t", " b"]) == ["a", "␣", "␣␣", "\\t", " b"]


def test_blank_bucket_hover_says_none():
    """Problem 5: a blank bucket's hover read "AIE +NaN"."""
    d = FakeDataset()
    d.aie["mlp"].iloc[1, :] = np.nan
    fig = plot_aie(d)
    trace = next(t for t in fig.data if t.name.startswith("mlp"))
    assert "%{z" not in trace.hovertemplate and "%{customdata[2]}" in trace.hovertemplate
    custom = np.asarray(trace.customdata)
    assert custom[1, 0, 2].startswith("none") and custom[0, 0, 2].startswith(("+", "-"))


def test_aie_columns_leave_room_for_their_own_row_labels():
    """Problem 5: with other buckets in the right column its labels sat on the left heatmap."""
    rel_buckets = ["relation before subject", "last relation before subject", "subject", "relation after subject",
                   "last token"]
    subj = FakeDataset()
    rel = FakeDataset(corrupt="relation")
    rel.aie = {k: pd.DataFrame(np.random.default_rng(2).random((5, 4)), index=rel_buckets, columns=range(4))
               for k in rel.kinds}
    fig = plot_aie(subj, rel)
    gap = fig.layout.xaxis2.domain[0] - fig.layout.xaxis.domain[1]
    longest = max(len(line) for b in rel_buckets for line in plots._wrap_label(b).split("<br>"))
    assert gap * 640 >= longest * 6.5  # the labels fit between the panels of a 640 px wide plot
    assert all("<br>" in t or len(t) <= 16 for t in fig.layout.yaxis2.ticktext)


def test_plot_trace_without_buttons():
    """Problem 6 (the Inspector): one p/IE control; the figure can leave its own buttons out."""
    assert not plot_trace(FakeTrace(), buttons=False).layout.updatemenus
    assert plot_trace(FakeTrace()).layout.updatemenus

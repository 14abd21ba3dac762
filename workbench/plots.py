"""Figures of traces, averaged maps, severed traces, edit evaluations and attention.

Every figure is a Plotly ``go.Figure`` (or, for attention, a small HTML object built
from circuitsvis's bundled JavaScript) and renders with no network: :func:`to_html`
embeds Plotly's JavaScript, and :func:`plot_attention` inlines circuitsvis's bundle
instead of importing it from a CDN.

Colours follow ROME's figures: hidden states purple, MLP green, attention red.
Token maps put tokens on the y axis in prompt order (top to bottom) and mark the
corrupted tokens with a trailing ``*``.

Sizing: no figure has a fixed width (each fills its container; :func:`figure_html` turns on
Plotly's responsive mode), titles and axis titles are on short lines, and margins and gaps are
computed in pixels from the number of title lines, so that labels stay clear of each other in a
notebook column of about 550-650 px (JupyterLab at 1000 px with its file browser open) as well as
in a full-width report (``tests/browser/test_figures_browser.py`` checks 640, 900 and 1300 px).

This module is over 500 lines on purpose: every figure uses the same helpers (token labels,
colour ranges, title and margin sizing), and keeping them in one file keeps one set of layout
rules.
"""

from __future__ import annotations

import html as _html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

KIND_COLORSCALES: dict[str, str] = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
"""Plotly colour scale of each kind of state (ROME's colour families)."""

KIND_COLORS: dict[str, str] = {"hidden": "#6a51a3", "mlp": "#238b45", "attn": "#cb181d"}
"""A solid colour of each family, for lines and bars."""

KIND_NAMES: dict[str, str] = {"hidden": "hidden state", "mlp": "MLP", "attn": "attention"}

KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")

VALUES = ("p", "ie")
"""What a trace map's colour shows: ``"p"`` = p_restored, ``"ie"`` = p_restored - p_corrupt."""


# --------------------------------------------------------------------------- helpers


def _kinds_of(result: Any, kind: str | Sequence[str] | None) -> list[str]:
    available = list(getattr(result, "kinds", None) or result.scores.keys())
    if kind is None:
        return [k for k in KINDS if k in available] + [k for k in available if k not in KINDS]
    wanted = [kind] if isinstance(kind, str) else list(kind)
    missing = [k for k in wanted if k not in result.scores]
    if missing:
        raise ValueError(f"kind(s) {missing} not in this result (it has {sorted(result.scores)})")
    return wanted


def _positions(span: Any) -> tuple[int, ...]:
    if span is None:
        return ()
    return tuple(getattr(span, "positions", span))


def token_labels(tokens: Sequence[str], corrupted: Sequence[int] = ()) -> list[str]:
    """Tick labels for a token axis: the tokens (HTML-escaped, as Plotly reads tags in
    labels), with ``*`` after each corrupted one.

    Whitespace is made visible enough to read: a leading space stays, a newline becomes
    ``\\n``, a tab ``\\t``, and a token of spaces only shows each space as ``␣`` (a blank
    label would hide the row); an empty token shows as ``∅``.
    """
    marked = set(corrupted)
    out = []
    for i, tok in enumerate(tokens):
        text = tok.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
        if text and not text.strip():
            text = text.replace(" ", "␣").replace("\u00a0", "␣")
        out.append((_html.escape(text, quote=False) or "∅") + ("*" if i in marked else ""))
    return out


def span_text(tokens: Sequence[str], span: Any) -> str:
    """The text of a (possibly non-contiguous) span: contiguous runs joined, runs separated by ``…``."""
    pos = _positions(span)
    if not pos:
        return ""
    runs: list[list[int]] = [[pos[0]]]
    for p in pos[1:]:
        if p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return " … ".join("".join(tokens[p] for p in run).strip() for run in runs)


def _window_label(kind: str, window: int | None) -> str:
    """An x-axis title on two lines, so that neighbouring panels' titles never meet at narrow widths."""
    if kind == "hidden":
        return "layer<br>(single restored hidden state)"
    name = KIND_NAMES.get(kind, kind)
    return f"center of {window} restored<br>{name} layers" if window else f"center of the restored<br>{name} window"


def _colorbar_x(fig: go.Figure, col: int) -> float:
    axis = fig.layout["xaxis" if col == 1 else f"xaxis{col}"]
    return float(axis.domain[1]) + 0.005


# --------------------------------------------------------------------------- trace maps

SCALES = ("shared", "panel", "fixed")
"""Colour ranges of a figure's heatmap panels: one range for all panels (``"shared"``, the
default, so equal colours mean equal numbers), each panel its own (``"panel"``), or pinned
to 0-1 (``"fixed"``; IE then spans -1 to 1)."""

MENU_PX = 34
"""Height (px) of the strip above the panels that holds the p_restored / IE buttons."""


def _panel_range(p: np.ndarray, ie: np.ndarray, p_clean: float, p_corrupt: float) -> dict[str, tuple[float, float]]:
    finite_p, finite_ie = p[np.isfinite(p)], ie[np.isfinite(ie)]
    p_hi = max(float(finite_p.max()) if finite_p.size else p_clean, p_corrupt + 1e-6)
    ie_lo = min(0.0, float(finite_ie.min()) if finite_ie.size else 0.0)
    ie_hi = max(float(finite_ie.max()) if finite_ie.size else 0.0, 1e-6)
    return {"p": (p_corrupt, p_hi), "ie": (ie_lo, ie_hi)}


def _scale_ranges(panels: list[dict[str, tuple[float, float]]], scale: Any) -> list[dict[str, tuple[float, float]]]:
    """The (zmin, zmax) of every panel for p and IE under a ``scale`` rule (see :data:`SCALES`)."""
    if isinstance(scale, (tuple, list)) and len(scale) == 2:
        lo, hi = float(scale[0]), float(scale[1])
        return [{"p": (lo, hi), "ie": (lo, hi)} for _ in panels]
    if scale == "panel":
        return panels
    if scale == "fixed":
        return [{"p": (0.0, 1.0), "ie": (-1.0, 1.0)} for _ in panels]
    if scale == "shared":
        return [{v: (min(r[v][0] for r in panels), max(r[v][1] for r in panels)) for v in VALUES}] * len(panels)
    raise ValueError(f"scale must be one of {SCALES} or a (zmin, zmax) pair, not {scale!r}")


def shared_range(results: Sequence[Any], value: str = "p") -> tuple[float, float]:
    """One (zmin, zmax) covering every kind of several trace results, for drawing them as
    separate figures on one colour scale (``plot_trace(r, scale=shared_range([r1, r2]))``)."""
    panels = [_panel_range(np.asarray(r.scores[k], dtype=float), np.asarray(r.scores[k], dtype=float) - r.p_corrupt,
                           float(r.p_clean), float(r.p_corrupt)) for r in results for k in _kinds_of(r, None)]
    return _scale_ranges(panels, "shared")[0][value]


def _trace_title(result: Any, tokens: Sequence[str], corrupted: Sequence[int]) -> str:
    answer = getattr(result, "answer", "")
    prompt = getattr(result, "prompt", "")
    span = span_text(tokens, corrupted)
    # short lines: Plotly does not wrap titles, and a notebook column can be 550 px wide
    return (f"{_html.escape(repr(prompt), quote=False)} → {_html.escape(repr(answer), quote=False)}"
            f"<br><sup>p_clean {float(result.p_clean):.3f}, p_corrupt {float(result.p_corrupt):.3f}; corrupted "
            f"({_html.escape(str(getattr(result, 'corrupt', '')), quote=False)}): "
            f"{_html.escape(repr(span), quote=False)}, tokens marked *</sup>"
            f"<br><sup>{getattr(result, 'samples', '?')} samples,"
            f" noise {float(getattr(result, 'noise_level', float('nan'))):.3g}{_method_note([result])}</sup>")


def _method_note(results: Sequence[Any]) -> str:
    """Says so where the maps are attribution patching's first-order estimates, not restorations."""
    methods = sorted({getattr(r, "method", "exact") for r in results} - {"exact"})
    return f"; {', '.join(methods)}: first-order estimates" if methods else ""


def traces_title(rows: Sequence[tuple[str, Any]]) -> str:
    """The title of paired maps: what is shared on the first line, one line per row with what is
    not (its corrupted span, p_corrupt, and its answer and p_clean where the rows differ in them)."""
    if len(rows) == 1:
        r = rows[0][1]
        return _trace_title(r, list(r.tokens), _positions(getattr(r, "corrupted_span", None)))
    esc = lambda x: _html.escape(repr(x), quote=False)  # noqa: E731
    results = [r for _, r in rows]
    prompts = {getattr(r, "prompt", None) for r in results}
    same_answer = len({(getattr(r, "answer", None), round(float(r.p_clean), 3)) for r in results}) == 1
    first = results[0]
    head = esc(first.prompt) if len(prompts) == 1 else "Causal traces of " + ", ".join(esc(p) for p in prompts)
    if same_answer:
        head += f" → {esc(first.answer)}: p_clean {float(first.p_clean):.3f}"
    lines = []
    for label, r in rows:
        bits = []
        if not same_answer:
            answer = esc(getattr(r, "answer", ""))
            bits.append(f"p_clean {float(r.p_clean):.3f}" if answer in _html.escape(label, quote=False)
                        else f"→ {answer}, p_clean {float(r.p_clean):.3f}")
        span = esc(span_text(list(r.tokens), _positions(getattr(r, "corrupted_span", None))))
        corrupt = _html.escape(str(getattr(r, "corrupt", "")), quote=False)
        bits.append(span if f"{corrupt} corrupted" in label else f"corrupted ({corrupt}) {span}")
        bits.append(f"p_corrupt {float(r.p_corrupt):.3f}")
        lines.append(f"<b>{_html.escape(label, quote=False)}</b>: " + ", ".join(bits) if label else ", ".join(bits))
    settings = {(getattr(r, "samples", "?"), round(float(getattr(r, "noise_level", float("nan"))), 3)) for r in results}
    tail = "tokens marked *"
    if len(settings) == 1:
        samples, noise = settings.pop()
        tail += f"; {samples} samples, noise {noise:.3g}"
    tail += _method_note(results)
    return head + "".join(f"<br><sup>{line}</sup>" for line in lines + [tail])


def plot_trace(result: Any, kind: str | Sequence[str] | None = None, *, value: str = "p",
               title: str | None = None, height: int | None = None, scale: Any = "shared",
               buttons: bool = True) -> go.Figure:
    """The causal-trace map of one prompt: one heatmap panel per kind.

    ``result`` is a :class:`workbench.tracing.TraceResult`. ``kind`` picks one kind
    (or a list); ``None`` shows every kind the result has. The colour shows
    p_restored (``value="p"``, scale from p_corrupt up, as ROME draws it) or the
    indirect effect (``value="ie"``); buttons above the panels switch between the two.
    ``scale`` (see :data:`SCALES`): the panels share one colour range by default;
    ``"panel"`` gives each its own, ``"fixed"`` pins p to 0-1, and a ``(zmin, zmax)``
    pair (e.g. from :func:`shared_range`) puts several figures on one scale. Hover
    shows token, position, layer, p_restored, IE, p_clean and p_corrupt. The figure
    has no fixed width: it fills its container. ``buttons=False`` leaves the p_restored / IE
    buttons out (where another control, such as the Inspector's, chooses the value).
    """
    return plot_traces([result], kind, value=value, title=title, height=height, scale=scale, buttons=buttons)


def plot_traces(results: Sequence[Any] | Mapping[str, Any], kind: str | Sequence[str] | None = None, *,
                value: str = "p", title: str | None = None, height: int | None = None,
                scale: Any = "shared", buttons: bool = True) -> go.Figure:
    """Several traces as rows of one figure (kinds as columns) on one colour scale.

    For paired maps: the subject vs the relation corrupted, two windows, a model before
    and after an edit. ``results`` is a list (rows labelled by what was corrupted) or a
    dict ``{row label: result}``. ``scale`` as in :func:`plot_trace` (``"shared"``: one
    range across every panel, so a colour means the same number in each row). The title
    names each row's corrupted span and p_corrupt (:func:`traces_title`); ``buttons`` as in
    :func:`plot_trace`.
    """
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}, not {value!r}")
    if isinstance(results, Mapping):
        rows = [(str(k), v) for k, v in results.items()]
    else:
        rows = [(f"{getattr(r, 'corrupt', '')} corrupted" if len(results) > 1 else "", r) for r in results]
    if not rows:
        raise ValueError("plot_traces needs at least one result")
    kinds = _kinds_of(rows[0][1], kind)
    for _, r in rows[1:]:
        _kinds_of(r, kinds)
    n_rows, n_cols = len(rows), len(kinds)

    panels, z_sets, customs, metas = [], {"p": [], "ie": []}, [], []
    for label, r in rows:
        tokens = list(r.tokens)
        corrupted = _positions(getattr(r, "corrupted_span", None))
        labels = token_labels(tokens, corrupted)
        p_clean, p_corrupt = float(r.p_clean), float(r.p_corrupt)
        for k in kinds:
            p = np.asarray(r.scores[k], dtype=float)
            if p.shape[0] != len(tokens):
                raise ValueError(f"scores[{k!r}] has {p.shape[0]} rows but the prompt has {len(tokens)} tokens")
            ie = p - p_corrupt
            custom = np.empty(p.shape + (4,), dtype=object)
            custom[..., 0] = np.array(labels, dtype=object)[:, None]
            custom[..., 1] = p
            custom[..., 2] = ie
            custom[..., 3] = np.arange(len(tokens))[:, None]
            panels.append(_panel_range(p, ie, p_clean, p_corrupt))
            z_sets["p"].append(p)
            z_sets["ie"].append(ie)
            customs.append(custom)
            metas.append((label, r, k, labels, p_clean, p_corrupt))
    ranges = _scale_ranges(panels, scale)
    one_bar_per_column = scale != "panel"

    def sub(label: str, k: str) -> str:
        name = KIND_NAMES.get(k, k)
        return f"{name}<br>{_html.escape(label, quote=False)}" if label else name

    if title is None:
        title = traces_title(rows)
    n_tok = max(len(m[3]) for m in metas)
    title_px = 38 + 15 * title.count("<br>")  # the title's first line, then one line per <br>
    menu_px = MENU_PX if buttons else 0
    panel_title_px = 40 if any(label for label, _ in rows) else 24  # two lines (kind, row label) or one
    top, bottom, gap = title_px + 14 + menu_px + panel_title_px, 72, 50 + panel_title_px  # px
    row_px = max(150, 22 * n_tok)
    fig_height = height or top + bottom + n_rows * row_px + (n_rows - 1) * gap
    plot_height = fig_height - top - bottom
    fig = make_subplots(rows=n_rows, cols=n_cols, shared_yaxes=True, horizontal_spacing=0.11 if n_cols > 1 else 0.0,
                        vertical_spacing=min(0.5, gap / plot_height) if n_rows > 1 else 0.0,
                        subplot_titles=[sub(label, k) for label, _ in rows for k in kinds])
    for i, (custom, (label, r, k, labels, p_clean, p_corrupt)) in enumerate(zip(customs, metas)):
        row, col = i // n_cols + 1, i % n_cols + 1
        zmin, zmax = ranges[i][value]
        xaxis = fig.layout["xaxis" if i == 0 else f"xaxis{i + 1}"]
        yaxis = fig.layout["yaxis" if i == 0 else f"yaxis{i + 1}"]
        show_bar = not one_bar_per_column or row == 1
        bar_y = (0.5, 1.0) if one_bar_per_column else (float(yaxis.domain[0] + yaxis.domain[1]) / 2,
                                                        float(yaxis.domain[1] - yaxis.domain[0]))
        fig.add_trace(
            go.Heatmap(
                z=z_sets[value][i], x=np.arange(z_sets[value][i].shape[1]), y=np.arange(len(labels)),
                customdata=custom, colorscale=KIND_COLORSCALES.get(k, "Viridis"), zmin=zmin, zmax=zmax,
                name=k if n_rows == 1 else f"{k} / {label}", showscale=show_bar,
                colorbar=dict(x=float(xaxis.domain[1]) + 0.005, thickness=10, len=bar_y[1], y=bar_y[0],
                              yanchor="middle", title=dict(text="p" if value == "p" else "IE", side="top")),
                hovertemplate=(
                    "token %{customdata[0]} (position %{customdata[3]})<br>layer %{x}<br>"
                    "p_restored %{customdata[1]:.4f}<br>IE %{customdata[2]:+.4f}<br>"
                    f"p_clean {p_clean:.4f}<br>p_corrupt {p_corrupt:.4f}<extra>{k}</extra>"
                ),
                xgap=1, ygap=1,
            ),
            row=row, col=col,
        )
        fig.update_xaxes(title_text=_window_label(k, getattr(r, "window", None)) if row == n_rows else None,
                         row=row, col=col, dtick=1 if z_sets[value][i].shape[1] <= 24 else None)
        fig.update_yaxes(tickmode="array", tickvals=list(range(len(labels))), ticktext=labels, row=row, col=col)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False)
    fig.update_annotations(font=dict(size=13))  # the panel titles: narrow panels at 1000 px windows

    def restyle_args(v: str) -> list:
        return [{"z": z_sets[v], "zmin": [r[v][0] for r in ranges], "zmax": [r[v][1] for r in ranges],
                 "colorbar.title.text": ["p" if v == "p" else "IE"] * len(z_sets[v])}]

    # The buttons sit in their own strip between the title and the panel titles, left
    # aligned, so they never cover either at any width.
    if buttons:
        fig.update_layout(updatemenus=[dict(
            type="buttons", direction="right", x=0.0, xanchor="left", y=1.0 + (panel_title_px + 4) / plot_height,
            yanchor="bottom", pad=dict(t=0, b=0, l=0, r=0), showactive=True, active=VALUES.index(value),
            font=dict(size=11),
            buttons=[dict(label="p_restored", method="restyle", args=restyle_args("p")),
                     dict(label="IE", method="restyle", args=restyle_args("ie"))],
        )])
    fig.update_layout(
        title=dict(text=title, x=0.0, xanchor="left", xref="paper", y=1.0, yref="container", yanchor="top",
                   pad=dict(t=16), font=dict(size=15)),
        height=fig_height, autosize=True,
        margin=dict(l=10, r=50, t=top, b=bottom),
        plot_bgcolor="white",
    )
    return fig


# --------------------------------------------------------------------------- averaged maps


def _as_results(results: Any) -> list[tuple[str, Any]]:
    """Normalize plot_aie's input to [(label, DatasetTraceResult)]."""
    if isinstance(results, Mapping) and not hasattr(results, "aie"):
        return [(str(k), v) for k, v in results.items()]
    if hasattr(results, "aie"):
        results = [results]
    out = []
    for r in results:
        label = str(getattr(r, "corrupt", "") or f"result {len(out) + 1}")
        out.append((f"{label} corrupted", r))
    return out


def plot_aie(*results: Any, kind: str | Sequence[str] | None = None, window: int | None = None,
             title: str | None = None, height: int | None = None) -> go.Figure:
    """Averaged indirect-effect maps over ROME's position buckets.

    Pass one or more :class:`workbench.tracing.DatasetTraceResult` (typically the
    subject- and the relation-corrupted sweep: ``plot_aie(subj, rel)``), or a dict
    ``{label: result}``. Perspectives are side by side (columns), kinds stacked
    (rows); within a row all panels share one colour scale, so the contrast between
    perspectives reads directly from the colours. ``window`` (the sweeps' MLP/attention
    window) only labels the x axes.
    """
    if len(results) == 1:
        pairs = _as_results(results[0])
    else:
        pairs = _as_results(list(results))
    if not pairs:
        raise ValueError("plot_aie needs at least one dataset result")
    if kind is None:
        seen: list[str] = []
        for _, r in pairs:
            for k in list(getattr(r, "kinds", None) or r.aie.keys()):
                if k not in seen and k in r.aie:
                    seen.append(k)
        kinds = [k for k in KINDS if k in seen] + [k for k in seen if k not in KINDS]
    else:
        kinds = [kind] if isinstance(kind, str) else list(kind)

    def sub_title(label: str, r: Any) -> str:
        n = getattr(r, "n_facts", None)
        skipped = getattr(r, "n_skipped", None)
        if n is None:
            return label
        return f"{label} ({n - (skipped or 0)} of {n} facts)"

    ncol = len(pairs)
    indices = {tuple(map(str, df.index)) for _, r in pairs for df in r.aie.values() if df is not None}
    shared = len(indices) <= 1
    # Row labels of every column but the first sit between panels: leave them room (in px of a
    # 640 px wide plot, a notebook's output area beside an open file browser) when they differ.
    label_px = max([len(line) for idx in indices for b in idx for line in _wrap_label(b).split("<br>")] or [0]) * 6.5
    h_space = 0.06 if shared else min(0.4, 0.03 + label_px / 640)
    blank = any(df is not None and df.size and bool(df.isna().any().any()) for _, r in pairs for df in r.aie.values())
    if title is None:
        title = "Average indirect effect by position bucket"
        pc = [(lbl, getattr(r, "p_clean", None), getattr(r, "p_corrupt", None)) for lbl, r in pairs]
        bits = [f"{lbl}: p_clean {_mean(a):.3f}, p_corrupt {_mean(b):.3f}" for lbl, a, b in pc
                if a is not None and b is not None]
        title += "".join(f"<br><sup>{bit}</sup>" for bit in bits)
    # px: the title's lines and the panel titles (two lines) above; between rows the x-axis
    # ticks and title (two lines) and the next panel titles; below, the axis titles and a note.
    top, gap, bottom = 34 + 15 * title.count("<br>") + 14 + 40, 130, 120 if blank else 80
    n_rows = len(kinds)
    fig_height = height or top + bottom + n_rows * 210 + (n_rows - 1) * gap
    fig = make_subplots(
        rows=n_rows, cols=ncol, shared_yaxes=shared,
        vertical_spacing=min(0.4, gap / max(1, fig_height - top - bottom)) if n_rows > 1 else 0.1,
        horizontal_spacing=h_space,
        subplot_titles=[f"{KIND_NAMES.get(k, k)}<br>{sub_title(lbl, r)}" for k in kinds for lbl, r in pairs],
    )
    fig.update_annotations(font=dict(size=13))
    for row, k in enumerate(kinds, start=1):
        frames = [r.aie.get(k) for _, r in pairs]
        values = [np.asarray(df.values, dtype=float) for df in frames if df is not None and df.size]
        finite = [v[np.isfinite(v)] for v in values]
        finite = [v for v in finite if v.size]
        lo = min([0.0] + [float(v.min()) for v in finite])
        hi = max([1e-6] + [float(v.max()) for v in finite])
        axis = "coloraxis" if row == 1 else f"coloraxis{row}"
        yaxis = fig.layout["yaxis" if (row - 1) * ncol + 1 == 1 else f"yaxis{(row - 1) * ncol + 1}"]
        y0, y1 = yaxis.domain
        fig.update_layout({axis: dict(
            colorscale=KIND_COLORSCALES.get(k, "Viridis"), cmin=lo, cmax=hi,
            colorbar=dict(title=dict(text="AIE", side="top"), thickness=12, x=1.01,
                          y=(y0 + y1) / 2, len=(y1 - y0), yanchor="middle"),
        )})
        for col, ((label, r), df) in enumerate(zip(pairs, frames), start=1):
            if df is None or not df.size:
                continue
            counts = _bucket_counts(r, k, df)
            z = df.values.astype(float)
            custom = np.empty(df.shape + (3,), dtype=object)
            custom[..., 0] = np.array([str(b) for b in df.index], dtype=object)[:, None]
            custom[..., 1] = counts[:, None]
            custom[..., 2] = np.where(np.isfinite(z), np.char.mod("%+.4f", np.nan_to_num(z)),
                                      "none: no position falls in this bucket")
            fig.add_trace(
                go.Heatmap(
                    z=z, x=[int(c) if str(c).isdigit() else c for c in df.columns],
                    y=list(range(len(df.index))), coloraxis=axis, customdata=custom, xgap=1, ygap=1,
                    name=f"{k} / {label}",
                    hovertemplate=("%{customdata[0]}<br>layer %{x}<br>AIE %{customdata[2]}<br>positions averaged "
                                   f"%{{customdata[1]}}<extra>{k}, {label}</extra>"),
                ),
                row=row, col=col,
            )
            fig.update_yaxes(tickmode="array", tickvals=list(range(len(df.index))),
                             ticktext=[_wrap_label(str(b)) for b in df.index], tickfont=dict(size=11),
                             row=row, col=col)
        for col in range(1, ncol + 1):
            fig.update_xaxes(title_text=_window_label(k, window or _window_of(pairs[col - 1][1])), row=row, col=col)
    fig.update_yaxes(autorange="reversed", showgrid=False)
    fig.update_xaxes(showgrid=False)
    if blank:
        fig.add_annotation(x=0.0, xref="paper", xanchor="left", y=0.0, yref="paper", yanchor="top", yshift=-78,
                           showarrow=False, font=dict(size=11, color="#555"), align="left",
                           text="Blank cells: no position of these facts falls in that bucket<br>(e.g. one-token "
                                "spans have no middle tokens, a span ending the prompt has no tokens after it).")
    fig.update_layout(title=dict(text=title, x=0.0, xanchor="left", xref="paper", y=1.0, yref="container",
                                 yanchor="top", pad=dict(t=16)),
                      height=fig_height, autosize=True,
                      margin=dict(l=10, r=60, t=top, b=bottom), plot_bgcolor="white")
    return fig


def _wrap_label(text: str, width: int = 16) -> str:
    """A row label broken into lines of about ``width`` characters at spaces (``<br>``)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "<br>".join(lines)


def _window_of(r: Any) -> int | None:
    return getattr(r, "window", None)


def _mean(x: Any) -> float:
    try:
        arr = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        return float("nan")
    finite = arr[np.isfinite(arr)]
    return float(finite.mean()) if finite.size else float("nan")


def _bucket_counts(r: Any, kind: str, df: pd.DataFrame) -> np.ndarray:
    """How many (fact, position) pairs each bucket row averages (``r.counts``; else n_facts)."""
    counts = getattr(r, "counts", None)
    default = getattr(r, "n_facts", "?")
    if isinstance(counts, Mapping) and kind in counts:
        counts = counts[kind]
    if isinstance(counts, pd.DataFrame):
        counts = counts.iloc[:, 0] if counts.shape[1] else None
    if isinstance(counts, (pd.Series, Mapping)):
        return np.array([counts.get(b, default) for b in df.index], dtype=object)
    return np.array([default] * len(df.index), dtype=object)


# --------------------------------------------------------------------------- severed


def _severed_curves(results: Sequence[Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name in ("none", "mlp_severed", "attn_severed"):
        arr = np.stack([np.asarray(getattr(r, name), dtype=float) for r in results])
        mean = arr.mean(0)
        sem = arr.std(0, ddof=1) / np.sqrt(len(arr)) if len(arr) > 1 else np.zeros_like(mean)
        out[name] = (mean, sem)
    return out


def plot_severed(result: Any | Sequence[Any], *, value: str = "p", title: str | None = None) -> go.Figure:
    """Restored probability per layer with nothing, the MLPs, or attention severed.

    ``result`` is a :class:`workbench.tracing.SeveredResult`, or a list of them (the
    curves are then averaged over prompts, with standard-error bars). ``value="ie"``
    subtracts p_corrupt. Dashed lines mark p_clean and p_corrupt. A gap between the
    purple bars and the green ones is the share of the effect that needs the MLPs
    at later layers.
    """
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}, not {value!r}")
    results = list(result) if isinstance(result, (list, tuple)) else [result]
    if not results:
        raise ValueError("plot_severed needs at least one result")
    curves = _severed_curves(results)
    p_clean = float(np.mean([r.p_clean for r in results]))
    p_corrupt = float(np.mean([r.p_corrupt for r in results]))
    offset = p_corrupt if value == "ie" else 0.0
    layers = np.arange(len(curves["none"][0]))
    fig = go.Figure()
    style = {"none": ("nothing severed", KIND_COLORS["hidden"]),
             "mlp_severed": ("MLP severed", KIND_COLORS["mlp"]),
             "attn_severed": ("attention severed", KIND_COLORS["attn"])}
    label = "p_restored" if value == "p" else "IE"
    for name, (mean, sem) in curves.items():
        text, colour = style[name]
        fig.add_bar(x=layers, y=mean - offset, name=text, marker_color=colour,
                    error_y=dict(type="data", array=sem, visible=len(results) > 1),
                    hovertemplate=f"layer %{{x}}<br>{label} %{{y:.4f}}<extra>{text}</extra>")
    for y, text in ((p_clean, "p_clean"), (p_corrupt, "p_corrupt")):
        # Labelled in the right margin, outside the bars, so they never overlap them.
        fig.add_hline(y=y - offset, line_dash="dash", line_color="#555", line_width=1)
        fig.add_annotation(x=1.0, xref="paper", xanchor="left", y=y - offset, yref="y", yanchor="middle",
                           text=f"{text} {y - offset:.2f}", showarrow=False, font=dict(size=11, color="#555"))
    if title is None:
        first = results[0]
        corrupts = {str(getattr(r, "corrupt", None)) for r in results if getattr(r, "corrupt", None) is not None}
        what = f"{', '.join(sorted(corrupts))} corrupted" if corrupts else "corrupted"
        if len(results) == 1:
            tok = first.tokens[first.token] if hasattr(first, "tokens") else first.token
            title = (f"Severed trace of {_html.escape(repr(first.prompt), quote=False)} → "
                     f"{_html.escape(repr(first.answer), quote=False)}"
                     f"<br><sup>restoring the hidden state at token {first.token} ({_html.escape(repr(tok), quote=False)}); "
                     f"{what}: {_html.escape(repr(span_text(first.tokens, first.corrupted_span)), quote=False)}</sup>")
        else:
            title = (f"Severed trace, {what}: mean of {len(results)} prompts"
                     "<br><sup>restoring the hidden state at the last corrupted token; bars ± s.e.</sup>")
    fig.update_layout(barmode="group", title=dict(text=title, x=0.0, xanchor="left"),
                      xaxis=dict(title="layer of the restored hidden state", dtick=1 if len(layers) <= 24 else None),
                      yaxis=dict(title=label), height=420, autosize=True, plot_bgcolor="white",
                      legend=dict(orientation="h", y=-0.2), margin=dict(l=10, r=100, t=80, b=60))
    return fig


# --------------------------------------------------------------------------- edit evaluation

_ROW_KEYS = ("method", "request", "locus")
KNOWN_FAMILIES = ("entity", "relation", "request", "transfer", "bleed", "other_relations", "locality", "n")


def edit_eval_long(df: pd.DataFrame) -> pd.DataFrame:
    """Reshape an evaluation table to long form: method, request, locus, family, metric, value.

    Accepts rows indexed by (method, request, locus) as :func:`workbench.evaluate` gives them,
    or (method, locus) (a MultiIndex, or ``method``/``request``/``locus`` columns; a missing
    ``request`` is ``""``), and value columns that are a MultiIndex ``(family, metric[, ...])``
    or flat names ``"family/metric"`` (also ``.``, ``:`` or ``|`` as separator, or
    ``"entity_reliability_acc"`` as in ``summary.csv``). Every value is one number: a table
    with two rows of the same (method, request, locus) is an error, not two bars in one.
    """
    frame = df.copy()
    if isinstance(frame.columns, pd.MultiIndex):
        flat = []
        for col in frame.columns:
            parts = [str(c) for c in col if str(c) != ""]
            flat.append(parts[0] if len(parts) == 1 and parts[0] in _ROW_KEYS else "/".join(parts))
        frame.columns = flat
    else:
        frame.columns = [str(c) for c in frame.columns]
    keys = [c for c in _ROW_KEYS if c in frame.columns]
    if keys:
        frame = frame.set_index(keys)
    index_names = [n if n else f"level_{i}" for i, n in enumerate(frame.index.names)]
    frame.index = frame.index.set_names(index_names)
    rows = []
    for idx, rec in frame.iterrows():
        idx = idx if isinstance(idx, tuple) else (idx,)
        named = dict(zip(index_names, idx))
        method = str(named.get("method", idx[0]))
        locus = str(named.get("locus", idx[-1] if len(idx) > 1 else ""))
        request = str(named.get("request", idx[1] if len(idx) > 2 else ""))
        for col, value in rec.items():
            parts = re.split(r"[/.:|]", str(col), maxsplit=1)
            if len(parts) != 2:  # summary.csv style: "entity_reliability_acc"
                fam = next((f for f in KNOWN_FAMILIES if str(col).startswith(f + "_")), None)
                if fam is None:
                    continue
                parts = [fam, str(col)[len(fam) + 1:]]
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            rows.append(dict(method=method, request=request, locus=locus, family=parts[0], metric=parts[1],
                             value=value))
    if not rows:
        raise ValueError(
            "plot_edit_eval found no (family, metric) value columns; expected a MultiIndex "
            f"(family, metric) or 'family/metric' names, got {list(df.columns)[:8]}"
        )
    long = pd.DataFrame(rows)
    dup = long.duplicated(["method", "request", "locus", "family", "metric"], keep=False)
    if dup.any():
        first = long[dup].iloc[0]
        raise ValueError(f"the table has more than one row for method {first['method']!r}, request "
                         f"{first['request']!r}, locus {first['locus']!r}; index the rows by (method, request, "
                         "locus) so that every bar is one number")
    return long


METHOD_PALETTE: tuple[str, ...] = ("#1f77b4", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22", "#393b79",
                                   "#7b4173")
"""Bar colours of editing methods: none is close to the kinds' purple, green or red."""

COUNT_FAMILIES = ("n",)
"""Column families that hold counts, not rates (``("n", "edits")``, ``("n", "errors")``); not plotted."""


def plot_edit_eval(df: pd.DataFrame, *, measure: str | None = "acc", title: str | None = None,
                   families: Sequence[str] | None = None) -> go.Figure:
    """Grouped bars of an edit evaluation: one panel per probe family, a group of bars per
    metric, one bar per (method, edit locus); one row of panels per request perspective
    when the table has them (``evaluate``'s rows are (method, request, locus)).

    ``df`` is what :func:`workbench.evaluate` returns; see :func:`edit_eval_long` for the
    accepted layouts. ``measure`` keeps the metrics ending in ``_acc`` (accuracy, default)
    or ``_score`` (CounterFact's P(new) > P(old)); ``None`` shows all. ``families`` picks
    panels (default: every family of rates, i.e. not the counts ``n`` nor the evaluation's
    ``*_adj`` differences; an axis reaches below 0 when a chosen one is negative). Bars of edits keyed at the
    relation are hatched; the unedited baseline is grey; every panel has its own numeric
    axis on one range.
    """
    long = edit_eval_long(df)
    long = long[~long["family"].isin(COUNT_FAMILIES)]
    if measure is not None:
        suffix = f"_{measure}"
        keep = long["metric"].str.endswith(suffix)
        if not keep.any():
            raise ValueError(f"no metric ends with {suffix!r}; metrics are {sorted(set(long['metric']))}")
        long = long[keep].assign(metric=lambda d: d["metric"].str[: -len(suffix)])
    all_families = list(dict.fromkeys(long["family"]))
    if families is None:  # the rates; the evaluation's "*_adj" families are differences of rates
        families = [f for f in all_families if not f.endswith("_adj")] or all_families
    else:
        unknown = [f for f in families if f not in all_families]
        if unknown:
            raise ValueError(f"families {unknown} are not in the table (it has {all_families})")
    long = long[long["family"].isin(list(families))]
    families = [f for f in all_families if f in set(long["family"])]
    requests = list(dict.fromkeys(long["request"]))
    bars = list(dict.fromkeys(zip(long["method"], long["locus"])))
    methods = [m for m in dict.fromkeys(long["method"]) if m != "unedited"]
    palette = list(METHOD_PALETTE)
    n_rows, n_cols = len(requests), len(families)

    def row_label(request: str) -> str:
        return f"{request}-based requests" if request else ""

    fig = make_subplots(rows=n_rows, cols=n_cols, horizontal_spacing=min(0.05, 0.3 / max(1, n_cols - 1)),
                        vertical_spacing=0.16 if n_rows > 1 else 0.1,
                        subplot_titles=[fam for _ in requests for fam in families])
    values = long["value"].dropna()
    top = 100.0 if values.size and values.abs().max() > 1.0 else 1.0
    bottom = min(0.0, float(values.min()) * 1.12) if values.size else 0.0
    legend_seen: set[str] = set()
    for row, req in enumerate(requests, start=1):
        for col, fam in enumerate(families, start=1):
            part = long[(long["family"] == fam) & (long["request"] == req)]
            metrics = list(dict.fromkeys(part["metric"]))
            for method, locus in bars:
                sel = part[(part["method"] == method) & (part["locus"] == locus)].set_index("metric")["value"]
                if sel.empty:
                    continue
                name = f"{method} @ {locus}" if locus and locus != "-" else method
                colour = "#9e9e9e" if method == "unedited" else palette[methods.index(method) % len(palette)]
                ys = [float(sel[m]) if m in sel.index else float("nan") for m in metrics]
                fig.add_bar(
                    x=metrics, y=ys, name=name, legendgroup=name, showlegend=name not in legend_seen,
                    row=row, col=col,
                    # a zero-height bar draws nothing: write its 0 so that it does not look missing
                    text=["0" if y == 0 else "" for y in ys], textposition="outside", textfont=dict(size=9),
                    marker=dict(color=colour, pattern_shape="/" if locus == "relation" else ""),
                    hovertemplate=(f"{_html.escape(name, quote=False)}"
                                   + (f" ({_html.escape(req, quote=False)} request)" if req else "")
                                   + f"<br>{_html.escape(fam, quote=False)} %{{x}}: %{{y:.3g}}<extra></extra>"),
                )
                legend_seen.add(name)
    unit = "%" if top == 100.0 else "rate"
    axis_title = {"acc": "accuracy", "score": "score (P(new) > P(old))"}.get(measure or "", "value") + f" ({unit})"
    # Numeric axes on one range in every panel; tick labels only on the first column.
    fig.update_yaxes(type="linear", range=[bottom, top * 1.12], showgrid=True, gridcolor="#eee")
    for col in range(2, n_cols + 1):
        fig.update_yaxes(showticklabels=False, col=col)
    for row in range(1, n_rows + 1):
        req = requests[row - 1]
        fig.update_yaxes(title_text=f"<b>{row_label(req)}</b><br>{axis_title}" if req else axis_title, row=row, col=1)
    fig.update_xaxes(type="category", tickfont=dict(size=10))
    fig.update_annotations(font=dict(size=13))
    if title is None:
        title = "Edit evaluation: probe families × edit locus"
        if measure:
            title += f" ({'teacher-forced accuracy' if measure == 'acc' else 'CounterFact score'})"
    fig.update_layout(barmode="group", title=dict(text=title, x=0.0, xanchor="left"),
                      height=120 + 300 * n_rows, autosize=True, plot_bgcolor="white",
                      legend=dict(orientation="h", y=-0.08 if n_rows > 1 else -0.18, yanchor="top"),
                      margin=dict(l=10, r=10, t=90, b=60), bargap=0.15, bargroupgap=0.0)
    return fig


# --------------------------------------------------------------------------- attention


@dataclass
class AttentionHTML:
    """Attention patterns rendered by circuitsvis with its JavaScript inlined.

    Displays in Jupyter (``_repr_html_``); ``str()`` gives the same self-contained
    HTML fragment; :meth:`save` writes a full page. Nothing is loaded from the
    network, unlike circuitsvis's own ``RenderedHTML``, which probes the internet
    and switches to a CDN bundle when it can.
    """

    html: str
    tokens: list[str]
    layer: int
    pattern: np.ndarray  # [n_heads, dest, src]

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return f"AttentionHTML(layer={self.layer}, heads={self.pattern.shape[0]}, tokens={len(self.tokens)})"

    def __html__(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html

    def save(self, path: str | Path) -> Path:
        """Write a complete offline HTML page."""
        path = Path(path)
        path.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                        f"{self.html}</body></html>", encoding="utf-8")
        return path


def circuitsvis_inline(element: str, **props: Any) -> str:
    """HTML rendering circuitsvis's React ``element`` with its bundled JavaScript inline."""
    from circuitsvis.utils.render import render_local

    return render_local(element, **props)


def plot_attention(model: Any, prompt: str, layer: int, heads: Sequence[int] | None = None) -> AttentionHTML:
    """Attention patterns of one layer on a prompt, one small map per head (circuitsvis).

    Runs the model once, caching only ``blocks.{layer}.attn.hook_pattern``.
    """
    import torch

    from .spans import tokenize

    n_layers = model.cfg.n_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: the model has layers 0..{n_layers - 1}")
    toks = tokenize(model, prompt)
    name = f"blocks.{layer}.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(toks.tensor(model.cfg.device), names_filter=lambda n: n == name)
    pattern = cache[name][0].float().cpu().numpy()  # [heads, dest, src]
    head_ids = list(range(pattern.shape[0])) if heads is None else list(heads)
    pattern = pattern[head_ids]
    tokens = list(toks.str_tokens)
    html = circuitsvis_inline(
        "AttentionHeads", attention=pattern, tokens=tokens,
        attentionHeadNames=[f"L{layer}H{h}" for h in head_ids], maskUpperTri=True,
    )
    return AttentionHTML(html=html, tokens=tokens, layer=layer, pattern=pattern)


# --------------------------------------------------------------------------- export

_EXTERNAL = re.compile(r"<script[^>]*\bsrc\s*=|<link[^>]*\bhref\s*=\s*[\"']?(https?:)?//|@import\s+url\(\s*[\"']?(https?:)?//",
                       re.IGNORECASE)


def external_references(html: str) -> list[str]:
    """External script/stylesheet references in an HTML text (empty when self-contained)."""
    return [m.group(0) for m in _EXTERNAL.finditer(html)]


def figure_html(fig: go.Figure, *, full_html: bool = False) -> str:
    """A figure as HTML: a fragment that expects Plotly already loaded, or (``full_html``)
    a complete page with Plotly's JavaScript embedded."""
    config = {"responsive": True, "displaylogo": False}  # fill the container, follow its resizes
    if full_html:
        return fig.to_html(full_html=True, include_plotlyjs=True, include_mathjax=False, config=config)
    return fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, config=config)


def save_html(fig: go.Figure | AttentionHTML, path: str | Path) -> Path:
    """Write a figure as a self-contained HTML page that opens offline."""
    path = Path(path)
    if isinstance(fig, AttentionHTML):
        return fig.save(path)
    path.write_text(figure_html(fig, full_html=True), encoding="utf-8")
    return path


__all__ = [
    "KIND_COLORSCALES", "KIND_COLORS", "AttentionHTML", "plot_trace", "plot_traces", "shared_range", "SCALES",
    "plot_aie", "plot_severed", "traces_title",
    "plot_edit_eval", "edit_eval_long", "plot_attention", "figure_html", "save_html",
    "external_references", "token_labels", "span_text",
]

"""What the Inspector shows, as functions of its :class:`~workbench.widgets.state.InspectorState`.

Each function reads the state and returns HTML (or a figure, or a progress bar's value, max,
style and label); none keeps anything between calls, so nothing shown can be left over from an
earlier run: the views are redrawn from the state after every change.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

from ..plots import plot_trace, plot_traces
from .state import SUCCESS_P, InspectorState, RunStatus

WARN = "#b36b00"
ERROR = "#b00"

RUN_WORDS = {"trace": {"done": "traced", "failed": "traced", "error": "stopped by an error",
                       "cancelled": "cancelled"},
             "edit": {"done": "edited", "failed": "edit failed", "error": "stopped by an error",
                      "cancelled": "cancelled"}}
BAR_STYLES = {"running": "", "done": "success", "failed": "danger", "error": "danger", "cancelled": "warning"}


def _span(colour: str, text: str, bold: bool = False) -> str:
    weight = ";font-weight:600" if bold else ""
    return f"<span style='color:{colour}{weight}'>{html.escape(text)}</span>"


@dataclass(frozen=True)
class ProgressView:
    """A progress bar's value, max and style, and its label."""

    value: int
    max: int
    style: str
    label: str


def progress(run: RunStatus | None) -> ProgressView:
    """The bar and the label "i/n step… t s" of a run, or how it ended ("traced in 1.2 s")."""
    if run is None:
        return ProgressView(0, 1, "", "")
    n = max(1, len(run.steps))
    if run.running:
        step = run.steps[min(run.done, len(run.steps) - 1)] if run.steps else ""
        label = f"{min(run.done + 1, n)}/{n} {step}… {run.elapsed():.1f} s"
    else:
        label = f"{RUN_WORDS[run.action][run.state]} in {run.elapsed():.1f} s"
        if run.state in ("error", "cancelled"):
            label = f"{RUN_WORDS[run.action][run.state]} after {run.elapsed():.1f} s"
    return ProgressView(min(run.done, n), n, BAR_STYLES[run.state], html.escape(label))


def badge(state: InspectorState) -> str:
    """The orange "edited model" badge: while an edit runs, or while any edit is applied to the model."""
    if state.edit_run is not None and state.edit_run.running:
        text = "editing the model: its weights change while this edit runs"
    else:
        edits = state.applied_edits
        if not edits:
            return ""
        last = edits[-1]
        request = (last.requests or [{}])[-1]
        new = request.get("target_new")
        new = new.get("str") if isinstance(new, dict) else new
        what = f"{last.method} at the {last.locus}"
        if request.get("prompt") and request.get("subject"):
            what += f": {request['prompt'].format(request['subject'])!r} → {str(new).strip()!r}"
        text = f"edited model: {len(edits)} edit(s) applied (last: {what}); Undo reverts the last"
    return ("<div class='workbench-badge' style='display:inline-block;background:#e6a100;color:#111;"
            f"padding:3px 10px;border-radius:4px;font-weight:600'>{html.escape(text)}</div>")


def stale_note(why: list[str], shown: str = "the map shown was") -> str:
    """The "out of date" note: every reason, then what the shown results belong to and what to do."""
    if not why:
        return ""
    return ("<div class='workbench-stale' style='background:#fff6e5;border-left:4px solid #e6a100;padding:4px 10px'>"
            f"out of date: {html.escape('; '.join(why))}. {html.escape(shown[:1].upper() + shown[1:])} computed "
            "for the earlier inputs; run again for the current ones.</div>")


def trace_status(state: InspectorState) -> str:
    """The Trace tab's status line: the input problem, the run's error, or the shown map's numbers."""
    if state.trace_error is not None:
        return _span(ERROR, state.trace_error[0])
    run = state.trace_run
    if run is not None and run.running:
        return ""
    problem = state.fact_problem() if state.trace.corrupt != "tokens" else state.tokens()[1]
    if problem is not None:
        return _span(WARN, f"{problem}: fix it before running")
    if run is not None and run.state == "cancelled":
        kept = "; the map below is the previous one" if state.traced is not None else ": no map"
        return _span(WARN, f"cancelled{kept}")
    if state.traced is None:
        return ""
    r = state.traced.result
    text = (f"answer {r.answer!r}: p_clean {r.p_clean:.3f}, p_corrupt {r.p_corrupt:.3f}"
            f" (noise {float(r.noise_level):.3g}, {r.samples} samples, window {r.window})")
    if state.traced.edits:
        text += "; traced on the edited model"
    return html.escape(text)


def token_bar(state: InspectorState) -> tuple[list[str], set[int]]:
    """The prompt's token labels (spaces shown as ␣) and the marked positions; none when it cannot be tokenized."""
    toks, _ = state.tokens()
    if toks is None:
        return [], set()
    labels = [tok.replace(" ", "␣") or "∅" for tok in toks.str_tokens]
    return labels, set(state.marked())


def trace_title(state: InspectorState) -> str:
    r = state.traced.result
    edited = " <b>[edited model]</b>" if state.traced.edits else ""
    # short lines: the title is not wrapped by Plotly, and a notebook's output area can be 550 px wide
    return (f"{html.escape(repr(r.prompt), quote=False)} → {html.escape(repr(r.answer), quote=False)}{edited}"
            f"<br><sup>p_clean {r.p_clean:.3f}, p_corrupt {r.p_corrupt:.3f}; corrupted "
            f"({html.escape(str(r.corrupt), quote=False)}), tokens marked *</sup>"
            f"<br><sup>{r.samples} samples, noise {float(r.noise_level):.3g}, window {r.window}</sup>")


def trace_figure(state: InspectorState) -> Any:
    """The shown map (the Inspector's own p/IE toggle chooses the value: no buttons in the figure)."""
    if state.traced is None:
        return None
    return plot_trace(state.traced.result, value=state.value, title=trace_title(state), buttons=False)


def edit_figure(state: InspectorState) -> Any:
    """The maps before and after the shown edit on one colour scale (``None`` without them)."""
    out = state.edited
    if out is None or out.after is None:
        return None
    rows = {}
    if out.before is not None:
        rows[f"original model → {out.before.answer!r}"] = out.before
    rows[f"edited model → {out.after.answer!r}"] = out.after
    r = out.after
    title = (f"{html.escape(repr(r.prompt), quote=False)} before and after"
             f"<br><sup>the edit to {html.escape(repr(out.settings.new_object.strip()), quote=False)} "
             f"({html.escape(out.settings.method)} at the {html.escape(out.settings.locus)}); each row traces "
             "its own top answer</sup>"
             f"<br><sup>one colour scale; corrupted ({html.escape(str(r.corrupt), quote=False)}), {r.samples} samples,"
             f" window {r.window}</sup>")
    return plot_traces(rows, value=state.value, title=title, buttons=False)


def edit_target(state: InspectorState) -> str:
    return ("<small>Edits the fact of the Trace tab:</small> "
            f"<b>{html.escape(state.trace.prompt)}</b> "
            f"<small>(subject <b>{html.escape(state.trace.subject or '?')}</b>)</small>")


def edit_status(state: InspectorState) -> str:
    """The Edit tab's status line: an error, the last undo, or what the shown edit did."""
    if state.edit_error is not None:
        return _span(ERROR, state.edit_error[0])
    run = state.edit_run
    if run is not None and run.running:
        return ""
    if state.edit_note:
        return html.escape(state.edit_note)
    if run is not None and run.state == "cancelled":
        return _span(WARN, "cancelled: no edit applied")
    out = state.edited
    if out is None:
        return ""
    edit, outcome, new = out.edit, out.outcome, out.settings.new_object.strip()
    layer = getattr(edit, "info", {}).get("layer", None)
    where = f"{edit.method} edit at the {edit.locus} ({', '.join(edit.param_names)}" + (
        f", layer {layer}" if layer is not None else "") + ")"
    if not edit.is_applied(state.model):
        return html.escape(f"the {where} shown below is no longer applied")
    if outcome.success:
        return html.escape(f"applied the {where}: P({new}) = {outcome.p_new:.3f}, top-1; "
                           f"{len(state.applied_edits)} edit(s) applied")
    return (_span(ERROR, "edit failed: ", bold=True) + html.escape(
        f"the {where} does not make {new!r} the answer: P({new}) = {outcome.p_new:.3f}, top-1 "
        f"{outcome.top_token!r} {outcome.top_p:.2f} (needs top-1 and P >= {SUCCESS_P}). The edit stays applied "
        "so that you can inspect it; Undo reverts it."))


def table_html(df: Any) -> Any:
    from IPython.display import HTML

    if df is None:
        return HTML("")
    # its own horizontal scroll: a wide table never widens the notebook's output area
    return HTML("<div class='workbench-table' style='max-width:100%;overflow-x:auto;font-size:0.9em'>"
                + df.to_html(float_format=lambda x: f"{x:.3f}", border=0) + "</div>")

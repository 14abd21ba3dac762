"""The Inspector's runs: trace, apply an edit, undo. Each changes the :class:`InspectorState` only.

A run fixes its steps when it starts (:class:`RunStatus`), marks each one done, checks the
cancel flag between steps and calls ``state.changed()`` after every change so the views redraw.
A run that is cancelled or stopped by an error keeps the previous results (they still belong to
the inputs they were computed from, and say so when those differ from the settings); an edit
cancelled after it was applied is reverted.
"""

from __future__ import annotations

import dataclasses
import inspect
import traceback
from typing import Any

from .state import (DEFAULT_LAYER, Cancelled, EditOutput, InspectorState, RunStatus, TraceOutput, _merge_traces,
                    prompt_outcome)


def _step(state: InspectorState, run: RunStatus) -> None:
    """Mark the current step done (after checking for a cancel) and redraw."""
    if state.cancel.is_set():
        raise Cancelled()
    run.done = min(run.done + 1, len(run.steps))
    state.changed()


def _check(state: InspectorState) -> None:
    if state.cancel.is_set():
        raise Cancelled()


def _trace(state: InspectorState, run: RunStatus, kwargs: dict, answer: Any = None) -> Any:
    """Trace kind by kind so that progress moves and Cancel is heard (same seed: same noise)."""
    from ..tracing import trace

    kwargs = dict(kwargs)
    kinds = kwargs.pop("kinds")
    if "progress" in inspect.signature(trace).parameters:
        kwargs["progress"] = False
    parts = []
    for kind in kinds:
        _check(state)
        parts.append(trace(state.model, state.trace.prompt, kinds=(kind,), answer=answer, **kwargs))
        _step(state, run)
    return _merge_traces(parts)


def run_trace(state: InspectorState) -> Any:
    """Trace the prompt with the Trace tab's settings; returns the result (``None`` on error or cancel)."""
    state.cancel.clear()
    state.trace_error = None
    try:
        kwargs = state.trace_kwargs()
    except ValueError as err:
        state.trace_run = None
        state.trace_error = (f"{type(err).__name__}: {err}", traceback.format_exc())
        state.changed()
        return None
    settings, edits = state.trace, state.edit_ids()
    run = state.trace_run = RunStatus("trace", [f"tracing {k}" for k in kwargs["kinds"]])
    state.changed()
    try:
        result = _trace(state, run, kwargs)
    except Cancelled:
        run.finish("cancelled")
        state.changed()
        return None
    except Exception as err:  # noqa: BLE001 - shown in the widget instead of the kernel log
        run.finish("error")
        state.trace_error = (f"{type(err).__name__}: {err}", traceback.format_exc())
        state.changed()
        return None
    state.traced = TraceOutput(result, settings, edits)
    run.finish("done")
    state.changed()
    return result


def _edit_call(state: InspectorState, fact: Any, new_object: str) -> Any:
    from ..evaluation import make_edit, resolve_method

    name, fn = resolve_method(state.edit.method)
    kwargs = dict(state.method_kwargs.get(name, {}))
    params = inspect.signature(fn).parameters
    layer = None if state.edit.layer == DEFAULT_LAYER else int(state.edit.layer)
    if layer is not None:
        if "layer" in params:
            kwargs["layer"] = layer
        elif "layers" in params:
            kwargs["layers"] = [layer]
        else:
            raise ValueError(f"{name} does not take a layer; choose 'method default'")
    return make_edit(name, fn, state.model, dataclasses.replace(fact, target_new=new_object), state.edit.locus,
                     kwargs)


def apply_edit(state: InspectorState) -> Any:
    """Compute and apply an edit of the current fact; returns the Edit (``None`` on error or cancel)."""
    from ..report import before_after, predictions_table

    state.cancel.clear()
    state.edit_error, state.edit_note = None, ""
    settings, prompt, subject = state.edit, state.trace.prompt, state.trace.subject
    try:
        new_object = settings.new_object.strip()
        if not new_object:
            raise ValueError("type the new object first")
        trace_kw = state.trace_kwargs() if settings.retrace else None
        fact = state.current_fact()
    except ValueError as err:
        state.edit_run = None
        state.edit_error = (f"{type(err).__name__}: {err}", traceback.format_exc())
        state.changed()
        return None
    kinds = trace_kw["kinds"] if trace_kw else ()
    run = state.edit_run = RunStatus("edit", ["predictions before", f"computing the {settings.method} edit",
                                              "applying", "predictions after"]
                                     + [f"tracing {k} before" for k in kinds] + [f"tracing {k} after" for k in kinds])
    state.changed()
    edit = None
    try:
        prompts = state.edit_prompts()
        probes = state.probe_rows(fact)
        objects = [fact.target_true, new_object]
        all_prompts = prompts + [p for p, _ in probes]
        before = predictions_table(state.model, all_prompts, objects=objects)
        _step(state, run)
        computed = _edit_call(state, fact, new_object)
        _step(state, run)
        computed.apply(state.model)
        edit = computed
        _step(state, run)
        after = predictions_table(state.model, all_prompts, objects=objects)
        outcome = prompt_outcome(state.model, fact.prompt, new_object)
        _step(state, run)
        table = before_after(before, after)
        table.insert(0, ("", "probe"), ["edit prompt"] + ["paraphrase"] * (len(prompts) - 1)
                     + [probe for _, probe in probes])
        before_map = after_map = None
        if trace_kw is not None:
            edit.revert(state.model)
            try:
                before_map = _trace(state, run, trace_kw)
            finally:
                edit.apply(state.model)
            after_map = _trace(state, run, trace_kw)
    except Cancelled:
        if edit is not None and edit.is_applied(state.model):
            edit.revert(state.model)
        run.finish("cancelled")
        state.changed()
        return None
    except Exception as err:  # noqa: BLE001
        if edit is not None and edit.is_applied(state.model):
            edit.revert(state.model)  # a half-finished edit run leaves the model as it was
        run.finish("error")
        state.edit_error = (f"{type(err).__name__}: {err}", traceback.format_exc())
        state.changed()
        return None
    state.edited = EditOutput(edit, settings, prompt, subject, table, outcome, before_map, after_map)
    run.finish("done" if outcome.success else "failed")
    state.changed()
    return edit


def undo_edit(state: InspectorState) -> Any:
    """Revert the most recent edit applied to the model; returns it (``None`` when none is applied)."""
    state.edit_error = None
    applied = state.applied_edits
    if not applied:
        state.edit_note = "nothing to undo"
        state.changed()
        return None
    edit = applied[-1]
    try:
        edit.revert(state.model)
    except Exception as err:  # noqa: BLE001
        state.edit_error = (f"{type(err).__name__}: {err}", traceback.format_exc())
        state.changed()
        return None
    if state.edited is not None and state.edited.edit is edit:
        state.edited = None
    state.edit_run = None
    state.edit_note = f"reverted the {edit.method} edit; {len(applied) - 1} edit(s) applied"
    state.changed()
    return edit

"""``Inspector``: an ipywidgets front end to tracing and editing, for notebooks.

``Inspector(model)`` shows an "edited model" badge (while any edit is applied to the model) above
two tabs:

* **Trace** — type a prompt and its subject, choose what to corrupt (the subject, the
  relation, or tokens clicked in the token bar), the kinds, samples, noise and
  window, and run: the maps of :func:`workbench.plots.plot_trace` appear below, and
  the p_restored / IE toggle redraws them without re-running.
* **Edit** — edit the fact shown in the Trace tab (its prompt and subject) with a method
  from :data:`workbench.evaluation.METHODS` (new object, locus, layer); see the top
  predictions before and after for the prompt, its paraphrases, other subjects of the
  relation in both phrasings (bleed) and the subject's other relations (locality), whether
  the edit reached the new object, the maps before and after on one colour scale, and undo.

The package is one state and views of it: :class:`~workbench.widgets.state.InspectorState`
holds the model (the applied edits are read from the model itself, so an Inspector created
again on an edited model shows the badge and can undo), the settings, the results with the
inputs they were computed from, and each tab's run; :mod:`~workbench.widgets.views` renders
every status line, badge, progress label, token bar and "out of date" note from it;
:mod:`~workbench.widgets.actions` holds the runs; :mod:`~workbench.widgets.inspector` the
widgets, which write the state and redraw. When the prompt or subject change, the Trace tab's
map is cleared; when other settings change, or an edit is applied or undone, results say they
are out of date and why. A cancelled run or one stopped by an error keeps the previous results.
Started from the buttons in a kernel, runs go to a background thread, so **Cancel** stops them at
the next step (an edit cancelled after it was applied is reverted).

Every control is a plain attribute (``inspector.prompt``, ``inspector.run_button``, ...)
and every action a method (:meth:`Inspector.run_trace`, :meth:`Inspector.apply_edit`,
:meth:`Inspector.undo_edit`), so the widget can be driven without a browser (tests,
scripts); called from code, actions run synchronously. Results: ``inspector.result``,
``inspector.figure``, ``inspector.edit_table``, ``inspector.edit_outcome`` and
``inspector.edited_figure``; the last action's error, if any, ``inspector.error`` (and in red
under its buttons).
"""

from __future__ import annotations

from ..report import before_after, predictions_table
from .display import FigureView
from .inspector import KIND_LABELS, Inspector
from .state import (DEFAULT_LAYER, N_NEIGHBOURS, SUCCESS_P, Cancelled, EditOutcome, InspectorState, RunStatus,
                    prompt_outcome)

__all__ = ["Inspector", "InspectorState", "RunStatus", "EditOutcome", "prompt_outcome", "FigureView",
           "predictions_table", "before_after", "Cancelled", "SUCCESS_P", "DEFAULT_LAYER", "KIND_LABELS",
           "N_NEIGHBOURS"]

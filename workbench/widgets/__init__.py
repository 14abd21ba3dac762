"""``Inspector``: an ipywidgets front end to tracing and editing, for notebooks.

``Inspector(model)`` shows an "edited model" badge (while any edit is applied) above two tabs:

* **Trace** — type a prompt and its subject, choose what to corrupt (the subject, the
  relation, or tokens clicked in the token bar), the kinds, samples, noise and
  window, and run: the maps of :func:`workbench.plots.plot_trace` appear below, and
  the p_restored / IE toggle redraws them without re-running.
* **Edit** — edit the fact shown in the Trace tab (its prompt and subject) with a method
  from :data:`workbench.evaluation.METHODS` (new object, locus, layer); see the top
  predictions before and after for the prompt, its paraphrases and a few other subjects
  (locality), whether the edit reached the new object, the maps before and after on one
  colour scale, and undo.

The Inspector's state is one model: every output belongs to the inputs it was computed
from. When the prompt or subject change, the Trace tab's map is cleared; when other
settings change, or an edit is applied or undone, it is marked out of date. Undo clears
the edit's outputs. Runs show monotone progress with the elapsed time; started from the
buttons in a kernel they run in a background thread, so **Cancel** stops them at the next
step (an edit cancelled after it was applied is reverted).

Every control is a plain attribute (``inspector.prompt``, ``inspector.run_button``, ...)
and every action a method (:meth:`Inspector.run_trace`, :meth:`Inspector.apply_edit`,
:meth:`Inspector.undo_edit`), so the widget can be driven without a browser (tests,
scripts); called from code, actions run synchronously. Results land in
``inspector.result``, ``inspector.figure``, ``inspector.edit_table``,
``inspector.edit_outcome`` and ``inspector.edited_figure``; the last error, if any, in
``inspector.error`` (and in red under the buttons).
"""

from __future__ import annotations

from ..report import before_after, predictions_table
from .display import FigureView
from .inspector import DEFAULT_LAYER, KIND_LABELS, N_NEIGHBOURS, Inspector
from .progress import Cancelled, Progress
from .state import SUCCESS_P, EditOutcome, prompt_outcome

__all__ = ["Inspector", "EditOutcome", "prompt_outcome", "FigureView", "predictions_table",
           "before_after", "Progress", "Cancelled", "SUCCESS_P", "DEFAULT_LAYER", "KIND_LABELS", "N_NEIGHBOURS"]

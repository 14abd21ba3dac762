"""The :class:`Inspector` widget: controls that write an :class:`InspectorState`, and a ``render``
that redraws every view from it (see :mod:`workbench.widgets`)."""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, Sequence

import ipywidgets as widgets

from ..plots import KINDS
from . import actions, views
from .display import _clear, _show
from .state import DEFAULT_LAYER, N_NEIGHBOURS, EditSettings, InspectorState, TraceSettings

KIND_LABELS = {"hidden": "hidden (purple)", "mlp": "MLP (green)", "attn": "attention (red)"}
DEFAULT_PROMPT, DEFAULT_SUBJECT = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"
STYLE = {"description_width": "90px"}


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _methods() -> dict[str, str]:
    from ..evaluation import METHODS

    return dict(METHODS)


def _row(*children: Any) -> widgets.HBox:
    return widgets.HBox(list(children), layout=widgets.Layout(flex_flow="row wrap", align_items="center"))


class Inspector:
    """Interactive causal tracing and editing of one model (see :mod:`workbench.widgets`).

    ``facts`` (optional) fills a dropdown of example facts that set the prompt, subject,
    paraphrases and a suggested new object. ``probe_facts`` (default: ``facts``) supply the other
    subjects of a relation (bleed) and the subject's other relations (locality) checked after an
    edit: pass the whole dataset for as many rows as the evaluation has.
    ``window`` defaults to :func:`workbench.tracing.default_window`. ``method_kwargs`` maps a
    method name to keyword arguments for it (``rome_kwargs`` is the same for ``"rome"``: e.g.
    ``hparams=`` or ``stats=`` for a model without a preset corpus). ``background``: run button
    clicks in a thread (default: when in a kernel). Edits already applied to ``model`` (by an
    earlier Inspector, or by code) show in the badge and Undo reverts them.
    """

    def __init__(self, model: Any, facts: Sequence[Any] | None = None, *, prompt: str | None = None,
                 subject: str | None = None, samples: int = 10, noise: str | float = "s3",
                 window: int | None = None, kinds: Sequence[str] = KINDS, seed: int = 1,
                 rome_kwargs: dict | None = None, method_kwargs: dict[str, dict] | None = None,
                 background: bool | None = None, probe_facts: Sequence[Any] | None = None) -> None:
        from ..tracing.window import resolve_window

        facts = list(facts or [])
        first = facts[0] if facts else None
        if prompt is None and first is not None:
            prompt, subject = first.prompt, first.subject
        if prompt is None:
            prompt, subject = DEFAULT_PROMPT, DEFAULT_SUBJECT if subject is None else subject
        methods = list(_methods())
        picked = first if first is not None and (first.prompt, first.subject) == (prompt, subject) else None
        trace = TraceSettings(prompt=prompt, subject=subject or "", kinds=tuple(k for k in KINDS if k in kinds),
                              samples=samples, noise=str(noise), window=resolve_window(model, window))
        edit = EditSettings(method="rome" if "rome" in methods else methods[0],
                            new_object=(picked.target_new or "") if picked is not None else "",
                            paraphrases=tuple(picked.paraphrases) if picked is not None else ())
        self.state = InspectorState(model, facts, trace=trace, edit=edit, seed=seed, method_kwargs=method_kwargs,
                                    probe_facts=probe_facts)
        if rome_kwargs:
            self.state.method_kwargs.setdefault("rome", {}).update(rome_kwargs)
        self.background = _in_kernel() if background is None else background
        self._worker: threading.Thread | None = None
        self._lock = threading.RLock()
        self._syncing = False
        self._shown: dict[str, Any] = {}  # what each Output widget shows (to redraw only on change)
        self._figures: dict[str, Any] = {}
        self._last = "trace"  # the tab of the last action (whose error ``error`` reports)
        self.token_buttons: list[widgets.Button] = []
        self._token_labels: list[str] | None = None
        self.badge = widgets.HTML(layout=widgets.Layout(min_height="0px"))
        trace_tab, edit_tab = self._build_trace_tab(methods), self._build_edit_tab(methods)
        self.tabs = widgets.Tab(children=[trace_tab, edit_tab])
        self.tabs.set_title(0, "Trace")
        self.tabs.set_title(1, "Edit")
        self.widget = widgets.VBox([self.badge, self.tabs])
        self.widget.add_class("workbench-inspector")
        self._wire()
        self.state.changed = self.render
        self.render()

    # ------------------------------------------------------------------ building
    def _build_trace_tab(self, methods: list[str]) -> widgets.VBox:
        s, t = self.state, self.state.trace
        wide = widgets.Layout(width="100%", max_width="640px")
        self.fact_picker = widgets.Dropdown(
            options=[("(type your own)", -1)] + [(f.prompt + " → " + f.target_true, i) for i, f in enumerate(s.facts)],
            value=s.picked, description="example", style=STYLE, layout=wide)
        self.prompt = widgets.Text(value=t.prompt, description="prompt", continuous_update=False, style=STYLE,
                                   layout=wide)
        self.subject = widgets.Text(value=t.subject, description="subject", continuous_update=False, style=STYLE,
                                    layout=widgets.Layout(width="100%", max_width="400px"))
        self.corrupt = widgets.ToggleButtons(options=["subject", "relation", "tokens"], value=t.corrupt,
                                             description="corrupt", style=STYLE,
                                             tooltips=["noise the subject's tokens", "noise the relation's tokens",
                                                       "noise the tokens clicked below"])
        self.token_bar = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.kind_boxes = {k: widgets.Checkbox(value=k in t.kinds, description=KIND_LABELS[k], indent=False,
                                               layout=widgets.Layout(width="150px")) for k in KINDS}
        small = widgets.Layout(width="170px")
        self.samples = widgets.BoundedIntText(value=t.samples, min=1, max=1000, description="samples", style=STYLE,
                                              layout=small)
        self.noise = widgets.Text(value=t.noise, description="noise", style=STYLE, layout=small,
                                  tooltip='"s3" (3 x embedding std), a number, or "u0.5" (uniform)')
        self.window = widgets.BoundedIntText(value=t.window, min=1, max=int(self.state.model.cfg.n_layers),
                                             description="window", style=STYLE, layout=small,
                                             tooltip="layers restored together by MLP/attention cells "
                                                     "(default min(10, ceil(n_layers/2)))")
        self.value = widgets.ToggleButtons(options=[("p_restored", "p"), ("IE", "ie")], value=s.value,
                                           description="colour", style=STYLE)
        self.run_button = widgets.Button(description="Run trace", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="180px"))
        self.progress_label = widgets.HTML()
        self.status = widgets.HTML()
        self.trace_stale = widgets.HTML()
        self.trace_out = widgets.Output()
        return widgets.VBox([
            *([self.fact_picker] if s.facts else []), self.prompt, self.subject, self.corrupt,
            widgets.HTML("<small>tokens (click to corrupt them; marks follow the chosen span)</small>"),
            self.token_bar, widgets.HBox(list(self.kind_boxes.values())),
            _row(self.samples, self.noise, self.window),
            _row(self.run_button, self.cancel_button, self.progress, self.progress_label),
            self.value, self.status, self.trace_stale, self.trace_out,
        ])

    def _build_edit_tab(self, methods: list[str]) -> widgets.VBox:
        e = self.state.edit
        self.edit_target = widgets.HTML()
        self.method = widgets.Dropdown(options=[(m.upper(), m) for m in methods], value=e.method,
                                       description="method", style=STYLE)
        self.new_object = widgets.Text(value=e.new_object, description="new object", style=STYLE)
        self.locus = widgets.ToggleButtons(options=[("subject (entity)", "subject"), ("relation", "relation")],
                                           value=e.locus, description="edit at", style=STYLE)
        self.layer = widgets.Dropdown(options=[("method default", DEFAULT_LAYER)]
                                      + [(str(i), i) for i in range(self.state.model.cfg.n_layers)],
                                      value=e.layer, description="layer", style=STYLE)
        self.paraphrases = widgets.Textarea(value="\n".join(e.paraphrases), description="paraphrases",
                                            placeholder="one prompt per line", style=STYLE,
                                            layout=widgets.Layout(width="100%", max_width="640px", height="90px"))
        self.retrace = widgets.Checkbox(value=e.retrace, description="trace before and after", indent=False)
        self.apply_button = widgets.Button(description="Apply edit", button_style="warning", icon="pencil")
        self.undo_button = widgets.Button(description="Undo", icon="undo", disabled=True)
        self.edit_cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.edit_progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="180px"))
        self.edit_progress_label = widgets.HTML()
        self.edit_status = widgets.HTML()
        self.edit_stale = widgets.HTML()
        self.edit_out = widgets.Output()
        return widgets.VBox([
            self.edit_target, self.method, self.new_object, self.locus, self.layer, self.paraphrases, self.retrace,
            _row(self.apply_button, self.undo_button, self.edit_cancel_button, self.edit_progress,
                 self.edit_progress_label),
            self.edit_status, self.edit_stale, self.edit_out,
        ])

    def _wire(self) -> None:
        self.fact_picker.observe(self._on_fact, names="value")
        for w in (self.prompt, self.subject):
            w.observe(self._on_prompt, names="value")
        self.corrupt.observe(self._on_corrupt, names="value")
        self.value.observe(self._on_value, names="value")
        for w in (*self.kind_boxes.values(), self.samples, self.noise, self.window):
            w.observe(self._on_trace_settings, names="value")
        for w in (self.new_object, self.locus, self.layer, self.method, self.paraphrases, self.retrace):
            w.observe(self._on_edit_settings, names="value")
        self.tabs.observe(self._on_tab, names="selected_index")
        self.run_button.on_click(lambda _: self._launch(self.run_trace))
        self.apply_button.on_click(lambda _: self._launch(self.apply_edit))
        self.undo_button.on_click(lambda _: self.undo_edit())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.edit_cancel_button.on_click(lambda _: self.cancel())

    # ------------------------------------------------------------------ display
    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ the state, as attributes
    lm = property(lambda self: self.state.model, doc="The model.")
    facts = property(lambda self: self.state.facts, doc="The example facts.")
    seed = property(lambda self: self.state.seed, doc="The noise seed of every trace.")
    method_kwargs = property(lambda self: self.state.method_kwargs, doc="Keyword arguments per editing method.")
    edits = property(lambda self: self.state.applied_edits, doc="The edits applied to the model, oldest first.")
    result = property(lambda self: self.state.traced.result if self.state.traced else None, doc="The shown trace.")
    edit_table = property(lambda self: self.state.edited.table if self.state.edited else None)
    edit_outcome = property(lambda self: self.state.edited.outcome if self.state.edited else None)
    before_result = property(lambda self: self.state.edited.before if self.state.edited else None)
    edited_result = property(lambda self: self.state.edited.after if self.state.edited else None)
    figure = property(lambda self: self._figure("trace"), doc="The shown map (a Plotly figure) or None.")
    edited_figure = property(lambda self: self._figure("edit"), doc="The shown before/after maps or None.")

    @property
    def error(self) -> str | None:
        """The error of the last action, if any (also shown in red under its buttons)."""
        err = self.state.trace_error if self._last == "trace" else self.state.edit_error
        return err[0] if err else None

    @property
    def error_traceback(self) -> str | None:
        err = self.state.trace_error if self._last == "trace" else self.state.edit_error
        return err[1] if err else None

    @property
    def rome_kwargs(self) -> dict:
        """Keyword arguments for ROME (``method_kwargs["rome"]``)."""
        return self.state.method_kwargs.setdefault("rome", {})

    @rome_kwargs.setter
    def rome_kwargs(self, value: dict) -> None:
        self.state.method_kwargs["rome"] = dict(value)

    def trace_kwargs(self) -> dict:
        """The keyword arguments of :func:`workbench.tracing.trace` the controls describe."""
        return self.state.trace_kwargs()

    def selected_positions(self) -> list[int]:
        """Positions of the marked (to be corrupted) tokens."""
        return self.state.marked()

    def click_token(self, position: int) -> None:
        """Toggle one token's mark, as a click on its button does."""
        self.token_buttons[position].click()

    def edit_prompts(self) -> list[str]:
        """The prompt and the paraphrases typed in the Edit tab."""
        return self.state.edit_prompts()

    def current_fact(self) -> Any:
        """The fact of the Trace tab's prompt and subject."""
        return self.state.current_fact()

    def neighbour_prompts(self, fact: Any, k: int = N_NEIGHBOURS) -> list[str]:
        """The bleed and locality prompts checked after an edit of ``fact`` (see ``InspectorState.probe_rows``)."""
        return [p for p, _ in self.state.probe_rows(fact, k)]

    # ------------------------------------------------------------------ running
    @property
    def busy(self) -> bool:
        """Whether a run is in progress."""
        return self.state.busy or (self._worker is not None and self._worker.is_alive())

    def _launch(self, action: Callable[[], Any]) -> None:
        """Run a button's action: in a background thread in a kernel (so Cancel is heard), else inline."""
        if self.busy:
            return
        if not self.background:
            action()
            return
        self._worker = threading.Thread(target=action, name="workbench-inspector", daemon=True)
        self._worker.start()

    def wait(self, timeout: float | None = None) -> None:
        """Block until a background run (started by a button) is finished."""
        if self._worker is not None:
            self._worker.join(timeout)

    def cancel(self) -> None:
        """Ask the current run to stop at its next step."""
        self.state.cancel.set()

    def _ticking(self, action: Callable[[InspectorState], Any]) -> Any:
        """Run ``action`` on the state; in the background, refresh the elapsed time twice a second."""
        stop = threading.Event()
        if self.background:
            def loop() -> None:
                while not stop.wait(0.5):
                    self._render_progress()

            threading.Thread(target=loop, daemon=True).start()
        try:
            return action(self.state)
        finally:
            stop.set()

    def run_trace(self) -> Any:
        """Trace the prompt with the chosen settings and draw the maps; returns the result (``None`` on
        an error or a cancel, which keep the previous map)."""
        self._last = "trace"
        return self._ticking(actions.run_trace)

    def apply_edit(self) -> Any:
        """Compute and apply an edit of the current fact; returns the Edit (``None`` on failure or cancel)."""
        self._last = "edit"
        return self._ticking(actions.apply_edit)

    def undo_edit(self) -> Any:
        """Revert the most recent edit applied to the model; returns it (``None`` when none is applied)."""
        self._last = "edit"
        return actions.undo_edit(self.state)

    # ------------------------------------------------------------------ controls -> state
    def _on_fact(self, change: dict | None = None) -> None:
        idx = self.fact_picker.value
        if self._syncing or idx is None or idx < 0:
            return
        fact = self.state.facts[idx]
        self.state.picked = idx
        self.state.trace = dataclasses.replace(self.state.trace, prompt=fact.prompt, subject=fact.subject)
        self.state.edit = dataclasses.replace(self.state.edit, paraphrases=tuple(fact.paraphrases),
                                              new_object=fact.target_new or "")
        self._sync_controls()
        self._fact_changed()

    def _on_prompt(self, change: dict | None = None) -> None:
        if self._syncing:
            return
        s = self.state
        s.trace = dataclasses.replace(s.trace, prompt=self.prompt.value, subject=self.subject.value)
        if s.facts and s.picked != -1 and s.picked_fact() is None:
            # A typed fact: the example's paraphrases and new object belong to another fact.
            s.picked = -1
            s.edit = dataclasses.replace(s.edit, paraphrases=(), new_object="")
            self._sync_controls()
        self._fact_changed()

    def _fact_changed(self) -> None:
        """Another fact: its tokens are new, so hand-picked marks and the old map no longer apply."""
        s = self.state
        if s.traced is not None and (s.traced.settings.prompt, s.traced.settings.subject) != (
                s.trace.prompt, s.trace.subject):
            s.traced = None
        s.trace = dataclasses.replace(s.trace, marks=())
        s.trace_error = None
        if s.trace_run is not None and not s.trace_run.running:
            s.trace_run = None
        self.render()

    def _on_corrupt(self, change: dict | None = None) -> None:
        if self._syncing:
            return
        s = self.state
        marks = tuple(s.marked()) if self.corrupt.value == "tokens" and s.trace.corrupt != "tokens" else s.trace.marks
        s.trace = dataclasses.replace(s.trace, corrupt=self.corrupt.value, marks=marks)
        self.render()

    def _on_token_click(self, position: int, button: widgets.Button) -> None:
        if button not in self.token_buttons:
            return  # a late click on a button of an earlier prompt
        s = self.state
        marked = set(s.marked())
        if s.trace.corrupt != "tokens":
            # Clicking a token starts a hand-picked selection: just that token (or the span's marks without it).
            marks = {position} if position not in marked else marked - {position}
        else:
            marks = marked ^ {position}
        s.trace = dataclasses.replace(s.trace, corrupt="tokens", marks=tuple(sorted(marks)))
        self._sync_controls()
        self.render()

    def _on_trace_settings(self, change: dict | None = None) -> None:
        self.state.trace = dataclasses.replace(
            self.state.trace, kinds=tuple(k for k, b in self.kind_boxes.items() if b.value),
            samples=int(self.samples.value), noise=self.noise.value, window=int(self.window.value))
        self.render()

    def _on_edit_settings(self, change: dict | None = None) -> None:
        if self._syncing:
            return
        self.state.edit = dataclasses.replace(
            self.state.edit, method=self.method.value, new_object=self.new_object.value, locus=self.locus.value,
            layer=self.layer.value, paraphrases=tuple(line for line in self.paraphrases.value.splitlines()),
            retrace=bool(self.retrace.value))
        self.render()

    def _on_value(self, change: dict | None = None) -> None:
        self.state.value = self.value.value
        self.render()

    def _on_tab(self, change: dict | None = None) -> None:
        """A tab became visible: draw its figures again, now that their area has a size (a figure
        drawn or resized while its tab was hidden is 0 px high)."""
        key = "trace" if self.tabs.selected_index == 0 else "edit"
        self._shown.pop(key, None)
        self.render()

    def _sync_controls(self) -> None:
        """Set the controls to the state (after the state changed other than through them)."""
        s = self.state
        self._syncing = True
        try:
            self.fact_picker.value = s.picked if s.facts else -1
            self.prompt.value, self.subject.value = s.trace.prompt, s.trace.subject
            self.corrupt.value = s.trace.corrupt
            self.paraphrases.value = "\n".join(s.edit.paraphrases)
            self.new_object.value = s.edit.new_object
        finally:
            self._syncing = False

    # ------------------------------------------------------------------ state -> views
    def _figure(self, key: str) -> Any:
        made = views.trace_figure if key == "trace" else views.edit_figure
        source = self.state.traced if key == "trace" else self.state.edited
        cache_key = (id(source), self.state.value)
        if source is None:
            return None
        if self._figures.get(key, (None,))[0] != cache_key:
            self._figures[key] = (cache_key, made(self.state))
        return self._figures[key][1]

    def _render_progress(self) -> None:
        with self._lock:
            for run, bar, label in ((self.state.trace_run, self.progress, self.progress_label),
                                    (self.state.edit_run, self.edit_progress, self.edit_progress_label)):
                p = views.progress(run)
                bar.max, bar.value, bar.bar_style = p.max, p.value, p.style
                label.value = p.label

    def _render_tokens(self) -> None:
        labels, marked = views.token_bar(self.state)
        if labels != self._token_labels:
            for old in self.token_buttons:
                old.close()
            self.token_buttons = []
            for i, label in enumerate(labels):
                b = widgets.Button(description=label, tooltip=f"position {i}", layout=widgets.Layout(width="auto"))
                b.on_click(functools.partial(self._on_token_click, i))
                self.token_buttons.append(b)
            self.token_bar.children = tuple(self.token_buttons)
            self._token_labels = labels
        for i, b in enumerate(self.token_buttons):
            b.button_style = "warning" if i in marked else ""

    def render(self) -> None:
        """Redraw every view from the state."""
        with self._lock:
            s = self.state
            self.badge.value = views.badge(s)
            self._render_tokens()
            self._render_progress()
            self.status.value = views.trace_status(s)
            self.trace_stale.value = views.stale_note(s.trace_stale(), "the map shown was")
            self.edit_target.value = views.edit_target(s)
            self.edit_status.value = views.edit_status(s)
            self.edit_stale.value = views.stale_note(s.edit_stale(), "the table and maps shown were")
            busy = s.busy
            self.run_button.disabled = self.apply_button.disabled = busy
            self.undo_button.disabled = busy or not s.applied_edits
            self.cancel_button.disabled = self.edit_cancel_button.disabled = not busy
            self._render_output("trace", self.trace_out, lambda: [self.figure] if self.figure is not None else [])
            self._render_output("edit", self.edit_out, self._edit_outputs)

    def _edit_outputs(self) -> list[Any]:
        if self.state.edited is None:
            return []
        fig = self.edited_figure
        return [views.table_html(self.state.edited.table)] + ([fig] if fig is not None else [])

    def _render_output(self, key: str, out: widgets.Output, objs: Callable[[], list[Any]]) -> None:
        source = self.state.traced if key == "trace" else self.state.edited
        shown = (id(source), self.state.value)
        if self._shown.get(key) == shown:
            return
        self._shown[key] = shown
        items = objs()
        if items:
            _show(out, *items)
        else:
            _clear(out)

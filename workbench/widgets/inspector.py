"""The :class:`Inspector` widget (see :mod:`workbench.widgets`)."""

from __future__ import annotations

import dataclasses
import functools
import html
import inspect
import threading
import traceback
from typing import Any, Callable, Sequence

import ipywidgets as widgets
import pandas as pd

from ..plots import KINDS, plot_trace, plot_traces
from ..report import before_after, predictions_table
from ..spans import SpanError, resolve_span, tokenize
from .display import _clear, _html_table, _show, _stale_note
from .progress import Cancelled, Progress, _in_kernel
from .state import SUCCESS_P, EditOutcome, _merge_traces, _noise_value, prompt_outcome

KIND_LABELS = {"hidden": "hidden (purple)", "mlp": "MLP (green)", "attn": "attention (red)"}

DEFAULT_LAYER = "default"
"""The layer dropdown's value for "the method's default layer(s)"."""

N_NEIGHBOURS = 3
"""Other subjects checked for locality after an edit."""


def _methods() -> dict[str, str]:
    from ..evaluation import METHODS

    return dict(METHODS)


class Inspector:
    """Interactive causal tracing and editing of one model (see the module docstring).

    ``facts`` (optional) fills a dropdown of example facts that set the prompt,
    subject, paraphrases and a suggested new object, and supply other subjects for the
    locality check. ``window`` defaults to :func:`workbench.tracing.default_window`.
    ``method_kwargs`` maps a method name to keyword arguments for it (``rome_kwargs`` is
    the same for ``"rome"``: e.g. ``hparams=`` or ``stats=`` for a model without a preset
    corpus). ``background``: run button clicks in a thread (default: when in a kernel).
    """

    def __init__(self, model: Any, facts: Sequence[Any] | None = None, *, prompt: str | None = None,
                 subject: str | None = None, samples: int = 10, noise: str | float = "s3",
                 window: int | None = None, kinds: Sequence[str] = KINDS, seed: int = 1,
                 rome_kwargs: dict | None = None, method_kwargs: dict[str, dict] | None = None,
                 background: bool | None = None) -> None:
        from ..tracing.window import resolve_window

        self.lm = model
        self.method_kwargs: dict[str, dict] = {k: dict(v) for k, v in (method_kwargs or {}).items()}
        if rome_kwargs:
            self.method_kwargs.setdefault("rome", {}).update(rome_kwargs)
        self.facts = list(facts or [])
        self.seed = seed
        self.background = _in_kernel() if background is None else background
        self.result: Any = None
        self.figure: Any = None
        self.edits: list[Any] = []
        self.edit_table: pd.DataFrame | None = None
        self.edit_outcome: EditOutcome | None = None
        self.before_result: Any = None
        self.edited_result: Any = None
        self.edited_figure: Any = None
        self.error: str | None = None
        self.error_traceback: str | None = None
        self._traced: dict | None = None  # the inputs of the shown map
        self._edited: dict | None = None  # the inputs of the shown edit results
        self._cancel = threading.Event()
        self._worker: threading.Thread | None = None
        self._syncing = False
        first = self.facts[0] if self.facts else None
        if prompt is None and first is not None:
            prompt, subject = first.prompt, first.subject
        prompt = prompt or "The mother tongue of Danielle Darrieux is"
        if subject is None and prompt == "The mother tongue of Danielle Darrieux is":
            subject = "Danielle Darrieux"

        style = {"description_width": "90px"}
        wide = widgets.Layout(width="100%", max_width="640px")
        # ---- badge
        self.badge = widgets.HTML(layout=widgets.Layout(min_height="0px"))
        # ---- trace tab
        self.fact_picker = widgets.Dropdown(
            options=[("(type your own)", -1)] + [(f.prompt + " → " + f.target_true, i) for i, f in enumerate(self.facts)],
            value=0 if self.facts else -1, description="example", style=style, layout=wide)
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False, style=style, layout=wide)
        self.subject = widgets.Text(value=subject or "", description="subject", continuous_update=False, style=style,
                                    layout=widgets.Layout(width="100%", max_width="400px"))
        self.corrupt = widgets.ToggleButtons(options=["subject", "relation", "tokens"], value="subject",
                                             description="corrupt", style=style,
                                             tooltips=["noise the subject's tokens", "noise the relation's tokens",
                                                       "noise the tokens clicked below"])
        self.token_bar = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.token_buttons: list[widgets.Button] = []
        self._marks: set[int] = set()
        self.kind_boxes = {k: widgets.Checkbox(value=k in kinds, description=KIND_LABELS[k], indent=False,
                                               layout=widgets.Layout(width="150px")) for k in KINDS}
        self.samples = widgets.BoundedIntText(value=samples, min=1, max=1000, description="samples", style=style,
                                              layout=widgets.Layout(width="170px"))
        self.noise = widgets.Text(value=str(noise), description="noise", style=style,
                                  tooltip='"s3" (3 x embedding std), a number, or "u0.5" (uniform)',
                                  layout=widgets.Layout(width="170px"))
        self.window = widgets.BoundedIntText(value=resolve_window(model, window), min=1, max=int(model.cfg.n_layers),
                                             description="window", style=style, layout=widgets.Layout(width="170px"),
                                             tooltip="layers restored together by MLP/attention cells "
                                                     "(default min(10, ceil(n_layers/2)))")
        self.value = widgets.ToggleButtons(options=[("p_restored", "p"), ("IE", "ie")], value="p",
                                           description="colour", style=style)
        self.run_button = widgets.Button(description="Run trace", button_style="primary", icon="play")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="", layout=widgets.Layout(width="180px"))
        self.progress_label = widgets.HTML()
        self.status = widgets.HTML()
        self.trace_stale = widgets.HTML()
        self.trace_out = widgets.Output()

        # ---- edit tab
        methods = list(_methods())
        self.edit_target = widgets.HTML()
        self.method = widgets.Dropdown(options=[(m.upper(), m) for m in methods],
                                       value="rome" if "rome" in methods else methods[0], description="method",
                                       style=style)
        self.new_object = widgets.Text(value=(first.target_new or "") if first is not None else "",
                                       description="new object", style=style)
        self.locus = widgets.ToggleButtons(options=[("subject (entity)", "subject"), ("relation", "relation")],
                                           value="subject", description="edit at", style=style)
        self.layer = widgets.Dropdown(options=[("method default", DEFAULT_LAYER)]
                                      + [(str(i), i) for i in range(model.cfg.n_layers)],
                                      value=DEFAULT_LAYER, description="layer", style=style)
        self.paraphrases = widgets.Textarea(value="\n".join(first.paraphrases) if first is not None else "",
                                            description="paraphrases", placeholder="one prompt per line",
                                            style=style, layout=widgets.Layout(width="100%", max_width="640px",
                                                                               height="90px"))
        self.retrace = widgets.Checkbox(value=True, description="trace before and after", indent=False)
        self.apply_button = widgets.Button(description="Apply edit", button_style="warning", icon="pencil")
        self.undo_button = widgets.Button(description="Undo", icon="undo", disabled=True)
        self.edit_cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.edit_progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="180px"))
        self.edit_progress_label = widgets.HTML()
        self.edit_status = widgets.HTML()
        self.edit_stale = widgets.HTML()
        self.edit_out = widgets.Output()

        # ---- wiring
        self.fact_picker.observe(self._on_fact, names="value")
        self.prompt.observe(self._on_prompt, names="value")
        self.subject.observe(self._on_prompt, names="value")
        self.corrupt.observe(self._on_corrupt, names="value")
        self.value.observe(self._on_value, names="value")
        for w in (*self.kind_boxes.values(), self.samples, self.noise, self.window):
            w.observe(self._on_settings, names="value")
        for w in (self.new_object, self.locus, self.layer, self.method, self.paraphrases):
            w.observe(self._on_edit_settings, names="value")
        self.run_button.on_click(lambda _: self._launch(self.run_trace))
        self.apply_button.on_click(lambda _: self._launch(self.apply_edit))
        self.undo_button.on_click(lambda _: self.undo_edit())
        self.cancel_button.on_click(lambda _: self.cancel())
        self.edit_cancel_button.on_click(lambda _: self.cancel())
        self._rebuild_tokens()
        self._on_corrupt()
        self._update_edit_target()

        trace_tab = widgets.VBox([
            *([self.fact_picker] if self.facts else []),
            self.prompt, self.subject, self.corrupt,
            widgets.HTML("<small>tokens (click to corrupt them; marks follow the chosen span)</small>"),
            self.token_bar,
            widgets.HBox(list(self.kind_boxes.values())),
            widgets.HBox([self.samples, self.noise, self.window], layout=widgets.Layout(flex_flow="row wrap")),
            widgets.HBox([self.run_button, self.cancel_button, self.progress, self.progress_label],
                         layout=widgets.Layout(flex_flow="row wrap", align_items="center")),
            self.value, self.status, self.trace_stale, self.trace_out,
        ])
        edit_tab = widgets.VBox([
            self.edit_target, self.method, self.new_object, self.locus, self.layer, self.paraphrases, self.retrace,
            widgets.HBox([self.apply_button, self.undo_button, self.edit_cancel_button, self.edit_progress,
                          self.edit_progress_label],
                         layout=widgets.Layout(flex_flow="row wrap", align_items="center")),
            self.edit_status, self.edit_stale, self.edit_out,
        ])
        self.tabs = widgets.Tab(children=[trace_tab, edit_tab])
        self.tabs.set_title(0, "Trace")
        self.tabs.set_title(1, "Edit")
        self.widget = widgets.VBox([self.badge, self.tabs])
        self.widget.add_class("workbench-inspector")

    # ------------------------------------------------------------------ display
    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def rome_kwargs(self) -> dict:
        """Keyword arguments for ROME (``method_kwargs["rome"]``)."""
        return self.method_kwargs.setdefault("rome", {})

    @rome_kwargs.setter
    def rome_kwargs(self, value: dict) -> None:
        self.method_kwargs["rome"] = dict(value)

    # ------------------------------------------------------------------ running
    @property
    def busy(self) -> bool:
        """Whether a background run is in progress."""
        return self._worker is not None and self._worker.is_alive()

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
        self._cancel.set()

    def _begin(self) -> None:
        self._cancel.clear()
        self.error = self.error_traceback = None
        for b in (self.run_button, self.apply_button, self.undo_button):
            b.disabled = True
        self.cancel_button.disabled = self.edit_cancel_button.disabled = False

    def _end(self) -> None:
        self.run_button.disabled = self.apply_button.disabled = False
        self.undo_button.disabled = not self.edits
        self.cancel_button.disabled = self.edit_cancel_button.disabled = True

    def _ticker(self, prog: Progress) -> Callable[[], None]:
        """Refresh ``prog``'s elapsed time every half second until the returned stop() is called."""
        if not self.background:
            return lambda: None
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(0.5):
                prog.tick()

        threading.Thread(target=loop, daemon=True).start()
        return stop.set

    # ------------------------------------------------------------------ helpers
    def _fail(self, where: widgets.HTML, err: BaseException) -> None:
        self.error = f"{type(err).__name__}: {err}"
        self.error_traceback = traceback.format_exc()
        where.value = f"<span style='color:#b00'>{html.escape(self.error)}</span>"

    def _tokens(self):
        return tokenize(self.lm, self.prompt.value)

    def selected_positions(self) -> list[int]:
        """Positions of the marked (to be corrupted) tokens."""
        return sorted(self._marks)

    def click_token(self, position: int) -> None:
        """Toggle one token's mark, as a click on its button does."""
        self.token_buttons[position].click()

    def _span_for_marks(self):
        toks = self._tokens()
        mode = self.corrupt.value
        if mode == "tokens":
            return self.selected_positions()
        try:
            span = resolve_span(toks, mode, self.subject.value or None)
            return list(span.positions)
        except (SpanError, ValueError):
            return []

    def _rebuild_tokens(self) -> None:
        try:
            toks = self._tokens()
        except Exception as err:  # noqa: BLE001 - show any tokenizer problem in the widget
            self._fail(self.status, err)
            return
        for old in self.token_buttons:  # the previous prompt's buttons
            old.close()
        # Plain buttons: only a click (a message the frontend sends on a real click) changes
        # the marks, which live here and are shown by the buttons' style.
        self.token_buttons = []
        self._marks = set()
        for i, tok in enumerate(toks.str_tokens):
            b = widgets.Button(description=tok.replace(" ", "␣") or "∅", tooltip=f"position {i}",
                               layout=widgets.Layout(width="auto"))
            b.on_click(functools.partial(self._on_token_click, i))
            self.token_buttons.append(b)
        self.token_bar.children = tuple(self.token_buttons)
        self._sync_marks()

    def _set_marks(self, marked: set[int]) -> None:
        self._marks = {i for i in marked if 0 <= i < len(self.token_buttons)}
        for i, b in enumerate(self.token_buttons):
            b.button_style = "warning" if i in self._marks else ""

    def _sync_marks(self) -> None:
        if self.corrupt.value != "tokens":
            self._set_marks(set(self._span_for_marks()))

    def _model_state(self) -> tuple:
        """Which edits are applied (the model the outputs were computed on)."""
        return tuple(id(e) for e in self.edits)

    def _trace_inputs(self) -> dict:
        return dict(prompt=self.prompt.value, subject=self.subject.value, corrupt=self.corrupt.value,
                    marks=tuple(self.selected_positions()),
                    kinds=tuple(k for k, b in self.kind_boxes.items() if b.value), samples=self.samples.value,
                    noise=self.noise.value, window=self.window.value, model=self._model_state())

    def _edit_inputs(self) -> dict:
        return dict(prompt=self.prompt.value, subject=self.subject.value, method=self.method.value,
                    new_object=self.new_object.value.strip(), locus=self.locus.value, layer=self.layer.value,
                    paraphrases=self.paraphrases.value)

    def _refresh_badge(self) -> None:
        if not self.edits:
            self.badge.value = ""
            return
        last = self.edits[-1]
        what = getattr(last, "_inspector_label", f"{last.method} edit")
        self.badge.value = (
            "<div class='workbench-badge' style='display:inline-block;background:#e6a100;color:#111;"
            "padding:3px 10px;border-radius:4px;font-weight:600'>"
            + html.escape(f"edited model: {len(self.edits)} edit(s) applied (last: {what}); Undo reverts")
            + "</div>")

    def _refresh_stale(self) -> None:
        """Clear or mark every output whose inputs changed since it was computed."""
        now = self._trace_inputs()
        if self._traced is not None:
            if (now["prompt"], now["subject"]) != (self._traced["prompt"], self._traced["subject"]):
                self.result = self.figure = None
                self._traced = None
                _clear(self.trace_out)
                self.trace_stale.value = ""
            else:
                why = []
                if now["model"] != self._traced["model"]:
                    why.append("an edit was applied or undone")
                if {k: v for k, v in now.items() if k != "model"} != {k: v for k, v in self._traced.items()
                                                                       if k != "model"}:
                    why.append("the settings changed")
                self.trace_stale.value = _stale_note(" and ".join(why)) if why else ""
        if self._edited is not None:
            changed = self._edit_inputs() != self._edited
            self.edit_stale.value = _stale_note("the prompt or edit settings changed; these results are for the "
                                                "applied edit") if changed else ""

    def _update_edit_target(self) -> None:
        self.edit_target.value = ("<small>Edits the fact of the Trace tab:</small> "
                                  f"<b>{html.escape(self.prompt.value)}</b> "
                                  f"<small>(subject <b>{html.escape(self.subject.value or '?')}</b>)</small>")

    # ------------------------------------------------------------------ callbacks
    def _on_fact(self, change: dict | None = None) -> None:
        idx = self.fact_picker.value
        if idx is None or idx < 0:
            return
        fact = self.facts[idx]
        self._syncing_fact = True
        try:
            self.subject.value = fact.subject
            self.prompt.value = fact.prompt
        finally:
            self._syncing_fact = False
        self.paraphrases.value = "\n".join(fact.paraphrases)
        self.new_object.value = fact.target_new or ""
        self._on_prompt()

    def _picked_fact(self) -> Any:
        idx = self.fact_picker.value
        if idx is None or idx < 0:
            return None
        fact = self.facts[idx]
        return fact if (fact.prompt, fact.subject) == (self.prompt.value, self.subject.value) else None

    def _on_prompt(self, change: dict | None = None) -> None:
        if getattr(self, "_syncing_fact", False):
            return
        self.status.value = ""
        self._rebuild_tokens()
        if self.facts and self.fact_picker.value != -1 and self._picked_fact() is None:
            # A typed fact: the example's paraphrases and new object belong to another fact.
            self.fact_picker.value = -1
            self.paraphrases.value = ""
            self.new_object.value = ""
        subject, prompt = self.subject.value, self.prompt.value
        if subject and prompt.count(subject) != 1:
            where = "does not occur" if subject not in prompt else "occurs more than once"
            self.status.value = (f"<span style='color:#b36b00'>the subject {html.escape(repr(subject))} {where} in "
                                 "the prompt: fix it before running</span>")
        self._update_edit_target()
        self._refresh_stale()

    def _on_corrupt(self, change: dict | None = None) -> None:
        if self._syncing:
            return
        self._sync_marks()
        self._refresh_stale()

    def _on_settings(self, change: dict | None = None) -> None:
        self._refresh_stale()

    def _on_edit_settings(self, change: dict | None = None) -> None:
        self._refresh_stale()

    def _on_token_click(self, position: int, button: widgets.Button) -> None:
        if button not in self.token_buttons:
            return  # a late click on a button of an earlier prompt
        if self.corrupt.value != "tokens":
            # Clicking a token starts a hand-picked selection: just that token (or the
            # span's marks without it, when it was marked).
            marks = {position} if position not in self._marks else self._marks - {position}
            self._syncing = True
            try:
                self.corrupt.value = "tokens"
            finally:
                self._syncing = False
        else:
            marks = self._marks ^ {position}
        self._set_marks(marks)
        self._refresh_stale()

    def _on_value(self, change: dict | None = None) -> None:
        if self.result is not None:
            self.figure = plot_trace(self.result, value=self.value.value, title=self._trace_title(self.result))
            _show(self.trace_out, self.figure)
        if self.edited_result is not None:
            self.edited_figure = self._edited_plot()
            _show(self.edit_out, _html_table(self.edit_table), self.edited_figure)

    # ------------------------------------------------------------------ actions
    def trace_kwargs(self) -> dict:
        """The keyword arguments of :func:`workbench.tracing.trace` the controls describe."""
        kinds = tuple(k for k, box in self.kind_boxes.items() if box.value)
        if not kinds:
            raise ValueError("pick at least one kind to restore")
        mode = self.corrupt.value
        if mode == "tokens":
            corrupt: Any = self.selected_positions()
            if not corrupt:
                raise ValueError("click at least one token to corrupt (or choose subject / relation)")
        else:
            corrupt = mode
            subject = self.subject.value
            if not subject or self.prompt.value.count(subject) != 1:
                raise ValueError(f"the subject {subject!r} must occur exactly once in the prompt "
                                 f"{self.prompt.value!r}")
        return dict(subject=self.subject.value or None, corrupt=corrupt, kinds=kinds, samples=int(self.samples.value),
                    noise=_noise_value(self.noise.value), window=int(self.window.value), seed=self.seed)

    def _trace(self, prog: Progress, answer: Any = None, **kwargs: Any) -> Any:
        """Trace kind by kind so that the progress moves and Cancel is heard (same seed: same noise)."""
        from ..tracing import trace

        kinds = kwargs.pop("kinds")
        accepted = inspect.signature(trace).parameters
        if "progress" in accepted:
            kwargs["progress"] = False
        parts = []
        for kind in kinds:
            prog.check()
            parts.append(trace(self.lm, self.prompt.value, kinds=(kind,), answer=answer, **kwargs))
            prog.step()
        return _merge_traces(parts)

    def _trace_title(self, r: Any) -> str:
        state = " <b>[edited model]</b>" if self.edits else ""
        return (f"{html.escape(repr(r.prompt), quote=False)} → {html.escape(repr(r.answer), quote=False)}{state}:"
                f" p_clean {r.p_clean:.3f}, p_corrupt {r.p_corrupt:.3f}"
                f"<br><sup>corrupted ({html.escape(str(r.corrupt), quote=False)}) — tokens marked *;"
                f" {r.samples} samples, noise {float(r.noise_level):.3g}, window {r.window}</sup>")

    def run_trace(self) -> Any:
        """Trace the prompt with the chosen settings and draw the maps; returns the result."""
        self._begin()
        self.status.value = ""
        self.trace_stale.value = ""
        prog = None
        stop = lambda: None  # noqa: E731
        try:
            kwargs = self.trace_kwargs()
            inputs = self._trace_inputs()
            self.result = self.figure = self._traced = None
            _clear(self.trace_out)
            prog = Progress(self.progress, self.progress_label, [f"tracing {k}" for k in kwargs["kinds"]],
                            self._cancel)
            stop = self._ticker(prog)
            result = self._trace(prog, **kwargs)
            self.result, self._traced = result, inputs
            self.figure = plot_trace(result, value=self.value.value, title=self._trace_title(result))
            self.status.value = html.escape(
                f"answer {result.answer!r}: p_clean {result.p_clean:.3f}, p_corrupt {result.p_corrupt:.3f}"
                f" (noise {float(result.noise_level):.3g}, {result.samples} samples, window {result.window})"
                + ("; traced on the edited model" if self.edits else ""))
            _show(self.trace_out, self.figure)
            prog.finish("success", "traced")
        except Cancelled:
            self.status.value = "<span style='color:#b36b00'>cancelled: no map</span>"
            if prog is not None:
                prog.finish("warning", "cancelled")
        except Exception as err:  # noqa: BLE001 - report in the widget instead of the kernel log
            self.result = self.figure = self._traced = None
            _clear(self.trace_out)
            self.progress.bar_style = "danger"
            self._fail(self.status, err)
        finally:
            stop()
            self._end()
        return self.result

    def edit_prompts(self) -> list[str]:
        """The prompt and the paraphrases typed in the Edit tab."""
        extra = [line.strip() for line in self.paraphrases.value.splitlines() if line.strip()]
        return [self.prompt.value] + [p for p in extra if p != self.prompt.value]

    def current_fact(self) -> Any:
        """The fact of the Trace tab's prompt and subject (true object = current top-1 prediction)."""
        from ..facts import Fact
        from ..predict import top_tokens

        prompt, subject = self.prompt.value, self.subject.value
        if not subject or prompt.count(subject) != 1:
            raise ValueError(f"the subject {subject!r} must occur exactly once in the prompt {prompt!r}")
        picked = self._picked_fact()
        if picked is not None:
            return picked
        template = prompt.replace(subject, "{}")
        target = top_tokens(self.lm, prompt, k=1)[0][0].strip()
        return Fact(subject=subject, template=template, target_true=target,
                    paraphrases=tuple(self.edit_prompts()[1:]))

    def neighbour_prompts(self, fact: Any, k: int = N_NEIGHBOURS) -> list[str]:
        """Up to ``k`` prompts about other subjects for the locality check: the fact's own
        neighbourhood, else example facts with the same template, else any other examples."""
        own = [p for p in getattr(fact, "neighborhood", ()) if fact.subject not in p]
        same = [f.prompt for f in self.facts if f.template == fact.template and f.subject != fact.subject]
        other = [f.prompt for f in self.facts if f.subject != fact.subject]
        return list(dict.fromkeys(own + same + other))[:k]

    def _edit_call(self, fact: Any, new_object: str) -> Any:
        from ..evaluation import make_edit, resolve_method

        name, fn = resolve_method(self.method.value)
        kwargs = dict(self.method_kwargs.get(name, {}))
        params = inspect.signature(fn).parameters
        layer = None if self.layer.value == DEFAULT_LAYER else int(self.layer.value)
        if layer is not None:
            if "layer" in params:
                kwargs["layer"] = layer
            elif "layers" in params:
                kwargs["layers"] = [layer]
            else:
                raise ValueError(f"{name} does not take a layer; choose 'method default'")
        return make_edit(name, fn, self.lm, dataclasses.replace(fact, target_new=new_object), self.locus.value,
                         kwargs)

    def _edited_plot(self) -> Any:
        rows = {}
        if self.before_result is not None:
            rows[f"original model → {self.before_result.answer!r}"] = self.before_result
        rows[f"edited model → {self.edited_result.answer!r}"] = self.edited_result
        r = self.edited_result
        title = (f"{html.escape(repr(r.prompt), quote=False)} before and after the edit to "
                 f"{html.escape(repr(self.new_object.value.strip()), quote=False)} "
                 f"({html.escape(self.method.value)} at the {html.escape(self.locus.value)})"
                 f"<br><sup>each row traces its own top answer; one colour scale; corrupted "
                 f"({html.escape(str(r.corrupt), quote=False)}), {r.samples} samples, window {r.window}</sup>")
        return plot_traces(rows, value=self.value.value, title=title)

    def apply_edit(self) -> Any:
        """Compute and apply an edit of the current fact; returns the Edit (``None`` on failure or cancel)."""
        self._begin()
        self.edit_stale.value = ""
        prog = None
        stop = lambda: None  # noqa: E731
        edit = None
        applied = False
        try:
            new_object = self.new_object.value.strip()
            if not new_object:
                raise ValueError("type the new object first")
            fact = self.current_fact()
            inputs = self._edit_inputs()
            trace_kw = self.trace_kwargs() if self.retrace.value else None
            self._clear_edit_outputs()
            prompts = self.edit_prompts()
            neighbours = [p for p in self.neighbour_prompts(fact) if p not in prompts]
            kinds = trace_kw["kinds"] if trace_kw else ()
            steps = ["predictions before", f"computing the {self.method.value} edit", "applying",
                     "predictions after"]
            steps += [f"tracing {k} before" for k in kinds] + [f"tracing {k} after" for k in kinds]
            prog = Progress(self.edit_progress, self.edit_progress_label, steps, self._cancel)
            stop = self._ticker(prog)
            objects = [fact.target_true, new_object]
            all_prompts = prompts + neighbours
            before = predictions_table(self.lm, all_prompts, objects=objects)
            prog.step()
            edit = self._edit_call(fact, new_object)
            edit._inspector_label = f"{edit.method} at the {edit.locus}: {fact.prompt!r} → {new_object!r}"
            prog.step()
            edit.apply(self.lm)
            applied = True
            self.edits.append(edit)
            self._refresh_badge()
            prog.step()
            after = predictions_table(self.lm, all_prompts, objects=objects)
            outcome = prompt_outcome(self.lm, fact.prompt, new_object)
            prog.step()
            table = before_after(before, after)
            table.insert(0, ("", "probe"), ["edit prompt"] + ["paraphrase"] * (len(prompts) - 1)
                         + ["other subject (locality)"] * len(neighbours))
            before_result = edited_result = None
            if trace_kw is not None:
                # the original model's map: the shown one when it is of these inputs, else traced now
                edit.revert(self.lm)
                try:
                    before_result = self._trace(prog, **dict(trace_kw))
                finally:
                    edit.apply(self.lm)
                edited_result = self._trace(prog, **dict(trace_kw))
            self.edit_table, self.edit_outcome = table, outcome
            self.before_result, self.edited_result = before_result, edited_result
            self._edited = inputs
            shown: list[Any] = [_html_table(table)]
            if edited_result is not None:
                self.edited_figure = self._edited_plot()
                shown.append(self.edited_figure)
            layer = getattr(edit, "info", {}).get("layer", None)
            where = f"{edit.method} edit at the {edit.locus} ({', '.join(edit.param_names)}" + (
                f", layer {layer}" if layer is not None else "") + ")"
            if outcome.success:
                self.edit_status.value = html.escape(
                    f"applied the {where}: P({new_object}) = {outcome.p_new:.3f}, top-1; "
                    f"{len(self.edits)} edit(s) applied")
                prog.finish("success", "edited")
            else:
                self.edit_status.value = (
                    "<span style='color:#b00;font-weight:600'>edit failed: </span>" + html.escape(
                        f"the {where} does not make {new_object!r} the answer: P({new_object}) = {outcome.p_new:.3f}"
                        f", top-1 {outcome.top_token!r} {outcome.top_p:.2f} (needs top-1 and P >= {SUCCESS_P})."
                        " The edit stays applied so that you can inspect it; Undo reverts it."))
                prog.finish("danger", "edit failed")
            _show(self.edit_out, *shown)
            self._refresh_stale()
            return edit
        except Cancelled:
            if applied and edit is not None and edit in self.edits:
                self.edits.remove(edit)
                edit.revert(self.lm)
            self._clear_edit_outputs()
            self.edit_status.value = "<span style='color:#b36b00'>cancelled: no edit applied</span>"
            if prog is not None:
                prog.finish("warning", "cancelled")
            return None
        except Exception as err:  # noqa: BLE001
            self.edit_progress.bar_style = "danger"
            self._fail(self.edit_status, err)
            return None
        finally:
            stop()
            self._refresh_badge()
            self._end()
            self._refresh_stale()

    def _clear_edit_outputs(self) -> None:
        self.edit_table = self.edit_outcome = None
        self.before_result = self.edited_result = self.edited_figure = None
        self._edited = None
        self.edit_stale.value = ""
        _clear(self.edit_out)

    def undo_edit(self) -> Any:
        """Revert the most recent edit and clear its outputs; returns it (``None`` when nothing was applied)."""
        self.error = None
        if not self.edits:
            self.edit_status.value = "nothing to undo"
            return None
        try:
            edit = self.edits.pop()
            edit.revert(self.lm)
            self._clear_edit_outputs()
            self.edit_progress.value, self.edit_progress.bar_style = 0, ""
            self.edit_progress_label.value = ""
            self.edit_status.value = html.escape(f"reverted the {edit.method} edit; {len(self.edits)} edit(s) applied")
            return edit
        except Exception as err:  # noqa: BLE001
            self._fail(self.edit_status, err)
            return None
        finally:
            self.undo_button.disabled = not self.edits
            self._refresh_badge()
            self._refresh_stale()


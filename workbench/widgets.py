"""``Inspector``: an ipywidgets front end to tracing and editing, for notebooks.

``Inspector(model)`` shows two tabs:

* **Trace** — type a prompt and its subject, choose what to corrupt (the subject, the
  relation, or tokens clicked in the token bar), the kinds, samples, noise and
  window, and run: the maps of :func:`workbench.plots.plot_trace` appear below, and
  the p_restored / IE toggle redraws them without re-running.
* **Edit** — apply a ROME edit to the prompt's fact (new object, locus, layer), see the
  top predictions before and after for the prompt and its paraphrases, re-trace the
  edited model, and undo.

Every control is a plain attribute (``inspector.prompt``, ``inspector.run_button``, ...)
and every action a method (:meth:`Inspector.run_trace`, :meth:`Inspector.apply_edit`,
:meth:`Inspector.undo_edit`), so the widget can be driven without a browser (tests,
scripts). Results land in ``inspector.result``, ``inspector.figure``,
``inspector.edit_table`` and ``inspector.edited_figure``; the last error, if any, in
``inspector.error`` (and in red under the buttons).
"""

from __future__ import annotations

import copy
import dataclasses
import html
import inspect
import traceback
from typing import Any, Sequence

import ipywidgets as widgets
import pandas as pd

from .plots import KINDS, plot_trace
from .report import before_after, predictions_table
from .spans import SpanError, resolve_span, tokenize

KIND_LABELS = {"hidden": "hidden (purple)", "mlp": "MLP (green)", "attn": "attention (red)"}


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _show(out: widgets.Output, *objs: Any) -> None:
    """Replace an Output widget's content (a no-op outside a Jupyter kernel)."""
    if not _in_kernel():
        return
    from IPython.display import display

    out.clear_output(wait=True)
    with out:
        for obj in objs:
            display(obj)


def _noise_value(text: str) -> str | float:
    """The noise field: ``"s3"``, ``"u0.5"``, ... stay strings; plain numbers become floats."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        return text


def _merge_traces(parts: Sequence[Any]) -> Any:
    """One TraceResult holding the scores of per-kind traces of the same prompt and noise."""
    if len(parts) == 1:
        return parts[0]
    scores: dict = {}
    kinds: list = []
    for part in parts:
        scores.update(part.scores)
        kinds.extend(part.kinds)
    first = parts[0]
    if dataclasses.is_dataclass(first):
        try:
            return dataclasses.replace(first, scores=scores, kinds=tuple(kinds))
        except (TypeError, ValueError):
            pass
    merged = copy.copy(first)
    merged.scores, merged.kinds = scores, tuple(kinds)
    return merged


class Inspector:
    """Interactive causal tracing and editing of one model (see the module docstring).

    ``facts`` (optional) fills a dropdown of example facts that set the prompt,
    subject, paraphrases and a suggested new object. ``rome_kwargs`` are passed to
    :func:`workbench.editing.rome` (e.g. ``hparams=`` or ``stats=`` for a model without
    a preset corpus).
    """

    def __init__(self, model: Any, facts: Sequence[Any] | None = None, *, prompt: str | None = None,
                 subject: str | None = None, samples: int = 10, noise: str | float = "s3",
                 window: int = 10, kinds: Sequence[str] = KINDS, seed: int = 1,
                 rome_kwargs: dict | None = None) -> None:
        self.lm = model
        self.rome_kwargs = dict(rome_kwargs or {})
        self.facts = list(facts or [])
        self.seed = seed
        self.result: Any = None
        self.figure: Any = None
        self.edits: list[Any] = []
        self.edit_table: pd.DataFrame | None = None
        self.edited_result: Any = None
        self.edited_figure: Any = None
        self.error: str | None = None
        first = self.facts[0] if self.facts else None
        if prompt is None and first is not None:
            prompt, subject = first.prompt, first.subject
        prompt = prompt or "The mother tongue of Danielle Darrieux is"
        if subject is None and prompt == "The mother tongue of Danielle Darrieux is":
            subject = "Danielle Darrieux"

        style = {"description_width": "90px"}
        wide = widgets.Layout(width="640px")
        # ---- trace tab
        self.fact_picker = widgets.Dropdown(
            options=[("(type your own)", None)] + [(f.prompt + " → " + f.target_true, i) for i, f in enumerate(self.facts)],
            value=0 if self.facts else None, description="example", style=style, layout=wide)
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False, style=style, layout=wide)
        self.subject = widgets.Text(value=subject or "", description="subject", continuous_update=False, style=style,
                                    layout=widgets.Layout(width="400px"))
        self.corrupt = widgets.ToggleButtons(options=["subject", "relation", "tokens"], value="subject",
                                             description="corrupt", style=style,
                                             tooltips=["noise the subject's tokens", "noise the relation's tokens",
                                                       "noise the tokens clicked below"])
        self.token_bar = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.token_buttons: list[widgets.ToggleButton] = []
        self.kind_boxes = {k: widgets.Checkbox(value=k in kinds, description=KIND_LABELS[k], indent=False,
                                               layout=widgets.Layout(width="150px")) for k in KINDS}
        self.samples = widgets.BoundedIntText(value=samples, min=1, max=1000, description="samples", style=style,
                                              layout=widgets.Layout(width="170px"))
        self.noise = widgets.Text(value=str(noise), description="noise", style=style,
                                  tooltip='"s3" (3 x embedding std), a number, or "u0.5" (uniform)',
                                  layout=widgets.Layout(width="170px"))
        self.window = widgets.BoundedIntText(value=window, min=1, max=1000, description="window",
                                             style=style, layout=widgets.Layout(width="170px"))
        self.value = widgets.ToggleButtons(options=[("p_restored", "p"), ("IE", "ie")], value="p",
                                           description="colour", style=style)
        self.run_button = widgets.Button(description="Run trace", button_style="primary", icon="play")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="", layout=widgets.Layout(width="220px"))
        self.status = widgets.HTML()
        self.trace_out = widgets.Output()

        # ---- edit tab
        self.new_object = widgets.Text(value=(first.target_new or "") if first is not None else "",
                                       description="new object", style=style)
        self.locus = widgets.ToggleButtons(options=[("subject (entity)", "subject"), ("relation", "relation")],
                                           value="subject", description="edit at", style=style)
        self.layer = widgets.Dropdown(options=[("method default", None)] + [(str(i), i) for i in range(model.cfg.n_layers)],
                                      value=None, description="layer", style=style)
        self.paraphrases = widgets.Textarea(value="\n".join(first.paraphrases) if first is not None else "",
                                            description="paraphrases", placeholder="one prompt per line",
                                            style=style, layout=widgets.Layout(width="640px", height="90px"))
        self.retrace = widgets.Checkbox(value=True, description="re-trace the edited model", indent=False)
        self.apply_button = widgets.Button(description="Apply ROME edit", button_style="warning", icon="pencil")
        self.undo_button = widgets.Button(description="Undo", icon="undo", disabled=True)
        self.edit_progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="220px"))
        self.edit_status = widgets.HTML()
        self.edit_out = widgets.Output()

        # ---- wiring
        self.fact_picker.observe(self._on_fact, names="value")
        self.prompt.observe(self._on_prompt, names="value")
        self.subject.observe(self._on_prompt, names="value")
        self.corrupt.observe(self._on_corrupt, names="value")
        self.value.observe(self._on_value, names="value")
        self.run_button.on_click(lambda _: self.run_trace())
        self.apply_button.on_click(lambda _: self.apply_edit())
        self.undo_button.on_click(lambda _: self.undo_edit())
        self._rebuild_tokens()
        self._on_corrupt()

        trace_tab = widgets.VBox([
            *( [self.fact_picker] if self.facts else [] ),
            self.prompt, self.subject, self.corrupt,
            widgets.HTML("<small>tokens (click to corrupt them; marks follow the chosen span)</small>"),
            self.token_bar,
            widgets.HBox(list(self.kind_boxes.values())),
            widgets.HBox([self.samples, self.noise, self.window]),
            widgets.HBox([self.run_button, self.progress, self.value]),
            self.status, self.trace_out,
        ])
        edit_tab = widgets.VBox([
            widgets.HTML("<small>Edits the fact in the Trace tab's prompt and subject.</small>"),
            self.new_object, self.locus, self.layer, self.paraphrases, self.retrace,
            widgets.HBox([self.apply_button, self.undo_button, self.edit_progress]),
            self.edit_status, self.edit_out,
        ])
        self.widget = widgets.Tab(children=[trace_tab, edit_tab])
        self.widget.set_title(0, "Trace")
        self.widget.set_title(1, "Edit")

    # ------------------------------------------------------------------ display
    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        return self.widget._repr_mimebundle_(**kwargs)

    # ------------------------------------------------------------------ helpers
    def _fail(self, where: widgets.HTML, err: BaseException) -> None:
        self.error = f"{type(err).__name__}: {err}"
        self.error_traceback = traceback.format_exc()
        where.value = f"<span style='color:#b00'>{html.escape(self.error)}</span>"

    def _tokens(self):
        return tokenize(self.lm, self.prompt.value)

    def selected_positions(self) -> list[int]:
        """Positions of the clicked token buttons."""
        return [i for i, b in enumerate(self.token_buttons) if b.value]

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
        self.token_buttons = []
        for i, tok in enumerate(toks.str_tokens):
            b = widgets.ToggleButton(value=False, description=tok.replace(" ", "␣") or "∅", tooltip=f"position {i}",
                                     layout=widgets.Layout(width="auto"))
            b.observe(self._on_token_click, names="value")
            self.token_buttons.append(b)
        self.token_bar.children = tuple(self.token_buttons)
        self._sync_marks()

    def _sync_marks(self) -> None:
        if self.corrupt.value == "tokens":
            return
        marked = set(self._span_for_marks())
        self._syncing = True
        try:
            for i, b in enumerate(self.token_buttons):
                b.value = i in marked
        finally:
            self._syncing = False

    # ------------------------------------------------------------------ callbacks
    def _on_fact(self, change: dict | None = None) -> None:
        idx = self.fact_picker.value
        if idx is None:
            return
        fact = self.facts[idx]
        self.subject.value = fact.subject
        self.prompt.value = fact.prompt
        self.paraphrases.value = "\n".join(fact.paraphrases)
        if fact.target_new:
            self.new_object.value = fact.target_new

    def _on_prompt(self, change: dict | None = None) -> None:
        self.status.value = ""
        self._rebuild_tokens()

    def _on_corrupt(self, change: dict | None = None) -> None:
        self._sync_marks()

    def _on_token_click(self, change: dict) -> None:
        if getattr(self, "_syncing", False):
            return
        if self.corrupt.value != "tokens":
            self.corrupt.value = "tokens"  # clicking a token switches to hand-picked corruption

    def _on_value(self, change: dict | None = None) -> None:
        if self.result is not None:
            self.figure = plot_trace(self.result, value=self.value.value)
            _show(self.trace_out, self.figure)
        if self.edited_result is not None:
            self.edited_figure = plot_trace(self.edited_result, value=self.value.value,
                                            title=self._edited_title())
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
        return dict(subject=self.subject.value or None, corrupt=corrupt, kinds=kinds, samples=int(self.samples.value),
                    noise=_noise_value(self.noise.value), window=int(self.window.value), seed=self.seed)

    def _trace(self, bar: widgets.IntProgress, **kwargs: Any) -> Any:
        """Trace kind by kind so that the progress bar moves (same seed: same noise in every part)."""
        from .tracing import trace

        kinds = kwargs.pop("kinds")
        bar.max, bar.value, bar.bar_style = len(kinds), 0, ""
        accepted = inspect.signature(trace).parameters
        if "progress" in accepted:
            kwargs["progress"] = False
        parts = []
        for kind in kinds:
            parts.append(trace(self.lm, self.prompt.value, kinds=(kind,), **kwargs))
            bar.value += 1
        bar.bar_style = "success"
        return _merge_traces(parts)

    def run_trace(self) -> Any:
        """Trace the prompt with the chosen settings and draw the maps; returns the result."""
        self.error = None
        self.status.value = "<i>tracing…</i>"
        self.run_button.disabled = True
        try:
            self.result = self._trace(self.progress, **self.trace_kwargs())
            self.figure = plot_trace(self.result, value=self.value.value)
            r = self.result
            self.status.value = html.escape(
                f"answer {r.answer!r}: p_clean {r.p_clean:.3f}, p_corrupt {r.p_corrupt:.3f}"
                f" (noise {float(r.noise_level):.3g}, {r.samples} samples)")
            _show(self.trace_out, self.figure)
        except Exception as err:  # noqa: BLE001 - report in the widget instead of the kernel log
            self.progress.bar_style = "danger"
            self._fail(self.status, err)
        finally:
            self.run_button.disabled = False
        return self.result

    def edit_prompts(self) -> list[str]:
        """The prompt and the paraphrases typed in the Edit tab."""
        extra = [line.strip() for line in self.paraphrases.value.splitlines() if line.strip()]
        return [self.prompt.value] + [p for p in extra if p != self.prompt.value]

    def current_fact(self) -> Any:
        """The fact of the Trace tab's prompt and subject (true object = current top-1 prediction)."""
        from .facts import Fact
        from .predict import top_tokens

        prompt, subject = self.prompt.value, self.subject.value
        if not subject or prompt.count(subject) != 1:
            raise ValueError(f"the subject {subject!r} must occur exactly once in the prompt {prompt!r}")
        idx = self.fact_picker.value
        if idx is not None and self.facts[idx].prompt == prompt and self.facts[idx].subject == subject:
            return self.facts[idx]
        template = prompt.replace(subject, "{}")
        target = top_tokens(self.lm, prompt, k=1)[0][0].strip()
        return Fact(subject=subject, template=template, target_true=target,
                    paraphrases=tuple(self.edit_prompts()[1:]))

    def _edited_title(self) -> str:
        e = self.edits[-1] if self.edits else None
        what = f" after editing to {self.new_object.value!r} at the {getattr(e, 'locus', self.locus.value)}" if e else ""
        r = self.edited_result
        return (f"Edited model{what}: answer {r.answer!r}, p_clean {r.p_clean:.3f}, "
                f"p_corrupt {r.p_corrupt:.3f}")

    def apply_edit(self) -> Any:
        """Compute and apply a ROME edit of the current fact; returns the Edit."""
        self.error = None
        self.edit_status.value = "<i>computing the edit…</i>"
        self.apply_button.disabled = True
        bar = self.edit_progress
        try:
            from .editing import rome

            new_object = self.new_object.value.strip()
            if not new_object:
                raise ValueError("type the new object first")
            fact = self.current_fact()
            prompts = self.edit_prompts()
            objects = [fact.target_true, new_object]
            bar.max, bar.value, bar.bar_style = 3 + int(self.retrace.value), 0, ""
            before = predictions_table(self.lm, prompts, objects=objects)
            bar.value += 1
            edit = rome(self.lm, fact, new_object, layer=self.layer.value, locus=self.locus.value,
                        **self.rome_kwargs)
            bar.value += 1
            edit.apply(self.lm)
            self.edits.append(edit)
            self.undo_button.disabled = False
            after = predictions_table(self.lm, prompts, objects=objects)
            bar.value += 1
            self.edit_table = before_after(before, after)
            shown: list[Any] = [_html_table(self.edit_table)]
            if self.retrace.value:
                kwargs = self.trace_kwargs()
                self.edited_result = self._trace(bar, **kwargs)
                bar.max, bar.value = 4, 4
                self.edited_figure = plot_trace(self.edited_result, value=self.value.value, title=self._edited_title())
                shown.append(self.edited_figure)
            bar.bar_style = "success"
            layer = getattr(edit, "info", {}).get("layer", self.layer.value)
            self.edit_status.value = html.escape(
                f"applied {edit.method} edit at the {edit.locus} ({', '.join(edit.param_names)}"
                + (f", layer {layer}" if layer is not None else "") + f"); {len(self.edits)} edit(s) applied")
            _show(self.edit_out, *shown)
            return edit
        except Exception as err:  # noqa: BLE001
            bar.bar_style = "danger"
            self._fail(self.edit_status, err)
            return None
        finally:
            self.apply_button.disabled = False

    def undo_edit(self) -> Any:
        """Revert the most recent edit; returns it (``None`` when nothing was applied)."""
        self.error = None
        if not self.edits:
            self.edit_status.value = "nothing to undo"
            return None
        try:
            edit = self.edits.pop()
            edit.revert(self.lm)
            self.edit_status.value = html.escape(f"reverted the {edit.method} edit; {len(self.edits)} edit(s) applied")
            self.undo_button.disabled = not self.edits
            self.edited_result = self.edited_figure = None
            self.edit_table = None
            _show(self.edit_out)
            return edit
        except Exception as err:  # noqa: BLE001
            self._fail(self.edit_status, err)
            return None


def _html_table(df: pd.DataFrame | None) -> Any:
    from IPython.display import HTML

    if df is None:
        return HTML("")
    return HTML(df.to_html(float_format=lambda x: f"{x:.3f}", border=0))


__all__ = ["Inspector", "predictions_table", "before_after"]

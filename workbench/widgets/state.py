"""The Inspector's state: one object holding everything its views show.

:class:`InspectorState` holds the model (whose applied edits are read from the model itself,
:func:`workbench.editing.applied_edits`, so a new Inspector on an edited model knows them), the
examples, the Trace and Edit tabs' settings, the last results with the inputs they were computed
from, and one :class:`RunStatus` per tab (running, finished, failed, cancelled). Every status
line, badge, progress label, token bar and "out of date" note is a function of this object
(:mod:`workbench.widgets.views`); nothing is left over from an earlier run.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

SUCCESS_P = 0.5
"""An edit succeeds when the new object is the prompt's top-1 token with at least this probability."""

DEFAULT_LAYER = "default"
"""The layer setting for "the method's default layer(s)"."""

N_NEIGHBOURS = 3
"""Other subjects (each in both phrasings) and other relations of the subject checked after an edit."""


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
    return dataclasses.replace(parts[0], scores=scores, kinds=tuple(kinds))


# --------------------------------------------------------------------------- an edit's outcome


@dataclass
class EditOutcome:
    """Whether an applied edit reached its new object on the edit prompt."""

    prompt: str
    new_object: str
    p_new: float
    top_token: str
    top_p: float
    top_is_new: bool

    @property
    def success(self) -> bool:
        """The new object's first token is top-1 with P(new) >= :data:`SUCCESS_P`."""
        return self.top_is_new and self.p_new >= SUCCESS_P


def prompt_outcome(model: Any, prompt: str, new_object: str) -> EditOutcome:
    """P(first token of ``new_object``) and the top-1 token of ``prompt`` under the model as it is.

    The Inspector's own success rule (top-1 and P >= :data:`SUCCESS_P`), on the model as shown; an edit's
    recorded outcome (:func:`workbench.editing.edit_outcome`) is the teacher-forced all-tokens check.
    """
    from ..predict import next_token_probs, object_token_ids

    probs = next_token_probs(model, [prompt])[0]
    new_id = object_token_ids(model, new_object)[0]
    top_p, top_id = probs.max(0)
    return EditOutcome(prompt=prompt, new_object=new_object, p_new=float(probs[new_id]),
                       top_token=model.tokenizer.decode([int(top_id)]), top_p=float(top_p),
                       top_is_new=int(top_id) == new_id)


# --------------------------------------------------------------------------- settings and results


@dataclass(frozen=True)
class TraceSettings:
    """What the Trace tab describes: the fact's prompt and subject, and how to trace it."""

    prompt: str
    subject: str
    corrupt: str = "subject"  # "subject", "relation" or "tokens" (the hand-picked ``marks``)
    marks: tuple[int, ...] = ()
    kinds: tuple[str, ...] = ("hidden", "mlp", "attn")
    samples: int = 10
    noise: str = "s3"
    window: int = 1


@dataclass(frozen=True)
class EditSettings:
    """What the Edit tab describes (the fact edited is the Trace tab's prompt and subject)."""

    method: str = "rome"
    new_object: str = ""
    locus: str = "subject"
    layer: Any = DEFAULT_LAYER
    paraphrases: tuple[str, ...] = ()
    retrace: bool = True


@dataclass
class TraceOutput:
    """A finished trace and the inputs it was computed from (settings, applied edits' ids)."""

    result: Any
    settings: TraceSettings
    edits: tuple[str, ...]


@dataclass
class EditOutput:
    """A finished edit: the edit, its before/after table, outcome, maps and the inputs it came from."""

    edit: Any
    settings: EditSettings
    prompt: str
    subject: str
    table: Any
    outcome: EditOutcome
    before: Any = None
    after: Any = None


RUN_STATES = ("running", "done", "failed", "error", "cancelled")
"""A run's state: running, finished (``done``), finished but the edit missed its object
(``failed``), stopped by an error, or cancelled."""


@dataclass
class RunStatus:
    """One run of a tab: its fixed list of steps, how many are done, and how it ended."""

    action: str  # "trace" or "edit"
    steps: list[str]
    done: int = 0
    state: str = "running"
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None

    def elapsed(self) -> float:
        return (self.ended if self.ended is not None else time.perf_counter()) - self.started

    def finish(self, state: str) -> None:
        if state not in RUN_STATES[1:]:
            raise ValueError(f"a run ends as one of {RUN_STATES[1:]}, not {state!r}")
        self.state, self.ended = state, time.perf_counter()
        if state == "done":
            self.done = len(self.steps)

    @property
    def running(self) -> bool:
        return self.state == "running"


class Cancelled(Exception):
    """Raised inside a run when its Cancel button was pressed."""


# --------------------------------------------------------------------------- the state


class InspectorState:
    """Everything the Inspector shows, as data (see the module docstring).

    The fields are plain attributes; the methods below derive what the views print. A run
    (:mod:`workbench.widgets.actions`) changes the state and calls ``changed()`` so that the
    views are redrawn from it.
    """

    def __init__(self, model: Any, facts: Sequence[Any] = (), *, trace: TraceSettings, edit: EditSettings,
                 seed: int = 1, method_kwargs: dict[str, dict] | None = None,
                 probe_facts: Sequence[Any] | None = None) -> None:
        self.model = model
        self.facts = list(facts)
        self.probe_facts = list(probe_facts) if probe_facts is not None else self.facts
        self.seed = seed
        self.method_kwargs: dict[str, dict] = {k: dict(v) for k, v in (method_kwargs or {}).items()}
        self.picked: int = 0 if self.facts and (self.facts[0].prompt, self.facts[0].subject) == (
            trace.prompt, trace.subject) else -1
        self.trace = trace
        self.edit = edit
        self.value = "p"
        self.traced: TraceOutput | None = None
        self.edited: EditOutput | None = None
        self.trace_run: RunStatus | None = None
        self.edit_run: RunStatus | None = None
        self.trace_error: tuple[str, str] | None = None  # (message, traceback)
        self.edit_error: tuple[str, str] | None = None
        self.edit_note: str = ""  # the last Undo's report
        self.cancel = threading.Event()
        self.changed: Any = lambda: None  # set by the Inspector: redraw the views

    # ------------------------------------------------------------------ the model
    @property
    def applied_edits(self) -> list[Any]:
        """The edits applied to the model now, oldest first, read from the model itself."""
        from ..editing.edit import applied_edits

        return applied_edits(self.model)

    def edit_ids(self) -> tuple[str, ...]:
        return tuple(e.id for e in self.applied_edits)

    @property
    def busy(self) -> bool:
        return any(r is not None and r.running for r in (self.trace_run, self.edit_run))

    # ------------------------------------------------------------------ the fact
    def tokens(self) -> tuple[Any, str | None]:
        """The prompt's tokens (``Tokenized``) and ``None``, or ``None`` and why it cannot be tokenized."""
        from ..spans import tokenize

        if not self.trace.prompt:
            return None, "type a prompt"
        try:
            return tokenize(self.model, self.trace.prompt), None
        except Exception as err:  # noqa: BLE001 - any tokenizer problem is shown, not raised
            return None, f"{type(err).__name__}: {err}"

    def fact_problem(self) -> str | None:
        """Why the prompt and subject do not yet describe a fact (``None`` when they do)."""
        prompt, subject = self.trace.prompt, self.trace.subject
        toks, problem = self.tokens()
        if problem is not None:
            return problem
        if not subject:
            return "type the subject (the part of the prompt that names it)"
        if subject not in prompt:
            return f"the subject {subject!r} does not occur in the prompt"
        if prompt.count(subject) > 1:
            return f"the subject {subject!r} occurs more than once in the prompt"
        return None

    def marked(self) -> list[int]:
        """Positions to corrupt: the subject's or relation's tokens, or the clicked ones."""
        from ..spans import SpanError, resolve_span

        if self.trace.corrupt == "tokens":
            return sorted(self.trace.marks)
        toks, problem = self.tokens()
        if toks is None or self.fact_problem() is not None:
            return []
        try:
            return list(resolve_span(toks, self.trace.corrupt, self.trace.subject or None).positions)
        except (SpanError, ValueError):
            return []

    def trace_kwargs(self) -> dict:
        """The keyword arguments of :func:`workbench.tracing.trace` the settings describe (or ValueError)."""
        t = self.trace
        if not t.kinds:
            raise ValueError("pick at least one kind to restore")
        if t.corrupt == "tokens":
            problem = self.tokens()[1]
            if problem is not None:
                raise ValueError(problem)
            corrupt: Any = sorted(t.marks)
            if not corrupt:
                raise ValueError("click at least one token to corrupt (or choose subject / relation)")
        else:
            problem = self.fact_problem()
            if problem is not None:
                raise ValueError(problem)
            corrupt = t.corrupt
        return dict(subject=t.subject or None, corrupt=corrupt, kinds=tuple(t.kinds), samples=int(t.samples),
                    noise=_noise_value(t.noise), window=int(t.window), seed=self.seed)

    def picked_fact(self) -> Any:
        """The chosen example, when the prompt and subject are still its own."""
        if self.picked < 0:
            return None
        fact = self.facts[self.picked]
        return fact if (fact.prompt, fact.subject) == (self.trace.prompt, self.trace.subject) else None

    def edit_prompts(self) -> list[str]:
        """The prompt and the paraphrases typed in the Edit tab."""
        extra = [p.strip() for p in self.edit.paraphrases if p.strip()]
        return [self.trace.prompt] + [p for p in dict.fromkeys(extra) if p != self.trace.prompt]

    def current_fact(self) -> Any:
        """The fact of the Trace tab: the chosen example, or the typed prompt and subject (true object =
        the current top-1 prediction; relation = that of an example phrased the same way, if any)."""
        from ..facts import Fact
        from ..predict import top_tokens

        problem = self.fact_problem()
        if problem is not None:
            raise ValueError(problem)
        picked = self.picked_fact()
        if picked is not None:
            return picked
        prompt, subject = self.trace.prompt, self.trace.subject
        template = prompt.replace(subject, "{}")
        target = top_tokens(self.model, prompt, k=1)[0][0].strip()
        return Fact(subject=subject, template=template, target_true=target, relation_id=self._relation_of(template),
                    paraphrases=tuple(self.edit_prompts()[1:]), id=f"typed:{prompt}")

    def _relation_of(self, template: str) -> str:
        """The relation id of the examples that use ``template`` (any of their phrasings), else ``""``."""
        for f in self.probe_facts:
            prompts = (f.prompt, *f.paraphrases, *f.entity_prompts, *f.relation_prompts)
            if any(p.count(f.subject) == 1 and p.replace(f.subject, "{}") == template for p in prompts):
                return f.relation_id
        return ""

    def probe_rows(self, fact: Any, k: int = N_NEIGHBOURS) -> list[tuple[str, str]]:
        """``(prompt, probe)`` rows checked after an edit beside the prompt and its paraphrases: bleed (other
        subjects of the relation, both phrasings) and locality (the subject's other relations), as in the
        evaluation (:func:`workbench.report.edit_probe_rows`), from ``probe_facts`` (default: the examples).
        """
        from ..report import edit_probe_rows

        own = set(self.edit_prompts())
        rows = edit_probe_rows(fact, self.probe_facts, k)
        seen: set[str] = set()
        out = []
        for p, probe in rows:
            if p not in own and p not in seen:
                seen.add(p)
                out.append((p, probe))
        return out

    # ------------------------------------------------------------------ what is out of date
    def trace_stale(self) -> list[str]:
        """Why the shown map no longer matches the settings or the model (empty: it matches)."""
        if self.traced is None:
            return []
        why = []
        if self.traced.settings != self.trace:
            changed = [name for name in ("corrupt", "marks", "kinds", "samples", "noise", "window")
                       if getattr(self.traced.settings, name) != getattr(self.trace, name)]
            why.append(f"the settings changed ({', '.join(_SETTING_NAMES[c] for c in changed)})")
        if self.traced.edits != self.edit_ids():
            why.append("an edit was applied or undone")
        return why

    def edit_stale(self) -> list[str]:
        """Why the shown edit results no longer match the Edit tab or the model (empty: they match)."""
        if self.edited is None:
            return []
        why = []
        changed = []
        if (self.edited.prompt, self.edited.subject) != (self.trace.prompt, self.trace.subject):
            changed.append("fact")
        changed += [name for name in ("method", "new_object", "locus", "layer", "paraphrases", "retrace")
                    if getattr(self.edited.settings, name) != getattr(self.edit, name)]
        if changed:
            why.append(f"the Edit tab changed ({', '.join(_SETTING_NAMES[c] for c in changed)})")
        if not self.edited.edit.is_applied(self.model):
            why.append("this edit is no longer applied")
        return why


_SETTING_NAMES = {"corrupt": "corrupted span", "marks": "clicked tokens", "kinds": "kinds", "samples": "samples",
                  "noise": "noise", "window": "window", "fact": "prompt or subject", "method": "method",
                  "new_object": "new object", "locus": "locus", "layer": "layer", "paraphrases": "paraphrases",
                  "retrace": "trace before and after"}


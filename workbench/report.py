"""One self-contained HTML report: traces from both perspectives, averaged maps, severed
traces and an edit, for ``workbench demo``.

The page embeds Plotly's JavaScript once (in ``<head>``) and every figure as a fragment
that uses it, with a small stylesheet inline, so the file opens offline in any browser.
"""

from __future__ import annotations

import datetime as _dt
import html
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from .plots import KINDS, _mean, external_references, figure_html, plot_aie, plot_severed, plot_traces

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #222;
       background: #fafafa; line-height: 1.45; }
main { max-width: 1380px; margin: 0 auto; padding: 24px 32px 64px; background: #fff; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 2.2em; }
h3 { margin-bottom: 0.3em; }
.lead { color: #555; margin-top: 0; }
.note { background: #f4f4f8; border-left: 4px solid #6a51a3; padding: 8px 14px; margin: 12px 0; }
.warn { background: #fff6e5; border-left: 4px solid #e6a100; padding: 8px 14px; margin: 12px 0; }
.pair { display: flex; flex-wrap: wrap; gap: 8px; align-items: flex-start; }
.pair > .fig { flex: 1 1 560px; min-width: 0; }
.fig { width: 100%; }
table.data { border-collapse: collapse; font-size: 0.9em; margin: 8px 0 16px; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.data th { background: #f0f0f0; }
table.data td:first-child, table.data th:first-child { text-align: left; }
code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
footer { color: #777; font-size: 0.85em; margin-top: 3em; }
nav a { margin-right: 14px; }
"""


# --------------------------------------------------------------------------- predictions


def predictions_table(model: Any, prompts: Sequence[str], *, k: int = 3, objects: Sequence[str] = ()
                      ) -> pd.DataFrame:
    """Top-``k`` next tokens of each prompt (``'tok' p`` strings) and P(first token of each object)."""
    from .predict import next_token_probs, object_token_ids

    probs = next_token_probs(model, list(prompts))
    rows = []
    for prompt, p in zip(prompts, probs):
        values, ids = p.topk(k)
        row = {"prompt": prompt,
               "top": ", ".join(f"{model.tokenizer.decode([int(i)])!r} {float(v):.2f}" for v, i in zip(values, ids))}
        for obj in objects:
            row[f"P({obj.strip()})"] = float(p[object_token_ids(model, obj)[0]])
        rows.append(row)
    return pd.DataFrame(rows).set_index("prompt")


def before_after(before: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Side-by-side before/after prediction tables (two-level columns)."""
    return pd.concat({"before": before, "after": after}, axis=1)


def edit_probe_rows(fact: Any, facts: Sequence[Any], k: int = 3) -> list[tuple[str, str]]:
    """``(prompt, probe)`` rows that show an edit's reach beyond its fact, as the evaluation probes it
    (:mod:`workbench.perspective`): **bleed**, up to ``k`` other subjects of the fact's relation in both
    request phrasings (a relation-keyed edit leaks there), and **locality**, up to ``k`` of the subject's
    other relations in both phrasings (which should keep their answers). ``facts`` supplies the other
    subjects and relations. A fact without a relation id is asked about other subjects in its own phrasing.
    """
    from .perspective import bleed_subjects, other_relations, phrasings, probes, relation_index, subject_index

    kind_name = {"entity": "subject-first", "relation": "relation-first"}
    relations = other_relations(fact, subject_index(facts), k=k)
    if fact.relation_id:
        others = bleed_subjects(fact, relation_index(facts), k=k)
        found = probes(fact, others, ph=phrasings(fact), relations=relations)
        rows = [(p, f"bleed: other subject, {kind_name[kind]}") for p, _, kind in found.bleed]
    else:
        found = probes(fact, relations=relations)
        subjects = [f.subject for f in facts if f.subject != fact.subject
                    and fact.subject not in f.subject and f.subject not in fact.subject]
        rows = [(fact.template.format(s), "bleed: other subject, same phrasing") for s in list(dict.fromkeys(subjects))[:k]]
    rows += [(p, f"locality: other relation of the subject, {kind_name[kind]}") for p, _, _, kind in found.relations]
    labels: dict[str, str] = {}
    for prompt, probe in rows:
        labels.setdefault(prompt, probe)  # each prompt once, with its first label
    return list(labels.items())


# --------------------------------------------------------------------------- assembly


@dataclass
class Section:
    """A titled part of the report: HTML parts in order."""

    id: str
    title: str
    parts: list[str] = field(default_factory=list)

    def add(self, part: str) -> None:
        self.parts.append(part)

    def html(self) -> str:
        return f"<section id='{self.id}'><h2>{html.escape(self.title)}</h2>\n" + "\n".join(self.parts) + "</section>"


def table_html(df: pd.DataFrame, **kwargs: Any) -> str:
    """A DataFrame as an HTML table in the report's style."""
    return df.to_html(classes="data", border=0, float_format=lambda x: f"{x:.3f}", **kwargs)


FIT_JS = """
(function () {
  // Plotly sizes a figure to its container when it is drawn and on window resizes. A figure
  // drawn before its row's other figures exist gets the whole row; fit each one again when
  // its container changes size (and once the page has loaded).
  function fit(g) { if (g && g.offsetParent !== null && window.Plotly) { Plotly.Plots.resize(g); } }
  function fitAll() { document.querySelectorAll('.js-plotly-plot').forEach(fit); }
  window.addEventListener('load', fitAll);
  if (window.ResizeObserver) {
    var seen = new WeakMap();
    var ro = new ResizeObserver(function (entries) {
      entries.forEach(function (e) {
        var w = Math.round(e.contentRect.width);
        if (seen.get(e.target) !== w) { seen.set(e.target, w); fit(e.target.querySelector('.js-plotly-plot')); }
      });
    });
    document.querySelectorAll('.fig').forEach(function (f) { ro.observe(f); });
  }
})();
"""
"""The report's script that fits every figure to its container (issue: a figure drawn wider than its column)."""


def page(title: str, sections: Sequence[Section], *, intro: str = "", footer: str = "") -> str:
    """The full HTML page: CSS and Plotly's JavaScript inline, once; every figure follows its container's width."""
    from plotly.offline import get_plotlyjs

    nav = " ".join(f"<a href='#{s.id}'>{html.escape(s.title)}</a>" for s in sections)
    body = "\n".join(s.html() for s in sections)
    plotly_js = get_plotlyjs().replace("</script>", "<\\/script>")
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style>\n<script type='text/javascript'>{plotly_js}</script></head>\n"
        f"<body><main><h1>{html.escape(title)}</h1>{intro}<nav>{nav}</nav>\n{body}"
        f"<footer>{footer}</footer></main><script type='text/javascript'>{FIT_JS}</script></body></html>\n"
    )


def _fig(fig: Any) -> str:
    return f"<div class='fig'>{figure_html(fig)}</div>"


def _esc(text: Any) -> str:
    return html.escape(str(text))


def known_facts(model: Any, facts: Sequence[Any], limit: int | None = None, batch_size: int = 64) -> list[Any]:
    """The facts whose prompt the model completes with the expected object (top-1), in order.

    ``limit`` stops once that many are found (facts are checked ``batch_size`` at a time).
    """
    from .predict import predicts

    out: list[Any] = []
    for i in range(0, len(facts), batch_size):
        chunk = list(facts[i: i + batch_size])
        ok = predicts(model, [f.prompt for f in chunk], [f.target_true for f in chunk])
        out.extend(f for f, good in zip(chunk, ok) if good)
        if limit is not None and len(out) >= limit:
            return out[:limit]
    return out


def diverse_order(facts: Sequence[Any]) -> list[Any]:
    """The facts reordered round-robin over relations, each relation starting at another
    subject, so that any prefix covers many relations and subjects."""
    groups: dict[str, list[Any]] = {}
    for f in facts:
        groups.setdefault(f.relation_id, []).append(f)
    rotated = []
    for ri, g in enumerate(groups.values()):
        offset = ri * len(g) // max(1, len(groups))
        rotated.append(g[offset:] + g[:offset])
    out = []
    for i in range(max((len(g) for g in rotated), default=0)):
        out.extend(g[i] for g in rotated if i < len(g))
    return out


def _noise_for(model: Any, facts: Sequence[Any], noise: Any) -> Any:
    """ν once over the report's subjects (reference §2), as a number, when tracing offers the rule."""
    try:
        from .tracing.noise import noise_level
    except ImportError:
        return noise
    if isinstance(noise, str) and noise.startswith("s") and facts:
        return noise_level(model, sorted({f.subject for f in facts}), noise)
    return noise


def build_report(model: Any, facts: Sequence[Any] | None = None, *, n_prompts: int = 4, n_sweep: int = 24,
                 samples: int = 10, kinds: Sequence[str] = KINDS, noise: str | float = "s3", window: int | None = None,
                 seed: int = 1, edit: bool = True, rome_kwargs: dict | None = None,
                 log: Callable[[str], None] | None = print, title: str | None = None) -> str:
    """The demo report as one HTML string.

    Traces ``n_prompts`` facts the model knows from the subject's and the relation's
    side, sweeps ``n_sweep`` facts per perspective for the averaged maps, runs severed
    traces of the same prompts, and (when :mod:`workbench.editing` offers ``rome``)
    makes one ROME edit and shows predictions before and after. ``facts`` defaults
    to the bundled world's. ``rome_kwargs`` go to :func:`workbench.editing.rome` (e.g.
    ``hparams=`` for a model without a preset covariance corpus); a failed edit becomes a
    note in the report, not an error. ``window`` defaults to
    :func:`workbench.tracing.default_window` (ROME's 10, at most half the model's depth). ``log`` receives one line per step (``None``:
    silent, and no progress bars).
    """
    from .facts import load_facts
    from .loading import model_info
    from .tracing import severed_trace, trace, trace_dataset
    from .tracing.window import resolve_window

    say = log or (lambda _msg: None)
    window = resolve_window(model, window)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    facts = list(facts) if facts is not None else load_facts("toy-facts")
    info = model_info(model)
    spec = info.get("spec") or "model"

    ordered = diverse_order(facts)
    known = known_facts(model, ordered, limit=max(n_prompts, n_sweep))
    sections: list[Section] = []
    warn = ""
    if known:
        pool = known
    else:
        pool = ordered
        warn = ("<p class='warn'>The model completes none of these facts with the expected object, so the "
                "per-prompt maps trace its own top prediction instead, and the averaged maps (which keep only "
                "known facts) are empty.</p>")
    shown = pool[:n_prompts]
    sweep = pool[:n_sweep]
    nu = _noise_for(model, sweep or shown, noise)
    common = dict(kinds=tuple(kinds), samples=samples, noise=nu, window=window, seed=seed)
    say(f"{len(known)} known facts picked from {len(facts)}; tracing {len(shown)} prompts x 2 perspectives, "
        f"sweeping {len(sweep)} facts, {samples} samples, noise {nu if isinstance(nu, str) else f'{nu:.4g}'}")

    # ---- 1. per-prompt maps
    t0 = time.perf_counter()
    sec = Section("maps", "1. Causal traces of single prompts")
    sec.add("<p>Each map restores one clean state into a corrupted run and colours the probability of the "
            "answer. Corrupted tokens are marked <code>*</code>. In each figure the top row has the <b>subject</b> "
            "corrupted (ROME's setting) and the bottom row the <b>relation</b>; both rows share one colour scale. "
            "Use the buttons above a figure to switch between p_restored and the indirect effect "
            "(IE = p_restored − p_corrupt); hover for values.</p>")
    traces = []
    for i, f in enumerate(shown, start=1):
        answer = f.target_true if known else None
        sec.add(f"<h3>{i}. {_esc(f.prompt)} → {_esc(f.target_true if known else '(top prediction)')}</h3>")
        pair = {f"{corrupt} corrupted": trace(model, f.prompt, subject=f.subject, corrupt=corrupt, answer=answer,
                                              **common) for corrupt in ("subject", "relation")}
        traces.extend(pair.values())
        sec.add(_fig(plot_traces(pair)))
        say(f"  traced {i}/{len(shown)}: {f.prompt!r}")
    timings["per-prompt traces"] = time.perf_counter() - t0
    sections.append(sec)

    # ---- 2. averaged maps
    t0 = time.perf_counter()
    sec = Section("aie", "2. Averaged indirect effects (paper RQ1)")
    sec.add("<p>The mean IE over facts the model knows, by position bucket (ROME's buckets around the "
            "corrupted span), with the subject corrupted (left column) and the relation corrupted (right column). "
            "Each row shares one colour scale, so the two perspectives compare directly.</p>")
    sweeps = {}
    for corrupt in ("subject", "relation"):
        sweeps[corrupt] = trace_dataset(model, sweep, corrupt=corrupt, progress=log is not None, **common)
        say(f"  swept {len(sweep)} facts with the {corrupt} corrupted")
    sec.add(_fig(plot_aie(sweeps["subject"], sweeps["relation"], window=window)))
    summary = pd.DataFrame(
        [{"corrupted": c, "facts traced": int(r.n_facts), "kept (known)": int(r.n_facts - r.n_skipped),
          "mean p_clean": f"{_mean(r.p_clean):.3f}", "mean p_corrupt": f"{_mean(r.p_corrupt):.3f}"}
         for c, r in sweeps.items()]).set_index("corrupted")
    sec.add(table_html(summary))
    best = []
    for c, r in sweeps.items():
        for k in r.aie:
            df = r.aie[k]
            if df.size and df.notna().any().any():
                stacked = df.stack()
                (bucket, layer), val = stacked.idxmax(), stacked.max()
                best.append({"corrupted": c, "kind": k, "strongest bucket": bucket, "layer": layer, "AIE": val})
    if best:
        sec.add("<p>Where each map peaks:</p>" + table_html(pd.DataFrame(best), index=False))
    timings["dataset sweeps"] = time.perf_counter() - t0
    sections.append(sec)

    # ---- 3. severed
    t0 = time.perf_counter()
    sec = Section("severed", "3. Severed traces")
    sec.add("<p>Restoring the hidden state at the last corrupted token, layer by layer (purple), and again with "
            "every MLP (green) or every attention layer (red) at that token frozen to its corrupted value. Where "
            "green falls below purple, the restored state needs the later MLPs to carry the fact.</p>")
    parts = []
    for corrupt in ("subject", "relation"):
        sev = [severed_trace(model, f.prompt, subject=f.subject, corrupt=corrupt, samples=samples, noise=nu,
                             seed=seed, answer=f.target_true if known else None) for f in shown]
        parts.append(_fig(plot_severed(sev, title=f"{corrupt.capitalize()} corrupted: mean of {len(sev)} prompts"
                                                  "<br><sup>restoring the hidden state at the last corrupted "
                                                  "token; bars ± s.e.</sup>")))
        say(f"  severed traces with the {corrupt} corrupted")
    sec.add("<div class='pair'>" + "".join(parts) + "</div>")
    timings["severed traces"] = time.perf_counter() - t0
    sections.append(sec)

    # ---- 4. editing
    t0 = time.perf_counter()
    sec = Section("edit", "4. One edit, before and after")
    if edit:
        _edit_section(model, sec, known or shown, common, say, rome_kwargs or {}, facts)
    else:
        sec.add("<p class='note'>Editing was switched off for this report.</p>")
    timings["edit"] = time.perf_counter() - t0
    sections.append(sec)

    total = time.perf_counter() - started
    timings["total"] = total
    say(f"report built in {total:.1f} s")
    info_df = pd.DataFrame({"value": {k: str(v) for k, v in info.items()}})
    settings = pd.DataFrame({"value": {
        "facts": f"{len(facts)} ({len(known)} known to the model picked)", "prompts traced": len(shown),
        "facts per sweep": len(sweep), "samples": samples, "noise ν": nu if isinstance(nu, str) else f"{nu:.4g}",
        "window": window, "seed": seed, "kinds": ", ".join(kinds)}})
    intro = (
        f"<p class='lead'>Where does <code>{_esc(spec)}</code> store a fact, seen from the entity (subject) and "
        "from the relation — and what happens when one fact is edited. Built by <code>workbench demo</code> "
        f"on {_dt.datetime.now():%Y-%m-%d %H:%M}.</p>{warn}"
        "<div class='pair'><div><b>Model</b>" + table_html(info_df) + "</div><div><b>Settings</b>"
        + table_html(settings) + "</div><div><b>Time (s)</b>"
        + table_html(pd.DataFrame({"seconds": timings})) + "</div></div>"
    )
    footer = (f"workbench {_version()} · Python {platform.python_version()} · definitions: "
              "docs/reference methods §1–3, §7 · this file needs no network.")
    return page(title or f"workbench demo — {spec}", sections, intro=intro, footer=footer)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("workbench")
    except Exception:  # noqa: BLE001 - not installed: a source checkout
        return "(source)"




def _edit_section(model: Any, sec: Section, facts: Sequence[Any], common: dict, say: Callable[[str], None],
                  rome_kwargs: dict, all_facts: Sequence[Any] = ()) -> None:
    try:
        from .editing import rome
    except ImportError:
        sec.add("<p class='note'>Editing (<code>workbench.editing.rome</code>) is not available in this build; "
                "this section is skipped.</p>")
        say("  editing not available: edit section skipped")
        return
    from .tracing import trace

    fact = next((f for f in facts if f.target_new), None)
    if fact is None:
        sec.add("<p class='note'>No fact with a requested new object; no edit made.</p>")
        return
    new = fact.target_new
    try:
        edit_obj = rome(model, fact, new, locus="subject", **rome_kwargs)
    except Exception as err:  # noqa: BLE001 - the rest of the report stands; say why this part is missing
        sec.add(f"<p class='warn'>The ROME edit of {_esc(fact.prompt)} → {_esc(new)} failed: "
                f"<code>{_esc(type(err).__name__)}: {_esc(err)}</code></p>")
        say(f"  edit failed: {type(err).__name__}: {err}")
        return
    if fact.entity_prompts or fact.relation_prompts:
        rephrased = [("subject-first phrasing", list(fact.entity_prompts[:3])),
                     ("relation-first phrasing", list(fact.relation_prompts[:3]))]
    else:
        rephrased = [("paraphrase", list(fact.paraphrases[:3]))]
    groups = [("edit prompt", [fact.prompt]), *rephrased]
    kind_of: dict[str, str] = {}
    for group, ps in groups:
        for p in ps:
            kind_of.setdefault(p, group)  # the edit prompt also appears among its phrasings
    for p, probe in edit_probe_rows(fact, all_facts):
        kind_of.setdefault(p, probe)
    prompts = list(kind_of)
    objects = [fact.target_true, new]
    before = predictions_table(model, prompts, objects=objects)
    original = trace(model, fact.prompt, subject=fact.subject, corrupt="subject", **common)
    with edit_obj.applied(model):
        after = predictions_table(model, prompts, objects=objects)
        retraced = trace(model, fact.prompt, subject=fact.subject, corrupt="subject", answer=new, **common)
    table = before_after(before, after)
    table.insert(0, ("", "probe"), [kind_of[p] for p in table.index])
    sec.add(f"<p>ROME rewrites <b>{_esc(fact.prompt)} → {_esc(fact.target_true)}</b> to <b>{_esc(new)}</b>, "
            f"keyed at the subject's last token ({_esc(', '.join(edit_obj.param_names))}). Top predictions and the "
            "probabilities of the old and new object, before and after, on the fact's phrasings, on other subjects "
            "of the relation (bleed: they should not move to the new object) and on the subject's other relations "
            "(locality: they should keep their answers):</p>")
    sec.add(table_html(table))
    sec.add("<p>The trace before the edit (top row, answer = the old object) and after it (bottom row, answer = "
            "the new object), subject corrupted, on one colour scale:</p>")
    sec.add(_fig(plot_traces({f"before → {original.answer!r}": original, f"after → {retraced.answer!r}": retraced})))
    say(f"  edited {fact.prompt!r}: {fact.target_true!r} -> {new!r}")


def write_report(html_text: str, path: str | Path) -> Path:
    """Write the report; refuses HTML that references external scripts or stylesheets."""
    bad = external_references(html_text)
    if bad:
        raise RuntimeError(f"report references external resources: {bad[:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_text, encoding="utf-8")
    return path


__all__ = ["build_report", "write_report", "predictions_table", "before_after", "edit_probe_rows", "known_facts",
           "diverse_order",
           "page", "Section"]

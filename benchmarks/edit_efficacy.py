"""How often a ROME edit reaches its new object, per edited layer, on known facts.

For each fact (one edit at a time, reverted after scoring), the CounterFact measures of the
ROME paper as top-1 rates: **efficacy** (the new object is the top-1 after the rewrite
prompt), **paraphrase** (top-1 after each other phrasing of the fact) and **neighbourhood**
(other subjects' prompts of the relation keep their own top-1 answer). The facts are the
bundled world's CounterFact records, shuffled with ``random.Random(seed)``, keeping the first
``-n`` whose rewrite prompt the unedited model completes with the true object.

    python benchmarks/edit_efficacy.py -n 200                      # the model's ROME preset
    python benchmarks/edit_efficacy.py -n 50 --layers 0 1 2 3      # one run per layer
    python benchmarks/edit_efficacy.py -n 50 --set v_num_grad_steps=20   # a preset field changed

Used to choose ``ROME_TOY``'s layer; the figures are in docs/results.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import time

import torch


def known_sample(model, facts, n: int, seed: int) -> list:
    """The first ``n`` facts (after a seeded shuffle) whose rewrite prompt the model gets right."""
    from workbench.report import known_facts

    order = list(facts)
    random.Random(seed).shuffle(order)
    return known_facts(model, order, limit=n)[:n]


def score_edit(model, fact, edit) -> dict:
    """Top-1 efficacy, paraphrase and neighbourhood rates of one edit (applied, then reverted)."""
    from workbench.predict import predicts

    new = fact.target_new
    targets = list(fact.neighborhood_targets) or [fact.target_true] * len(fact.neighborhood)
    with edit.applied(model):
        eff = predicts(model, [fact.prompt], [new])[0]
        para = predicts(model, list(fact.paraphrases), [new] * len(fact.paraphrases)) if fact.paraphrases else []
        kept = predicts(model, list(fact.neighborhood), targets) if fact.neighborhood else []
    return {"efficacy": float(eff), "paraphrase": sum(para) / max(1, len(para)),
            "neighbourhood": sum(kept) / max(1, len(kept))}


def run_layer(model, facts, layer: int | None, overrides: dict | None = None) -> dict:
    """Mean rates over ``facts`` with ROME at ``layer`` (``None``: the preset's layer), the
    preset's fields replaced by ``overrides``."""
    import warnings

    from workbench.editing import rome
    from workbench.editing.edit import EditNotReachedWarning
    from workbench.progress import progress_bar

    rows = []
    t0 = time.time()
    for fact in progress_bar(facts, desc=f"ROME layer {layer if layer is not None else 'preset'}", mininterval=5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EditNotReachedWarning)
            edit = rome(model, fact, layer=layer, hparams=overrides or None)
        rows.append(score_edit(model, fact, edit))
    n = len(rows)
    return {"layer": layer if layer is not None else edit.hparams.get("layers"), "n": n,
            "overrides": overrides or {},
            **{k: sum(r[k] for r in rows) / n for k in ("efficacy", "paraphrase", "neighbourhood")},
            "reached": int(sum(r["efficacy"] for r in rows)), "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-facts")
    ap.add_argument("--facts", default="toy-facts")
    ap.add_argument("-n", type=int, default=200, help="facts per layer (default 200)")
    ap.add_argument("--layers", type=int, nargs="*", default=None, help="layers to edit (default: the preset's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a field of the model's ROME preset (a Python literal), e.g. v_num_grad_steps=20")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import workbench as wb

    model = wb.load_model(args.model, device="cpu")
    facts = known_sample(model, wb.load_facts(args.facts), args.n, args.seed)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = ast.literal_eval(value)
    results = [run_layer(model, facts, layer, overrides) for layer in (args.layers or [None])]
    print("| layer | n | efficacy | paraphrase | neighbourhood kept | time |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['layer']} | {r['n']} | {100 * r['efficacy']:.1f} % ({r['reached']}/{r['n']}) | "
              f"{100 * r['paraphrase']:.1f} % | {100 * r['neighbourhood']:.1f} % | {r['seconds']:.0f} s |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

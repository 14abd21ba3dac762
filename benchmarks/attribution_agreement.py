"""How well attribution patching (``trace(method="attribution")``) agrees with the exact maps, and its speed.

For each model and prompt, the three maps (hidden, mlp, attn) are traced exactly (the default
incremental engine) and estimated by attribution patching with the same noise draw, and
compared per kind:

* **Spearman** -- rank correlation of the indirect effects over the cells from the first
  corrupted token on (the cells before it are exactly p_corrupt in both and would inflate it);
* **top cell** -- whether the cell of largest indirect effect is the same.

Models: ``toy`` (the bundled model, on the first ``-n`` facts of its world) and random models of
the families of :mod:`workbench.architecture` (``--families``; ``--layers``/``--width``; an
``initializer_range`` of 0.3 makes their next-token distributions peaked), on the same prompts.
Wall times are summed over the prompts of a model (untimed warm-up first).

    OMP_NUM_THREADS=1 python benchmarks/attribution_agreement.py -n 20
    OMP_NUM_THREADS=1 python benchmarks/attribution_agreement.py -n 5 --families gpt2 llama --layers 12 --width 768
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

KINDS = ("hidden", "mlp", "attn")


def compare(model, facts, samples: int, window: int | None) -> dict:
    """Per kind: the Spearman correlations and top-cell matches over ``facts``; the two engines' seconds."""
    from workbench.tracing import trace
    from workbench.tracing.attribution import agreement

    out = {k: {"rho": [], "top": []} for k in KINDS}
    kw = dict(samples=samples, window=window)
    trace(model, facts[0].prompt, subject=facts[0].subject, **kw)  # warm-up
    trace(model, facts[0].prompt, subject=facts[0].subject, method="attribution", **kw)
    times = {"exact": 0.0, "attribution": 0.0}
    for fact in facts:
        t0 = time.perf_counter()
        exact = trace(model, fact.prompt, subject=fact.subject, **kw)
        t1 = time.perf_counter()
        approx = trace(model, fact.prompt, subject=fact.subject, method="attribution", **kw)
        t2 = time.perf_counter()
        times["exact"] += t1 - t0
        times["attribution"] += t2 - t1
        for k, agree in agreement(exact, approx).items():
            out[k]["rho"].append(agree.spearman)
            out[k]["top"].append(agree.top_cell_same)
    out["times"] = times
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20, help="prompts per model (default 20)")
    ap.add_argument("--families", nargs="*", default=["gpt2", "gptj", "gpt_neox", "llama"],
                    help="random models of these families besides the bundled one (default gpt2 gptj gpt_neox llama)")
    ap.add_argument("--no-toy", dest="toy", action="store_false", help="skip the bundled model")
    ap.add_argument("--layers", type=int, default=6, help="layers of the random models (default 6)")
    ap.add_argument("--width", type=int, default=128, help="d_model of the random models (default 128)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=None, help="default: the model's default window")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    from workbench.architecture import random_bridge
    from workbench.facts import load_facts
    from workbench.loading import load_model

    torch.set_num_threads(args.threads)
    facts = load_facts("toy-facts")[: args.n]
    models = []
    if args.toy:
        models.append(("toy-facts (bundled)", lambda: load_model("toy-facts", device="cpu")))
    for family in args.families:
        heads = max(1, args.width // 64)
        models.append((f"random {family} {args.layers}x{args.width}",
                       lambda f=family, h=heads: random_bridge(f, n_layers=args.layers, d_model=args.width, n_heads=h,
                                                               n_ctx=64, initializer_range=0.3, device="cpu")))
    print(f"CPU, {torch.get_num_threads()} thread(s); {len(facts)} prompts per model; {args.samples} samples")
    print("| model | kind | Spearman (median, min) | top cell same | exact s | attribution s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, build in models:
        model = build()
        res = compare(model, facts, args.samples, args.window)
        t = res["times"]
        for k in KINDS:
            rho = [r for r in res[k]["rho"] if r == r]
            top = res[k]["top"]
            speed = (f"| {t['exact']:.2f} | {t['attribution']:.2f} | {t['exact'] / t['attribution']:.1f}x |"
                     if k == KINDS[0] else "| | | |")
            print(f"| {name} | {k} | {statistics.median(rho):.2f}, {min(rho):.2f} | {sum(top)}/{len(top)} {speed}",
                  flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())

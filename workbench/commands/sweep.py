"""``workbench sweep``: average causal traces over a facts file, resumable in an output folder."""

from __future__ import annotations

from . import add_model_arg, add_scale_args, nonnegative_int
from .trace import add_trace_args, parse_noise_arg


def register(sub) -> None:
    p = sub.add_parser("sweep", help="average indirect effects over many facts (resumable)")
    add_model_arg(p)
    p.add_argument("--facts", default="toy-facts", help="'toy-facts' or a CounterFact / known_1000 JSON file")
    p.add_argument("--split", choices=("counterfact", "known"), default="counterfact",
                   help="for toy-facts: which file of the bundled world")
    p.add_argument("--corrupt", choices=("subject", "relation"), default="subject", help="what to corrupt")
    p.add_argument("--out", required=True, help="folder for per-fact results; rerunning resumes there")
    p.add_argument("--limit", type=nonnegative_int, default=None, help="only the first N facts (N >= 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_trace_args(p)
    add_scale_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import pandas as pd

    from ..facts import load_facts
    from ..loading import load_model
    from ..scale import check_workers
    from ..tracing import trace_dataset

    check_workers(args.workers, args.ray_address)  # before loading anything
    model = load_model(args.model, device=args.device)
    facts = load_facts(args.facts, split=args.split)
    if args.limit is not None:
        facts = facts[: args.limit]
    res = trace_dataset(model, facts, corrupt=args.corrupt, kinds=tuple(args.kinds), out=args.out,
                        samples=args.samples, noise=parse_noise_arg(args.noise), window=args.window, seed=args.seed,
                        precision=args.precision, replace=args.replace, engine=args.engine, prepend_bos=args.prepend_bos,
                        progress=not args.no_progress, workers=args.workers, ray_address=args.ray_address,
                        method=args.method)
    print(f"{res.n_facts} facts, {res.n_skipped} skipped (clean prediction wrong); corrupted: {res.corrupt}; "
          f"noise level {res.noise_level:.4g}; mean p_clean {res.p_clean:.4f}, p_corrupt {res.p_corrupt:.4f}"
          + ("" if res.method == "exact" else f"; method {res.method} (first-order estimates)"))
    print("samples per bucket:", ", ".join(f"{k}: {v}" for k, v in res.counts.items()))
    with pd.option_context("display.width", 200, "display.max_columns", 60, "display.precision", 4):
        for kind in res.kinds:
            print(f"\naverage indirect effect, {kind} (rows: positions, columns: layers)")
            print(res.aie[kind].to_string(float_format=lambda v: f"{v:+.4f}"))
    print(f"\nper-fact results in {args.out}/facts.jsonl")
    return 0

"""``workbench reproduce``: the paper's Tables 1 and 2 (and the full 2x2 table) on a model.

Every fact is edited once per (method, locus), scored on the entity, relation and locality
probe families (:mod:`workbench.evaluation`), and reverted. Results go to ``--out``:
``details.jsonl`` (one row per edit, written as it finishes; rerunning with the same
``--out`` resumes), ``summary.csv``, and the tables ``table1_relation_edits``,
``table2_entity_edits``, ``table_2x2`` (accuracy, the paper's metric) and their ``_score``
twins (CounterFact score), each as ``.csv`` and ``.md``, in the paper's column order
(entity reliability, entity generality, relation reliability, relation generality) with a
locality column added; percentages with two decimals.
"""

from __future__ import annotations

from . import add_bos_arg, add_model_arg


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's Table 1 (relation edits) and Table 2 (entity edits)",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    add_model_arg(p)
    p.add_argument("--facts", "-f", default="toy-facts",
                   help="'toy-facts' (the bundled world's CounterFact split) or a CounterFact JSON file")
    p.add_argument("--out", "-o", required=True, help="output folder (resumable)")
    p.add_argument("-n", type=int, default=100, help="facts per (method, locus) cell, a seeded sample (default 100; "
                                                      "0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fact sample (default 0)")
    p.add_argument("--methods", default="ft,kn,rome,memit", help="comma-separated methods (default ft,kn,rome,memit)")
    p.add_argument("--loci", default="subject,relation", help="comma-separated edit loci (default subject,relation)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_bos_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation import evaluate, to_markdown, paper_table, write_tables
    from ..facts import load_facts
    from ..loading import load_model

    model = load_model(args.model, device=args.device)
    facts = load_facts(args.facts)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    loci = [m.strip() for m in args.loci.split(",") if m.strip()]
    summary = evaluate(model, facts, methods=methods, loci=loci, n=args.n or None, out=args.out, seed=args.seed,
                       raise_errors=bool(args.debug), progress=not args.no_progress, prepend_bos=args.prepend_bos)
    written = write_tables(summary, args.out, model_name=f" ({args.model})")
    for locus, title in (("relation", "Table 1: relation-based edits"), ("subject", "Table 2: entity-based edits")):
        if locus in loci:
            print(to_markdown(paper_table(summary, locus), f"{title} (accuracy, %)"))
    errors = int(summary[("n", "errors")].sum())
    if errors:
        print(f"{errors} edit(s) failed; see the 'error' field of {args.out}/details.jsonl")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0

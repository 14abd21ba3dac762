"""``workbench reproduce``: the paper's Tables 1 and 2 (and the full cube) on a model.

Every sampled fact is edited once per (method, request perspective, key locus), scored on its
probe families (:mod:`workbench.evaluation`: entity- and relation-phrased families, bleed onto
other subjects of the relation, bleed-adjusted transfer, the subject's other relations, locality), and reverted. The request perspective is how the
edit is posed (``entity``: subject-first prompt; ``relation``: relation-first prompt), the locus
where token-keyed methods read their key. By default each request gets the paper's locus
(entity -> subject, relation -> relation); ``--loci subject,relation,relation_before_subject``
evaluates every combination (the full cube).

Results go to ``--out``: ``details.jsonl`` (one row per edit, written as it finishes; rerunning
with the same ``--out`` resumes), ``summary.csv``, and the tables ``table1_relation_requests``,
``table2_entity_requests`` and ``cube`` (accuracy) with ``_tok`` (per-token accuracy) and
``_score`` (CounterFact score) twins, each ``.csv`` and ``.md``: means over edits with 95%
bootstrap intervals, ``n`` edits scored and ``failed`` edits per row.
"""

from __future__ import annotations

import time

from . import add_bos_arg, add_model_arg, add_presets_arg, add_scale_args, add_stats_arg, nonnegative_int


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="the paper's Table 1 (relation-based requests) and Table 2 (entity-based)",
                       description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    add_model_arg(p)
    p.add_argument("--facts", "-f", default="toy-facts",
                   help="'toy-facts' (the bundled world's CounterFact split) or a CounterFact JSON file")
    p.add_argument("--out", "-o", required=True, help="output folder (resumable)")
    p.add_argument("-n", type=nonnegative_int, default=100, help="facts per cell, a seeded sample (default 100; 0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fact sample and bleed subjects (default 0)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods (default: every registered one, in the paper's order "
                        "FT, KN, MEND, ROME, MEMIT)")
    p.add_argument("--requests", default="entity,relation",
                   help="comma-separated request perspectives (default entity,relation)")
    p.add_argument("--loci", default="paired",
                   help="'paired' (entity->subject, relation->relation; default) or comma-separated key loci "
                        "from subject,relation,relation_before_subject, evaluated for every request")
    p.add_argument("--kn-preset", default=None,
                   help="KN preset: kn-original (default), kn-subject or kn-calibrated (the kn-subject rows are "
                        "their own method, kn-subject)")
    p.add_argument("--ft-preset", default=None,
                   help="FT preset: ft-gpt2-xl, ft-gpt-j, ft-toy, ft-generic (default: by the model's identity)")
    p.add_argument("--mend-editor", default=None,
                   help="MEND editor (file or `workbench train-mend` output folder, or a .pt checkpoint of the "
                        "originals' code; default: the one shipped for the bundled model)")
    p.add_argument("--bleed-subjects", type=int, default=5,
                   help="other subjects of the relation probed for bleed per fact (x 2 phrasings; default 5)")
    p.add_argument("--other-relations", type=nonnegative_int, default=None,
                   help="the subject's facts of other relations probed per fact (x 2 phrasings; default: all)")
    p.add_argument("--corpus", default=None,
                   help="covariance corpus of ROME and MEMIT: a text file (one text per line), 'toy-facts', or a "
                        "datasets name (default: the bundled world for toy-facts, else wikitext, which needs the hub)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_bos_arg(p)
    add_presets_arg(p)
    add_stats_arg(p)
    add_scale_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation import evaluate, paper_table, to_markdown, write_tables
    from ..facts import load_facts
    from ..loading import load_model
    from ..scale import check_workers

    from ..evaluation.methods import check_method_kwargs

    start = time.perf_counter()
    check_workers(args.workers, args.ray_address)  # before loading anything
    check_method_kwargs({"kn": {"preset": args.kn_preset}, "ft": {"preset": args.ft_preset}})
    model = load_model(args.model, device=args.device)
    facts = load_facts(args.facts)
    methods = _split(args.methods) if args.methods else None
    requests = _split(args.requests)
    loci = None if args.loci.strip() == "paired" else _split(args.loci)
    kwargs: dict[str, dict] = {}
    if args.kn_preset:
        kwargs["kn"] = {"preset": args.kn_preset}
    if args.ft_preset:
        kwargs["ft"] = {"preset": args.ft_preset}
    if args.corpus:
        from ..editing.corpus import resolve_corpus

        resolve_corpus(model, args.corpus)  # a missing file fails here, not once per edit
        for m in ("rome", "memit"):
            if methods is None or m in methods:
                kwargs[m] = {"hparams": {"mom2_dataset": args.corpus}}
    if args.stats_npz:
        from ..editing.stats import check_npz_source

        check_npz_source(args.stats_npz)  # a missing path fails here, not once per edit
        for m in ("rome", "memit"):
            if methods is None or m in methods:
                kwargs.setdefault(m, {})["stats"] = args.stats_npz
    if args.mend_editor:
        kwargs["mend"] = {"editor": args.mend_editor}
    summary = evaluate(model, facts, methods=methods, requests=requests, loci=loci, n=args.n or None, out=args.out,
                       seed=args.seed, method_kwargs=kwargs, bleed_subjects_per_fact=args.bleed_subjects,
                       other_relations_per_fact=args.other_relations,
                       raise_errors=bool(args.debug), progress=not args.no_progress, prepend_bos=args.prepend_bos,
                       workers=args.workers, ray_address=args.ray_address, strict_presets=args.strict_presets)
    written = write_tables(summary, args.out, model_name=f" ({args.model})")
    for request, title in (("relation", "Table 1: relation-based requests"), ("entity", "Table 2: entity-based requests")):
        if request in requests:
            print(to_markdown(paper_table(summary, request), f"{title} (accuracy, %, mean [95% interval])"))
    failed = int(summary[("n", "failed")].sum())
    if failed:
        print(f"{failed} edit(s) failed; see the 'error' field of {args.out}/details.jsonl")
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"reproduce took {time.perf_counter() - start:.0f} s")
    dead = all_failed(summary.attrs.get("details"))
    if dead:
        import sys

        what = "; ".join(f"{m}: all {n} edit(s) failed (first error: {e})" for m, n, e in dead)
        print(f"workbench reproduce: error: {what}; see {args.out}/details.jsonl", file=sys.stderr)
        return 1
    return 0


def all_failed(details) -> list[tuple[str, int, str]]:
    """``(method, n, first error)`` for each method every one of whose edits failed in ``details``."""
    from ..evaluation import BASELINE

    if details is None or len(details) == 0 or "failed" not in details:
        return []
    out = []
    for method, rows in details[details["method"] != BASELINE].groupby("method", sort=False):
        if len(rows) and rows["failed"].astype(bool).all():
            errors = rows["error"].dropna() if "error" in rows else []
            first = " ".join(str(errors.iloc[0]).split())[:200] if len(errors) else "no error recorded"
            out.append((str(method), len(rows), first))
    return out

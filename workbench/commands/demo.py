"""``workbench demo``: one self-contained HTML report of tracing and editing a model."""

from __future__ import annotations

from . import add_model_arg, add_presets_arg


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="trace a few facts from both perspectives (and edit one) into one offline HTML report",
        description="Trace a handful of facts with the subject and with the relation corrupted, average the "
                    "maps over a small sweep, run severed traces and one ROME edit, and write everything into "
                    "one self-contained HTML file that opens offline in a browser.")
    add_model_arg(p)
    add_presets_arg(p)
    p.add_argument("--out", "-o", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--facts", default=None,
                   help="facts file (CounterFact or known_1000 JSON); default: the bundled world's facts")
    p.add_argument("--prompts", type=int, default=4, help="prompts traced one by one, per perspective (default 4)")
    p.add_argument("--sweep", type=int, default=24, help="facts per averaged-map sweep (default 24)")
    p.add_argument("--samples", type=int, default=10, help="noise samples per trace (default 10)")
    p.add_argument("--noise", default="s3", help="noise rule: 's3' (default), a number, or 'u<x>'")
    p.add_argument("--window", type=int, default=None,
                   help="layers restored together by MLP/attention cells (default min(10, ceil(n_layers/2)): "
                        "ROME's 10, at most half the model's depth)")
    p.add_argument("--seed", type=int, default=1, help="noise seed (default 1)")
    p.add_argument("--no-edit", action="store_true", help="skip the editing section")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for small models on CPU, where more threads only add "
                        "synchronisation cost, and much more so on a busy machine; torch's default otherwise)")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from ..facts import load_facts
    from ..loading import load_model
    from ..report import build_report, write_report

    started = time.perf_counter()
    model = load_model(args.model, device=args.device)
    _set_threads(model, args.threads)
    facts = load_facts(args.facts or "toy-facts")
    try:
        noise = float(args.noise)
    except ValueError:
        noise = args.noise
    html = build_report(model, facts, n_prompts=args.prompts, n_sweep=args.sweep, samples=args.samples,
                        noise=noise, window=args.window, seed=args.seed, edit=not args.no_edit,
                        log=None if getattr(args, "quiet", False) else print)
    path = write_report(html, args.out)
    print(f"wrote {path.resolve()} ({len(html) / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s; "
          "open it in a browser (works offline)")
    return 0


SMALL_MODEL_PARAMS = 50_000_000
"""Below this many parameters a CPU forward pass is too small to gain from several threads."""


def _set_threads(model, threads: int | None) -> None:
    import torch

    from ..loading import model_info

    if threads is None:
        info = model_info(model, config_check=False)
        if info["device"] != "cpu" or info["params"] >= SMALL_MODEL_PARAMS:
            return
        threads = 1
    torch.set_num_threads(max(1, threads))

"""Speed of causal tracing: each engine against one forward pass per cell, per model shape.

For every ``--shapes`` entry, in one run, the three maps (hidden, mlp, attn) of one prompt:

* ``incremental`` -- the default engine (the model's own blocks, rows restarted at their
  first differing layer and token), exact float32, timed ``--repeats`` times;
* ``batched`` -- TransformerBridge forward passes with (cell x sample) rows;
* ``loop`` -- the original algorithm, one forward pass of S+1 rows per cell;

* ``attribution`` -- ``trace(method="attribution")``, every cell's first-order estimate from one
  forward and one backward pass of the corrupted runs (``--no-attribution`` skips it); its
  agreement with the exact maps is the Spearman rank correlation of the indirect effects per
  kind (hidden/mlp/attn) over the cells from the first corrupted token on.

``batched`` and ``loop`` are timed on ``--sample-cells`` random cells and extrapolated to all
cells (they cost the same per cell); every engine's numbers are checked against the others.
A table of wall times, speed-ups and agreement closes the output. ``--precision fast`` adds
bfloat16 autocast (CUDA) timings and drift (on CPU ``fast`` is float32, the same as exact).

    python benchmarks/trace_speed.py                                    # CPU: gpt2 and llama shapes
    python benchmarks/trace_speed.py --shapes toy --repeats 5           # the bundled model
    python benchmarks/trace_speed.py --device cuda --shapes gpt2-xl gpt-j --precision exact fast
    python benchmarks/trace_speed.py --shapes gpt2-xl gpt-j --layers 2 --repeats 1   # the widths, on a CPU

Random weights, the bundled tokenizer's vocabulary (about 1.2k tokens, so the unembedding is
cheaper than a real model's 50k). ``gpt2``/``gpt2-xl``: GPT-2 small / XL; ``llama``: a
Llama-shaped 12x768 model with grouped-query attention (4 key/value heads), SwiGLU d_mlp 2048;
``gpt-j``: GPT-J-6B's shape (28x4096, rotary, parallel attention/MLP).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

PROMPT, SUBJECT = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"
SHAPES = {
    "gpt2": ("gpt2", dict(n_layers=12, d_model=768, n_heads=12, n_ctx=1024)),
    "llama": ("llama", dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=4, d_mlp=2048, n_ctx=1024)),
    "gpt2-xl": ("gpt2", dict(n_layers=48, d_model=1600, n_heads=25, n_ctx=1024)),
    "gpt-j": ("gptj", dict(n_layers=28, d_model=4096, n_heads=16, d_mlp=16384, n_ctx=2048)),
}


def build(shape: str, device: str, layers: int | None = None):
    from workbench.architecture import random_bridge
    from workbench.facts import load_facts
    from workbench.loading import assets_dir, load_model

    if shape == "toy":
        if (assets_dir() / "toy-facts" / "model.safetensors").exists():
            model = load_model("toy-facts", device=device)
            fact = load_facts("toy-facts")[0]
            return model, fact.prompt, fact.subject, "bundled toy-facts model"
        shape = "gpt2"
    model_type, sizes = SHAPES[shape]
    if layers:
        sizes = {**sizes, "n_layers": layers}
    model = random_bridge(model_type, device=device, **sizes)
    return model, PROMPT, SUBJECT, f"random {shape} shape ({sizes['n_layers']}x{sizes['d_model']}, {model_type})"


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench_shape(shape: str, args) -> list[dict]:
    from workbench.tracing import trace
    from workbench.tracing.api import prepare
    from workbench.tracing.engine import KINDS, Plan, kind_plan

    model, prompt, subject, what = build(shape, args.device, args.layers)
    n_layers = model.cfg.n_layers
    from workbench.tracing.window import resolve_window

    window = resolve_window(model, args.window)
    kw = dict(subject=subject, samples=args.samples, kinds=KINDS, window=window)
    print(f"\n== {what}; prompt {prompt!r}; samples {args.samples}; window {window}", flush=True)
    rows = []
    for precision in args.precision:
        if args.warmup:
            trace(model, prompt, engine="incremental", precision=precision, **kw)
        runs, cpus = [], []
        for _ in range(args.repeats):
            res, wall, cpu = timed(lambda: trace(model, prompt, engine="incremental", precision=precision, **kw),
                                   args.device)
            runs.append(wall)
            cpus.append(cpu)
        n_tokens = len(res.tokens)
        best = min(runs)
        print(f"incremental ({precision}): wall {', '.join(f'{w:.3f}' for w in runs)} s (best {best:.3f}, "
              f"median {statistics.median(runs):.3f}); cpu {', '.join(f'{c:.3f}' for c in cpus)} s", flush=True)
        rows.append({"shape": shape, "engine": "incremental", "precision": precision, "seconds": best,
                     "cpu": min(cpus), "runs": len(runs), "extrapolated": False, "diff": 0.0})
        if precision != "exact":
            exact = next(r for r in rows if r["engine"] == "incremental" and r["precision"] == "exact")
            rows[-1]["diff"] = float(max(np.abs(res.scores[k] - exact_scores[k]).max() for k in KINDS))
            print(f"  max |p diff| vs exact {rows[-1]['diff']:.2e}; speed-up vs exact {exact['seconds'] / best:.2f}x")
            continue
        exact_scores = res.scores
        if args.attribution:
            rows.append(bench_attribution(model, prompt, subject, shape, res, kw, args))
        plan = Plan.concat([kind_plan(k, range(n_tokens), n_layers, window) for k in KINDS])
        flat = np.concatenate([res.scores[k].reshape(-1) for k in KINDS])
        pick = np.arange(len(plan))
        if args.sample_cells and args.sample_cells < len(plan):
            pick = np.sort(np.random.RandomState(0).choice(len(plan), args.sample_cells, replace=False))
        print(f"cells: {len(plan)} ({n_tokens} tokens x {n_layers} layers x 3 kinds); batched/loop timed on "
              f"{len(pick)}" + (" and extrapolated" if len(pick) < len(plan) else ""), flush=True)
        for engine in ("batched", "loop"):
            prep = prepare(model, prompt, subject=subject, samples=args.samples, engine=engine, precision=precision)
            answer = prep.resolve_answer(model, None)
            prep.engine.ensure_corrupted()
            out, wall, cpu = timed(lambda: prep.engine.run(plan.take(pick), answer), args.device)
            total, total_cpu = wall * len(plan) / len(pick), cpu * len(plan) / len(pick)
            diff = float(np.abs(out - flat[pick]).max())
            print(f"{engine}: {total:.3f} s for all cells ({wall:.3f} s for {len(pick)}); max |diff| vs incremental "
                  f"{diff:.2e}", flush=True)
            rows.append({"shape": shape, "engine": engine, "precision": precision, "seconds": total,
                         "cpu": total_cpu, "runs": 1,
                         "extrapolated": len(pick) < len(plan), "diff": diff})
    del model
    return rows


def bench_attribution(model, prompt: str, subject: str, shape: str, exact, kw: dict, args) -> dict:
    """Time ``trace(method="attribution")`` and compare its maps with the exact ones."""
    from workbench.tracing import trace

    run = lambda: trace(model, prompt, method="attribution", precision="exact", **kw)  # noqa: E731
    if args.warmup:
        run()
    walls, cpus = [], []
    for _ in range(args.repeats):
        res, wall, cpu = timed(run, args.device)
        walls.append(wall)
        cpus.append(cpu)
    from workbench.tracing.attribution import agreement

    agree = agreement(exact, res)
    rho = {k: a.spearman for k, a in agree.items()}
    top = {k: a.top_cell_same for k, a in agree.items()}
    print(f"attribution: wall {', '.join(f'{w:.3f}' for w in walls)} s; Spearman vs exact "
          + ", ".join(f"{k} {rho[k]:.2f} (top cell {'same' if top[k] else 'differs'})" for k in exact.kinds),
          flush=True)
    return {"shape": shape, "engine": "attribution", "precision": "exact", "seconds": min(walls), "cpu": min(cpus),
            "runs": len(walls), "extrapolated": False, "diff": None, "rho": rho}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shapes", nargs="+", choices=("toy", *SHAPES), default=["gpt2", "llama"])
    ap.add_argument("--precision", nargs="+", choices=("exact", "fast"), default=["exact"])
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of the incremental engine (default 2)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=None,
                    help="restoration window of the mlp/attn maps (default: the model's, min(10, ceil(n_layers / 2)): "
                         "the originals' 10 on GPT-2 XL and GPT-J)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, cores))")
    ap.add_argument("--sample-cells", type=int, default=24,
                    help="cells the batched and loop engines are timed on (extrapolated; 0 = all)")
    ap.add_argument("--layers", type=int, default=None,
                    help="override the shapes' number of layers (e.g. 2: GPT-J's width on a CPU)")
    ap.add_argument("--no-attribution", dest="attribution", action="store_false",
                    help="skip trace(method='attribution')")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: no CUDA device is visible to torch {torch.__version__}")
    if "exact" not in args.precision:
        args.precision = ["exact", *args.precision]

    torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"CPU, {torch.get_num_threads()} thread(s)")
    print(f"device: {device}")
    rows = [r for shape in args.shapes for r in bench_shape(shape, args)]

    print(f"\n| shape | engine | precision | wall s | cpu s | vs one forward per cell (wall / cpu) | "
          f"vs exact: max abs diff, or Spearman hidden/mlp/attn |   ({device})")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        loop = next(x for x in rows if x["shape"] == r["shape"] and x["engine"] == "loop")
        note = " (extrapolated)" if r["extrapolated"] else f" (best of {r['runs']})"
        agree = ("/".join(f"{v:.2f}" for v in r["rho"].values()) if r.get("rho") is not None
                 else f"{r['diff']:.1e}")
        print(f"| {r['shape']} | {r['engine']} | {r['precision']} | {r['seconds']:.3f}{note} | {r['cpu']:.3f} | "
              f"{loop['seconds'] / r['seconds']:.1f}x / {loop['cpu'] / r['cpu']:.1f}x | {agree} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

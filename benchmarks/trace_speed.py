"""Speed of causal tracing: the workbench engine against one forward pass per cell.

Times, in one run, the three maps (hidden, mlp, attn) of one prompt

* with ``workbench.trace`` (default engine, exact float32), ``--repeats`` times;
* with the batched TransformerBridge engine (the reference the fast engine is tested against);
* with the original algorithm: one forward pass of S+1 rows per cell (``engine="loop"``);

prints the seconds and the ratio, and how far ``precision="fast"`` (bfloat16 autocast on
CUDA; identical to exact on CPU) and ``"bf16"`` drift from exact.

    python benchmarks/trace_speed.py                       # CPU, bundled model (else random 6x128)
    python benchmarks/trace_speed.py --device cuda --shape gpt2-xl --loop-cells 200
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
SHAPES = {"gpt2": (12, 768, 12), "gpt2-xl": (48, 1600, 25)}


def build(shape: str, device: str):
    from workbench.facts import load_facts
    from workbench.loading import assets_dir, load_model, random_model

    if shape == "toy":
        if (assets_dir() / "toy-facts" / "model.safetensors").exists():
            model = load_model("toy-facts", device=device)
            fact = load_facts("toy-facts")[0]
            return model, fact.prompt, fact.subject, "bundled toy-facts model"
        return random_model(6, 128, 4, device=device), PROMPT, SUBJECT, "random 6x128 (bundled model missing)"
    L, d, h = SHAPES[shape]
    return random_model(L, d, h, n_ctx=1024, device=device), PROMPT, SUBJECT, f"random {shape} shape ({L}x{d})"


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=("toy", "gpt2", "gpt2-xl"), default="toy")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the workbench engine (default 3)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, cores))")
    ap.add_argument("--loop-cells", type=int, default=None,
                    help="time the one-cell-per-forward loop on this many random cells and extrapolate")
    ap.add_argument("--skip-batched", action="store_true", help="do not time the batched bridge engine")
    args = ap.parse_args(argv)

    from workbench.tracing import trace
    from workbench.tracing.api import prepare
    from workbench.tracing.engine import KINDS, Plan, kind_plan

    torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    model, prompt, subject, what = build(args.shape, args.device)
    n_layers = model.cfg.n_layers
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    kw = dict(subject=subject, samples=args.samples, kinds=KINDS)
    print(f"model: {what}; device: {dev_name}; prompt: {prompt!r}; samples {args.samples}")

    trace(model, prompt, **kw)  # warm-up
    runs = []
    for _ in range(args.repeats):
        res, wall, cpu = timed(lambda: trace(model, prompt, **kw), args.device)
        runs.append((wall, cpu))
    n_tokens = len(res.tokens)
    cells = len(KINDS) * n_tokens * n_layers
    best = min(w for w, _ in runs)
    print(f"cells: {cells} ({n_tokens} tokens x {n_layers} layers x 3 kinds), {cells * args.samples} rows")
    print(f"workbench (engine auto, exact): wall {', '.join(f'{w:.3f}' for w, _ in runs)} s "
          f"(best {best:.3f}, median {statistics.median(w for w, _ in runs):.3f}); "
          f"cpu {', '.join(f'{c:.3f}' for _, c in runs)} s")

    if not args.skip_batched:
        bat, wall, cpu = timed(lambda: trace(model, prompt, engine="batched", **kw), args.device)
        drift = max(np.abs(bat.scores[k] - res.scores[k]).max() for k in KINDS)
        print(f"batched bridge engine: wall {wall:.3f} s, cpu {cpu:.3f} s; max |diff| vs workbench {drift:.2e}")

    prep = prepare(model, prompt, subject=subject, samples=args.samples, engine="loop")
    answer = prep.resolve_answer(model, None)
    plan = Plan.concat([kind_plan(k, range(n_tokens), n_layers, 10) for k in KINDS])
    if args.loop_cells and args.loop_cells < len(plan):
        pick = np.random.RandomState(0).choice(len(plan), args.loop_cells, replace=False)
        sub = plan.take(pick)
    else:
        pick, sub = None, plan
    ref, wall, cpu = timed(lambda: prep.engine.run(sub, answer), args.device)
    scale = len(plan) / len(sub)
    flat = np.concatenate([res.scores[k].reshape(-1) for k in KINDS])
    diff = np.abs(ref - (flat if pick is None else flat[pick])).max()
    est = " (extrapolated)" if scale > 1 else ""
    print(f"one forward per cell (original algorithm): wall {wall * scale:.3f} s{est}, cpu {cpu * scale:.3f} s; "
          f"max |diff| vs workbench {diff:.2e}")
    print(f"speed-up, wall: {wall * scale / best:.1f}x   (cpu time: {cpu * scale / min(c for _, c in runs):.1f}x)")

    span = res.p_clean - res.p_corrupt
    for precision in ("fast", "bf16"):
        other, wall, _ = timed(lambda: trace(model, prompt, precision=precision, **kw), args.device)
        d = max(np.abs(other.scores[k] - res.scores[k]).max() for k in KINDS)
        rel = f" ({d / span:.2%} of p_clean - p_corrupt)" if span > 1e-4 else ""
        print(f"precision={precision}: wall {wall:.3f} s; max |p diff| vs exact {d:.2e}{rel}; "
              f"answer same: {other.answer_id == res.answer_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``workbench trace``: causal trace of one prompt, with a readable summary of the top cells."""

from __future__ import annotations

from . import add_bos_arg, add_model_arg, positive_int

KIND_CHOICES = ("hidden", "mlp", "attn")


def add_trace_args(p) -> None:
    """Options shared by ``trace`` and ``sweep``."""
    p.add_argument("--kinds", nargs="+", choices=KIND_CHOICES, default=list(KIND_CHOICES),
                   help="what to restore: hidden states, MLP outputs, attention outputs (default: all)")
    p.add_argument("--samples", type=positive_int, default=10, help="noise samples per cell (default 10)")
    p.add_argument("--noise", default="s3",
                   help="noise: a number (nu), 's<x>' (x times the subject-embedding std, default s3) or 'u<x>'")
    p.add_argument("--replace", action="store_true", help="replace the corrupted embeddings by noise instead of adding")
    p.add_argument("--window", type=int, default=None,
                   help="layers restored around each mlp/attn cell (default min(10, ceil(n_layers/2)): ROME's 10, "
                        "at most half the model's depth)")
    p.add_argument("--seed", type=int, default=1, help="seed of the NumPy noise draw (default 1)")
    p.add_argument("--precision", choices=("exact", "fast", "bf16"), default="exact",
                   help="exact float32 (default), fast = bfloat16 on GPU, bf16 everywhere")
    p.add_argument("--engine", choices=("auto", "incremental", "batched", "loop"), default="auto",
                   help="tracing engine of exact cells (default auto)")
    p.add_argument("--method", choices=("exact", "attribution"), default="exact",
                   help="exact: restore every cell (default); attribution: estimate every cell to first order from "
                        "one forward and one backward pass per noise sample (attribution patching)")
    add_bos_arg(p)


def parse_noise_arg(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def register(sub) -> None:
    p = sub.add_parser("trace", help="causal trace of one prompt (where can the answer be restored?)")
    add_model_arg(p)
    p.add_argument("--prompt", "-p", required=True, help="the prompt text")
    p.add_argument("--subject", "-s", default=None, help="the subject inside the prompt")
    p.add_argument("--corrupt", default="subject",
                   help="what to corrupt: subject (default), relation, or a substring of the prompt")
    p.add_argument("--answer", default=None, help="score this object instead of the clean top-1 token")
    p.add_argument("--top", type=positive_int, default=5, help="cells to show per kind (default 5)")
    p.add_argument("--json", default=None, help="write the full result to this JSON file")
    add_trace_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loading import load_model
    from ..tracing import trace

    model = load_model(args.model, device=args.device)
    res = trace(model, args.prompt, subject=args.subject, corrupt=args.corrupt, kinds=tuple(args.kinds),
                samples=args.samples, noise=parse_noise_arg(args.noise), window=args.window, answer=args.answer,
                seed=args.seed, precision=args.precision, replace=args.replace, engine=args.engine,
                prepend_bos=args.prepend_bos, method=args.method)
    print(summary(res, args.top))
    if args.json:
        res.save_json(args.json)
        print(f"wrote {args.json}")
    return 0


def summary(res, top: int = 5) -> str:
    """A few lines: tokens with the corrupted ones marked, the probabilities, the top cells per kind."""
    marks = " ".join(f"[{t}]" if i in res.corrupted_span else t for i, t in enumerate(res.tokens))
    lines = [
        f"prompt:    {res.prompt!r}",
        f"tokens:    {marks}   ([..] corrupted, noise level {res.noise_level:.4g}, {res.samples} samples)",
        f"answer:    {res.answer!r} (token {res.answer_id})   p_clean {res.p_clean:.4f}   "
        f"p_corrupt {res.p_corrupt:.4f}",
    ]
    if res.method != "exact":
        lines.append(f"method:    {res.method} (first-order estimates of the cells, not restorations)")
    for kind in res.kinds:
        lines.append(f"{kind}: top {top} cells by indirect effect (p_restored - p_corrupt)")
        for t, layer, p, ie in res.top_cells(kind, top):
            lines.append(f"  token {t:3d} {res.tokens[t]!r:>16}  layer {layer:3d}   p {p:.4f}   IE {ie:+.4f}")
    return "\n".join(lines)

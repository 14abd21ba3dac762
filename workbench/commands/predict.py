"""``workbench predict``: the top next tokens of a prompt."""

from __future__ import annotations

from . import add_model_arg, positive_int


def register(sub) -> None:
    p = sub.add_parser("predict", help="top-k next tokens of a prompt with their probabilities")
    add_model_arg(p)
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("-k", type=positive_int, default=5, help="how many tokens to show (default 5)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..loading import load_model
    from ..predict import top_tokens

    model = load_model(args.model, device=args.device)
    print(f"{args.prompt!r} ->")
    for token, prob in top_tokens(model, args.prompt, k=args.k):
        print(f"  {prob:7.2%}  {token!r}")
    return 0

"""``workbench info``: the size of a model and its identity (what presets it gets, :mod:`workbench.identity`)."""

from __future__ import annotations

from . import add_model_arg


def register(sub) -> None:
    p = sub.add_parser("info", help="layers, d_model, vocabulary, parameters and device of a model")
    add_model_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..identity import model_identity
    from ..loading import load_model, model_info

    model = load_model(args.model, device=args.device)
    info = {**model_info(model), "identity": model_identity(model).label}
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    return 0

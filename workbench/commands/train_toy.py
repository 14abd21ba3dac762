"""``workbench train-toy``: rebuild the bundled synthetic-world model."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("train-toy", help="generate the synthetic world and train the bundled model on it",
                       add_help=False)
    p.add_argument("rest", nargs="*", help="options of `python -m workbench.toyworld.train` (see --help there)")
    p.set_defaults(func=run, passthrough=True)


def run(args) -> int:
    from ..toyworld.train import main

    return int(main(args.rest) or 0)

"""Subcommands of the ``workbench`` command line, one module each (see :mod:`workbench.cli`)."""

from __future__ import annotations

import argparse


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--model`` option shared by every subcommand that loads a model."""
    parser.add_argument("--model", "-m", default="toy-facts",
                        help="'toy-facts' (bundled, default), a local Hugging Face folder, or a hub name")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def add_bos_arg(parser: argparse.ArgumentParser) -> None:
    """``--prepend-bos/--no-prepend-bos``: BOS before every prompt (default: the model's convention;
    the original ROME/MEMIT code never prepends it)."""
    parser.add_argument("--prepend-bos", action=argparse.BooleanOptionalAction, default=None,
                        help="prepend BOS to every prompt (default: the model's convention; "
                             "--no-prepend-bos as the original ROME/MEMIT code)")


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0 (``--limit -5`` used to mean "all but the last 5")."""
    return _int_at_least(text, 0)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (``-k 0`` or ``--top -3`` would print nothing, or everything)."""
    return _int_at_least(text, 1)


def add_scale_args(parser: argparse.ArgumentParser) -> None:
    """``--workers`` / ``--ray``: run on Ray actors (the ``[scale]`` extra; see :mod:`workbench.scale`)."""
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="run on N Ray workers (one per GPU where the cluster has GPUs, else CPU workers); "
                             "needs pip install 'workbench[scale]'")
    parser.add_argument("--ray", default=None, metavar="ADDRESS", dest="ray_address",
                        help="address of a running Ray cluster (e.g. 'auto' or HEAD_IP:6379 after `ray start "
                             "--head`); default: a local Ray started for this run")


def add_presets_arg(parser: argparse.ArgumentParser) -> None:
    """``--strict-presets``: an unknown model (identified by its config) is an error, not a warning
    and the methods' generic presets (:func:`workbench.editing.presets.strict_presets`)."""
    parser.add_argument("--strict-presets", action="store_true",
                        help="refuse a model whose config is not a known model's (GPT-2 XL, GPT-J, the bundled "
                             "model, or one registered) instead of warning and using generic presets")


def add_stats_arg(parser: argparse.ArgumentParser) -> None:
    """``--stats-npz``: the originals' published covariance statistics (``layer_stats`` ``.npz`` files)."""
    parser.add_argument("--stats-npz", default=None, metavar="PATH",
                        help="ROME/MEMIT covariance from the originals' layer_stats .npz files: a folder holding "
                             "them (e.g. .../gpt2-xl/wikipedia_stats) or one file (one layer)")

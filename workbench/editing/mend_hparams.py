"""MEND's hyperparameters (the originals' names) and presets (reference §6a).

:class:`MendHyperParams` holds the network, edit and training settings. Presets: ``MEND_GPT2_XL``
and ``MEND_GPT_J`` (the originals' edited weights and learning rates, eric-mitchell/mend
``config/model/gpt2xl.yaml`` / ``gptj.yaml`` and ``config/alg/mend.yaml``), ``MEND_TOY`` for the
bundled model; they are registered with :mod:`workbench.editing.presets` (``mend:gpt2-xl``,
``mend:gpt-j``, ``mend:toy-facts``, and ``mend:generic`` for other models: the last three blocks),
and :func:`mend_hparams_for` picks one by the model's identity (its config, not its folder name).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Sequence

from .presets import HyperParameterError, register_presets, resolve, unknown_keys_error

EARLY_STOP_KEYS = ("loss", "edit_success")
"""What picks the best editor during training: ``"loss"``, the lowest validation loss cedit·edit +
cloc·loc (the originals' ``early_stop_key: loss/total_edit_val``), or ``"edit_success"``, the highest
validation edit success (locality breaks ties)."""

FACTOR_POSITIONS = ("all", "target")
"""Where the gradient factors (x_t, δ_t) are taken: ``"all"``, every position whose input and
output gradient are both nonzero (the originals: ``nz_mask`` in ``algs/mend.py``), or
``"target"``, only the positions whose logits predict the new object's tokens."""


# ----------------------------------------------------------------------------- hyperparameters
@dataclass
class MendHyperParams:
    """MEND's hyperparameters, with the originals' names (``config/alg/mend.yaml``, ``config.yaml``).

    Network: ``n_hidden`` (hidden residual layers; the network has n_hidden + 1), ``rank`` (of U V),
    ``init`` (``"id"``: U = 0, residual; ``"xavier"``), ``norm`` (running-mean/std normalisation of
    the factors), ``combine`` (one network over [x, δ] instead of one per factor), ``shared`` (one
    network per weight shape, with per-weight modes), ``act`` (only ``"relu"``).
    Edit: ``inner_params`` (HF names of the edited weights; ``None``: the MLP input and output
    projections of the last ``n_blocks`` blocks), ``edit_lr`` (initial step α), ``factor_positions``
    (:data:`FACTOR_POSITIONS`: ``"all"`` as the originals, or ``"target"``), ``prepend_bos`` (the BOS
    convention of training and edits; ``None``: :func:`~workbench.editing.hparams.editing_prepend_bos`).
    Training: ``lr`` (Adam on the network), ``lr_lr`` (Adam on the α's), ``cedit``/``cloc`` (loss
    weights), ``batch_size`` (edits per optimiser step; the originals accumulate 10 batches),
    ``grad_clip``, ``max_steps``, ``val_every`` (steps between validations), ``n_val`` (validation
    edits), ``early_stop_key`` (:data:`EARLY_STOP_KEYS`: what picks the best editor), ``early_stop_patience``
    (validations without improvement), ``checkpoint_every``, ``seed``.
    """

    inner_params: tuple[str, ...] | None = None
    n_blocks: int = 3
    edit_lr: float = 1e-4
    lr: float = 1e-6
    lr_lr: float = 1e-4
    cedit: float = 0.1
    cloc: float = 1.0
    n_hidden: int = 1
    rank: int = 1920
    init: str = "id"
    norm: bool = True
    combine: bool = True
    shared: bool = True
    act: str = "relu"
    batch_size: int = 10
    grad_clip: float = 100.0
    max_steps: int = 100_000
    val_every: int = 500
    n_val: int = 100
    early_stop_key: str = "loss"
    early_stop_patience: int = 4
    checkpoint_every: int = 50
    seed: int = 0
    factor_positions: str = "all"
    prepend_bos: bool | None = None  # BOS before every prompt (None: the model's editing convention)

    def __post_init__(self) -> None:
        if self.inner_params is not None:
            self.inner_params = tuple(self.inner_params)
            if not self.inner_params:
                raise HyperParameterError("inner_params is empty; name at least one weight (or None for the default)")
        if self.init not in ("id", "xavier"):
            raise HyperParameterError(f"init must be 'id' or 'xavier', not {self.init!r}")
        if self.factor_positions not in FACTOR_POSITIONS:
            raise HyperParameterError(f"factor_positions must be one of {FACTOR_POSITIONS}, not "
                                      f"{self.factor_positions!r}")
        if self.early_stop_key not in EARLY_STOP_KEYS:
            raise HyperParameterError(f"early_stop_key must be one of {EARLY_STOP_KEYS}, not {self.early_stop_key!r}")
        if self.act != "relu":
            raise HyperParameterError(f"act must be 'relu', not {self.act!r}")
        for name in ("n_hidden", "rank", "batch_size", "max_steps", "val_every", "n_val", "n_blocks",
                     "checkpoint_every"):
            low = 0 if name == "n_hidden" else 1
            if int(getattr(self, name)) < low:
                raise HyperParameterError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("lr", "lr_lr", "cedit", "cloc", "grad_clip"):
            if not float(getattr(self, name)) >= 0:
                raise HyperParameterError(f"{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["inner_params"] = list(self.inner_params) if self.inner_params is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MendHyperParams":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise unknown_keys_error("MendHyperParams", unknown, sorted(names))
        return cls(**d)

    def with_(self, **changes: Any) -> "MendHyperParams":
        return replace(self, **changes)


def _blocks(prefix: str, names: Sequence[str], layers: Sequence[int]) -> tuple[str, ...]:
    return tuple(f"{prefix}.{l}.mlp.{n}.weight" for l in layers for n in names)


# The originals' values. eric-mitchell/mend, config/alg/mend.yaml: edit_lr 1e-4, lr 1e-6, lr_lr 1e-4,
# mend.{n_hidden 1, rank 1920, init id, norm, combine, shared, act relu}; config/config.yaml: cedit 0.1,
# cloc 1.0, grad_clip 100; config/model/gpt2xl.yaml: inner_params c_proj, c_fc of blocks 45-47
# (in this order); config/model/gptj.yaml: fc_in, fc_out of blocks 25-27. Their Hugging Face
# tokenizers add no BOS. Factors over every position with nonzero input and gradient (algs/mend.py).
MEND_GPT2_XL = MendHyperParams(inner_params=_blocks("transformer.h", ("c_proj", "c_fc"), (45, 46, 47)),
                               edit_lr=1e-4, lr=1e-6, lr_lr=1e-4, cedit=0.1, cloc=1.0, prepend_bos=False)
"""The originals' GPT-2 XL setup (``config/model/gpt2xl.yaml`` + ``config/alg/mend.yaml``)."""

MEND_GPT_J = MendHyperParams(inner_params=_blocks("transformer.h", ("fc_in", "fc_out"), (25, 26, 27)),
                             edit_lr=1e-4, lr=1e-6, lr_lr=1e-4, cedit=0.1, cloc=1.0, prepend_bos=False)
"""The originals' GPT-J setup (``config/model/gptj.yaml`` + ``config/alg/mend.yaml``)."""

MEND_TOY = MendHyperParams(
    inner_params=_blocks("transformer.h", ("c_proj", "c_fc"), (3, 4, 5)),
    edit_lr=1e-4, lr=1e-4, lr_lr=1e-3, rank=128, batch_size=16, max_steps=600, val_every=50, n_val=96,
    early_stop_patience=3, checkpoint_every=25,
)
"""The bundled model (6 blocks of width 128): the last three blocks as in the originals' GPT-2 small
setup; rank 128 keeps the shipped editor small (two networks of width 640, ~2.6 MB); the
network and step learning rates are larger than GPT-2 XL's (a small model's factors are few and
its edits need steps ~100x edit_lr), chosen on training runs of the bundled model."""

MEND_PRESETS: dict[str, MendHyperParams] = {"gpt2-xl": MEND_GPT2_XL, "gpt-j": MEND_GPT_J, "toy-facts": MEND_TOY}
"""Model identity key -> MEND preset (:func:`mend_hparams_for` looks a model up here)."""

MEND_SOURCES: dict[str, str] = {
    "gpt2-xl": "eric-mitchell/mend config/model/gpt2xl.yaml, config/alg/mend.yaml, config/config.yaml",
    "gpt-j": "eric-mitchell/mend config/model/gptj.yaml, config/alg/mend.yaml, config/config.yaml",
}
"""Preset key -> the original files its values come from."""


register_presets("mend", by_model={k: (f"mend:{k}", v) for k, v in MEND_PRESETS.items()},
                 generic=lambda model: ("mend:generic", MendHyperParams()),
                 sources={f"mend:{k}": v for k, v in MEND_SOURCES.items()})


def mend_hparams_for(model) -> MendHyperParams:
    """MEND's preset for ``model`` by its identity (:func:`workbench.editing.presets.resolve`): GPT-2 XL,
    GPT-J, the bundled model; any other model gets the defaults (the last three blocks) with an
    :class:`~workbench.editing.presets.UnknownModelWarning` (an error under strict presets)."""
    return resolve("mend", model).hparams

"""ROME and MEMIT hyperparameters, with the original field names, and presets.

Field names follow ``rome/rome_hparams.py`` and ``memit/memit_hparams.py``. Module-name
fields of the originals (``rewrite_module_tmp`` etc.) are replaced by TransformerLens
hook names, which are the same for every model the bridge loads. Additions:

* ``mom2_n_tokens`` — how many tokens :func:`workbench.editing.stats.layer_stats` uses
  (the originals count ``mom2_n_samples`` Wikipedia articles; see ``stats.py``).
* ``mom2_dataset`` — a corpus spec for ``layer_stats`` (``None``: the model's default).
* ``context_templates`` — explicit templates (e.g. ``["{}"]``) instead of generated ones.
* ``seed`` — seed of the context-template sampling.
* ``context_template_scheme`` — ``"rome"`` or ``"memit"``: how the context templates are
  generated (:func:`workbench.editing.context.context_templates`); MEMIT's default is MEMIT's.
* ``prepend_bos`` — BOS before every prompt (``None``: the model's default). The originals
  never prepend it, so the GPT-2 XL and GPT-J presets say ``False``.

* ``mom2_n_samples`` — articles of an article corpus (``"wikipedia"``, ``"articles:FILE"``), as the originals.

Presets, by model identity (:mod:`workbench.identity`; registered with
:func:`workbench.editing.presets.register_presets`): ``gpt2-xl`` and ``gpt-j`` (``EleutherAI/gpt-j-6B``)
with the originals' values (reference §4-§5; source files in comments), ``toy-facts`` for the bundled
model (see ``TOY_NOTES``), and a generic preset for unknown models (warned about).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from .common import EditError

from .presets import HyperParameterError, editing_prepend_bos, register_presets, resolve, unknown_keys_error

ORIGINAL_EXTRAS = frozenset({"rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
                             "ln_f_module", "lm_head_module"})
"""Fields of the originals' hparams JSON files that hook names replace here; ``from_dict`` skips them."""


@dataclass
class _EditHyperParams:
    """Fields ROME and MEMIT share (the originals' names): the target optimisation, the covariance."""

    IGNORED_KEYS: ClassVar[frozenset] = ORIGINAL_EXTRAS

    layers: list[int] = field(default_factory=lambda: [17])
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 5e-1
    v_loss_layer: int | None = None  # None: the model's last layer (the originals' value: L - 1)
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    # KL term's direction. "original": KL(P ‖ P₀), what the originals' code computes
    # (F.kl_div(init, cur, log_target=True)) and ROME's paper writes; "reference": KL(P₀ ‖ P), as
    # the project's methods.md §4 states it. Default "original" so numbers match the originals.
    kl_direction: str = "original"
    mom2_adjustment: bool = True
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    mom2_dataset: Any = None
    mom2_n_samples: int = 100_000
    mom2_dtype: str = "float64"
    mom2_n_tokens: int = 100_000
    context_templates: list | None = None
    # "rome": prefixes sampled from BOS, length params [[5, 10], [10, 10]] (rome_main);
    # "memit": prefixes continuing "The", "Therefore", "Because", "I", "You" (memit_main).
    context_template_scheme: str = "rome"
    seed: int = 0
    # Prepend BOS to every prompt? None: the model's default (TransformerLens: yes). The
    # originals never do; the GPT-2 XL and GPT-J presets say False, the bundled model (trained
    # with BOS) keeps True.
    prepend_bos: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self):
        """Check every field's type and range; raises :class:`HyperParameterError`, returns ``self``."""
        name = type(self).__name__

        def bad(field_name: str, rule: str):
            return HyperParameterError(f"{name}.{field_name} = {getattr(self, field_name)!r}: {rule}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) or type(v).__name__.startswith(("int", "uint"))

        layers = self.layers
        if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
            raise bad("layers", "must be a list of layer indices")
        layers = list(layers)
        if not layers or not all(is_int(l) and int(l) >= 0 for l in layers):
            raise bad("layers", "must be a non-empty list of layer indices >= 0")
        if len(set(int(l) for l in layers)) != len(layers):
            raise bad("layers", "lists a layer twice; each layer can be edited once per edit")
        if not is_int(self.v_num_grad_steps) or self.v_num_grad_steps < 1:
            raise bad("v_num_grad_steps", "must be an integer >= 1 (the target vector needs at least one step)")
        for f in ("v_lr", "clamp_norm_factor"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise bad(f, "must be a finite number > 0")
        for f in ("v_weight_decay", "kl_factor"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise bad(f, "must be a finite number >= 0")
        if self.v_loss_layer is not None and (not is_int(self.v_loss_layer) or self.v_loss_layer < 0):
            raise bad("v_loss_layer", "must be None (the last layer) or a layer index >= 0")
        if self.kl_direction not in ("original", "reference"):
            raise bad("kl_direction", "must be 'original' or 'reference'")
        for f in ("mom2_n_samples", "mom2_n_tokens"):
            v = getattr(self, f)
            if not is_int(v) or v < 1:
                raise bad(f, "must be an integer >= 1")
        if self.context_templates is not None and (isinstance(self.context_templates, str)
                                                   or not len(self.context_templates)):
            raise bad("context_templates", "must be None or a non-empty list of templates with '{}'")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        """An instance from a dict of fields; the originals' module-name fields (:data:`ORIGINAL_EXTRAS`)
        are skipped, any other unknown key is an error that suggests the field meant."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in names and k not in ORIGINAL_EXTRAS]
        if unknown:
            raise unknown_keys_error(cls.__name__, unknown, names)
        return cls(**{k: v for k, v in d.items() if k in names})

    def with_(self, **changes: Any):
        """A copy with some fields changed."""
        return replace(copy.deepcopy(self), **changes)


@dataclass
class ROMEHyperParams(_EditHyperParams):
    """ROME (one rank-one update of ``W_out`` of each layer in ``layers``; usually one layer)."""


@dataclass
class MEMITHyperParams(_EditHyperParams):
    """MEMIT (spread the edits of many facts over the layers ``layers``)."""

    layers: list[int] = field(default_factory=lambda: [13, 14, 15, 16, 17])
    clamp_norm_factor: float = 0.75
    context_template_scheme: str = "memit"
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    layer_selection: str = "all"
    mom2_update_weight: float = 20_000.0

    def validate(self):
        super().validate()
        w = self.mom2_update_weight
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w <= 0:
            raise HyperParameterError(f"MEMITHyperParams.mom2_update_weight = {w!r}: must be a finite number > 0")
        return self


# ----------------------------------------------------------------------------- presets
# The originals' values; v_loss_layer = L - 1. mom2_n_tokens is this package's count (the originals
# count mom2_n_samples = 100,000 Wikipedia articles; see stats.py). mom2_dtype: the originals collect
# in float32, here E[kk^T] is accumulated in float64 (more exact; the field is informational).
# Source: kmeng01/rome hparams/ROME/gpt2-xl.json
ROME_GPT2_XL = ROMEHyperParams(layers=[17], v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=4,
                               kl_factor=0.0625, mom2_adjustment=True, v_loss_layer=47,
                               context_template_length_params=[[5, 10], [10, 10]], mom2_dataset="wikipedia",
                               mom2_n_samples=100_000, mom2_n_tokens=10_000_000, prepend_bos=False)
# Source: kmeng01/rome hparams/ROME/EleutherAI_gpt-j-6B.json
ROME_GPT_J = ROMEHyperParams(layers=[5], v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5, clamp_norm_factor=4,
                             kl_factor=0.0625, mom2_adjustment=True, v_loss_layer=27,
                             context_template_length_params=[[5, 10], [10, 10]], mom2_dataset="wikipedia",
                             mom2_n_samples=100_000, mom2_n_tokens=10_000_000, prepend_bos=False)
# Source: kmeng01/memit hparams/MEMIT/gpt2-xl.json
MEMIT_GPT2_XL = MEMITHyperParams(layers=[13, 14, 15, 16, 17], v_num_grad_steps=20, v_lr=0.5, v_weight_decay=0.5,
                                 clamp_norm_factor=0.75, kl_factor=0.0625, mom2_update_weight=20_000,
                                 layer_selection="all", v_loss_layer=47, mom2_dataset="wikipedia",
                                 mom2_n_samples=100_000, mom2_n_tokens=10_000_000, prepend_bos=False)
# Source: kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json
MEMIT_GPT_J = MEMITHyperParams(layers=[3, 4, 5, 6, 7, 8], v_num_grad_steps=25, v_lr=0.5, v_weight_decay=0.5,
                               clamp_norm_factor=0.75, kl_factor=0.0625, mom2_update_weight=15_000,
                               layer_selection="all", v_loss_layer=27, mom2_dataset="wikipedia",
                               mom2_n_samples=100_000, mom2_n_tokens=10_000_000, prepend_bos=False)

TOY_NOTES = """Bundled model (toy-facts, 6 layers) presets, read off the model's own traces (docs/results.md).
Subject corrupted (3σ, 10 samples, 300 known facts), the MLP AIE at the last subject token is 0.420 at
layer 0 with a window of 1 (0.040 or less at layers 1-5), and 0.427 / 0.431 / 0.125 at layers 0 / 1 / 2
with the default window of 3: the subject's facts are assembled by layer 0's MLP at the subject's last
token, where its first name (read by attention) meets its surname. So ROME edits layer 0's W_out, as
ROME edits GPT-2 XL's peak layer 17, and MEMIT spreads over the window's layers 0-1.
ROME efficacy over 50 known facts by layer (20 / 60 steps of the value optimisation): layer 0 92 / 98 %,
1 80 / 88 %, 2 94 / 94 %, 3 92 / 94 %; the bundled model is trained to near-certainty (the new object
starts at NLL ~14), so the originals' 20 steps at lr 0.5 often stop short of it, and the presets take 60.
λ (mom2_update_weight) = 100: the originals' 20,000 is calibrated to GPT-2 XL's keys and blocked every
edit on the previous bundled model (50 facts: efficacy 0.00; λ = 10 / 100 / 1000 gave 0.78 / 0.84 / 0.40
there). ROME_TOY over 200 known CounterFact facts (benchmarks/edit_efficacy.py -n 200): the new object is
the top-1 on the rewrite prompt for 98.5 %, on the paraphrases for 87.2 %, neighbourhood answers kept 94.5 %."""

ROME_TOY = ROMEHyperParams(layers=[0], v_num_grad_steps=60, mom2_n_tokens=200_000)
MEMIT_TOY = MEMITHyperParams(layers=[0, 1], v_num_grad_steps=60, mom2_update_weight=100.0, mom2_n_tokens=200_000)

ROME_PRESETS: dict[str, ROMEHyperParams] = {"gpt2-xl": ROME_GPT2_XL, "gpt-j": ROME_GPT_J, "toy-facts": ROME_TOY}
"""ROME's presets by model identity key (:mod:`workbench.identity`)."""
MEMIT_PRESETS: dict[str, MEMITHyperParams] = {"gpt2-xl": MEMIT_GPT2_XL, "gpt-j": MEMIT_GPT_J, "toy-facts": MEMIT_TOY}
"""MEMIT's presets by model identity key."""


def _generic_layers(model, n: int) -> list[int]:
    """Fallback layers for an unknown model: GPT-2 XL's relative depth (17/48 for ROME)."""
    L = int(model.cfg.n_layers)
    last = max(0, min(L - 1, round(17 / 48 * L)))
    return list(range(max(0, last - n + 1), last + 1))


def _rome_generic(model) -> tuple[str, ROMEHyperParams]:
    """GPT-2 XL's values at the same relative depth, the model's own BOS convention, 100k tokens."""
    return "rome:generic", replace(ROME_GPT2_XL, layers=_generic_layers(model, 1), v_loss_layer=None,
                                   mom2_dataset=None, mom2_n_tokens=100_000, prepend_bos=None)


def _memit_generic(model) -> tuple[str, MEMITHyperParams]:
    """GPT-2 XL's values, 5 layers ending at 17/48 depth, the model's own BOS convention, 100k tokens."""
    n = min(5, int(model.cfg.n_layers))
    return "memit:generic", replace(MEMIT_GPT2_XL, layers=_generic_layers(model, n), v_loss_layer=None,
                                    mom2_dataset=None, mom2_n_tokens=100_000, prepend_bos=None)


def check_for_model(model, hp):
    """``hp`` checked against ``model``: layers in range, ``v_loss_layer`` the last layer (or None)."""
    L = int(model.cfg.n_layers)
    if not hp.layers or any(not 0 <= int(l) < L for l in hp.layers):
        raise EditError(f"layers {hp.layers} out of range for a {L}-layer model")
    if hp.v_loss_layer not in (None, L - 1):
        raise EditError(f"v_loss_layer={hp.v_loss_layer}: only the last layer ({L - 1}, the model's own logits) "
                        "is supported")
    return hp


_ALIASES = {"layer": ("layers", lambda v: [int(v)]), "layers": ("layers", lambda v: [int(l) for l in v])}
register_presets("rome", by_model={k: (f"rome:{k}", v) for k, v in ROME_PRESETS.items()}, generic=_rome_generic,
                 check=check_for_model, aliases=_ALIASES,
                 sources={"rome:gpt2-xl": "kmeng01/rome hparams/ROME/gpt2-xl.json",
                          "rome:gpt-j": "kmeng01/rome hparams/ROME/EleutherAI_gpt-j-6B.json"})
register_presets("memit", by_model={k: (f"memit:{k}", v) for k, v in MEMIT_PRESETS.items()},
                 generic=_memit_generic, check=check_for_model, aliases=_ALIASES,
                 sources={"memit:gpt2-xl": "kmeng01/memit hparams/MEMIT/gpt2-xl.json",
                          "memit:gpt-j": "kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json"})


def rome_hparams_for(model) -> ROMEHyperParams:
    """ROME's preset for ``model`` (by its identity, :func:`workbench.editing.presets.resolve`)."""
    return resolve("rome", model).hparams


def memit_hparams_for(model) -> MEMITHyperParams:
    """MEMIT's preset for ``model`` (by its identity, :func:`workbench.editing.presets.resolve`)."""
    return resolve("memit", model).hparams


__all__ = ["HyperParameterError", "unknown_keys_error", "ROMEHyperParams", "MEMITHyperParams", "editing_prepend_bos",
           "rome_hparams_for", "memit_hparams_for", "check_for_model", "ROME_PRESETS", "MEMIT_PRESETS",
           "ROME_GPT2_XL", "ROME_GPT_J", "MEMIT_GPT2_XL", "MEMIT_GPT_J", "ROME_TOY", "MEMIT_TOY", "TOY_NOTES"]

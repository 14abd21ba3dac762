"""Weight editing: the :class:`Edit` object, ROME, MEMIT, MEND, the FT and KN baselines, covariance statistics.

Every method returns an unapplied :class:`Edit`; ``edit.apply(model)`` / ``edit.revert(model)``
/ ``with edit.applied(model):`` change the weights, bit-identically reversibly.
"""

from __future__ import annotations

from .common import EditError
from .context import context_templates
from .edit import (Edit, EditFingerprintError, EditIntegrityError, EditNotReachedWarning, EditStateError,
                   applied_edits, edit_outcome)
from .ft import FT_GPT2_XL, FT_GPT_J, FT_PRESETS, FT_TOY, FTHyperParams, ft
from .kn import KN_PRESETS, KNHyperParams, kn, kn_subject
from .hparams import HyperParameterError
from .hparams import (MEMIT_GPT2_XL, MEMIT_GPT_J, MEMIT_PRESETS, MEMIT_TOY, ROME_GPT2_XL, ROME_GPT_J, ROME_PRESETS,
                      ROME_TOY, MEMITHyperParams, ROMEHyperParams, memit_hparams_for, rome_hparams_for)
from .memit import memit
from .mend import mend
from .mend_hparams import MEND_GPT2_XL, MEND_GPT_J, MEND_PRESETS, MEND_TOY, MendHyperParams, mend_hparams_for
from .mend_net import MendEditor, MendModelMismatch
from .mend_original import OriginalCheckpointError, load_original
from .mend_train import MendTrainResult, toy_training_facts, train_mend
from .presets import (UnknownModelError, UnknownModelWarning, register_presets, resolve, set_strict_presets,
                      strict_presets)
from .rome import rome
from .stats import LayerStats, layer_stats

__all__ = [
    "Edit", "EditStateError", "EditError", "EditFingerprintError", "EditIntegrityError", "EditNotReachedWarning",
    "edit_outcome", "applied_edits", "HyperParameterError",
    "rome", "memit", "ft", "kn", "kn_subject", "FTHyperParams", "FT_GPT2_XL", "FT_GPT_J", "FT_TOY", "FT_PRESETS",
    "KN_PRESETS", "resolve", "register_presets", "strict_presets", "set_strict_presets", "UnknownModelError",
    "UnknownModelWarning", "KNHyperParams", "layer_stats", "LayerStats", "context_templates",
    "ROMEHyperParams", "MEMITHyperParams", "rome_hparams_for", "memit_hparams_for",
    "ROME_GPT2_XL", "ROME_GPT_J", "ROME_TOY", "MEMIT_GPT2_XL", "MEMIT_GPT_J", "MEMIT_TOY",
    "ROME_PRESETS", "MEMIT_PRESETS",
    "mend", "train_mend", "MendEditor", "MendHyperParams", "MendModelMismatch", "MendTrainResult", "mend_hparams_for",
    "toy_training_facts", "load_original", "OriginalCheckpointError", "MEND_GPT2_XL", "MEND_GPT_J", "MEND_TOY", "MEND_PRESETS",
]

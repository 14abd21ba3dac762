"""workbench: where does a language model store a fact, and what happens when you edit it?

Causal tracing (ROME-style, from the subject's or the relation's side), severed tracing,
and weight edits (ROME, MEMIT, MEND, FT, KN) on TransformerLens ``TransformerBridge`` models.
"""

from __future__ import annotations

from .editing import (Edit, EditError, EditStateError, FTHyperParams, KNHyperParams, MEMITHyperParams, ROMEHyperParams,
                      ft, kn, layer_stats, memit, rome)
from .editing import MendEditor, MendHyperParams, mend, train_mend
from .editing import UnknownModelError, UnknownModelWarning, set_strict_presets, strict_presets
from .identity import model_identity, register_known_model
from .evaluation import evaluate, full_table, paper_table, probes, relation_templates, score_fact, write_tables
from .facts import Fact, FactFormatError, load_facts
from .loading import ModelLoadError, load_model, model_info, random_model, save_hf
from .predict import next_token_probs, top_tokens
from .progress import set_progress
from .spans import Span, SpanError, relation_span, resolve_span, subject_span, tokenize
from .plots import plot_aie, plot_attention, plot_edit_eval, plot_severed, plot_trace
from .tracing import (BUCKETS, DatasetTraceResult, SeveredResult, TraceResult, noise_level, severed_trace, trace,
                      trace_dataset)

__version__ = "0.2.0"
"""The package version (``pyproject.toml`` reads it from here; CHANGELOG.md lists what each version added)."""

__all__ = [
    "Edit", "EditError", "EditStateError", "FTHyperParams", "KNHyperParams", "MEMITHyperParams", "ROMEHyperParams",
    "ft", "kn", "layer_stats", "model_identity", "register_known_model", "strict_presets", "set_strict_presets",
    "UnknownModelError", "UnknownModelWarning", "memit", "rome", "mend", "train_mend", "MendEditor", "MendHyperParams",
    "evaluate", "full_table", "paper_table", "probes", "relation_templates", "score_fact", "write_tables",
    "plot_aie", "plot_attention", "plot_edit_eval", "plot_severed", "plot_trace", "Inspector",
    "Fact", "FactFormatError", "load_facts",
    "ModelLoadError", "load_model", "model_info", "random_model", "save_hf",
    "next_token_probs", "top_tokens", "set_progress",
    "Span", "SpanError", "relation_span", "resolve_span", "subject_span", "tokenize",
    "BUCKETS", "DatasetTraceResult", "SeveredResult", "TraceResult", "noise_level", "severed_trace", "trace",
    "trace_dataset",
]


def __getattr__(name: str):
    # ipywidgets is imported only when the Inspector is asked for.
    if name == "Inspector":
        from .widgets import Inspector

        return Inspector
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")

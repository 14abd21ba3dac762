"""workbench: where does a language model store a fact, and what happens when you edit it?

Causal tracing (ROME-style, from the subject's or the relation's side), severed tracing,
and weight edits (ROME, MEMIT, FT, KN) on TransformerLens ``TransformerBridge`` models.
"""

from __future__ import annotations

from .facts import Fact, FactFormatError, load_facts
from .loading import ModelLoadError, load_model, model_info, random_model, save_hf
from .predict import next_token_probs, top_tokens
from .spans import Span, SpanError, relation_span, resolve_span, subject_span, tokenize
from .tracing import (BUCKETS, DatasetTraceResult, SeveredResult, TraceResult, noise_level, severed_trace, trace,
                      trace_dataset)

__version__ = "0.1.0"

__all__ = [
    "Fact", "FactFormatError", "load_facts",
    "ModelLoadError", "load_model", "model_info", "random_model", "save_hf",
    "next_token_probs", "top_tokens",
    "Span", "SpanError", "relation_span", "resolve_span", "subject_span", "tokenize",
    "BUCKETS", "DatasetTraceResult", "SeveredResult", "TraceResult", "noise_level", "severed_trace", "trace",
    "trace_dataset",
]

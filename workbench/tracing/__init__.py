"""Causal tracing (reference §1-3): where in the network a fact's answer can be restored.

Public API: :func:`trace`, :func:`severed_trace`, :func:`trace_dataset`,
:func:`noise_level`, the result classes and :data:`BUCKETS`.
"""

from __future__ import annotations

from .api import severed_trace, trace
from .dataset import bucket_positions, trace_dataset
from .engine import KINDS, window_layers
from .noise import draw_noise, noise_level
from .results import BUCKETS, DatasetTraceResult, SeveredResult, TraceResult
from .window import default_window

__all__ = [
    "trace", "severed_trace", "trace_dataset", "noise_level", "draw_noise", "bucket_positions",
    "TraceResult", "SeveredResult", "DatasetTraceResult", "BUCKETS", "KINDS", "window_layers",
    "default_window",
]

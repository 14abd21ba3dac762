"""Result dataclasses of causal tracing (field names are a contract for plotting code)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..spans import Span

BUCKETS = ("first corrupted", "middle corrupted", "last corrupted", "first after", "further", "last token")
"""Position buckets of averaged traces (reference §1, ROME's notebook), in plotting order."""

RELATION_BUCKETS = ("relation before subject", "last relation before subject", "subject", "relation after subject",
                    "last token")
"""Buckets of relation-corrupted traces: relation tokens before the subject (all but the last of them, and the
last), the uncorrupted subject tokens, relation tokens after the subject (but the last token), the last token."""


def span_to_list(span: Span | None) -> list[int] | None:
    return None if span is None else [int(p) for p in span.positions]


def span_from_list(data: Any) -> Span | None:
    return None if data is None else Span(tuple(int(p) for p in data))


@dataclass
class TraceResult:
    """One prompt's causal trace: ``scores[kind]`` is p_restored, shape [n_tokens, n_layers]."""

    prompt: str
    tokens: list[str]
    corrupt: Any
    corrupted_span: Span
    subject_span: Span | None
    relation_span: Span | None
    answer_id: int
    answer: str
    p_clean: float
    p_corrupt: float
    scores: dict[str, np.ndarray]
    kinds: tuple
    noise_level: float
    samples: int
    window: int
    seed: int
    model_spec: str | None = None
    prepend_bos: bool | None = None  # whether BOS was prepended to the prompt
    engine: str | None = None  # the engine that computed the scores
    noise_rule: str = ""  # how noise_level was obtained, e.g. "s3 over 300 subjects" or "given"
    method: str = "exact"  # "exact" (restored cells) or "attribution" (first-order estimates)

    def ie(self, kind: str) -> np.ndarray:
        """Indirect effect p_restored - p_corrupt (float64) of ``kind``."""
        return self.scores[kind].astype(np.float64) - self.p_corrupt

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt, "tokens": list(self.tokens),
            "corrupt": list(self.corrupt) if isinstance(self.corrupt, tuple) else self.corrupt,
            "corrupted_span": span_to_list(self.corrupted_span), "subject_span": span_to_list(self.subject_span),
            "relation_span": span_to_list(self.relation_span), "answer_id": int(self.answer_id),
            "answer": self.answer, "p_clean": float(self.p_clean), "p_corrupt": float(self.p_corrupt),
            "scores": {k: np.asarray(v).tolist() for k, v in self.scores.items()}, "kinds": list(self.kinds),
            "noise_level": float(self.noise_level), "samples": int(self.samples), "window": int(self.window),
            "seed": int(self.seed), "model_spec": self.model_spec, "prepend_bos": self.prepend_bos,
            "engine": self.engine, "noise_rule": self.noise_rule, "method": self.method,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "TraceResult":
        corrupt = data["corrupt"]
        return cls(
            prompt=data["prompt"], tokens=list(data["tokens"]),
            corrupt=tuple(corrupt) if isinstance(corrupt, list) else corrupt,
            corrupted_span=span_from_list(data["corrupted_span"]), subject_span=span_from_list(data["subject_span"]),
            relation_span=span_from_list(data["relation_span"]), answer_id=int(data["answer_id"]),
            answer=data["answer"], p_clean=float(data["p_clean"]), p_corrupt=float(data["p_corrupt"]),
            scores={k: np.asarray(v, dtype=np.float32) for k, v in data["scores"].items()},
            kinds=tuple(data["kinds"]), noise_level=float(data["noise_level"]), samples=int(data["samples"]),
            window=int(data["window"]), seed=int(data["seed"]), model_spec=data.get("model_spec"),
            prepend_bos=data.get("prepend_bos"), engine=data.get("engine"), noise_rule=data.get("noise_rule", ""),
            method=data.get("method", "exact"),
        )

    def save_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> "TraceResult":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def top_cells(self, kind: str, k: int = 5) -> list[tuple[int, int, float, float]]:
        """The ``k`` cells with the largest IE: (token, layer, p_restored, IE)."""
        ie = self.ie(kind)
        order = np.argsort(-ie, axis=None, kind="stable")[:k]
        return [(int(t), int(l), float(self.scores[kind][t, l]), float(ie[t, l]))
                for t, l in zip(*np.unravel_index(order, ie.shape))]


@dataclass
class SeveredResult:
    """Per-layer restored probability at one token: nothing / all MLPs / all attentions severed."""

    prompt: str
    tokens: list[str]
    token: int
    answer_id: int
    answer: str
    p_clean: float
    p_corrupt: float
    corrupted_span: Span
    none: np.ndarray
    mlp_severed: np.ndarray
    attn_severed: np.ndarray
    prepend_bos: bool | None = None
    engine: str | None = None
    noise_level: float = float("nan")
    noise_rule: str = ""
    corrupt: Any = None

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt, "tokens": list(self.tokens), "token": int(self.token),
            "answer_id": int(self.answer_id), "answer": self.answer, "p_clean": float(self.p_clean),
            "p_corrupt": float(self.p_corrupt), "corrupted_span": span_to_list(self.corrupted_span),
            "none": self.none.tolist(), "mlp_severed": self.mlp_severed.tolist(),
            "attn_severed": self.attn_severed.tolist(), "prepend_bos": self.prepend_bos, "engine": self.engine,
            "noise_level": float(self.noise_level), "noise_rule": self.noise_rule,
            "corrupt": self.corrupt,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SeveredResult":
        arr = lambda k: np.asarray(data[k], dtype=np.float32)  # noqa: E731
        return cls(data["prompt"], list(data["tokens"]), int(data["token"]), int(data["answer_id"]), data["answer"],
                   float(data["p_clean"]), float(data["p_corrupt"]), span_from_list(data["corrupted_span"]),
                   arr("none"), arr("mlp_severed"), arr("attn_severed"), data.get("prepend_bos"), data.get("engine"),
                   float(data.get("noise_level", float("nan"))), data.get("noise_rule", ""), data.get("corrupt"))


@dataclass
class DatasetTraceResult:
    """Average indirect effects over facts, per position bucket (rows) and layer (columns)."""

    aie: dict[str, pd.DataFrame]
    counts: pd.Series
    n_facts: int
    n_skipped: int
    p_clean: float
    p_corrupt: float
    corrupt: str
    kinds: tuple
    noise_level: float
    per_fact: pd.DataFrame = field(repr=False)
    noise_rule: str = ""  # e.g. "s3 over 300 subjects" (one dataset-level nu for every fact) or "given"
    method: str = "exact"  # "exact" (restored cells) or "attribution" (first-order estimates)

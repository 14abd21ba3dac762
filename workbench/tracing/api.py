"""``trace`` and ``severed_trace``: causal tracing of one prompt (reference §2-3)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from ..predict import object_token_ids
from ..spans import Span, SpanSpec, Tokenized, relation_span, resolve_span, subject_span, tokenize
from .attribution import AttributionEngine
from .engine import ENGINES, KINDS, BridgeEngine, Engine, LoopEngine, Plan, kind_plan, severed_plan
from .incremental import IncrementalEngine
from .noise import Corruption, NoiseSpec, draw_noise, noise_level, parse_noise
from .results import SeveredResult, TraceResult
from .window import resolve_window

AnswerSpec = Union[str, int, None]

METHODS = ("exact", "attribution")
"""How :func:`trace` computes its cells: ``"exact"`` restores each one (the engines of
:mod:`~workbench.tracing.engine`); ``"attribution"`` estimates them all to first order
(:mod:`~workbench.tracing.attribution`)."""


def user_hooks(model) -> list[str]:
    """Hook points of the bridge with hooks attached (by the user: engines remove their own)."""
    return [name for name, hp in model.hook_dict.items()
            if getattr(hp, "_forward_hooks", None) or getattr(hp, "_forward_pre_hooks", None)]



def make_engine(model, ids: torch.Tensor, corruption: Corruption, *, engine: str = "auto",
                precision: str = "exact", max_batch: int | None = None) -> Engine:
    """Pick and build an engine: ``auto`` = incremental for the families it supports, else batched.

    Hooks attached to the bridge would see partial sequences in the incremental engine, so
    with any attached it falls back to the batched engine (which runs them) with a warning;
    the engine used is ``engine.name`` (recorded on results).
    """
    if engine == "attribution":  # first-order estimates (trace(method="attribution")), any bridge
        return AttributionEngine(model, ids, corruption, precision=precision, max_batch=max_batch)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    if engine == "auto":
        engine = "incremental" if IncrementalEngine.supports(model) else "batched"
    if engine == "incremental" and not IncrementalEngine.supports(model):
        raise ValueError("the incremental engine supports the families of workbench.architecture "
                         "(GPT-2, GPT-J, GPT-NeoX, GPT-Neo, Llama, Mistral, Qwen2); use engine='batched'")
    if engine == "incremental":
        attached = user_hooks(model)
        if attached:
            warnings.warn(f"hooks are attached to the bridge ({', '.join(attached[:3])}"
                          f"{', ...' if len(attached) > 3 else ''}): tracing with the batched engine, which runs them "
                          "(the incremental engine would show them partial sequences)", stacklevel=3)
            engine = "batched"
    cls = {"incremental": IncrementalEngine, "batched": BridgeEngine, "loop": LoopEngine}[engine]
    return cls(model, ids, corruption, precision=precision, max_batch=max_batch)


class TraceParameterError(ValueError):
    """A tracing parameter is out of its domain; the message names the parameter and what is allowed."""


def _integer(name: str, value, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TraceParameterError(f"{name} must be an integer >= {minimum}, not {value!r}")
    if value < minimum:
        raise TraceParameterError(f"{name} must be >= {minimum}, not {value}")
    return int(value)


def check_window(window, n_layers: int | None = None) -> int | None:
    """``window`` (layers restored around each layer by mlp/attn cells) as an int in 1..``n_layers``;
    ``None`` passes."""
    if window is None:
        return None
    window = _integer("window", window, 1)
    if n_layers is not None and window > n_layers:
        raise TraceParameterError(f"window={window} is larger than the model's {n_layers} layers: every cell would "
                                  f"restore every layer and the maps would be flat; use 1..{n_layers} (default "
                                  f"min(10, ceil(n_layers / 2)))")
    return window


def check_method(method: str, engine: str = "auto") -> str:
    """The engine that computes ``method``'s cells (``engine`` itself for ``"exact"``)."""
    if method not in METHODS:
        raise TraceParameterError(f"method must be one of {METHODS}, not {method!r}")
    if method == "attribution":
        if engine not in ("auto", "attribution"):
            raise TraceParameterError(f"method='attribution' has its own engine; engine={engine!r} runs exact cells "
                                      "(pass method='exact' for it)")
        return "attribution"
    return engine


def check_samples(samples) -> int:
    """``samples`` (noise draws) as an int >= 1."""
    return _integer("samples", samples, 1)


def check_noise(noise: NoiseSpec) -> tuple[str, float]:
    """:func:`parse_noise`, then nu (or the std factor, or the uniform bound) finite and > 0."""
    try:
        kind, value = parse_noise(noise)
    except ValueError as err:
        raise TraceParameterError(str(err)) from None
    if not np.isfinite(value) or value <= 0:
        what = {"std": "the std factor x of 's<x>'", "uniform": "the bound x of 'u<x>'"}.get(kind, "nu")
        raise TraceParameterError(f"noise={noise!r}: {what} must be a finite number > 0 (NaN, inf, zero or a "
                                  f"negative value gives meaningless maps)")
    return kind, value


@dataclass
class Prepared:
    """A prompt made ready to trace: tokens, spans, the noise draw, the engine, the answer."""

    tokens: Tokenized
    corrupted_span: Span
    subject_span: Span | None
    relation_span: Span | None
    noise_level: float
    engine: Engine
    noise_rule: str = ""

    def resolve_answer(self, model, answer: AnswerSpec) -> int:
        if answer is None:
            return int(self.engine.clean_probs.argmax())
        if isinstance(answer, (int, np.integer)) and not isinstance(answer, (bool, np.bool_)):
            vocab = len(self.engine.clean_probs)
            if not 0 <= int(answer) < vocab:
                raise TraceParameterError(f"answer token id {answer} is outside the vocabulary (0..{vocab - 1})")
            return int(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise TraceParameterError(f"answer must be a non-blank object string or a token id, not {answer!r} "
                                      f"(leave it out to score the clean top-1 token)")
        return object_token_ids(model, answer)[0]


def _span_text(tokens: Tokenized, span: Span) -> str:
    first = 1 if tokens.has_bos else 0
    offs = [tokens.offsets[p] for p in span if p >= first]
    if not offs:
        raise ValueError("the corrupted span holds only the BOS token; pass a numeric noise level")
    return tokens.prompt[min(o[0] for o in offs):max(o[1] for o in offs)]


def prepare(model, prompt: str, *, subject: str | None = None, corrupt: SpanSpec = "subject",
            template: str | None = None, samples: int = 10, noise: NoiseSpec = "s3", seed: int = 1,
            replace: bool = False, prepend_bos: bool | None = None, precision: str = "exact",
            engine: str = "auto", max_batch: int | None = None,
            noise_subjects: Sequence[str] | None = None) -> Prepared:
    """Tokenize, find spans, draw the noise and run the clean pass (shared by every trace)."""
    check_samples(samples)
    check_noise(noise)
    tokens = tokenize(model, prompt, prepend_bos)
    span = resolve_span(tokens, corrupt, subject, template)
    subj = subject_span(tokens, subject, template) if subject is not None else None
    rel = relation_span(tokens, subject, template) if subject is not None else None
    nu, rule = resolve_noise(model, noise, noise_subjects, subject if subject is not None
                             else _span_text(tokens, span))
    kind, _ = parse_noise(noise)
    eps = draw_noise(samples, len(span), model.cfg.d_model, nu, seed=seed, uniform=kind == "uniform")
    corruption = Corruption(span.positions, eps, replace=replace)
    ids = tokens.tensor(model.cfg.device)
    eng = make_engine(model, ids, corruption, engine=engine, precision=precision, max_batch=max_batch)
    return Prepared(tokens, span, subj, rel, nu, eng, rule)


def resolve_noise(model, noise: NoiseSpec, subjects: Sequence[str] | None, fallback: str) -> tuple[float, str]:
    """``(nu, rule)``: the noise level and how it was obtained.

    A number is nu itself (e.g. a dataset-level nu computed once); ``"s<x>"`` is x times the
    std of the embeddings of ``subjects`` when given (a dataset-level nu over a list of
    subjects), else of ``fallback`` (the traced subject, or the corrupted text).
    """
    kind, value = parse_noise(noise)
    if kind != "std":
        return value, ("given" if kind == "level" else f"uniform {value!r}")
    if subjects is not None:
        subjects = list(subjects)
        return noise_level(model, subjects, noise), f"{noise} over {len(subjects)} subjects"
    return noise_level(model, [fallback], noise), f"{noise} over {fallback!r}"


def _decode(model, token_id: int) -> str:
    return model.tokenizer.decode([int(token_id)])


def trace(model, prompt: str, *, subject: str | None = None, corrupt: SpanSpec = "subject",
          kinds: Sequence[str] = KINDS, samples: int = 10, noise: NoiseSpec = "s3", window: int | None = None,
          answer: AnswerSpec = None, seed: int = 1, prepend_bos: bool | None = None, precision: str = "exact",
          template: str | None = None, replace: bool = False, engine: str = "auto",
          max_batch: int | None = None, noise_subjects: Sequence[str] | None = None,
          method: str = "exact") -> TraceResult:
    """Causal trace of ``prompt``: p_restored for every (token, layer) cell of each kind.

    ``corrupt``: ``"subject"``, ``"relation"`` (needs ``subject``), a substring, a (start,
    end) token range or positions. ``noise``: nu itself (a number), ``"s<x>"`` (x times
    the std of the token embeddings of ``noise_subjects`` when given -- a dataset-level nu --,
    else of the subject, else of the corrupted text) or ``"u<x>"`` (uniform in [-x, x]); a
    number passes a dataset-level nu computed once (:func:`~workbench.tracing.noise.noise_level`).
    The result records nu (``noise_level``) and how it was obtained (``noise_rule``); ``replace=True`` replaces the embeddings by
    the noise instead of adding it. The draw is ``RandomState(seed).randn(samples,
    span_len, d_model) * nu``, shared by every cell. ``answer``: the token to score (the
    clean top-1 by default; a string scores its first token with a leading space; an int
    is a token id). ``window``: layers restored around l by mlp/attn cells (default
    :func:`~workbench.tracing.window.default_window`: min(10, ceil(n_layers / 2))).

    ``precision``: ``"exact"`` (float32), ``"fast"`` (bfloat16 autocast on CUDA; on CPU
    the same as exact, since bf16 is not faster there), ``"bf16"`` (bf16 autocast on any
    device, for measuring drift). ``engine``: ``"auto"`` (``"incremental"`` for the families
    of :mod:`workbench.architecture`, else ``"batched"``; ``"batched"`` with a warning when
    hooks are attached to the bridge), or ``"loop"`` (one forward per cell, the original
    algorithm); ``result.engine`` records the one used. ``prepend_bos`` is recorded as
    ``result.prepend_bos``. ``max_batch`` caps rows per forward pass (otherwise set by free memory).

    ``method``: ``"exact"`` (default) restores every cell; ``"attribution"`` estimates every
    cell to first order from one forward and one backward pass of the corrupted runs
    (attribution patching, :mod:`workbench.tracing.attribution`: each cell is p_corrupt + the
    mean over samples of (clean state - corrupted state) · d p / d state; an mlp/attn cell sums
    its window's layers). Same result class, ``result.method`` says which.
    """
    kinds = tuple(kinds)
    engine = check_method(method, engine)
    window = check_window(resolve_window(model, window), int(model.cfg.n_layers))  # before any forward pass
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown trace kind {kind!r}; use any of {KINDS}")
    prep = prepare(model, prompt, subject=subject, corrupt=corrupt, template=template, samples=samples,
                   noise=noise, seed=seed, replace=replace, prepend_bos=prepend_bos, precision=precision,
                   engine=engine, max_batch=max_batch, noise_subjects=noise_subjects)
    return _trace_prepared(model, prep, prompt, corrupt, kinds, window, answer, seed)


def _trace_prepared(model, prep: Prepared, prompt: str, corrupt, kinds: tuple, window: int,
                    answer: AnswerSpec, seed: int) -> TraceResult:
    eng = prep.engine
    n, L = len(prep.tokens), model.cfg.n_layers
    window = check_window(window, L)
    answer_id = prep.resolve_answer(model, answer)
    p_clean = float(eng.clean_probs[answer_id])
    p_corrupt = eng.p_corrupt(answer_id)
    plans = [kind_plan(kind, range(n), L, window) for kind in kinds]
    flat = eng.run(Plan.concat(plans), answer_id) if plans else np.zeros(0, np.float32)
    _check_finite(model, prep, p_corrupt, flat)
    scores = {kind: flat[i * n * L:(i + 1) * n * L].reshape(n, L).copy() for i, kind in enumerate(kinds)}
    return TraceResult(
        prompt=prompt, tokens=list(prep.tokens.str_tokens), corrupt=corrupt, corrupted_span=prep.corrupted_span,
        subject_span=prep.subject_span, relation_span=prep.relation_span, answer_id=answer_id,
        answer=_decode(model, answer_id), p_clean=p_clean, p_corrupt=p_corrupt, scores=scores, kinds=kinds,
        noise_level=prep.noise_level, samples=eng.S, window=window, seed=seed,
        model_spec=getattr(model, "workbench_spec", None), prepend_bos=prep.tokens.has_bos, engine=eng.name,
        noise_rule=prep.noise_rule, method="attribution" if eng.name == "attribution" else "exact",
    )


def _check_finite(model, prep: Prepared, p_corrupt: float, flat: np.ndarray) -> None:
    """Refuse a trace whose corrupted runs overflowed (e.g. ``noise=1e300``): its map would be NaN."""
    if not (np.isfinite(p_corrupt) and np.isfinite(flat).all()):
        raise TraceParameterError(
            f"noise level {prep.noise_level:.4g} ({prep.noise_rule or 'given'}) overflows the corrupted runs "
            f"({getattr(model.cfg, 'dtype', 'float32')}): the map would be NaN; use a smaller noise, e.g. 's3' (3 x "
            f"the subject embeddings' std)")


def _severed_token(prep: Prepared, token: str | int, n: int) -> int:
    if isinstance(token, (int, np.integer)):
        t = int(token) + (n if token < 0 else 0)
    elif token == "last_corrupted":
        t = prep.corrupted_span.last
    elif token in ("last_subject", "last_relation"):
        span = prep.subject_span if token == "last_subject" else prep.relation_span
        if span is None:
            raise ValueError(f"token={token!r} needs the subject")
        t = span.last
    elif token == "last":
        t = n - 1
    else:
        raise ValueError(f"token must be an int, 'last_corrupted', 'last_subject', 'last_relation' or 'last', "
                         f"not {token!r}")
    if not 0 <= t < n:
        raise ValueError(f"token {token} is outside the {n} tokens")
    return t


def severed_trace(model, prompt: str, *, subject: str | None = None, corrupt: SpanSpec = "subject",
                  token: str | int = "last_corrupted", samples: int = 10, noise: NoiseSpec = "s3",
                  answer: AnswerSpec = None, seed: int = 1, prepend_bos: bool | None = None,
                  precision: str = "exact", template: str | None = None, replace: bool = False,
                  engine: str = "auto", max_batch: int | None = None,
                  noise_subjects: Sequence[str] | None = None) -> SeveredResult:
    """Hidden-state restoration at ``token``, per layer, with nothing / all MLPs / all attention severed.

    Severing sets ``hook_mlp_out`` (or ``hook_attn_out``) of every layer at ``token`` to its
    value in the corrupted run without restoration, with the same noise (reference §3), so
    the restored state reaches later layers only through the other module. The
    ``none`` curve equals hidden tracing at ``token``. Other arguments as in :func:`trace`
    (the loop engine does not implement severing).
    """
    prep = prepare(model, prompt, subject=subject, corrupt=corrupt, template=template, samples=samples,
                   noise=noise, seed=seed, replace=replace, prepend_bos=prepend_bos, precision=precision,
                   engine=engine, max_batch=max_batch, noise_subjects=noise_subjects)
    eng = prep.engine
    n, L = len(prep.tokens), model.cfg.n_layers
    t = _severed_token(prep, token, n)
    answer_id = prep.resolve_answer(model, answer)
    p_corrupt = eng.p_corrupt(answer_id)
    flat = eng.run(severed_plan(t, L), answer_id)
    _check_finite(model, prep, p_corrupt, flat)
    return SeveredResult(
        prompt=prompt, tokens=list(prep.tokens.str_tokens), token=t, answer_id=answer_id,
        answer=_decode(model, answer_id), p_clean=float(eng.clean_probs[answer_id]), p_corrupt=p_corrupt,
        corrupted_span=prep.corrupted_span, none=flat[:L].copy(), mlp_severed=flat[L:2 * L].copy(),
        attn_severed=flat[2 * L:].copy(), prepend_bos=prep.tokens.has_bos, engine=eng.name,
        noise_level=prep.noise_level, noise_rule=prep.noise_rule,
        corrupt=corrupt if isinstance(corrupt, str) else None,
    )


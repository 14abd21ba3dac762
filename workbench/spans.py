"""Token spans of a prompt: the subject, the relation, any substring.

Spans are found from the tokenizer's character offsets (``return_offsets_mapping``),
never by decoding tokens one at a time: a token belongs to a span when its characters
overlap the span's characters. Positions count the BOS token when one is prepended,
exactly as ``model.to_tokens(prompt)`` does (TransformerLens's ``prepend_bos``).

The relation span (reference §1) is every token of the template's own words, i.e.
every non-BOS token that does not overlap the subject. It may sit on both sides of the
subject (``"The mother tongue of {} is"``), so a :class:`Span` is a sorted tuple of
positions that need not be contiguous; its ``last`` is the last relation token.
"""

from __future__ import annotations

import contextlib
import numbers
from dataclasses import dataclass
from typing import Iterator, Sequence, Union

import numpy as np
import torch


class SpanError(ValueError):
    """A requested span does not exist (or is ambiguous) in a prompt."""


@dataclass(frozen=True)
class Span:
    """Token positions (sorted, unique) inside a tokenized prompt."""

    positions: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.positions:
            raise SpanError("empty span")
        if list(self.positions) != sorted(set(self.positions)):
            raise SpanError(f"span positions must be sorted and unique: {self.positions}")

    @classmethod
    def range(cls, start: int, end: int) -> "Span":
        """The contiguous span [start, end)."""
        if end <= start:
            raise SpanError(f"empty span [{start}, {end})")
        return cls(tuple(range(start, end)))

    @property
    def start(self) -> int:
        return self.positions[0]

    @property
    def end(self) -> int:
        """One past the last position."""
        return self.positions[-1] + 1

    @property
    def first(self) -> int:
        return self.positions[0]

    @property
    def last(self) -> int:
        return self.positions[-1]

    @property
    def contiguous(self) -> bool:
        return self.end - self.start == len(self.positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __iter__(self):
        return iter(self.positions)

    def __contains__(self, pos: object) -> bool:
        return pos in self.positions

    def __repr__(self) -> str:
        if self.contiguous:
            return f"Span[{self.start}:{self.end}]"
        return f"Span{list(self.positions)}"


@dataclass(frozen=True)
class Tokenized:
    """A prompt's token ids with each token's character range in the prompt."""

    prompt: str
    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]  # (0, 0) for the BOS token
    str_tokens: tuple[str, ...]
    has_bos: bool

    def __len__(self) -> int:
        return len(self.ids)

    def tensor(self, device: str | torch.device | None = None) -> torch.Tensor:
        """Ids as a [1, n] long tensor."""
        return torch.tensor([self.ids], dtype=torch.long, device=device)

    def char_span(self, char_start: int, char_end: int) -> Span:
        """Tokens whose characters overlap [char_start, char_end)."""
        first = 1 if self.has_bos else 0
        pos = [i for i in range(first, len(self.ids))
               if self.offsets[i][0] < char_end and self.offsets[i][1] > char_start]
        if not pos:
            raise SpanError(f"no token of {self.prompt!r} covers characters [{char_start}, {char_end})")
        return Span(tuple(pos))


def _tokenizer(model_or_tokenizer):
    return getattr(model_or_tokenizer, "tokenizer", None) or model_or_tokenizer


def default_prepend_bos(model_or_tokenizer) -> bool:
    """TransformerLens's default: the model config's ``default_prepend_bos`` (True if absent)."""
    cfg = getattr(model_or_tokenizer, "cfg", None)
    return bool(getattr(cfg, "default_prepend_bos", True)) if cfg is not None else True


@contextlib.contextmanager
def bos_convention(model, prepend_bos: bool | None) -> Iterator[bool]:
    """Within the block, ``model``'s default BOS choice is ``prepend_bos`` (``None``: unchanged).

    Sets TransformerLens's ``model.cfg.default_prepend_bos``, which :func:`tokenize` and the
    bridge's own ``to_tokens`` read, so every prompt tokenized inside (rewrite prompts,
    probes, scores) follows one convention; restored on exit. Yields the choice in force.
    """
    cfg = model.cfg
    had = hasattr(cfg, "default_prepend_bos")
    old = getattr(cfg, "default_prepend_bos", None)
    if prepend_bos is not None:
        cfg.default_prepend_bos = bool(prepend_bos)
    try:
        yield default_prepend_bos(model)
    finally:
        if had:
            cfg.default_prepend_bos = old
        elif prepend_bos is not None:
            del cfg.default_prepend_bos


class PromptTooLongError(SpanError):
    """A prompt has more tokens than the model's context window."""


def tokenize(model_or_tokenizer, prompt: str, prepend_bos: bool | None = None) -> Tokenized:
    """Tokenize ``prompt`` with character offsets, prepending BOS as TransformerLens does.

    Given a model, a prompt longer than its context (``cfg.n_ctx``) raises :class:`PromptTooLongError`.
    """
    tok = _tokenizer(model_or_tokenizer)
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(model_or_tokenizer)
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    if prepend_bos:
        if tok.bos_token_id is None:
            raise SpanError("prepend_bos=True but the tokenizer has no BOS token")
        ids = [tok.bos_token_id] + ids
        offsets = [(0, 0)] + offsets
    n_ctx = getattr(getattr(model_or_tokenizer, "cfg", None), "n_ctx", None)
    if n_ctx is not None and len(ids) > n_ctx:
        raise PromptTooLongError(f"the prompt {prompt[:80]!r}{'...' if len(prompt) > 80 else ''} has {len(ids)} "
                                 f"tokens but the model's context (n_ctx) is {n_ctx}; shorten it")
    str_tokens = tuple(tok.convert_ids_to_tokens(ids))
    str_tokens = tuple(tok.convert_tokens_to_string([t]) for t in str_tokens)
    return Tokenized(prompt, tuple(ids), tuple(offsets), str_tokens, bool(prepend_bos))


def find_char_span(prompt: str, substring: str) -> tuple[int, int]:
    """Character range of the single occurrence of ``substring`` in ``prompt``."""
    if not substring:
        raise SpanError("cannot find an empty substring")
    start = prompt.find(substring)
    if start < 0:
        raise SpanError(f"{substring!r} does not occur in the prompt {prompt!r}")
    again = prompt.find(substring, start + 1)
    if again >= 0:
        raise SpanError(
            f"{substring!r} occurs more than once in the prompt {prompt!r} "
            f"(at characters {start} and {again}); pass a template with '{{}}' to say which"
        )
    return start, start + len(substring)


def subject_char_span(prompt: str, subject: str, template: str | None = None) -> tuple[int, int]:
    """Characters of the subject; a template disambiguates a repeated subject."""
    if template is not None:
        if template.format(subject) != prompt:
            raise SpanError(f"template {template!r} filled with {subject!r} is not the prompt {prompt!r}")
        start = template.index("{}")
        return start, start + len(subject)
    return find_char_span(prompt, subject)


def substring_span(tokens: Tokenized, substring: str) -> Span:
    """Tokens covering the single occurrence of ``substring``."""
    return tokens.char_span(*find_char_span(tokens.prompt, substring))


def subject_span(tokens: Tokenized, subject: str, template: str | None = None) -> Span:
    """Tokens covering the subject."""
    return tokens.char_span(*subject_char_span(tokens.prompt, subject, template))


def relation_span(tokens: Tokenized, subject: str, template: str | None = None) -> Span:
    """Tokens of the template's own words: every non-BOS token not overlapping the subject."""
    subj = set(subject_span(tokens, subject, template))
    first = 1 if tokens.has_bos else 0
    pos = tuple(i for i in range(first, len(tokens)) if i not in subj)
    if not pos:
        raise SpanError(f"prompt {tokens.prompt!r} has no relation tokens besides the subject {subject!r}")
    return Span(pos)


SpanSpec = Union[str, tuple[int, int], Sequence[int], Span]


def _position(value, spec) -> int:
    """A token position: any integer type (numpy's included), never a float or a bool."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise SpanError(f"token positions must be integers; {value!r} in {spec!r} is not (a (start, end) tuple is "
                        f"a range, a list gives positions)")
    return int(value)


def resolve_span(tokens: Tokenized, spec: SpanSpec, subject: str | None = None,
                 template: str | None = None) -> Span:
    """Turn ``"subject"``, ``"relation"``, a substring, a (start, end) range or positions into a Span.

    A tuple of two integers (of any integer type, numpy's included) is the range
    [start, end); any other sequence (a list) gives positions. Non-integers are refused.
    """
    if isinstance(spec, Span):
        span = spec
    elif isinstance(spec, str):
        if spec in ("subject", "relation"):
            if subject is None:
                raise SpanError(f"corrupt={spec!r} needs the subject")
            span = (subject_span if spec == "subject" else relation_span)(tokens, subject, template)
        else:
            span = substring_span(tokens, spec)
    elif isinstance(spec, tuple) and len(spec) == 2:
        span = Span.range(*(_position(x, spec) for x in spec))
    else:
        try:
            items = list(spec)
        except TypeError:
            raise SpanError(f"corrupt={spec!r}: use 'subject', 'relation', a substring, a (start, end) tuple "
                            f"or a list of token positions") from None
        span = Span(tuple(_position(x, spec) for x in items))
    if span.start < 0 or span.end > len(tokens):
        raise SpanError(f"span {span} is outside the {len(tokens)} tokens of {tokens.prompt!r}")
    return span

"""Next-token queries on a model: top-k predictions and object probabilities.

These small helpers are shared by the command line, tracing, editing and evaluation.
Prompts of different lengths are right-padded and read at each prompt's own last
token, so one forward pass serves a whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float, Int

from .spans import tokenize


def object_token_ids(model, obj: str) -> list[int]:
    """Token ids of an object as it follows a prompt (with its leading space)."""
    text = obj if obj.startswith(" ") else " " + obj
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"object {obj!r} tokenizes to nothing")
    return list(ids)


def batch_tokens(model, prompts: Sequence[str], prepend_bos: bool | None = None
                 ) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch"]]:
    """Right-padded token ids of prompts and the index of each one's last token."""
    rows = [tokenize(model, p, prepend_bos).ids for p in prompts]
    width = max(len(r) for r in rows)
    pad = model.tokenizer.pad_token_id
    pad = pad if pad is not None else (model.tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    last = torch.tensor([len(r) - 1 for r in rows])
    return ids.to(model.cfg.device), last.to(model.cfg.device)


@torch.no_grad()
def next_token_probs(model, prompts: Sequence[str], prepend_bos: bool | None = None,
                     batch_size: int = 64) -> Float[torch.Tensor, "batch vocab"]:
    """Softmax of the next-token logits at each prompt's last token (float32)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        ids, last = batch_tokens(model, prompts[i : i + batch_size], prepend_bos)
        logits = model(ids, return_type="logits")
        out.append(torch.softmax(logits[torch.arange(len(last)), last].float(), dim=-1))
    return torch.cat(out)


def top_tokens(model, prompt: str, k: int = 5, prepend_bos: bool | None = None) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens of ``prompt`` with their probabilities (``k`` >= 1)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (how many tokens to show), not {k!r}")
    probs = next_token_probs(model, [prompt], prepend_bos)[0]
    values, ids = probs.topk(k)
    return [(model.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids)]


def predicts(model, prompts: Sequence[str], objects: Sequence[str], prepend_bos: bool | None = None) -> list[bool]:
    """Whether each prompt's top-1 next token is the first token of its object."""
    probs = next_token_probs(model, prompts, prepend_bos)
    first = torch.tensor([object_token_ids(model, o)[0] for o in objects], device=probs.device)
    return (probs.argmax(-1) == first).tolist()


@dataclass(frozen=True)
class ObjectScore:
    """One (prompt, object) pair under teacher forcing."""

    mean_logprob: float
    correct: bool  # argmax is the object's token at every object position
    token_acc: float = 0.0  # fraction of object positions whose argmax is the object's token


@torch.no_grad()
def score_objects(model, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[ObjectScore]:
    """Teacher-forced scores of ``(prompt, object)`` pairs, batched (right-padded).

    Each row is the prompt's tokens (BOS as the model prepends it) followed by the object's
    tokens but the last; pairs whose rows coincide (single-token objects of one prompt)
    share a row, so all probes of a fact usually take one forward pass.
    """
    prompt_ids = {p: list(tokenize(model, p).ids) for p, _ in pairs}
    obj_ids = {o: object_token_ids(model, o) for _, o in pairs}
    rows: dict[tuple[int, ...], int] = {}
    where = []
    for p, o in pairs:
        row = tuple(prompt_ids[p] + obj_ids[o][:-1])
        rows.setdefault(row, len(rows))
        where.append(rows[row])
    row_list = list(rows)
    logp_of: dict[int, torch.Tensor] = {}
    start_of: dict[int, int] = {}
    for (p, o), r in zip(pairs, where):
        start_of[r] = min(start_of.get(r, 10**9), len(prompt_ids[p]) - 1)
    pad = model.tokenizer.pad_token_id
    pad = pad if pad is not None else (model.tokenizer.eos_token_id or 0)
    device = model.cfg.device
    for b in range(0, len(row_list), batch_size):
        chunk = row_list[b : b + batch_size]
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)] = torch.tensor(r)
        logits = model(ids.to(device), return_type="logits")
        for i, r in enumerate(chunk):
            k = b + i
            logp_of[k] = torch.log_softmax(logits[i, start_of[k] : len(r)].float(), dim=-1).cpu()
    out = []
    for (p, o), r in zip(pairs, where):
        obj = obj_ids[o]
        first = len(prompt_ids[p]) - 1 - start_of[r]
        lp = logp_of[r][first : first + len(obj)]
        target = torch.tensor(obj)
        token_lp = lp[torch.arange(len(obj)), target]
        hits = lp.argmax(-1) == target
        out.append(ObjectScore(float(token_lp.mean()), bool(hits.all()), float(hits.float().mean())))
    return out

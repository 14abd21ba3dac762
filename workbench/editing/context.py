"""Context templates: short model-generated prefixes that ROME/MEMIT put before a prompt.

ROME averages the key over ``"{}"`` plus prefixes the model itself writes from BOS
(reference §4.1; original ``rome_main.get_context_templates``): for each
``[length, n]`` in ``context_template_length_params`` (default ``[[5, 10], [10, 10]]``)
``n`` samples of ``length`` tokens *counting the BOS* (so ``length - 1`` new tokens),
top-k sampling with k = 5, decoded, NFKD-normalised, ``"\\n\\n"`` -> ``" "``, the BOS
text (``"<|endoftext|>"``) removed, braces replaced by spaces, and used as
``"<prefix>. {}"``.

MEMIT's scheme (``scheme="memit"``, MEMIT's default; original ``memit_main.get_context_templates``)
continues the five words ``"The"``, ``"Therefore"``, ``"Because"``, ``"I"``, ``"You"`` instead:
for each ``[length, n]`` (default ``[[10, 5]]``) ``n // 5`` samples per word of ``length``
tokens *counting the word's tokens* (BOS, if prepended, not counted), top-k 5, cleaned as
above, giving ``[["{}"], [5 prefixes]]``. The words are tokenized with the edit's BOS
convention (the originals: no BOS).

Templates come back *grouped*: ``[["{}"], [prefixes of length 5...], [prefixes of length 10...]]``.
ROME uses the flat list (a plain mean over all templates, as ``rome/compute_u.py``);
MEMIT averages within each group and then over groups (as ``memit/compute_ks.py``).

Sampling uses a seeded ``torch.Generator``, so templates are deterministic for a given
model and seed. They are cached in memory and, when ``cache_dir`` is given, on disk,
keyed by the model fingerprint (:func:`workbench.loading.model_fingerprint`), the length
parameters and the seed.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Sequence

import torch

_MEMORY: dict[tuple, list[list[str]]] = {}

DEFAULT_LENGTH_PARAMS: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))


def flatten(groups: Sequence[Sequence[str]] | Sequence[str]) -> list[str]:
    """A flat template list from grouped (or already flat) templates."""
    if groups and isinstance(groups[0], str):
        return list(groups)  # type: ignore[arg-type]
    return [t for g in groups for t in g]


def as_groups(templates: Sequence[Sequence[str]] | Sequence[str]) -> list[list[str]]:
    """Grouped templates; a flat list becomes a single group."""
    if not templates:
        raise ValueError("context templates must not be empty")
    if isinstance(templates[0], str):
        out = [list(templates)]  # type: ignore[list-item]
    else:
        out = [list(g) for g in templates]
    for t in flatten(out):
        if t.count("{}") != 1:
            raise ValueError(f"context template {t!r} must contain exactly one '{{}}'")
    return out


def _clean(text: str, bos_text: str | None) -> str:
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    if bos_text:
        text = text.replace(bos_text, "")
    return text


MEMIT_SEED_WORDS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
SCHEMES = ("rome", "memit")


@torch.no_grad()
def generate_prefixes(model, length: int, n: int, *, top_k: int = 5, generator: torch.Generator | None = None,
                      start: str | None = None, prepend_bos: bool | None = None) -> list[str]:
    """``n`` texts sampled with top-k sampling: from BOS to ``length`` tokens (BOS included), or,
    with ``start``, continuing that text to ``length`` tokens (a prepended BOS not counted)."""
    tok = model.tokenizer
    bos = tok.bos_token_id
    device = model.cfg.device
    if start is None:
        if bos is None:
            raise ValueError("the tokenizer has no BOS token to generate context templates from")
        first = [bos]
    else:
        from ..spans import tokenize

        tokens = tokenize(model, start, prepend_bos)
        first, length = list(tokens.ids), length + int(tokens.has_bos)
    ids = torch.tensor([first] * n, dtype=torch.long, device=device)
    while ids.shape[1] < length:
        logits = model(ids, return_type="logits")[:, -1, :].float()
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, top_k, dim=-1)
        p = top.values / top.values.sum(-1, keepdim=True)
        choice = torch.multinomial(p.cpu(), 1, generator=generator).to(device)
        ids = torch.cat([ids, torch.gather(top.indices, 1, choice)], dim=1)
    return [_clean(tok.decode(row.tolist()), tok.bos_token) for row in ids]


def context_templates(model, length_params: Sequence[Sequence[int]] = DEFAULT_LENGTH_PARAMS, *, seed: int = 0,
                      cache_dir: str | Path | None = None, fingerprint: str | None = None, scheme: str = "rome",
                      prepend_bos: bool | None = None) -> list[list[str]]:
    """Grouped context templates for ``model`` (see the module docstring); cached per model.

    ``scheme``: ``"rome"`` (prefixes from BOS) or ``"memit"`` (prefixes continuing
    :data:`MEMIT_SEED_WORDS`, tokenized with ``prepend_bos``).
    """
    from ..loading import model_fingerprint
    from ..spans import default_prepend_bos

    if scheme not in SCHEMES:
        raise ValueError(f"context template scheme must be one of {SCHEMES}, not {scheme!r}")
    params = tuple((int(a), int(b)) for a, b in length_params)
    fp = fingerprint or model_fingerprint(model)
    bos = default_prepend_bos(model) if prepend_bos is None else bool(prepend_bos)
    key = (fp, params, seed) if scheme == "rome" else (fp, params, seed, scheme, bos)
    if key in _MEMORY:
        return [list(g) for g in _MEMORY[key]]
    path = None
    if cache_dir is not None:
        name = "_".join(f"{a}x{b}" for a, b in params) or "none"
        name += "" if scheme == "rome" else f"_memit_bos{int(bos)}"
        path = Path(cache_dir) / fp / f"context_templates_{name}_seed{seed}.json"
        if path.exists():
            groups = json.loads(path.read_text())
            _MEMORY[key] = groups
            return [list(g) for g in groups]
    gen = torch.Generator().manual_seed(seed)
    groups: list[list[str]] = [["{}"]]
    for length, n in params:
        if scheme == "rome":
            prefixes = generate_prefixes(model, length, n, generator=gen)
        else:
            prefixes = [p for word in MEMIT_SEED_WORDS for p in generate_prefixes(
                model, length, n // len(MEMIT_SEED_WORDS), generator=gen, start=word, prepend_bos=bos)]
        groups.append([p.replace("{", " ").replace("}", " ") + ". {}" for p in prefixes])
    _MEMORY[key] = groups
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(groups, indent=1))
    return [list(g) for g in groups]

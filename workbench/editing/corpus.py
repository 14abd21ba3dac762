"""The text corpora whose MLP keys give ROME's and MEMIT's covariance (:mod:`workbench.editing.stats`).

Corpus (``corpus=``):

* ``None``/``"toy-facts"``: the bundled world's training text (default for the bundled
  model; the world is read from ``assets/toy-facts/world.json``).
* a list of strings, or a path to a text file (one text per non-empty line).
* a Hugging Face ``datasets`` name, ``"name"`` or ``"name:config"`` (``"text"`` column,
  train split), where the hub is reachable. Default for models without a preset corpus:
  ``"wikitext:wikitext-103-raw-v1"`` (texts joined by BOS, counted in tokens).
* ``"wikipedia"``: the originals' corpus, Hugging Face ``wikipedia`` ``20200501.en``, *one article
  per row* (each truncated to the model's context, no BOS, as the originals' ``TokenizedDataset``),
  counted in articles: the first ``n_samples`` (the presets' ``mom2_n_samples`` = 100,000; the
  originals draw a seeded random sample of that size). The GPT-2 XL and GPT-J presets use it, so
  their statistics are the originals' kind; where the hub is unreachable it fails with a message
  naming the two offline ways: ``"articles:FILE"`` (the same shape from a local JSON-lines file, one
  ``{"text": ...}`` article per line) or the originals' published statistics.

A corpus spec resolves to ``(corpus_id, texts)`` (:func:`resolve_corpus`); the id is a content hash for
texts, text files and the bundled world (a hub dataset is known by name), so caches and result keys
never mistake a file replaced in place for the old one. :func:`token_rows` cuts texts into the rows
the statistics are accumulated over.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Iterator, Sequence

from ..loading import BUNDLED, assets_dir, is_bundled_name

DEFAULT_HUB_CORPUS = "wikitext:wikitext-103-raw-v1"
"""The corpus of models without a preset corpus, where the hub is reachable."""

_TEXT_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl", ".csv", ".tsv")


def _hash_texts(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:12]


def _bundled_world() -> tuple[tuple[str, ...], str]:
    """The bundled world's training text and its hash, generated once per version of ``world.json``
    (ROME and MEMIT resolve their covariance corpus on every edit; generating it takes ~0.5 s)."""
    path = assets_dir() / BUNDLED / "world.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the bundled world's text needs the bundled model assets")
    stat = path.stat()
    return _world_text(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _world_text(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, ...], str]:
    from ..toyworld.world import World

    texts = tuple(World.load(path).training_text(seed=1))
    return texts, _hash_texts(texts)


WIKIPEDIA = ("wikipedia", "20200501.en")
"""The originals' covariance corpus (``rome/layer_stats.py``: ``load_dataset("wikipedia", "20200501.en")``)."""


class Articles:
    """Texts to take one per row (truncated to the context), counted in articles, as the originals."""

    def __init__(self, texts) -> None:
        self.texts = texts

    def __iter__(self):
        return iter(self.texts)


def _article_file(path: Path) -> list[str]:
    """Articles of a JSON-lines file: one object with a ``"text"`` field per line."""
    if not path.is_file():
        raise FileNotFoundError(f"article file {path} does not exist; give a JSON-lines file with one "
                                '{"text": ...} article per line')
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text = row["text"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}, line {n}: not a JSON object with a 'text' field (one article per line, "
                             "as a Hugging Face dataset row)") from None
        if str(text).strip():
            texts.append(str(text))
    if not texts:
        raise ValueError(f"{path} holds no article with text")
    return texts


def corpus_id(model, corpus) -> str:
    """The id of a corpus spec, by content for texts, text files and the bundled world (a hub dataset by name):
    what caches and result keys record, so a corpus file replaced in place is not mistaken for the old one."""
    return resolve_corpus(model, corpus)[0]


def resolve_corpus(model, corpus) -> tuple[str, Iterator[str] | list[str]]:
    """``(corpus_id, texts)`` for a corpus spec; the id (a content hash, but for hub datasets) enters the cache
    key. Article corpora (``"wikipedia"``, ``"articles:FILE"``) come as :class:`Articles`."""
    if isinstance(corpus, str) and corpus.startswith("articles:"):
        path = Path(corpus.split(":", 1)[1]).expanduser()
        texts = _article_file(path)
        return f"articles-{path.stem}-{_hash_texts(texts)}", Articles(texts)
    if corpus == "wikipedia":
        return "wikipedia-20200501.en", Articles(_hub_texts(*WIKIPEDIA))
    if corpus is None:
        spec = getattr(model, "workbench_spec", None)
        corpus = BUNDLED if spec is not None and is_bundled_name(spec, note=False) else DEFAULT_HUB_CORPUS
    if isinstance(corpus, (list, tuple)):
        texts = [str(t) for t in corpus]
        return f"texts-{_hash_texts(texts)}", texts
    text = str(corpus)
    if text in (BUNDLED, "world", "toy-world"):
        texts, digest = _bundled_world()
        return f"toyworld-{digest}", list(texts)
    path = Path(text).expanduser()
    if path.is_file():
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return f"file-{path.stem}-{_hash_texts(texts)}", texts
    if path.is_dir() or text.startswith(("/", ".", "~")) or path.suffix in _TEXT_SUFFIXES:
        raise FileNotFoundError(f"corpus file {path} does not exist (or is a folder); give a text file with one "
                                f"text per line, 'toy-facts', or a Hugging Face dataset name such as "
                                f"{DEFAULT_HUB_CORPUS!r}")
    name, _, config = text.partition(":")
    return f"hf-{text.replace('/', '_').replace(':', '_')}", _hub_texts(name, config or None)


def _hub_texts(name: str, config: str | None) -> Iterator[str]:
    from ..loading import hub_reachable

    ok, reason = hub_reachable()
    if not ok and (name, config) == WIKIPEDIA:
        raise RuntimeError(
            f"the covariance corpus is Wikipedia ({name} {config}, one article per row, as the originals), but "
            f"the Hugging Face hub is unreachable ({reason}). Offline, use the originals' published statistics "
            "(stats='DIR_OR_FILE.npz', CLI --stats-npz) or a local copy of the articles "
            "(corpus / mom2_dataset 'articles:FILE.jsonl', one {\"text\": ...} per line)")
    if not ok:
        raise RuntimeError(
            f"corpus {name!r} is a Hugging Face dataset but the hub is unreachable ({reason}). "
            "Pass corpus= a list of strings or a text file instead (or 'toy-facts' for the bundled world).")
    import datasets

    ds = datasets.load_dataset(name, config, split="train", streaming=True)
    for row in ds:
        t = row.get("text") or ""
        if t.strip():
            yield t


def token_rows(model, texts, seq_len: int, n_samples: int | None = None) -> Iterator[list[int]]:
    """Texts joined by BOS/EOS and cut into rows of ``seq_len`` token ids (deterministic); for
    :class:`Articles`, one row per article (its first ``seq_len`` tokens, no BOS), the first ``n_samples``."""
    tok = model.tokenizer
    if isinstance(texts, Articles):
        for i, text in enumerate(texts):
            if n_samples is not None and i >= n_samples:
                return
            ids = tok(text, add_special_tokens=False)["input_ids"][:seq_len]
            if ids:
                yield ids
        return
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    buf: list[int] = []
    for text in texts:
        if sep is not None:
            buf.append(sep)
        buf.extend(tok(text, add_special_tokens=False)["input_ids"])
        while len(buf) >= seq_len:
            yield buf[:seq_len]
            buf = buf[seq_len:]
    if buf:
        yield buf

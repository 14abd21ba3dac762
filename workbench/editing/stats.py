"""Second-moment statistics of MLP keys: C = E[k kᵀ] (ROME's and MEMIT's covariance).

The keys of layer l are ``blocks.{l}.mlp.hook_post`` (the input of ``W_out``, in every family
:mod:`workbench.architecture` describes; for gated MLPs act(gate)·up). C is the
*uncentred* second moment over every token of a text corpus, as in the originals'
``layer_stats(..., to_collect=["mom2"])``; it is accumulated batch by batch in float64.

Sample count. The originals count ``mom2_n_samples`` = 100,000 *Wikipedia articles*
(each truncated to the model's context), i.e. tens of millions of tokens. Here the
count is ``n_tokens``: the corpus is tokenized, texts are joined with the BOS/EOS
token between them (as GPT-2 saw its training data) and cut into rows of ``seq_len``
tokens; exactly ``n_tokens`` keys are accumulated (the first ``n_tokens`` of that
stream). ``hparams.mom2_n_tokens`` is that number; ``mom2_n_samples`` counts the articles
of an article corpus (below).

Corpus (``corpus=``): see :mod:`workbench.editing.corpus` (the bundled world's text, texts or a
text file, a Hugging Face dataset, ``"wikipedia"`` one article per row as the originals); or the
originals' published statistics (``rome``'s ``layer_stats`` ``.npz`` files, keys ``mom2.mom2`` -- the
*sum* of k kᵀ -- and ``mom2.count``): :func:`npz_layer_stats`, or a path passed as ``stats=`` to
``rome``/``memit``/``evaluate`` (``--stats-npz``).

Cache. Results go to ``cache_dir`` (default: ``platformdirs.user_cache_dir("workbench")/stats``;
``WORKBENCH_CACHE`` overrides), one safetensors file per (model fingerprint, layer,
corpus id, n_tokens). A partial computation saves its running sum and count every
``save_every`` batches to ``<file>.partial.safetensors``; the next call resumes from
the saved count (the token stream is deterministic). Every file records one SHA-256 over
the whole record: the sum, its ``count`` and the metadata (:mod:`workbench.integrity`); a cache or partial file that is unreadable, damaged, of the wrong shape or for
another key is reported with its path (a warning), moved aside to
``<file>.corrupt-<time>`` and recomputed. One process computes a given file at a time
(an ``flock`` on ``<file>.lock``; a second waits, then reads the result).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from jaxtyping import Float

from ..architecture import key_hook, mlp_weights
from ..integrity import file_sha256
from ..loading import model_fingerprint
from .corpus import Articles, resolve_corpus, token_rows

log = logging.getLogger(__name__)

ALL_TOKENS = 2 ** 62
"""``n_tokens`` of an article corpus: every token of its articles (they are counted instead)."""
_MEMORY: dict[tuple, "LayerStats"] = {}


@dataclass
class LayerStats:
    """E[k kᵀ] of one layer's MLP keys over ``n_tokens`` tokens of a corpus."""

    mom2: Float[torch.Tensor, "d_mlp d_mlp"]  # float64
    n_tokens: int
    layer: int
    corpus: str
    fingerprint: str
    path: Path | None = None
    info: dict = field(default_factory=dict)

    @property
    def cov(self) -> torch.Tensor:
        """Alias of ``mom2`` (the originals call the uncentred second moment the covariance)."""
        return self.mom2


def default_cache_dir() -> Path:
    """``$WORKBENCH_CACHE/stats`` or the platform's user cache dir ``.../workbench/stats``."""
    env = os.environ.get("WORKBENCH_CACHE")
    if env:
        return Path(env) / "stats"
    import platformdirs

    return Path(platformdirs.user_cache_dir("workbench")) / "stats"


# --------------------------------------------------------------------------- keys
def _keys(model, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """Keys (:func:`workbench.architecture.key_hook`) for a batch of ids, [batch, pos, d_mlp]."""
    store: dict[str, torch.Tensor] = {}

    def hook(x, hook):
        store["k"] = x.detach()
        return x

    with torch.no_grad():
        model.run_with_hooks(ids, return_type=None, fwd_hooks=[(key_hook(layer), hook)],
                             stop_at_layer=layer + 1)
    return store["k"]


class StatsCacheWarning(RuntimeWarning):
    """A covariance cache file was damaged; it was moved aside and is recomputed."""


class _Corrupt(Exception):
    pass


_HEADER_KEY = "workbench_stats"


def _save(path: Path, mom2_sum: torch.Tensor, count: int, meta: dict) -> None:
    """Write the running sum and its count, the whole record (count and meta included) sealed by one SHA-256."""
    from ..integrity import write_safetensors

    write_safetensors(path, {"mom2_sum": mom2_sum.contiguous()}, {**meta, "count": int(count)},
                      header_key=_HEADER_KEY, what="covariance cache")


def _load(path: Path, d_mlp: int | None = None, meta: dict | None = None) -> tuple[torch.Tensor, int, dict]:
    """The saved (sum, count, meta); raises ``_Corrupt`` with the reason when the file cannot be trusted."""
    from ..integrity import IntegrityError, read_safetensors

    try:
        tensors, saved = read_safetensors(path, header_key=_HEADER_KEY, what="covariance cache", fix="recomputing it")
        s = tensors["mom2_sum"]
        count = int(saved["count"])
    except IntegrityError as err:
        raise _Corrupt(f"cannot be trusted ({err})") from None
    except Exception as err:  # noqa: BLE001 - a missing tensor or field, a bad count
        raise _Corrupt(f"unreadable: {type(err).__name__}: {err}") from None
    if s.dtype != torch.float64 or s.ndim != 2 or s.shape[0] != s.shape[1] or (d_mlp and s.shape[0] != d_mlp):
        raise _Corrupt(f"holds a {s.dtype} tensor of shape {tuple(s.shape)}, not float64 [{d_mlp}, {d_mlp}]")
    if count <= 0 or not torch.isfinite(s).all():
        raise _Corrupt("holds a non-positive count or non-finite values")
    for k in ("layer", "corpus", "n_tokens", "fingerprint"):
        if meta is not None and k in saved and saved[k] != meta[k]:
            raise _Corrupt(f"was written for {k}={saved[k]!r}, not {meta[k]!r}")
    return s, count, saved


def _load_or_quarantine(path: Path, d_mlp: int, meta: dict, verbose: bool):
    """:func:`_load`, or ``None`` after moving a damaged file aside with a warning naming it."""
    try:
        return _load(path, d_mlp, meta)
    except _Corrupt as err:
        aside = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(path, aside)
        msg = (f"covariance cache {path} {err}; moved it to {aside} and recomputing "
               f"(delete the moved file once you no longer need it)")
        warnings.warn(msg, StatsCacheWarning, stacklevel=3)
        return None


@contextlib.contextmanager
def _exclusive(path: Path, verbose: bool) -> Iterator[None]:
    """Hold ``<path>.lock`` (blocking): one process computes a cache file, others wait for it."""
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if verbose:
                log.info("layer_stats: another process is computing %s; waiting for it", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def layer_stats(model, layer: int, *, corpus=None, n_tokens: int = 100_000, cache_dir: str | Path | None = None,
                batch_size: int = 8, seq_len: int | None = None, save_every: int = 20, progress: bool = True,
                force: bool = False, fingerprint: str | None = None, verbose: bool = True,
                n_samples: int = 100_000) -> LayerStats:
    """E[k kᵀ] of ``blocks.{layer}.mlp.hook_post`` over the first ``n_tokens`` tokens of ``corpus``
    (for an article corpus, ``"wikipedia"`` or ``"articles:FILE"``: over every token of its first
    ``n_samples`` articles, each cut to the context, as the originals).

    Cached on disk by (model fingerprint, layer, corpus, n_tokens) under ``cache_dir``
    (printed); a partial computation resumes. ``force`` recomputes from scratch.
    """
    if n_tokens <= 0:
        raise ValueError("n_tokens must be positive")
    if not 0 <= int(layer) < int(model.cfg.n_layers):
        raise ValueError(f"layer {layer} is out of range for a {model.cfg.n_layers}-layer model")
    fp = fingerprint or model_fingerprint(model)
    corpus_id, texts = resolve_corpus(model, corpus)
    if isinstance(texts, Articles):  # counted in articles: every token of the first n_samples, whole context
        corpus_id = f"{corpus_id}-a{int(n_samples)}"
        texts = Articles(itertools.islice(texts, int(n_samples)))
        n_tokens = ALL_TOKENS
        seq_len = int(seq_len or model.cfg.n_ctx)
    seq_len = int(seq_len or min(int(model.cfg.n_ctx), 256))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = (fp, layer, corpus_id, n_tokens, str(cache))
    if key in _MEMORY and not force:
        return _MEMORY[key]
    folder = cache / fp
    path = folder / f"layer{layer}_{corpus_id}_n{'all' if n_tokens == ALL_TOKENS else n_tokens}.safetensors"
    partial = path.with_name(path.stem + ".partial.safetensors")
    meta = {"layer": layer, "corpus": corpus_id, "n_tokens": n_tokens, "fingerprint": fp, "seq_len": seq_len,
            "hook": key_hook(layer), "spec": getattr(model, "workbench_spec", None)}

    d_mlp = mlp_weights(model, layer).d_mlp
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(path, verbose):
        return _layer_stats_locked(model, layer, path, partial, meta, key, texts, corpus_id, fp, d_mlp, n_tokens,
                                   batch_size, seq_len, save_every, progress, force, verbose)


def _layer_stats_locked(model, layer, path, partial, meta, key, texts, corpus_id, fp, d_mlp, n_tokens, batch_size,
                        seq_len, save_every, progress, force, verbose) -> LayerStats:
    loaded = _load_or_quarantine(path, d_mlp, meta, verbose) if path.exists() and not force else None
    if loaded is not None:
        s, count, _ = loaded
        if verbose:
            log.info("layer_stats: layer %d: cached E[kk^T] over %d tokens from %s", layer, count, path)
        stats = LayerStats(mom2=s / count, n_tokens=count, layer=layer, corpus=corpus_id, fingerprint=fp, path=path,
                           info={"resumed_from": None, "cached": True})
        _MEMORY[key] = stats
        return stats

    mom2_sum = torch.zeros(d_mlp, d_mlp, dtype=torch.float64)
    count = 0
    if partial.exists() and not force:
        loaded = _load_or_quarantine(partial, d_mlp, meta, verbose)
        if loaded is not None:
            mom2_sum, count, pmeta = loaded
            if pmeta.get("seq_len") != seq_len:  # a different row layout: start over
                mom2_sum, count = torch.zeros(d_mlp, d_mlp, dtype=torch.float64), 0
    resumed = count
    if verbose:
        what = f"resuming at {count}" if count else "computing"
        log.info("layer_stats: layer %d: %s E[kk^T] over %d tokens of %s; cache %s", layer, what, n_tokens,
                 corpus_id, path)

    from ..progress import progress_bar

    bar = progress_bar(total=None if n_tokens == ALL_TOKENS else n_tokens, initial=count, unit="tok",
                       desc=f"layer_stats L{layer}", enabled=progress, leave=False)
    device = model.cfg.device
    rows = token_rows(model, texts, seq_len)  # an article corpus comes already cut to its n_samples
    skipped = 0
    batch: list[list[int]] = []
    n_batches = 0

    def flush(batch_rows: list[list[int]]) -> None:
        nonlocal mom2_sum, count, n_batches
        for width in sorted({len(r) for r in batch_rows}):  # the tail row may be shorter
            same = [r for r in batch_rows if len(r) == width]
            ids = torch.tensor(same, dtype=torch.long, device=device)
            k = _keys(model, layer, ids).reshape(-1, d_mlp)
            k = k[: n_tokens - count].to("cpu", torch.float64)
            mom2_sum += k.T @ k
            count += k.shape[0]
            bar.update(k.shape[0])
        n_batches += 1
        if n_batches % save_every == 0 and count < n_tokens:
            _save(partial, mom2_sum, count, meta)

    try:
        for row in rows:
            if count >= n_tokens:
                break
            if skipped < resumed:  # resume: skip the tokens already accumulated
                take = min(len(row), resumed - skipped)
                skipped += take
                row = row[take:]
                if not row:
                    continue
            batch.append(row)
            if len(batch) == batch_size:
                flush(batch)
                batch = []
        if batch and count < n_tokens:
            flush(batch)
    except BaseException:
        if count > resumed:
            _save(partial, mom2_sum, count, meta)
        raise
    finally:
        bar.close()
    if count == 0:
        raise ValueError(f"corpus {corpus_id} produced no tokens")
    if count < n_tokens != ALL_TOKENS and verbose:
        log.warning("layer_stats: corpus %s has only %d tokens (< %d asked); using all of them", corpus_id, count,
                    n_tokens)
    _save(path, mom2_sum, count, meta)
    if partial.exists():
        partial.unlink()
    stats = LayerStats(mom2=mom2_sum / count, n_tokens=count, layer=layer, corpus=corpus_id, fingerprint=fp,
                       path=path, info={"resumed_from": resumed or None, "cached": False})
    _MEMORY[key] = stats
    return stats


def clear_memory_cache() -> None:
    """Forget in-memory stats (the disk cache stays)."""
    _MEMORY.clear()


# --------------------------------------------------------------------------- the originals' .npz statistics
NPZ_KEYS = ("mom2.mom2", "mom2.count")
"""Keys of an original ``layer_stats`` file (``CombinedStat(mom2=SecondMoment())``'s ``state_dict``:
``mom2.mom2`` the *sum* of k kᵀ, ``mom2.count`` the number of keys; also ``mom2.constructor``, ``sample_size``)."""


def check_npz_source(source: str | os.PathLike) -> Path:
    """``source`` as a path that exists (a ``.npz`` file or a folder), else a :class:`FileNotFoundError`."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give an original layer_stats .npz file or the folder "
                                "holding them (e.g. data/stats/gpt2-xl/wikipedia_stats)")
    return path


def npz_file_for(source: str | os.PathLike, layer: int) -> Path:
    """The ``.npz`` file of ``layer`` in ``source``: the file itself (its name must not name another
    layer), or the one file under the folder named like ``...h.{layer}.mlp...mom2....npz``."""
    import re

    path = check_npz_source(source)
    pattern = re.compile(rf"(^|[._]){int(layer)}\.mlp\.")
    if path.is_file():
        named = re.search(r"(?:^|[._])(\d+)\.mlp\.", path.name)
        if named and int(named.group(1)) != int(layer):
            raise ValueError(f"{path} holds layer {named.group(1)}'s statistics, not layer {layer}'s")
        return path
    found = sorted(p for p in path.rglob("*.npz") if pattern.search(p.name) and "mom2" in p.name)
    if len(found) != 1:
        what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found[:4])})"
        raise FileNotFoundError(f"{path} has {what} of layer {layer}'s statistics; the originals name them like "
                                f"transformer.h.{layer}.mlp.c_proj_float32_mom2_100000.npz")
    return found[0]


def npz_layer_stats(source: str | os.PathLike, layer: int, model=None) -> LayerStats:
    """E[k kᵀ] of ``layer`` from the originals' published statistics (``rome/layer_stats.py``'s ``.npz``:
    ``mom2.mom2`` / ``mom2.count``); ``source`` is the file or a folder holding one per layer. With
    ``model``, the matrix must be [d_mlp, d_mlp] of that layer. The corpus id carries the file's SHA-256."""
    import numpy as np

    path = npz_file_for(source, layer)
    stat = path.stat()
    key = ("npz", str(path.resolve()), stat.st_size, stat.st_mtime_ns, int(layer))
    if key in _MEMORY:
        return _MEMORY[key]
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise ValueError(f"{path} is not an original layer_stats file: it lacks {missing} "
                                 f"(has {sorted(data.files)})")
            total = torch.from_numpy(np.asarray(data["mom2.mom2"], dtype=np.float64))
            count = int(data["mom2.count"])
            sample_size = int(data["sample_size"]) if "sample_size" in data.files and data["sample_size"].shape == () \
                and np.issubdtype(data["sample_size"].dtype, np.number) else None
    except (OSError, ValueError, EOFError) as err:
        if isinstance(err, ValueError) and "layer_stats" in str(err):
            raise
        raise ValueError(f"{path} is not a readable .npz file ({type(err).__name__}: {err})") from None
    if total.ndim != 2 or total.shape[0] != total.shape[1]:
        raise ValueError(f"{path}: mom2.mom2 has shape {tuple(total.shape)}, not a square [d_mlp, d_mlp] matrix")
    if model is not None:
        d_mlp = mlp_weights(model, layer).d_mlp
        if total.shape[0] != d_mlp:
            raise ValueError(f"{path}: a [{total.shape[0]}, {total.shape[0]}] matrix, but layer {layer} of the "
                             f"model has {d_mlp} MLP units; these statistics are another model's")
    if count <= 0 or not torch.isfinite(total).all():
        raise ValueError(f"{path}: non-positive mom2.count ({count}) or non-finite values")
    digest = file_sha256(path)
    stats = LayerStats(mom2=total / count, n_tokens=count, layer=int(layer), corpus=f"npz-{digest[:12]}",
                       fingerprint="npz", path=path,
                       info={"source": "npz", "sha256": digest, "sample_size": sample_size, "cached": True})
    _MEMORY[key] = stats
    return stats

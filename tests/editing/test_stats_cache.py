"""Covariance caches under damage: detected, reported with their path, moved aside, recomputed (problem 11)."""

from __future__ import annotations

import os

import pytest
import torch

from workbench.editing.stats import StatsCacheWarning, clear_memory_cache, layer_stats

TEXTS = [f"Varo Keltin number {i} was born in Osla and speaks Tuvan; the trumpet is loud." for i in range(60)]
KW = dict(corpus=TEXTS, n_tokens=200, seq_len=32, batch_size=4, progress=False, verbose=False)


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "random":
        path.write_bytes(os.urandom(len(data)))
    elif how == "flipped bit":
        data[-5] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "wrong tensor":
        from safetensors.torch import save_file

        save_file({"mom2_sum": torch.ones(3, 3, dtype=torch.float64)}, str(path), metadata={"count": "5"})


@pytest.mark.parametrize("how", ["truncated", "random", "flipped bit", "wrong tensor"])
def test_corrupt_cache_is_reported_moved_aside_and_recomputed(tiny_model, tmp_path, how):
    clear_memory_cache()
    fresh = layer_stats(tiny_model, 1, cache_dir=tmp_path, **KW)
    _damage(fresh.path, how)
    clear_memory_cache()
    with pytest.warns(StatsCacheWarning, match=f"{fresh.path}.*moved it to"):
        again = layer_stats(tiny_model, 1, cache_dir=tmp_path, **KW)
    assert torch.equal(again.mom2, fresh.mom2) and not again.info["cached"]
    assert len(list(fresh.path.parent.glob("*.corrupt-*"))) == 1
    clear_memory_cache()
    assert layer_stats(tiny_model, 1, cache_dir=tmp_path, **KW).info["cached"]  # the recomputed file is sound


def test_corrupt_partial_file_restarts(tiny_model, tmp_path):
    clear_memory_cache()
    fresh = layer_stats(tiny_model, 0, cache_dir=tmp_path, **KW)
    partial = fresh.path.with_name(fresh.path.stem + ".partial.safetensors")
    os.replace(fresh.path, partial)  # a "partial" holding everything ...
    _damage(partial, "flipped bit")  # ... and damaged
    clear_memory_cache()
    with pytest.warns(StatsCacheWarning, match="partial"):
        again = layer_stats(tiny_model, 0, cache_dir=tmp_path, **KW)
    assert torch.equal(again.mom2, fresh.mom2) and again.info["resumed_from"] is None


def test_missing_corpus_file_says_so(tiny_model, tmp_path):
    """Problem 14: `edit --corpus /no/such/file` said the hub was unreachable."""
    with pytest.raises(FileNotFoundError, match="corpus file .*no/such/file.txt does not exist"):
        layer_stats(tiny_model, 0, corpus=str(tmp_path / "no/such/file.txt"), cache_dir=tmp_path, progress=False)


def _rewrite_header(path, change):
    """Change the cache's JSON header with ``change(meta)``, keeping the file valid safetensors."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    meta = json.loads(header["workbench_stats"])
    change(meta)
    save_file(tensors, str(path), metadata={"workbench_stats": json.dumps(meta)})


@pytest.mark.parametrize("change", ["count digit", "no checksum (older workbench)"])
def test_count_is_inside_the_checksum(tiny_model, tmp_path, change):
    """Issue 21: the `count` header was outside the SHA-256; one flipped digit was used (MEMIT deltas changed
    by up to 29 %). A cache from before whole-record checksums is not trusted either."""
    clear_memory_cache()
    fresh = layer_stats(tiny_model, 1, cache_dir=tmp_path, **KW)
    if change == "count digit":
        _rewrite_header(fresh.path, lambda m: m.update(count=m["count"] + 10))
        match = "does not match its recorded SHA-256"
    else:
        _rewrite_header(fresh.path, lambda m: m.pop("checksum"))
        match = "has no checksum .*older workbench"
    clear_memory_cache()
    with pytest.warns(StatsCacheWarning, match=f"{fresh.path}.*{match}.*moved it to"):
        again = layer_stats(tiny_model, 1, cache_dir=tmp_path, **KW)
    assert again.n_tokens == fresh.n_tokens == 200 and torch.equal(again.mom2, fresh.mom2)


def test_corpus_file_enters_the_key_by_content(tiny_model, tmp_path):
    """Issue 21: replacing the corpus file in place must not reuse statistics of the old text."""
    from workbench.editing.corpus import corpus_id

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS))
    first = corpus_id(tiny_model, str(corpus))
    clear_memory_cache()
    a = layer_stats(tiny_model, 0, cache_dir=tmp_path / "c", **{**KW, "corpus": str(corpus)})
    corpus.write_text("\n".join(t.replace("Osla", "Paris") for t in TEXTS))
    assert corpus_id(tiny_model, str(corpus)) != first
    clear_memory_cache()
    b = layer_stats(tiny_model, 0, cache_dir=tmp_path / "c", **{**KW, "corpus": str(corpus)})
    assert not b.info["cached"] and b.path != a.path and not torch.equal(a.mom2, b.mom2)

"""layer_stats: the second moment itself, disk cache reuse, and resuming a partial computation."""

from __future__ import annotations

import pytest
import torch

import workbench.editing.stats as stats_mod
from workbench.editing.stats import clear_memory_cache, layer_stats

TEXTS = [f"Varo Keltin number {i} was born in Osla and speaks Tuvan; the trumpet is loud." for i in range(120)]


def test_matches_direct_computation(tiny_model, tmp_path):
    s = layer_stats(tiny_model, 1, corpus=TEXTS, n_tokens=300, cache_dir=tmp_path, seq_len=32, batch_size=4,
                    progress=False)
    assert s.n_tokens == 300 and s.mom2.dtype == torch.float64
    rows = list(stats_mod.token_rows(tiny_model, TEXTS, 32))
    ids = torch.tensor([r for r in rows if len(r) == 32][:10])
    k = stats_mod._keys(tiny_model, 1, ids).reshape(-1, tiny_model.cfg.d_mlp)[:300].double()
    assert torch.allclose(s.mom2, k.T @ k / 300, rtol=1e-10, atol=1e-12)
    assert torch.allclose(s.mom2, s.mom2.T)


def test_cache_reuse(tiny_model, tmp_path, monkeypatch):
    clear_memory_cache()
    a = layer_stats(tiny_model, 0, corpus=TEXTS, n_tokens=256, cache_dir=tmp_path, progress=False)
    assert a.path.exists() and a.path.parent.parent == tmp_path
    clear_memory_cache()
    calls = []
    monkeypatch.setattr(stats_mod, "_keys", lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(AssertionError))
    b = layer_stats(tiny_model, 0, corpus=TEXTS, n_tokens=256, cache_dir=tmp_path, progress=False)
    assert not calls and b.info["cached"] and torch.equal(a.mom2, b.mom2)
    # a different corpus, count or layer is a different cache entry
    monkeypatch.undo()
    c = layer_stats(tiny_model, 0, corpus=TEXTS[:60], n_tokens=256, cache_dir=tmp_path, progress=False)
    assert c.path != a.path


def test_resume_after_interrupt(tiny_model, tmp_path, monkeypatch):
    clear_memory_cache()
    kw = dict(corpus=TEXTS, n_tokens=700, cache_dir=tmp_path / "fresh", seq_len=32, batch_size=2, progress=False)
    fresh = layer_stats(tiny_model, 2, **kw)
    clear_memory_cache()
    kw["cache_dir"] = tmp_path / "resumed"
    real = stats_mod._keys
    n = {"calls": 0}

    def flaky(*args, **kwargs):
        n["calls"] += 1
        if n["calls"] == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stats_mod, "_keys", flaky)
    with pytest.raises(KeyboardInterrupt):
        layer_stats(tiny_model, 2, save_every=2, **kw)
    partials = list((tmp_path / "resumed").rglob("*.partial.safetensors"))
    assert len(partials) == 1
    monkeypatch.setattr(stats_mod, "_keys", real)
    resumed = layer_stats(tiny_model, 2, **kw)
    assert resumed.info["resumed_from"] == 5 * 64  # five batches of 2 rows x 32 tokens were saved
    assert resumed.n_tokens == 700
    assert torch.allclose(resumed.mom2, fresh.mom2, rtol=1e-12, atol=1e-14)
    assert not list((tmp_path / "resumed").rglob("*.partial.safetensors"))


def test_messages_go_through_logging_not_stderr(tiny_model, tmp_path, capfd, caplog, monkeypatch):
    """Informational lines are log records (a notebook shows no red stderr), at INFO level."""
    import logging

    clear_memory_cache()
    # without the CLI's stderr handler (a CLI test may have added it): nothing may reach stderr directly
    monkeypatch.setattr(logging.getLogger("workbench"), "handlers", [])
    with caplog.at_level(logging.INFO, logger="workbench"):
        layer_stats(tiny_model, 2, corpus=TEXTS, n_tokens=200, cache_dir=tmp_path, progress=False)
        clear_memory_cache()
        layer_stats(tiny_model, 2, corpus=TEXTS, n_tokens=200, cache_dir=tmp_path, progress=False)
    messages = [r.getMessage() for r in caplog.records if r.name == "workbench.editing.stats"]
    assert any("computing" in m for m in messages) and any("cached" in m for m in messages)
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "workbench.editing.stats")
    assert "layer_stats" not in capfd.readouterr().err

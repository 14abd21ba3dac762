"""Fixtures shared by the editing tests: a small stats corpus and weight snapshots."""

from __future__ import annotations

import pytest
import torch

from workbench.editing import layer_stats
from workbench.editing.edit import named_parameters

CORPUS = [f"The capital of France is Paris. Miles Davis plays the trumpet. Varo Keltin speaks Tuvan {i}."
          for i in range(200)]


def snapshot(model) -> dict[str, torch.Tensor]:
    """Copies of every parameter, by Hugging Face name."""
    return {n: p.detach().clone() for n, p in named_parameters(model).items()}


def identical(model, snap: dict[str, torch.Tensor]) -> bool:
    """Whether every parameter is bit-identical to the snapshot."""
    params = named_parameters(model)
    return all(torch.equal(params[n], t) for n, t in snap.items())


@pytest.fixture(scope="session")
def tiny_stats(tiny_model, tmp_path_factory):
    """Covariance statistics of every layer of ``tiny_model`` (one cache folder per session)."""
    cache = tmp_path_factory.getbasetemp() / "editing-stats"
    return {l: layer_stats(tiny_model, l, corpus=CORPUS, n_tokens=2000, cache_dir=cache, progress=False)
            for l in range(tiny_model.cfg.n_layers)}


def fail_on_second_call(monkeypatch, module, name: str, failure: str) -> dict:
    """Replace ``module.name`` by a wrapper whose 2nd call fails: "error" raises RuntimeError,
    "interrupt" KeyboardInterrupt, "nan" returns the real result with a NaN ``target``.
    Returns the call counter ``{"n": ...}``."""
    real = getattr(module, name)
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            if failure == "error":
                raise RuntimeError("injected")
            if failure == "interrupt":
                raise KeyboardInterrupt
            res = real(*args, **kwargs)
            res.target = res.target * float("nan")
            return res
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)
    return calls

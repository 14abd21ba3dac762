"""The corruption of causal tracing: noise added to (or replacing) token embeddings.

Reference §2. The default draw reproduces the original implementation number for number:
``numpy.random.RandomState(seed).randn(samples, span_len, d_model) * nu`` in float64,
added to the float32 output of the token embedding (``hook_embed``, before positions are
added) in float64 and rounded back to float32 (what ``x[1:, b:e] += torch.from_numpy(noise)``
does in ROME). The same draw serves every cell of one trace (common random numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch
from jaxtyping import Float

NoiseSpec = Union[float, int, str]


def _embed_subject(model, subject: str) -> torch.Tensor:
    """Token-embedding outputs [n_tokens, d] of ``subject`` tokenized alone, without BOS."""
    ids = model.tokenizer(subject, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"subject {subject!r} tokenizes to nothing")
    tokens = torch.tensor([ids], dtype=torch.long, device=model.cfg.device)
    with torch.inference_mode():
        return model.embed(tokens)[0].float()


def parse_noise(noise: NoiseSpec) -> tuple[str, float]:
    """Split a noise spec into (kind, value).

    kind ``"level"``: ``value`` is nu itself (a number or a numeric string);
    ``"std"``: nu = ``value`` x the std of subject embeddings (rule ``"s<x>"``, ``"s"`` = 1);
    ``"uniform"``: uniform noise in [-value, value] (rule ``"u<x>"``).
    """
    if isinstance(noise, bool):
        raise ValueError(f"invalid noise spec {noise!r}")
    if isinstance(noise, (int, float, np.floating, np.integer)):
        return "level", float(noise)
    text = str(noise).strip()
    try:
        if text.startswith("s"):
            return "std", float(text[1:]) if len(text) > 1 else 1.0
        if text.startswith("u"):
            return "uniform", float(text[1:])
        return "level", float(text)
    except ValueError:
        raise ValueError(
            f"invalid noise spec {noise!r}: use a number (nu itself), 's<x>' (x times the std of the "
            "subject embeddings, default 's3') or 'u<x>' (uniform in [-x, x])"
        ) from None


def noise_level(model, subjects: Sequence[str] | str, rule: NoiseSpec = "s3") -> float:
    """The noise scale nu of ``rule`` for ``subjects`` (reference §2).

    ``"s<x>"``: x x ``torch.cat([embed(subject) for subject in subjects]).std()``, each
    subject tokenized alone without BOS, torch's unbiased std over all entries (ROME's
    ``collect_embedding_std``). Sweeps call this once over the dataset's subjects.
    A number is returned as is; ``"u<x>"`` returns x (the uniform half-width).
    """
    kind, value = parse_noise(rule)
    if kind != "std":
        return value
    if isinstance(subjects, str):
        subjects = [subjects]
    if not subjects:
        raise ValueError("noise rule 's<x>' needs at least one subject")
    data = torch.cat([_embed_subject(model, s) for s in subjects])
    return value * float(data.std().item())


def draw_noise(samples: int, span_len: int, d_model: int, nu: float, *, seed: int = 1,
               uniform: bool = False) -> np.ndarray:
    """The scaled noise ``RandomState(seed).randn(samples, span_len, d_model) * nu`` (float64).

    ``uniform``: ``RandomState(seed).uniform(-1, 1, shape) * nu`` instead.
    """
    rs = np.random.RandomState(seed)
    shape = (samples, span_len, d_model)
    raw = rs.uniform(-1, 1, shape) if uniform else rs.randn(*shape)
    return raw * nu


@dataclass
class Corruption:
    """Noise at fixed positions, one draw per sample, applied to the token embeddings."""

    positions: tuple[int, ...]
    noise: Float[np.ndarray, "samples span d_model"]  # float64, already scaled by nu
    replace: bool = False

    @property
    def samples(self) -> int:
        return self.noise.shape[0]

    def apply(self, x: Float[torch.Tensor, "batch pos d_model"],
              sample_idx: torch.Tensor) -> Float[torch.Tensor, "batch pos d_model"]:
        """Corrupt rows of ``x`` in place, row i with sample ``sample_idx[i]``; returns ``x``.

        Adds in float64 and rounds to ``x``'s dtype, like ROME's in-place ``+=``.
        """
        noise = getattr(self, "_cache", None)
        if noise is None or noise.device != x.device:
            noise = torch.from_numpy(self.noise).to(x.device)
            self._cache = noise
        pos = torch.tensor(self.positions, device=x.device)
        eps = noise[sample_idx.to(x.device)]
        if self.replace:
            x[:, pos] = eps.to(x.dtype)
        else:
            x[:, pos] = (x[:, pos].double() + eps).to(x.dtype)
        return x

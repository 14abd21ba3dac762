"""Attribution patching: a first-order estimate of every cell of a causal trace (``method="attribution"``).

An exact cell restores one clean state inside each corrupted run and reruns the model. Its
first-order Taylor estimate needs only the corrupted run and its gradient: for noise sample
s, state site ``h`` (``hook_resid_post``, ``hook_mlp_out`` or ``hook_attn_out`` of a layer)
and token t,

    p_s(restore h at t) - p_s  ≈  (h_clean[t] - h_s[t]) · ∂p_s/∂h[t]

where p_s is the answer's probability (softmax at the last token) in corrupted run s and the
gradient is taken at that run. One forward pass and one backward pass of the S corrupted
rows give the gradient at every site, layer and token at once, so the whole map (every kind)
costs about three forward passes instead of one (partial) pass per cell. A cell's estimate
is ``p_corrupt`` plus the mean over samples of its first-order terms.

Windows (mlp/attn cells restore ``window`` layers around l at once): the estimate is the
sum of the window's single-layer terms, each with the full gradient (which includes the
paths through the window's later layers). That is the first-order effect of *adding* each
layer's clean-minus-corrupted difference; the exact cell instead *holds* the window's later
layers at their clean values, which cuts those paths at the restored token. The two agree
exactly to first order for ``window=1`` and for hidden cells; for wider windows they differ
by those within-window paths (a first-order term, not a higher-order one), the price of
one backward pass for every window (holding them would need one backward per window).

Tokens before the first corrupted one are unchanged by the corruption, so their cells are
set to ``p_corrupt`` (their estimate is zero up to rounding), as the exact engines do.
Severing is not estimated (use an exact engine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .engine import Engine, Plan, run_chunked
from .results import TraceResult

SITES = ("resid_post", "mlp_out", "attn_out")


class AttributionEngine(Engine):
    """First-order estimates of the cells of a :class:`~workbench.tracing.engine.Plan` (module docstring)."""

    name = "attribution"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        store: dict[str, torch.Tensor] = {}

        def recorder(name):
            def hook(x, hook=None):
                store[name] = x.detach()
                return x
            return hook

        names = self._names()
        with torch.inference_mode(), self._ctx():
            logits = self.model.run_with_hooks(self.ids, fwd_hooks=[(n, recorder(n)) for n in names])
        self.clean_probs = torch.softmax(logits[0, -1].float(), -1)
        self.clean = {site: torch.stack([store[f"blocks.{j}.hook_{site}"][0] for j in range(self.L)]).float()
                      for site in SITES}  # [L, n, d]
        self._terms: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    def _names(self) -> list[str]:
        return [f"blocks.{j}.hook_{site}" for j in range(self.L) for site in SITES]

    def _row_bytes(self) -> int:
        cfg = self.model.cfg
        n, d = self.n, self.d
        # the saved activations of a forward pass with its graph, and the backward's buffers
        return 3 * 4 * (n * (40 * d + 4 * cfg.d_mlp + 2 * cfg.d_vocab) + 4 * cfg.n_heads * n * n)

    def first_order_terms(self, answer: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(p, terms)``: p [S] of the answer per corrupted run and, per site, the first-order
        terms ``(clean - corrupted) · ∂p/∂state`` [L, S, n] (float64), computed once per answer."""
        if answer not in self._terms:
            packed = run_chunked(self.S, self._chunk_rows(), lambda a, b: self._chunk_terms(answer, a, b))
            terms = packed[:, 1:].reshape(self.S, len(SITES), self.L, self.n).permute(1, 2, 0, 3)
            self._terms[answer] = (packed[:, 0], dict(zip(SITES, terms)))
        return self._terms[answer]

    def _chunk_terms(self, answer: int, a: int, b: int) -> torch.Tensor:
        """Rows a..b of the samples: [rows, 1 + 3 L n], p then the terms [site, layer, token] flattened."""
        samples = torch.arange(a, b, device=self.device)
        store: dict[str, torch.Tensor] = {}

        def corrupt(x, hook=None):
            x = self.corruption.apply(x.detach().clone(), samples)
            return x.requires_grad_(True)  # the graph starts here: no gradient reaches the weights

        def recorder(name):
            def hook(x, hook=None):
                store[name] = x
                return x
            return hook

        names = self._names()
        with torch.enable_grad(), self._ctx():
            logits = self.model.run_with_hooks(self.ids.repeat(b - a, 1),
                                               fwd_hooks=[("hook_embed", corrupt)] + [(n, recorder(n)) for n in names])
            p = torch.softmax(logits[:, -1].float(), -1)[:, answer]
            # rows are independent: the gradient of the sum is each row's own gradient
            grads = torch.autograd.grad(p.sum(), [store[n] for n in names], allow_unused=True)
        grad = dict(zip(names, grads))
        terms = torch.zeros(b - a, len(SITES), self.L, self.n, dtype=torch.float64, device=self.device)
        for i, site in enumerate(SITES):
            for j in range(self.L):
                name = f"blocks.{j}.hook_{site}"
                if grad[name] is not None:  # None: the state does not reach the answer
                    diff = self.clean[site][j][None] - store[name].detach().float()
                    terms[:, i, j] = (diff * grad[name].float()).sum(-1).double()
        return torch.cat([p.detach().double()[:, None], terms.reshape(b - a, -1)], dim=1)

    def p_corrupt(self, answer: int) -> float:
        p, _ = self.first_order_terms(answer)
        return float(p.mean())

    def ensure_corrupted(self) -> None:
        """Nothing to prepare: the corrupted runs are part of :meth:`first_order_terms`."""

    def run(self, plan: Plan, answer: int) -> np.ndarray:
        if plan.corr_mlp.any() or plan.corr_attn.any():
            raise ValueError("attribution patching does not estimate severed traces; use an exact engine")
        p, terms = self.first_order_terms(answer)
        p_corrupt = float(p.mean())
        mean = {site: t.mean(1).cpu().numpy() for site, t in terms.items()}  # [L, n]
        tok = plan.token
        out = np.full(len(plan), p_corrupt, dtype=np.float64)
        hid = np.nonzero(plan.resid >= 0)[0]
        out[hid] += mean["resid_post"][plan.resid[hid], tok[hid]]
        out += (plan.clean_mlp * mean["mlp_out"][:, tok].T).sum(1)
        out += (plan.clean_attn * mean["attn_out"][:, tok].T).sum(1)
        out[tok < min(self.corruption.positions)] = p_corrupt
        return out


@dataclass
class Agreement:
    """How an estimated map ranks its cells against the exact one (one kind)."""

    kind: str
    spearman: float  # rank correlation of the indirect effects (NaN where a map is constant)
    top_cell_same: bool  # the cell of largest indirect effect is the same
    cells: int  # the cells compared: every layer of the tokens from the first corrupted one on


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN where either side is constant."""
    import pandas as pd

    ra = pd.Series(np.ravel(a)).rank().to_numpy()
    rb = pd.Series(np.ravel(b)).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def agreement(exact: TraceResult, estimate: TraceResult) -> dict[str, Agreement]:
    """Per kind of both results: the rank agreement of ``estimate`` (e.g. ``method="attribution"``)
    with ``exact`` over the cells from the first corrupted token on (those before it are
    ``p_corrupt`` in both and would inflate the correlation)."""
    if exact.tokens != estimate.tokens:
        raise ValueError("the two traces are of different prompts (their tokens differ)")
    first = min(exact.corrupted_span.positions)
    out = {}
    for kind in (k for k in exact.kinds if k in estimate.kinds):
        a, b = exact.ie(kind)[first:], estimate.ie(kind)[first:]
        out[kind] = Agreement(kind, spearman(a, b), bool(np.argmax(a) == np.argmax(b)), int(a.size))
    return out


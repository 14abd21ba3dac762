"""Engines that run many restoration cells of one causal trace (reference §2-3).

A *cell* restores some states of the clean run at one token inside the corrupted run and
reads the answer's probability at the last token, averaged over the noise samples. A
:class:`Plan` lists cells as arrays (token, restored layer, per-layer patch masks), so the
same description drives three engines:

* ``"loop"`` -- the original algorithm: one forward pass (batch of S+1, row 0 clean) per
  cell, each restored state copied from row 0. Slow; the baseline of the benchmark.
* ``"batched"`` -- TransformerBridge forward passes with (cell x sample) rows in the batch
  dimension, each row patched at its own token by index tensors in hooks. Works for any
  architecture the bridge supports; the reference the fast engine is tested against.
* ``"incremental"`` (:mod:`workbench.tracing.incremental`) -- every family of
  :mod:`workbench.architecture`, through the model's own blocks: a row restoring at token t from layer s on starts from the cached corrupted
  residual at layer s and computes only positions >= t, reading the keys and values of
  positions < t from the cached corrupted run (causal attention: neither the layers below
  s nor the positions before t can differ from the corrupted run). Nothing of a family's
  arithmetic is re-implemented: rotary positions, grouped-query attention and parallel
  attention/MLP blocks run in the model's own code. With user hooks attached to the
  bridge, :func:`workbench.tracing.api.make_engine` falls back to ``"batched"`` (with a
  warning).

:mod:`workbench.tracing.attribution` adds first-order estimates of every cell
(``engine="attribution"``); :func:`workbench.tracing.api.make_engine` picks among them all.

Batches are chunked by a memory budget (free GPU memory, or available RAM on CPU); a chunk
that runs out of memory is halved and retried.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np
import torch

from .noise import Corruption

KINDS = ("hidden", "mlp", "attn")
ENGINES = ("auto", "incremental", "batched", "loop")
PRECISIONS = ("exact", "fast", "bf16")


# --------------------------------------------------------------------------- plans

def window_layers(layer: int, n_layers: int, window: int) -> range:
    """Layers restored by an mlp/attn cell at ``layer``: [l - W//2, l + W - W//2) clipped."""
    return range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2))


@dataclass
class Plan:
    """Cells of a trace as arrays (C cells, L layers).

    ``resid[c] = l >= 0``: restore ``blocks.l.hook_resid_post`` at ``token[c]`` from the
    clean run. ``clean_mlp[c, j]``/``clean_attn[c, j]``: restore ``hook_mlp_out`` /
    ``hook_attn_out`` of block j at the token from the clean run; ``corr_*``: set them to
    their values in the corrupted run without restoration (severing). Clean mlp/attn
    patches are never combined with a resid restore (not needed by any trace).
    """

    token: np.ndarray
    resid: np.ndarray
    clean_mlp: np.ndarray
    clean_attn: np.ndarray
    corr_mlp: np.ndarray
    corr_attn: np.ndarray

    def __len__(self) -> int:
        return len(self.token)

    @classmethod
    def empty(cls, n_cells: int, n_layers: int) -> "Plan":
        z = lambda: np.zeros((n_cells, n_layers), dtype=bool)  # noqa: E731
        return cls(np.zeros(n_cells, dtype=np.int64), np.full(n_cells, -1, dtype=np.int64), z(), z(), z(), z())

    @classmethod
    def concat(cls, plans: Sequence["Plan"]) -> "Plan":
        return cls(*(np.concatenate([getattr(p, f.name) for p in plans]) for f in fields(cls)))

    def take(self, idx: np.ndarray) -> "Plan":
        return Plan(*(getattr(self, f.name)[idx] for f in fields(self)))

    def start_layers(self) -> np.ndarray:
        """First block whose computation can differ from the corrupted run, per cell (L: none)."""
        n_layers = self.clean_mlp.shape[1]
        clean = self.clean_mlp | self.clean_attn
        first_clean = np.where(clean.any(1), clean.argmax(1), n_layers)
        return np.where(self.resid >= 0, self.resid + 1, first_clean)


def kind_plan(kind: str, tokens: Sequence[int], n_layers: int, window: int) -> Plan:
    """Cells (t, l) for t in ``tokens`` (outer) and every layer l (inner) of one kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown trace kind {kind!r}; use one of {KINDS}")
    tokens = list(tokens)
    plan = Plan.empty(len(tokens) * n_layers, n_layers)
    plan.token[:] = np.repeat(tokens, n_layers)
    layers = np.tile(np.arange(n_layers), len(tokens))
    if kind == "hidden":
        plan.resid[:] = layers
    else:
        mask = plan.clean_mlp if kind == "mlp" else plan.clean_attn
        for c, layer in enumerate(layers):
            mask[c, list(window_layers(int(layer), n_layers, window))] = True
    return plan


def severed_plan(token: int, n_layers: int) -> Plan:
    """3L cells at ``token``: hidden restore at each layer with nothing, all MLPs, all attentions severed."""
    plan = Plan.empty(3 * n_layers, n_layers)
    plan.token[:] = token
    plan.resid[:] = np.tile(np.arange(n_layers), 3)
    plan.corr_mlp[n_layers:2 * n_layers] = True
    plan.corr_attn[2 * n_layers:] = True
    return plan


# --------------------------------------------------------------------------- memory

def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "CUDA error: out of memory" in text)


def memory_budget(device: str | torch.device) -> int:
    """Bytes a chunk may use: half the free GPU memory, or a quarter of available RAM (<= 4 GiB)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        avail = 4 << 30
    return int(min(avail * 0.25, 4 << 30))


def run_chunked(total: int, chunk: int, fn: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``cat(fn(a, b))`` over [0, total) in chunks of <= ``chunk`` rows; OOM halves the chunk."""
    outs, start, size = [], 0, max(1, chunk)
    while start < total:
        stop = min(total, start + size)
        try:
            outs.append(fn(start, stop))
        except (torch.cuda.OutOfMemoryError, RuntimeError) as err:
            if not is_oom(err) or size == 1:
                raise
            size = max(1, (stop - start) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        start = stop
    return torch.cat(outs) if outs else torch.empty(0)


def autocast_for(precision: str, device: str | torch.device):
    """Context of a precision: ``exact`` float32; ``fast`` bf16 autocast on CUDA only; ``bf16`` everywhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    dev = torch.device(device).type
    if precision == "exact" or (precision == "fast" and dev != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev, dtype=torch.bfloat16)


def _answer_probs(logits_last: torch.Tensor, answer: int) -> torch.Tensor:
    return torch.softmax(logits_last.float(), dim=-1)[:, answer]


# --------------------------------------------------------------------------- engines

class Engine:
    """Common interface: ``clean_probs`` [V], ``p_corrupt(answer)``, ``run(plan, answer)`` -> [C]."""

    name = "engine"

    def __init__(self, model, ids: torch.Tensor, corruption: Corruption, precision: str = "exact",
                 max_batch: int | None = None):
        self.model = model
        self.ids = ids
        self.n = ids.shape[1]
        self.L = model.cfg.n_layers
        self.d = model.cfg.d_model
        self.S = corruption.samples
        self.corruption = corruption
        self.precision = precision
        self.max_batch = max_batch
        self.device = ids.device
        self._corrupted = False

    def _ctx(self):
        return autocast_for(self.precision, self.device)

    def p_corrupt(self, answer: int) -> float:
        self.ensure_corrupted()
        return float(self.corrupt_probs[:, answer].double().mean())

    def ensure_corrupted(self) -> None:
        if not self._corrupted:
            with torch.inference_mode(), self._ctx():
                self._run_corrupted()
            self._corrupted = True

    def _row_bytes(self) -> int:
        raise NotImplementedError

    def _chunk_rows(self) -> int:
        rows = max(1, memory_budget(self.device) // max(1, self._row_bytes()))
        return min(rows, self.max_batch) if self.max_batch else rows

    def run(self, plan: Plan, answer: int) -> np.ndarray:
        self.ensure_corrupted()
        with torch.inference_mode(), self._ctx():
            out = self._run(plan, answer)
        return out.float().cpu().numpy()


class BridgeEngine(Engine):
    """(cell x sample) rows through TransformerBridge forward passes with index-tensor hooks."""

    name = "batched"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        L = self.L
        store: dict[str, torch.Tensor] = {}

        def recorder(name):
            def hook(x, hook=None):
                store[name] = x.detach().clone()
                return x
            return hook

        names = [f"blocks.{j}.hook_{site}" for j in range(L) for site in ("resid_post", "mlp_out", "attn_out")]
        with torch.inference_mode(), self._ctx():
            logits = self.model.run_with_hooks(self.ids, fwd_hooks=[(n, recorder(n)) for n in names])
        self.clean_probs = torch.softmax(logits[0, -1].float(), -1)
        stack = lambda site: torch.stack([store[f"blocks.{j}.hook_{site}"][0] for j in range(L)])  # noqa: E731
        self.clean_resid, self.clean_mlp, self.clean_attn = stack("resid_post"), stack("mlp_out"), stack("attn_out")

    def _run_corrupted(self) -> None:
        S, L = self.S, self.L
        store: dict[str, torch.Tensor] = {}
        samples = torch.arange(S, device=self.device)

        def recorder(name):
            def hook(x, hook=None):
                store[name] = x.detach().clone()
                return x
            return hook

        hooks = [("hook_embed", lambda x, hook=None: self.corruption.apply(x, samples))]
        hooks += [(f"blocks.{j}.hook_{s}", recorder(f"{j}.{s}")) for j in range(L) for s in ("mlp_out", "attn_out")]
        logits = self.model.run_with_hooks(self.ids.repeat(S, 1), fwd_hooks=hooks)
        self.corrupt_probs = torch.softmax(logits[:, -1].float(), -1)
        self.corr_mlp = torch.stack([store[f"{j}.mlp_out"] for j in range(L)])  # [L, S, n, d]
        self.corr_attn = torch.stack([store[f"{j}.attn_out"] for j in range(L)])

    def _row_bytes(self) -> int:
        cfg = self.model.cfg
        n, d = self.n, self.d
        return 4 * (n * (40 * d + 4 * cfg.d_mlp + 2 * cfg.d_vocab) + 4 * cfg.n_heads * n * n)

    def _run(self, plan: Plan, answer: int) -> torch.Tensor:
        S = self.S
        total = len(plan) * S
        return run_chunked(total, self._chunk_rows(), lambda a, b: self._chunk(plan, answer, a, b)
                           ).view(len(plan), S).double().mean(1)

    def _chunk(self, plan: Plan, answer: int, a: int, b: int) -> torch.Tensor:
        S, L, dev = self.S, self.L, self.device
        rows = np.arange(a, b)
        cell, sample_np = rows // S, rows % S
        tok_np = plan.token[cell]
        sample = torch.as_tensor(sample_np, device=dev)
        hooks = [("hook_embed", lambda x, hook=None: self.corruption.apply(x, sample))]

        def patcher(sets):
            def hook(x, hook=None):
                for idx, pos, vals in sets:
                    x[idx, pos] = vals.to(x.dtype)
                return x
            return hook

        for j in range(L):
            sel = np.nonzero(plan.resid[cell] == j)[0]
            if len(sel):
                pos = torch.as_tensor(tok_np[sel], device=dev)
                hooks.append((f"blocks.{j}.hook_resid_post",
                              patcher([(torch.as_tensor(sel, device=dev), pos, self.clean_resid[j, pos])])))
            for site, clean, corr, cmask, rmask in (
                ("mlp_out", self.clean_mlp, self.corr_mlp, plan.clean_mlp, plan.corr_mlp),
                ("attn_out", self.clean_attn, self.corr_attn, plan.clean_attn, plan.corr_attn),
            ):
                sets = []
                sel = np.nonzero(cmask[cell, j])[0]
                if len(sel):
                    pos = torch.as_tensor(tok_np[sel], device=dev)
                    sets.append((torch.as_tensor(sel, device=dev), pos, clean[j, pos]))
                sel = np.nonzero(rmask[cell, j])[0]
                if len(sel):
                    pos = torch.as_tensor(tok_np[sel], device=dev)
                    smp = torch.as_tensor(sample_np[sel], device=dev)
                    sets.append((torch.as_tensor(sel, device=dev), pos, corr[j, smp, pos]))
                if sets:
                    hooks.append((f"blocks.{j}.hook_{site}", patcher(sets)))
        logits = self.model.run_with_hooks(self.ids.repeat(len(rows), 1), fwd_hooks=hooks)
        return _answer_probs(logits[:, -1], answer)


class LoopEngine(BridgeEngine):
    """The original algorithm: per cell one forward pass of S+1 rows, states copied from the clean row 0."""

    name = "loop"

    def _run(self, plan: Plan, answer: int) -> torch.Tensor:
        if plan.corr_mlp.any() or plan.corr_attn.any():
            raise ValueError("the loop engine does not implement severing")
        S, L = self.S, self.L
        samples = torch.arange(S, device=self.device)
        ids = self.ids.repeat(S + 1, 1)
        out = []

        def corrupt(x, hook=None):
            self.corruption.apply(x[1:], samples)
            return x

        def copier(t):
            def hook(x, hook=None):
                x[1:, t] = x[0, t]
                return x
            return hook

        for c in range(len(plan)):
            t = int(plan.token[c])
            hooks = [("hook_embed", corrupt)]
            if plan.resid[c] >= 0:
                hooks.append((f"blocks.{int(plan.resid[c])}.hook_resid_post", copier(t)))
            for j in range(L):
                if plan.clean_mlp[c, j]:
                    hooks.append((f"blocks.{j}.hook_mlp_out", copier(t)))
                if plan.clean_attn[c, j]:
                    hooks.append((f"blocks.{j}.hook_attn_out", copier(t)))
            logits = self.model.run_with_hooks(ids, fwd_hooks=hooks)
            out.append(torch.softmax(logits[1:, -1].float(), -1).mean(0)[answer])
        return torch.stack(out) if out else torch.empty(0)

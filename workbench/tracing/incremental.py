"""The incremental engine: the model's own blocks, each row computed only where it can differ.

A row restoring at token t from layer s on starts from the cached corrupted residual at layer s
and computes only positions >= t, reading the keys and values of positions < t from the cached
corrupted run (causal attention: neither the layers below s nor the positions before t can differ
from the corrupted run). Nothing of a family's arithmetic is re-implemented: rotary positions,
grouped-query attention and parallel attention/MLP blocks run in the model's own code (the
blocks of :mod:`workbench.architecture`'s families). Tested equal to the batched engine
(:class:`workbench.tracing.engine.BridgeEngine`) on every family.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from .engine import Engine, Plan, run_chunked

class _KVPrefix:
    """The cache interface an attention module calls (``update(keys, values, layer_idx, ...)``).

    It prepends the keys and values of the positions before the restored token (from the
    corrupted run) to the new ones, and keeps the new ones (to record a full run's cache).
    """

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None):
        self.keys, self.values, self.new = keys, values, None

    def update(self, keys: torch.Tensor, values: torch.Tensor, *args, **kwargs):
        self.new = (keys, values)
        if self.keys is None:
            return keys, values
        return torch.cat([self.keys.to(keys.dtype), keys], -2), torch.cat([self.values.to(values.dtype), values], -2)

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])


_CACHE_KWARGS = ("past_key_values", "cache", "layer_past")


def _query_slice(kwargs: dict, t: int) -> dict:
    """The block keyword arguments of a full-length run for the queries at positions >= t."""
    out = {}
    for key, val in kwargs.items():
        if key in _CACHE_KWARGS or key == "use_cache":
            continue
        if key == "attention_mask" and torch.is_tensor(val) and val.dim() == 4:
            val = val[:, :, t:, :]
        elif key == "position_ids" and torch.is_tensor(val):
            val = val[..., t:]
        elif key == "cache_position" and torch.is_tensor(val):
            val = val[t:]
        elif key == "position_embeddings" and isinstance(val, tuple):
            val = tuple(v[..., t:, :] for v in val)
        out[key] = val
    return out


class IncrementalEngine(Engine):
    """The model's own blocks; rows start at their first differing layer and token.

    Every block is the bridge's block (the wrapped Hugging Face layer), called directly
    with the keyword arguments the model itself passes it in a full forward (attention
    mask, rotary position embeddings, position ids) cut to the query positions >= t, and
    with a key/value prefix: the keys and values of positions < t from the cached
    corrupted run, handed to the attention module through its cache interface. Rotary
    positions, grouped-query attention and parallel attention/MLP blocks are therefore the
    model's own code. Patches go through the bridge's ``hook_mlp_out``/``hook_attn_out``.
    """

    name = "incremental"

    @staticmethod
    def supports(model) -> bool:
        """Families whose blocks are known to take a key/value prefix this way (see :mod:`workbench.architecture`)."""
        from ..architecture import ArchitectureError, family

        try:
            family(model)
        except (ArchitectureError, AttributeError):
            return False
        return hasattr(model, "blocks") and hasattr(model, "ln_final") and hasattr(model, "unembed")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._state: dict[int, _KVPrefix] = {}
        self._patch: Callable | None = None
        self._record: dict | None = None
        self._sliced: dict[tuple[int, int], dict] = {}
        captured: dict[int, dict] = {}
        handles = [self.model.blocks[j].register_forward_pre_hook(
            lambda mod, args, kw, j=j: captured.__setitem__(j, dict(kw)), with_kwargs=True) for j in range(self.L)]
        try:
            with torch.inference_mode(), self._ctx():
                self.model(self.ids, return_type=None)
        finally:
            for h in handles:
                h.remove()
        self._block_kwargs = captured
        with torch.inference_mode(), self._ctx():
            rec = self._full(None)
        self.clean_probs = rec["probs"][0]
        self.clean_resid_pre = rec["resid_pre"][:, 0]  # [L+1, n, d]
        self.clean_mlp = rec["mlp"][:, 0]
        self.clean_attn = rec["attn"][:, 0]

    # -- wiring: key/value prefixes into the attention modules, patches and records on the hook points
    @contextlib.contextmanager
    def _wired(self):
        handles = []

        def inject(j):
            def pre(mod, args, kwargs):
                prefix = self._state.get(j)
                if prefix is None:
                    return None
                return args, {**kwargs, **{k: prefix for k in _CACHE_KWARGS}}
            return pre

        def site_hook(site, j):
            def hook(mod, args, out):
                if self._record is not None:
                    self._record[(site, j)] = out
                return self._patch(site, j, out) if self._patch is not None else out
            return hook

        try:
            for j in range(self.L):
                handles.append(self.model.blocks[j].attn.register_forward_pre_hook(inject(j), with_kwargs=True))
                for site in ("mlp", "attn"):
                    hp = self.model.hook_dict[f"blocks.{j}.hook_{site}_out"]
                    handles.append(hp.register_forward_hook(site_hook(site, j)))
            yield
        finally:
            for h in handles:
                h.remove()
            self._state.clear()
            self._patch = self._record = None

    def _block(self, j: int, x: torch.Tensor, t: int, prefix: _KVPrefix) -> torch.Tensor:
        if (j, t) not in self._sliced:
            self._sliced[(j, t)] = _query_slice(self._block_kwargs[j], t)
        self._state[j] = prefix
        out = self.model.blocks[j](x, **self._sliced[(j, t)])
        return out[0] if isinstance(out, tuple) else out

    def _final_probs(self, x_last: torch.Tensor) -> torch.Tensor:
        logits = self.model.unembed(self.model.ln_final(x_last[:, None]))[:, 0]
        return torch.softmax(logits.float(), dim=-1)

    def _full(self, samples: torch.Tensor | None) -> dict:
        """A full forward (corrupted per ``samples`` unless None) through the model's blocks, recording states."""
        ids = self.ids if samples is None else self.ids.repeat(len(samples), 1)
        hooks = [] if samples is None else [("hook_embed", lambda x, hook=None: self.corruption.apply(x, samples))]
        x = self.model.run_with_hooks(ids, fwd_hooks=hooks, stop_at_layer=0)  # the residual entering block 0
        rec = {k: [] for k in ("resid_pre", "k", "v", "attn", "mlp")}
        with self._wired():
            for j in range(self.L):
                rec["resid_pre"].append(x)
                self._record = {}
                prefix = _KVPrefix()
                x = self._block(j, x, 0, prefix)
                rec["k"].append(prefix.new[0])
                rec["v"].append(prefix.new[1])
                rec["attn"].append(self._record[("attn", j)])
                rec["mlp"].append(self._record[("mlp", j)])
        rec["resid_pre"].append(x)
        out = {key: torch.stack(val) for key, val in rec.items()}
        out["probs"] = self._final_probs(x[:, -1])
        return out

    def _run_corrupted(self) -> None:
        rec = self._full(torch.arange(self.S, device=self.device))
        self.corrupt_probs = rec["probs"]
        self.corr_resid_pre = rec["resid_pre"]  # [L+1, S, n, d]
        self.corr_k, self.corr_v = rec["k"], rec["v"]  # [L, S, kv_heads, n, d_head]
        self.corr_mlp, self.corr_attn = rec["mlp"], rec["attn"]  # [L, S, n, d]

    def _row_bytes(self) -> int:
        cfg = self.model.cfg
        n, d = self.n, self.d
        return 4 * (n * (24 * d + 4 * cfg.d_mlp) + 4 * n * d + 4 * cfg.n_heads * n * n) + 8 * cfg.d_vocab

    # -- cells
    def _run(self, plan: Plan, answer: int) -> torch.Tensor:
        S = self.S
        out = torch.empty(len(plan), dtype=torch.float64, device=self.device)
        first = min(self.corruption.positions)
        before = plan.token < first  # positions before the corruption never change
        p_corrupt = self.corrupt_probs[:, answer].double().mean()
        out[torch.as_tensor(np.nonzero(before)[0], device=self.device)] = p_corrupt
        starts = plan.start_layers()
        # No block left to run: the final state is the clean one (restored at the last token)
        # or the corrupted one, so the probability is exactly p_clean or p_corrupt.
        done = ~before & (starts >= self.L)
        to_clean = done & (plan.token == self.n - 1) & (plan.resid >= 0)
        out[torch.as_tensor(np.nonzero(to_clean)[0], device=self.device)] = self.clean_probs[answer].double()
        out[torch.as_tensor(np.nonzero(done & ~to_clean)[0], device=self.device)] = p_corrupt
        chunk = self._chunk_rows()
        with self._wired():
            for t in np.unique(plan.token[~before & ~done]):
                cells = np.nonzero((plan.token == t) & ~done)[0]
                cells = cells[np.argsort(starts[cells], kind="stable")]
                rows_cell = np.repeat(cells, S)
                rows_sample = np.tile(np.arange(S), len(cells))
                probs = run_chunked(len(rows_cell), chunk, lambda a, b: self._chunk(
                    plan, starts, int(t), rows_cell[a:b], rows_sample[a:b], answer))
                out[torch.as_tensor(cells, device=self.device)] = probs.view(len(cells), S).double().mean(1)
        return out

    def _chunk(self, plan: Plan, starts: np.ndarray, t: int, cell: np.ndarray, sample_np: np.ndarray,
               answer: int) -> torch.Tensor:
        dev, L = self.device, self.L
        s_np = starts[cell]
        s = torch.as_tensor(s_np, device=dev)
        sample = torch.as_tensor(sample_np, device=dev)
        x = self.corr_resid_pre[s, sample, t:]  # [R, m, d]
        hid = np.nonzero(plan.resid[cell] >= 0)[0]
        if len(hid):
            hid_t = torch.as_tensor(hid, device=dev)
            x[hid_t, 0] = self.clean_resid_pre[s[hid_t], t].to(x.dtype)
        masks = {("clean", "mlp"): plan.clean_mlp[cell], ("clean", "attn"): plan.clean_attn[cell],
                 ("corr", "mlp"): plan.corr_mlp[cell], ("corr", "attn"): plan.corr_attn[cell]}
        clean_vals = {"mlp": self.clean_mlp, "attn": self.clean_attn}
        corr_vals = {"mlp": self.corr_mlp, "attn": self.corr_attn}

        def patch(site: str, j: int, val: torch.Tensor) -> torch.Tensor:
            k = val.shape[0]
            cm, rm = masks[("clean", site)][:k, j], masks[("corr", site)][:k, j]
            if not (cm.any() or rm.any()):
                return val
            val = val.clone()
            if cm.any():
                sel = torch.as_tensor(np.nonzero(cm)[0], device=dev)
                val[sel, 0] = clean_vals[site][j, t].to(val.dtype)
            if rm.any():
                sel = torch.as_tensor(np.nonzero(rm)[0], device=dev)
                val[sel, 0] = corr_vals[site][j, sample[sel], t].to(val.dtype)
            return val

        self._patch = patch
        bounds = np.searchsorted(s_np, np.arange(L), side="right")  # rows with start <= j
        for j in range(int(s_np.min()), L):
            k = int(bounds[j])
            if k == 0:
                continue
            prefix = _KVPrefix()
            if t > 0:
                prefix = _KVPrefix(self.corr_k[j, sample[:k], :, :t], self.corr_v[j, sample[:k], :, :t])
            new = self._block(j, x[:k], t, prefix)
            x = new if k == x.shape[0] else torch.cat([new.to(x.dtype), x[k:]])
        self._patch = None
        return self._final_probs(x[:, -1])[:, answer]

"""The MEND editor network (reference §6a): the gradient transform, per-weight steps, persistence.

Mitchell et al. 2022, "Fast Model Editing at Scale"; the original code is eric-mitchell/mend
(``algs/mend.py``, ``nn.py``).

**Gradient transform.** The rank-one factors (x_t, δ_t) of an edited weight's fine-tuning
gradient (:mod:`workbench.editing.mend` collects them) are normalised by running means and
standard deviations (accumulated while training), concatenated (``combine``) and passed through
``n_hidden + 1`` residual low-rank layers h <- h + max(0, (U V h + b) * s_m + o_m), U initialised
to zero so the network starts as the identity (``init="id"``). One network serves every edited
weight of the same shape (``shared``); s_m, o_m are a learned scale and shift per weight ("mode").

**Edit.** ∇̃W = Σ_t δ̃_t x̃_tᵀ in the weight's own orientation (``Conv1D`` stores [in, out],
``nn.Linear`` [out, in]), and W̃ = W - α_m ∇̃W with α_m a learned step per weight, initialised to
``edit_lr``. (The originals' code adds α·∇̃W and lets α and the network learn the sign; here the
untrained editor takes a gradient-descent step, as methods.md §6a writes it.)

:class:`MendEditor` holds the networks and steps of one model's edited weights and saves / loads
them as safetensors with their hyperparameters and the model's fingerprint.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
from jaxtyping import Float, Int

from .common import EditError
from .edit import _hf
from .mend_hparams import MendHyperParams, mend_hparams_for

_META_KEY = "workbench_mend"
FORMAT = 2
"""Editor file format: 2 = factors per weight (``factor_positions``), sealed by a SHA-256."""


class MendModelMismatch(ValueError):
    """A MEND editor was trained for another model (weights, names or shapes differ)."""


# ----------------------------------------------------------------------------- edited weights
@dataclass(frozen=True)
class EditedWeight:
    """An edited weight: its HF name, (in, out) features and orientation (``"in_out"``: Conv1D)."""

    name: str
    d_in: int
    d_out: int
    orientation: str  # "in_out" (weight is [in, out], y = x W) or "out_in" (nn.Linear, y = x Wᵀ)

    @property
    def shape_key(self) -> str:
        return f"{self.d_in}x{self.d_out}"


def default_inner_params(model, n_blocks: int = 3) -> tuple[str, ...]:
    """HF names of the MLP output and input projections of the last ``n_blocks`` blocks, from the
    family description (:mod:`workbench.architecture`): GPT-2 ``c_proj``, ``c_fc``; GPT-J ``fc_out``,
    ``fc_in``; GPT-NeoX ``dense_4h_to_h``, ``dense_h_to_4h``; Llama-likes ``down_proj``, ``gate_proj``,
    ``up_proj``."""
    from ..architecture import mlp_weights

    n_layers = int(model.cfg.n_layers)
    if not 1 <= n_blocks <= n_layers:
        raise ValueError(f"n_blocks={n_blocks} but the model has {n_layers} blocks")
    names: list[str] = []
    for l in range(n_layers - n_blocks, n_layers):
        w = mlp_weights(model, l)
        names += [w.out_name, *w.in_names]
    return tuple(names)


def _owning_modules(model) -> dict[str, nn.Module]:
    """``{hf_weight_name: module}`` for every module that owns a ``weight`` parameter directly."""
    from ..loading import canonical_hf_name

    out: dict[str, nn.Module] = {}
    for mod_name, module in _hf(model).named_modules():
        if isinstance(module._parameters.get("weight"), torch.Tensor):
            out.setdefault(canonical_hf_name(f"{mod_name}.weight"), module)
    return out


def _orientation(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "out_in"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 style
        return "in_out"
    raise EditError(f"MEND edits linear maps (nn.Linear or Conv1D); {type(module).__name__} is neither")


def edited_weights(model, names: Sequence[str]) -> tuple[list[EditedWeight], list[nn.Module]]:
    """The :class:`EditedWeight` descriptions and the modules of ``names`` in ``model``."""
    owners = _owning_modules(model)
    missing = [n for n in names if n not in owners]
    if missing:
        raise MendModelMismatch(f"model has no linear weight(s) {missing}; MEND edits {list(names)}")
    weights, modules = [], []
    for n in names:
        module = owners[n]
        orient = _orientation(module)
        rows, cols = module.weight.shape
        d_in, d_out = (rows, cols) if orient == "in_out" else (cols, rows)
        weights.append(EditedWeight(n, int(d_in), int(d_out), orient))
        modules.append(module)
    return weights, modules


# ----------------------------------------------------------------------------- the network
class LowRankResidual(nn.Module):
    """h -> h + max(0, (U V h + b) * s_m + o_m) (``init="id"``), or without the residual (``"xavier"``)."""

    def __init__(self, width: int, rank: int, n_modes: int | None, init: str) -> None:
        super().__init__()
        mid = min(rank, width)
        self.init = init
        if init == "id":
            self.u = nn.Parameter(torch.zeros(width, mid))
            self.v = nn.Parameter(torch.randn(mid, width))
        else:
            self.u = nn.Parameter(torch.empty(width, mid))
            self.v = nn.Parameter(torch.empty(mid, width))
            nn.init.xavier_uniform_(self.u, gain=nn.init.calculate_gain("relu"))
            nn.init.xavier_uniform_(self.v, gain=1.0)
        self.bias = nn.Parameter(torch.zeros(width))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, width)) if n_modes else None
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, width)) if n_modes else None

    def forward(self, h: Float[torch.Tensor, "n w"], mode: int | None = None) -> Float[torch.Tensor, "n w"]:
        pre = (h @ self.v.T) @ self.u.T + self.bias
        if mode is not None and self.mode_scale is not None:
            pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        act = pre.clamp(min=0)  # clamp, not relu: the originals' choice (gradient at 0)
        return h + act if self.init == "id" else act


class GradientTransform(nn.Module):
    """Normalise the factors (running statistics) and transform them: (x, δ) -> (x̃, δ̃)."""

    def __init__(self, d_in: int, d_out: int, hp: MendHyperParams, n_modes: int | None) -> None:
        super().__init__()
        self.d_in, self.d_out, self.norm, self.combine = d_in, d_out, hp.norm, hp.combine

        def net(width: int) -> nn.ModuleList:
            return nn.ModuleList(LowRankResidual(width, hp.rank, n_modes, hp.init) for _ in range(hp.n_hidden + 1))

        if hp.combine:
            self.net = net(d_in + d_out)
        else:
            self.net_x, self.net_d = net(d_in), net(d_out)
        for side, width in (("x", d_in), ("d", d_out)):
            self.register_buffer(f"mean_{side}", torch.zeros(width, dtype=torch.float64))
            self.register_buffer(f"m2_{side}", torch.zeros(width, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update_stats(self, x: torch.Tensor, d: torch.Tensor) -> None:
        """Add rows to the running mean and variance (Chan et al.'s parallel update, float64)."""
        n_b = x.shape[0]
        if n_b == 0:
            return
        n_a = self.count.clone()
        total = n_a + n_b
        for side, rows in (("x", x), ("d", d)):
            rows = rows.double()
            mean_b = rows.mean(0)
            m2_b = ((rows - mean_b) ** 2).sum(0)
            mean_a, m2_a = getattr(self, f"mean_{side}"), getattr(self, f"m2_{side}")
            delta = mean_b - mean_a
            mean_a += delta * (n_b / total)
            m2_a += m2_b + delta ** 2 * (n_a * n_b / total)
        self.count += n_b

    def _normalise(self, rows: torch.Tensor, side: str) -> torch.Tensor:
        if not self.norm:
            return rows
        if self.count < 2:
            raise RuntimeError("the MEND editor has no normalisation statistics yet (train it first)")
        mean = getattr(self, f"mean_{side}")
        std = (getattr(self, f"m2_{side}") / (self.count - 1)).sqrt()
        return ((rows - mean.float()) / (std.float() + 1e-7))

    def forward(self, x: Float[torch.Tensor, "n d_in"], d: Float[torch.Tensor, "n d_out"], mode: int | None = None
                ) -> tuple[Float[torch.Tensor, "n d_in"], Float[torch.Tensor, "n d_out"]]:
        x, d = x.float(), d.float()
        if self.training and self.norm:
            self.update_stats(x, d)
        x, d = self._normalise(x, "x"), self._normalise(d, "d")
        if self.combine:
            h = torch.cat([x, d], dim=-1)
            for layer in self.net:
                h = layer(h, mode)
            return h[:, : self.d_in], h[:, self.d_in:]
        for layer in self.net_x:
            x = layer(x, mode)
        for layer in self.net_d:
            d = layer(d, mode)
        return x, d


@dataclass
class Factors:
    """Per edited weight, the inputs x_t and output gradients δ_t at the positions kept
    (``factor_positions``), and each position's row (edit) index, rows ascending; ``n_rows`` edits."""

    x: dict[str, Float[torch.Tensor, "n d_in"]]
    d: dict[str, Float[torch.Tensor, "n d_out"]]
    row: dict[str, Int[torch.Tensor, "n"]]
    n_rows: int


def _slots(row: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
    """Each entry's index within its row (``row`` ascending) and the longest row's length."""
    counts = torch.bincount(row, minlength=n_rows)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(row.numel(), device=row.device) - starts[row]
    return slot, int(counts.max()) if row.numel() else 0


# ----------------------------------------------------------------------------- the editor
class MendEditor(nn.Module):
    """The trained MEND editor of one model: gradient transforms, per-weight modes and steps.

    ``weights`` lists the edited weights (HF names, shapes, orientation); ``model_fingerprint``
    is :func:`workbench.loading.model_fingerprint` of the model it was trained for. Build one
    for a model with :meth:`for_model`, train it with :func:`workbench.train_mend`, save and
    load it with :meth:`save` / :meth:`load`.
    """

    def __init__(self, hparams: MendHyperParams, weights: Sequence[EditedWeight], model_fingerprint: str | None,
                 model_spec: str | None = None, info: dict | None = None) -> None:
        super().__init__()
        self.hparams = hparams
        self.weights = list(weights)
        self.model_fingerprint = model_fingerprint
        self.model_spec = model_spec
        self.info = dict(info or {})
        self.source: str | None = None  # the file it was loaded from
        self._hash: tuple[tuple[int, ...], str, dict] | None = None
        self.names = [w.name for w in self.weights]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"inner_params has duplicates: {self.names}")
        # one network per shape (modes = index among the weights of that shape), or per weight
        self.net_key: dict[str, str] = {}
        self.mode: dict[str, int | None] = {}
        groups: dict[str, list[EditedWeight]] = {}
        for w in self.weights:
            key = w.shape_key if hparams.shared else w.name.replace(".", "#")
            groups.setdefault(key, []).append(w)
            self.net_key[w.name] = key
            self.mode[w.name] = len(groups[key]) - 1 if hparams.shared else None
        self.nets = nn.ModuleDict({key: GradientTransform(ws[0].d_in, ws[0].d_out, hparams,
                                                          len(ws) if hparams.shared else None)
                                   for key, ws in groups.items()})
        self.alphas = nn.Parameter(torch.full((len(self.weights),), float(hparams.edit_lr)))

    # ---------------------------------------------------------------- construction
    @classmethod
    def for_model(cls, model, hparams: MendHyperParams | None = None, seed: int | None = None) -> "MendEditor":
        """A fresh (untrained) editor for ``model``; the network's random init is seeded."""
        from ..loading import model_fingerprint

        hp = hparams or mend_hparams_for(model)
        names = hp.inner_params or default_inner_params(model, hp.n_blocks)
        weights, _ = edited_weights(model, names)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(hp.seed if seed is None else seed)
        try:
            editor = cls(replace(hp, inner_params=tuple(names)), weights, model_fingerprint(model),
                         getattr(model, "workbench_spec", None))
        finally:
            torch.random.set_rng_state(gen_state)
        return editor.to(model.cfg.device)

    # ---------------------------------------------------------------- checks
    def check_model(self, model, fingerprint: bool = True) -> list[nn.Module]:
        """The edited modules of ``model``; raises :class:`MendModelMismatch` if the editor was
        trained for another model (different weight names, shapes, or fingerprint)."""
        try:
            weights, modules = edited_weights(model, self.names)
        except MendModelMismatch as err:
            raise MendModelMismatch(f"this MEND editor was trained for another model ({self._origin()}): {err}") from None
        if weights != self.weights:
            bad = [(a.name, (a.d_in, a.d_out), (b.d_in, b.d_out)) for a, b in zip(self.weights, weights) if a != b]
            raise MendModelMismatch(f"this MEND editor was trained for another model ({self._origin()}): "
                                    f"weight shapes differ (name, editor, model): {bad}")
        if fingerprint and self.model_fingerprint is not None:
            from ..loading import model_fingerprint

            found = model_fingerprint(model)
            if found != self.model_fingerprint:
                raise MendModelMismatch(
                    f"this MEND editor was trained for another model ({self._origin()}); the model given has "
                    f"fingerprint {found}. Train an editor for it: `workbench train-mend --model "
                    f"{getattr(model, 'workbench_spec', None) or 'M'} --out DIR`")
        return modules

    def _origin(self) -> str:
        return f"spec {self.model_spec!r}, fingerprint {self.model_fingerprint}"

    # ---------------------------------------------------------------- the transform
    def transform(self, factors: Factors) -> Factors:
        """(x̃, δ̃) for every edited weight (normalisation statistics update in training mode)."""
        x, d = {}, {}
        for w in self.weights:
            x[w.name], d[w.name] = self.nets[self.net_key[w.name]](factors.x[w.name], factors.d[w.name],
                                                                   self.mode[w.name])
        return Factors(x, d, factors.row, factors.n_rows)

    def alpha(self, name: str) -> torch.Tensor:
        return self.alphas[self.names.index(name)]

    def weight_delta(self, w: EditedWeight, tx: torch.Tensor, td: torch.Tensor) -> torch.Tensor:
        """-α ∇̃W for one edit, ∇̃W = Σ_t δ̃_t x̃_tᵀ in the weight's own orientation."""
        grad = tx.T @ td if w.orientation == "in_out" else td.T @ tx
        return -self.alpha(w.name) * grad

    @contextlib.contextmanager
    def edited(self, modules: Sequence[nn.Module], transformed: Factors, row_edit: torch.Tensor) -> Iterator[None]:
        """Within the block, each edited module acts as W - α ∇̃W of the edit ``row_edit[r]`` on row r.

        The change is applied to the module's output in low-rank form, y += -α (x X̃ᵀ) D̃, which
        equals running with the edited weight and keeps the autograd path to the editor.
        """
        n_edits = transformed.n_rows
        padded: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for w in self.weights:
            tx, td, row = transformed.x[w.name], transformed.d[w.name], transformed.row[w.name]
            slot, width = _slots(row, n_edits)
            px = tx.new_zeros(n_edits, width, w.d_in).index_put((row, slot), tx)
            pd = td.new_zeros(n_edits, width, w.d_out).index_put((row, slot), td)
            padded[w.name] = (px[row_edit], pd[row_edit])

        def make(w: EditedWeight) -> Callable:
            def hook(module, args, output):
                px, pd = padded[w.name]
                inp = args[0].to(px.dtype)
                change = torch.einsum("rti,rni->rtn", inp, px)
                change = torch.einsum("rtn,rno->rto", change, pd)
                return output - (self.alpha(w.name) * change).to(output.dtype)
            return hook

        handles = [m.register_forward_hook(make(w)) for w, m in zip(self.weights, modules)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ---------------------------------------------------------------- persistence
    def metadata(self) -> dict:
        return {"format": FORMAT, "hparams": self.hparams.to_dict(), "weights": [asdict(w) for w in self.weights],
                "model_fingerprint": self.model_fingerprint, "model_spec": self.model_spec, "info": self.info}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The state dict on the CPU (what :meth:`save` writes)."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}

    @property
    def content_hash(self) -> str:
        """SHA-256 over the whole editor (metadata and tensors, :func:`workbench.integrity.record_checksum`):
        the checksum its file carries, so a result folder keyed on it refuses another editor."""
        from ..integrity import record_checksum

        versions = tuple(t._version for t in (*self.parameters(), *self.buffers()))  # bumped by in-place changes
        meta = self.metadata()
        if self._hash is None or self._hash[0] != versions or self._hash[2] != meta:
            self._hash = (versions, record_checksum(meta, self.tensors()), meta)
        return self._hash[1]

    @property
    def label(self) -> str:
        """A short name for rows and reports: the file it was loaded from (its folder for an
        ``editor.safetensors``), or ``"in memory"``."""
        if self.source is None:
            return "in memory"
        path = Path(self.source)
        return path.parent.name if path.name == "editor.safetensors" else path.name

    def save(self, path: str | os.PathLike) -> Path:
        """Write the editor as safetensors (tensors) with its hyperparameters, weights and model
        fingerprint as JSON metadata, sealed by a SHA-256 over the whole record (atomic write)."""
        from ..integrity import write_safetensors

        return write_safetensors(path, self.tensors(), self.metadata(), header_key=_META_KEY, what="MEND editor")

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, device: str | torch.device | None = None) -> "MendEditor":
        """Read an editor written by :meth:`save`; with ``model``, check it was trained for it.

        The file's SHA-256 over the whole record (metadata included) is verified first: a damaged
        or edited file, or one without a checksum, is an :class:`~workbench.integrity.IntegrityError`
        naming the file and the fix.
        """
        from ..integrity import IntegrityError, read_safetensors

        path = Path(path)
        if path.is_dir():
            path = path / "editor.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"{path}: no MEND editor there (build one with `workbench train-mend`)")
        fix = ("restore the file, or train the editor again (`workbench train-mend --out DIR`; an editor of "
               "the originals' code loads with `workbench.editing.load_original`)")
        tensors, meta = read_safetensors(path, header_key=_META_KEY, what="MEND editor", fix=fix)
        if meta.get("format") != FORMAT:
            raise IntegrityError(f"{path}: MEND editor format {meta.get('format')} is not {FORMAT} (an older "
                                 f"workbench's editor, trained with other gradient factors); {fix}")
        hp = MendHyperParams.from_dict(meta["hparams"])
        editor = cls(hp, [EditedWeight(**w) for w in meta["weights"]], meta.get("model_fingerprint"),
                     meta.get("model_spec"), meta.get("info"))
        editor.load_state_dict(tensors, strict=True)
        editor.source = str(path)
        editor.eval()
        if model is not None:
            editor.check_model(model)
            device = device or model.cfg.device
        return editor.to(device or "cpu")

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

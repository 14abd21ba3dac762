"""The :class:`Edit` object: weight deltas plus what produced them.

Every editing method (ROME, MEMIT, FT, KN, ...) returns an :class:`Edit`. It holds
additive deltas keyed by Hugging Face parameter name (``"transformer.h.5.mlp.c_proj.weight"``)
and never touches a model by itself: ``edit.apply(model)`` adds them in place,
``edit.revert(model)`` restores the exact tensors that were there before (a stored
copy, so the weights come back bit-identical, not ``w + d - d``), and
``with edit.applied(model): ...`` does both.

Building one (e.g. for a new baseline)::

    Edit(deltas={"transformer.h.3.mlp.c_proj.weight": delta}, method="ft", locus="subject",
         requests=[fact.to_request()], hparams={"lr": 5e-4}, info={"loss": [...]},
         model_fingerprint=model_fingerprint(model))

Only ``deltas`` is required. Deltas must have the parameter's shape (any float dtype;
they are cast to the parameter's dtype and device when applied).

Per-model state lives on the wrapped Hugging Face module (attribute
``_workbench_applied_edits``; :func:`applied_edits` lists them), so the bridge and its HF model
see the same state:
applying an edit that is already applied, or reverting one that is not, raises
:class:`EditStateError`; edits that touch the same parameter must be reverted in the
reverse order of application (otherwise restoring one copy would erase the other edit).
Applying is itself a transaction, end to end: if any step fails (adding a delta, the
checksums, the bookkeeping), the parameters are restored before the error propagates.

Provenance and integrity: an edit records the fingerprint of the weights it was computed
on, and :meth:`Edit.apply` refuses a model with other weights (another model of the same
shape, or one with other edits applied) unless ``force=True``; :meth:`Edit.compose`
refuses edits computed on different weights. Saved edits carry one SHA-256 over the whole
record, metadata included (:mod:`workbench.integrity`), checked by :meth:`Edit.load`. Methods decorated with
:func:`reports_outcome` record in ``edit.info`` whether the edit reached its new object
(``reached``, ``p_new``, ``top1``) and warn (:class:`EditNotReachedWarning`) when not.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..integrity import IntegrityError, tensor_digest

_STATE_ATTR = "_workbench_applied_edits"
_META_KEY = "workbench_edit"


log = logging.getLogger(__name__)


class EditStateError(RuntimeError):
    """An edit was applied twice, reverted while not applied, or reverted out of order."""


class EditFingerprintError(EditStateError):
    """An edit is applied to weights other than those it was computed on (override: ``force=True``)."""


class EditIntegrityError(IntegrityError):
    """A saved edit file is unreadable, not an edit, or does not match its recorded SHA-256."""


class EditNotReachedWarning(UserWarning):
    """An edit was computed but the edited model does not predict the new object."""


delta_checksum = tensor_digest
"""SHA-256 of a delta's dtype, shape and bytes (recorded per delta by :meth:`Edit.save`)."""


def _hf(model):
    """The Hugging Face module holding the parameters (bridge -> ``original_model``)."""
    return getattr(model, "original_model", model)


def named_parameters(model) -> dict[str, torch.nn.Parameter]:
    """``{hf_name: parameter}`` of a bridge or of its (rewired) HF model, names in Hugging Face form."""
    from ..loading import canonical_hf_name

    out: dict[str, torch.nn.Parameter] = {}
    for name, param in _hf(model).named_parameters():
        out.setdefault(canonical_hf_name(name), param)
    return out


def param_name(model, param: torch.Tensor) -> str:
    """The Hugging Face name of ``param`` (found by identity), e.g. of ``model.blocks[5].mlp.W_out``."""
    for name, p in named_parameters(model).items():
        if p is param:
            return name
    raise KeyError("tensor is not a parameter of this model")


def _state(hf) -> list:
    """The list of (edit_id, {name: original tensor}, {name: checksum}, edit) applied to ``hf``, oldest first."""
    state = hf.__dict__.get(_STATE_ATTR)
    if state is None:
        state = []
        object.__setattr__(hf, _STATE_ATTR, state)
    return state


def applied_edits(model) -> list["Edit"]:
    """The edits applied to ``model`` (bridge or HF module) now, oldest first: read from the model
    itself, so that any code holding the model (a new notebook widget, a later cell) sees them."""
    return [entry[3] for entry in _state(_hf(model))]


def _checksum(t: torch.Tensor) -> float:
    return float(t.detach().double().sum().item())


def _jsonable(obj: Any) -> Any:
    """Best-effort JSON conversion of metadata (tensors become lists, unknown objects strings)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, float) and obj != obj:  # NaN
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    return str(obj)


@dataclass(eq=False)
class Edit:
    """Additive weight deltas keyed by HF parameter name, with provenance.

    Attributes:
        deltas: ``{hf_param_name: delta}``; each delta has the parameter's shape.
        method: ``"rome"``, ``"memit"``, ``"ft"``, ``"kn"``, ``"compose"``, ...
        locus: where the edit was keyed: ``"subject"`` or ``"relation"`` (free text for others).
        requests: the CounterFact ``requested_rewrite``-shaped dicts it implements.
        hparams: hyperparameters used (plain dict, JSON-serialisable).
        info: diagnostics (losses, norms, layers, ...), JSON-serialisable.
        model_fingerprint: :func:`workbench.loading.model_fingerprint` of the weights it was
            computed on (``None`` if unknown).
    """

    deltas: dict[str, torch.Tensor]
    method: str = "custom"
    locus: str = "subject"
    requests: list[dict] = field(default_factory=list)
    hparams: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    model_fingerprint: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if not isinstance(self.deltas, dict) or not self.deltas:
            raise ValueError("Edit needs a non-empty dict of deltas {hf_param_name: tensor}")
        for name, delta in self.deltas.items():
            if not isinstance(delta, torch.Tensor):
                raise TypeError(f"delta for {name!r} is not a tensor: {type(delta).__name__}")
        self.deltas = {name: d.detach() for name, d in self.deltas.items()}

    # ----------------------------------------------------------------- inspection
    @property
    def param_names(self) -> list[str]:
        return list(self.deltas)

    def norms(self) -> dict[str, float]:
        """Frobenius norm of each delta."""
        return {n: float(d.float().norm()) for n, d in self.deltas.items()}

    def is_applied(self, model) -> bool:
        """Whether this edit is currently applied to ``model`` (bridge or HF module)."""
        return any(entry[0] == self.id for entry in _state(_hf(model)))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}{tuple(d.shape)}" for n, d in self.deltas.items())
        return (f"Edit(method={self.method!r}, locus={self.locus!r}, requests={len(self.requests)}, "
                f"deltas=[{shapes}])")

    # ----------------------------------------------------------------- apply / revert
    def _params(self, hf) -> dict[str, torch.nn.Parameter]:
        params = named_parameters(hf)
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise KeyError(f"model has no parameter(s) {missing}; this edit targets {self.param_names}")
        for name, delta in self.deltas.items():
            if tuple(params[name].shape) != tuple(delta.shape):
                raise ValueError(f"delta for {name} has shape {tuple(delta.shape)}, parameter has "
                                 f"{tuple(params[name].shape)}")
        return {n: params[n] for n in self.deltas}

    def apply(self, model, force: bool = False) -> "Edit":
        """Add the deltas to ``model``'s parameters in place; returns ``self``.

        Raises :class:`EditStateError` if this edit is already applied to ``model``, and
        :class:`EditFingerprintError` if the model's weights are not those the edit was
        computed on (``force=True`` applies anyway). Non-finite deltas are refused before
        any weight changes; any failure after that restores the weights.
        """
        hf = _hf(model)
        state = _state(hf)
        if self.is_applied(hf):
            raise EditStateError(f"{self!r} is already applied to this model; revert it first")
        params = self._params(hf)
        for name, delta in self.deltas.items():
            if not torch.isfinite(delta).all():
                raise ValueError(f"delta for {name} has non-finite values; refusing to apply")
        if self.model_fingerprint is not None and not force:
            from ..loading import model_fingerprint

            current = model_fingerprint(model)
            if current != self.model_fingerprint:
                applied = len(state)
                raise EditFingerprintError(
                    f"{self!r} was computed on weights with fingerprint {self.model_fingerprint}, but this model's "
                    f"weights have {current} (another model, or the same one with "
                    f"{applied if applied else 'other'} edit(s) applied); recompute the edit on this model, or pass "
                    f"force=True to apply it anyway")
        from ..loading import remember_fingerprint, restore_fingerprint

        remember_fingerprint(model, self.id)  # revert restores these exact weights: keep their fingerprint
        originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            try:
                for name, param in params.items():
                    originals[name] = param.detach().clone()
                    param.add_(self.deltas[name].to(device=param.device, dtype=param.dtype))
                checksums = {name: _checksum(p) for name, p in params.items()}
                state.append((self.id, originals, checksums, self))
            except BaseException:
                for name, orig in originals.items():
                    params[name].copy_(orig)
                restore_fingerprint(model, self.id, originals)
                if state and state[-1][0] == self.id:
                    state.pop()
                raise
        return self

    def revert(self, model) -> "Edit":
        """Restore the exact parameter values from before :meth:`apply`; returns ``self``."""
        hf = _hf(model)
        state = _state(hf)
        index = next((i for i, entry in enumerate(state) if entry[0] == self.id), None)
        if index is None:
            raise EditStateError(f"{self!r} is not applied to this model; nothing to revert")
        _, originals, checksums, _ = state[index]
        later = [e for e in state[index + 1:] if set(e[1]) & set(originals)]
        if later:
            raise EditStateError(
                f"{self!r} shares parameters with {len(later)} edit(s) applied after it; revert those first "
                "(edits on the same weights are undone in reverse order of application)")
        params = named_parameters(hf)
        with torch.no_grad():
            for name, orig in originals.items():
                if _checksum(params[name]) != checksums[name]:
                    warnings.warn(f"{name} changed since {self.method} edit {self.id} was applied; "
                                  "revert restores the pre-edit values anyway", RuntimeWarning, stacklevel=2)
                params[name].copy_(orig)
        del state[index]
        from ..loading import restore_fingerprint

        restore_fingerprint(model, self.id, originals)  # the pre-apply fingerprint, if nothing else changed
        return self

    @contextlib.contextmanager
    def applied(self, model, force: bool = False) -> Iterator[Any]:
        """Context manager: apply on entry (``force`` as in :meth:`apply`), revert on exit (also on error)."""
        self.apply(model, force=force)
        try:
            yield model
        finally:
            self.revert(model)

    # ----------------------------------------------------------------- combination
    def __add__(self, other: "Edit") -> "Edit":
        return Edit.compose([self, other])

    @staticmethod
    def compose(edits: list["Edit"]) -> "Edit":
        """One edit whose deltas are the sums of the given edits' deltas (same-named parameters add)."""
        if not edits:
            raise ValueError("compose needs at least one edit")
        fps = {e.model_fingerprint for e in edits}
        if len(fps) > 1:
            listed = ", ".join(f"{e.method} edit {e.id}: {e.model_fingerprint}" for e in edits)
            raise EditFingerprintError(
                f"cannot compose edits computed on different weights ({listed}); an edit is only meaningful "
                f"on the weights it was computed on: compute every edit on the same model")
        deltas: dict[str, torch.Tensor] = {}
        for e in edits:
            for name, d in e.deltas.items():
                deltas[name] = deltas[name] + d.to(deltas[name]) if name in deltas else d.clone()
        return Edit(deltas=deltas, method="compose", locus="+".join(sorted({e.locus for e in edits})),
                    requests=[r for e in edits for r in e.requests],
                    hparams={"parts": [{"method": e.method, "hparams": e.hparams} for e in edits]},
                    info={"parts": [e.id for e in edits]},
                    model_fingerprint=fps.pop())

    # ----------------------------------------------------------------- persistence
    def metadata(self) -> dict:
        """Everything but the deltas, JSON-ready."""
        return _jsonable({"id": self.id, "method": self.method, "locus": self.locus, "requests": self.requests,
                          "hparams": self.hparams, "info": self.info, "model_fingerprint": self.model_fingerprint,
                          "format": 3})

    def save(self, path: str | os.PathLike) -> Path:
        """Write the deltas as safetensors, the metadata as JSON in the safetensors header, atomically.

        The whole record (metadata and deltas) is sealed with one SHA-256
        (:mod:`workbench.integrity`); :meth:`load` checks it. A path that cannot be written
        (full disk, read-only folder, a folder in the way) raises
        :class:`workbench.integrity.WriteError` naming it, and leaves no partial file.
        """
        from ..integrity import write_safetensors

        tensors = {n: d.detach().to("cpu").contiguous() for n, d in self.deltas.items()}
        meta = {**self.metadata(), "checksums": {n: delta_checksum(t) for n, t in tensors.items()}}
        return write_safetensors(path, tensors, meta, header_key=_META_KEY, what="edit file")

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Edit":
        """Read an edit written by :meth:`save`, verifying the whole record against its SHA-256.

        Raises :class:`EditIntegrityError` (naming the file) when the file is unreadable, not
        an edit, damaged (a delta or any metadata field changed), or written by a workbench
        from before whole-record checksums (it cannot be verified: recompute and save it again).
        """
        from ..integrity import read_safetensors

        deltas, meta = read_safetensors(path, header_key=_META_KEY, what="edit file", error=EditIntegrityError,
                                        fix="recompute the edit and save it again", device="cpu")
        sums = meta.get("checksums") or {}
        for name, t in deltas.items():  # also names the delta that a damaged file got wrong
            if name in sums and delta_checksum(t) != sums[name]:
                raise EditIntegrityError(f"{path}: delta {name} does not match its recorded SHA-256; the file "
                                         f"is damaged (e.g. a flipped bit): recompute the edit and save it again")
        deltas = {n: t.to(device) for n, t in deltas.items()}
        return cls(deltas=deltas, method=meta.get("method", "custom"), locus=meta.get("locus", "subject"),
                   requests=meta.get("requests", []), hparams=meta.get("hparams", {}), info=meta.get("info", {}),
                   model_fingerprint=meta.get("model_fingerprint"))  # a fresh id: a separate object

    def save_model(self, model, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``model`` with this edit applied as a Hugging Face folder (``loading.save_hf``).

        The edit is applied for the duration of the save if it is not applied already; the
        model is left in the state it was found in.
        """
        from ..loading import save_hf

        if self.is_applied(model):
            return save_hf(model, out_dir, overwrite=overwrite)
        with self.applied(model):
            return save_hf(model, out_dir, overwrite=overwrite)


# --------------------------------------------------------------------------- outcome

@torch.no_grad()
def edit_outcome(model, edit: Edit, force: bool = True) -> list[dict]:
    """Per request: does the edited model predict the new object at the edit prompt?

    Teacher-forced over the new object's tokens: ``p_new`` = P(all of its tokens),
    ``top1`` = the argmax next token after the prompt, ``reached`` = the argmax is the
    object's token at every position. The edit is applied for the check and reverted.
    """
    from ..predict import object_token_ids
    from ..spans import tokenize

    rows = []
    for req in edit.requests:
        new = req.get("target_new")
        new = new.get("str") if isinstance(new, dict) else new
        if not req.get("prompt") or not req.get("subject") or not new:
            continue
        rows.append((req["prompt"].format(req["subject"]), new))
    if not rows:
        return []
    out = []
    ctx = contextlib.nullcontext() if edit.is_applied(model) else edit.applied(model, force=force)
    with ctx:
        for prompt, new in rows:
            ids = list(tokenize(model, prompt).ids)
            obj = object_token_ids(model, new)
            seq = torch.tensor([ids + obj[:-1]], device=model.cfg.device)
            logits = model(seq, return_type="logits")[0, len(ids) - 1:].float()
            logp = torch.log_softmax(logits, dim=-1).cpu()
            target = torch.tensor(obj)
            p_new = float(logp[torch.arange(len(obj)), target].sum().exp())
            top = int(logp[0].argmax())
            out.append({"prompt": prompt, "target_new": new.strip(), "p_new": p_new,
                        "top1": model.tokenizer.decode([top]), "reached": bool((logp.argmax(-1) == target).all())})
    return out


def record_outcome(model, edit: Edit, warn: bool = True) -> Edit:
    """Store :func:`edit_outcome` in ``edit.info`` (``outcome``, ``reached``, ``p_new``) and warn if not reached."""
    outcome = edit_outcome(model, edit)
    if not outcome:
        return edit
    edit.info["outcome"] = outcome
    edit.info["reached"] = all(o["reached"] for o in outcome)
    edit.info["p_new"] = float(sum(o["p_new"] for o in outcome) / len(outcome))
    missed = [o for o in outcome if not o["reached"]]
    if missed and warn:
        first = missed[0]
        msg = (f"{edit.method} edit did not reach its new object for {len(missed)} of {len(outcome)} request(s): "
               f"{first['prompt']!r} -> top-1 {first['top1']!r}, P({first['target_new']!r}) = {first['p_new']:.3g}")
        warnings.warn(msg, EditNotReachedWarning, stacklevel=3)
    return edit


def reports_outcome(method: Callable[..., Edit]) -> Callable[..., Edit]:
    """Decorate an editing method ``f(model, ...) -> Edit`` so that its edit records and
    reports whether it reached its new object (:func:`record_outcome`)."""

    @functools.wraps(method)
    def wrapper(model, *args: Any, **kwargs: Any) -> Edit:
        return record_outcome(model, method(model, *args, **kwargs))

    return wrapper

"""MEND editors trained by the originals' code, read into a :class:`~workbench.editing.mend_net.MendEditor`.

The originals (eric-mitchell/mend, and kmeng01/rome's copy in ``baselines/mend``) save
``torch.save({"model": MEND.state_dict(), "opt": ..., "lr_opt": ..., "step": ..., ...})``
(``trainer.py`` ``save_state``). ``MEND.state_dict`` holds, besides ``"model_config"`` (the
model's Hugging Face config object):

* ``edit_lrs`` — one step per edited weight, in ``config.model.inner_params`` order;
* ``mend.<key>.mlp.layers.<i>.{u, v, bias, mode_scale.weight, mode_shift.weight}`` — the
  low-rank residual layers (``nn.py`` ``IDMLP``/``LRLinear``; ``mlp1``/``mlp2`` instead of
  ``mlp`` without ``combine``), ``<key>`` being the weight shape ``"(d_in, d_out)"`` (``shared``) or
  the weight's name with ``#`` for ``.``; ROME's published files (``mend-10tok-gpt2-xl.pt``)
  spell the prefix ``gtn.`` instead of ``mend.``;
* ``mend.<key>.{u_mean, v_mean, u_std, v_std, u_s, v_s, k}`` — the running normalisation
  statistics of the inputs (``u``) and output gradients (``v``).

**Sign.** The originals apply ``p + edit_lr * einsum(x̃, δ̃)`` (``algs/mend.py`` ``edit``:
``new_params.append(p + updates[n])``; ROME's wrapper ``p.add_(delta * edit_lrs[i])``); the
workbench applies ``W - α Σ δ̃ x̃ᵀ``. So ``α = -edit_lr``, and the converted editor makes the same
update, number for number. The statistics map as mean → mean, and the variance sum so that the
workbench's standard deviation is the stored ``u_std``/``v_std`` (what the originals normalise with).

What the file does not say is taken from ``hparams`` (default: the model's MEND preset, e.g.
:data:`~workbench.editing.mend_hparams.MEND_GPT2_XL`): the edited weights' names (their order
must be the originals' ``inner_params`` order), ``init`` and the BOS convention.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from .mend_hparams import MendHyperParams, mend_hparams_for
from .mend_net import MendEditor, MendModelMismatch, edited_weights


class OriginalCheckpointError(ValueError):
    """A file is not a MEND checkpoint of the originals' code (or one this loader cannot read)."""


_LAYER = re.compile(r"^(mlp|mlp1|mlp2)\.layers\.(\d+)\.(u|v|bias|mode_scale\.weight|mode_shift\.weight)$")
_STATS = {"u_mean": "mean_x", "v_mean": "mean_d", "k": "count"}
_NET = {"mlp": "net", "mlp1": "net_x", "mlp2": "net_d"}


def read_original_state(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """The MEND state dict of an originals' checkpoint (``archive["model"]``, or a bare state dict),
    prefix ``gtn.`` read as ``mend.``, ``model_config`` dropped.

    The file is a pickle: it is read with ``weights_only=True`` and the Hugging Face config classes
    allowed; a file that needs anything else is refused unless ``trusted`` (then fully unpickled:
    only for files whose source you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such MEND checkpoint file")
    try:
        if trusted:
            archive = torch.load(path, map_location="cpu", weights_only=False)
        else:
            from transformers import PretrainedConfig
            from transformers.models.gpt2.configuration_gpt2 import GPT2Config
            from transformers.models.gptj.configuration_gptj import GPTJConfig

            with torch.serialization.safe_globals([PretrainedConfig, GPT2Config, GPTJConfig]):
                archive = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - pickle, zip and EOF errors alike: name the file
        hint = "" if trusted else (" If it holds other Python objects and you trust its source, pass trusted=True.")
        raise OriginalCheckpointError(f"{path} cannot be read as a MEND checkpoint of the originals' code "
                                      f"({type(err).__name__}: {str(err).splitlines()[0][:200]}).{hint}") from None
    state = archive.get("model", archive) if isinstance(archive, dict) else None
    if not isinstance(state, dict) or "edit_lrs" not in state:
        raise OriginalCheckpointError(f"{path} is not a MEND checkpoint of the originals' code: no 'edit_lrs' in "
                                      "its state dict (expected torch.save({'model': MEND.state_dict(), ...}))")
    out = {}
    for name, value in state.items():
        if name == "model_config" or name.startswith("model."):
            continue
        if name.startswith("gtn."):
            name = "mend." + name[len("gtn."):]
        if not isinstance(value, torch.Tensor):
            raise OriginalCheckpointError(f"{path}: entry {name!r} is not a tensor ({type(value).__name__})")
        out[name] = value
    return out


def _group_key(key: str, path: Path) -> tuple[str, tuple[int, int] | None]:
    """The workbench's network key of an original ``mend.<key>`` and the shape it names (shared)."""
    shape = re.fullmatch(r"\((\d+), (\d+)\)", key)
    if shape:
        d_in, d_out = int(shape[1]), int(shape[2])
        return f"{d_in}x{d_out}", (d_in, d_out)
    if "#" in key:
        return key, None
    raise OriginalCheckpointError(f"{path}: network key {key!r} is neither a shape '(d_in, d_out)' nor a weight name")


def convert_original_state(state: dict[str, torch.Tensor], hparams: MendHyperParams, path: Path
                           ) -> tuple[MendHyperParams, dict[str, torch.Tensor]]:
    """The hyperparameters the tensors imply (``n_hidden``, ``rank``, ``combine``, ``shared``) and the
    workbench's state dict of the same editor (α = -edit_lr; statistics as in the module docstring)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in state.items():
        if name == "edit_lrs":
            continue
        if not name.startswith("mend."):
            raise OriginalCheckpointError(f"{path}: unexpected entry {name!r} (expected edit_lrs and mend.*)")
        key, _, rest = name[len("mend."):].partition(".")
        groups.setdefault(key, {})[rest] = value
    if not groups:
        raise OriginalCheckpointError(f"{path}: no gradient-transform networks (mend.*) in the checkpoint")
    shared = {_group_key(k, path)[1] is not None for k in groups}
    if len(shared) != 1:
        raise OriginalCheckpointError(f"{path}: mixes shared (shape) and per-weight networks")
    out: dict[str, torch.Tensor] = {}
    nets: set[str] = set()
    n_layers: set[int] = set()
    ranks: set[int] = set()
    for key, entries in groups.items():
        ours, _ = _group_key(key, path)
        for rest, value in entries.items():
            m = _LAYER.match(rest)
            if m:
                net, layer, field = _NET[m[1]], int(m[2]), m[3].replace(".weight", "")
                nets.add(m[1])
                n_layers.add(layer)
                if field == "v":
                    ranks.add(int(value.shape[0]))
                out[f"nets.{ours}.{net}.{layer}.{field}"] = value.float()
            elif rest in _STATS:
                v = value.double()
                out[f"nets.{ours}.{_STATS[rest]}"] = v.reshape(()) if rest == "k" else v
            elif rest not in ("u_std", "v_std", "u_s", "v_s"):
                raise OriginalCheckpointError(f"{path}: unexpected entry mend.{key}.{rest}")
        count = entries["k"].double().reshape(())
        for side, ours_side in (("u", "x"), ("v", "d")):
            std = entries[f"{side}_std"].double()
            out[f"nets.{ours}.m2_{ours_side}"] = std ** 2 * (count - 1)  # our std = sqrt(m2 / (k - 1)) = theirs
    if nets not in ({"mlp"}, {"mlp1", "mlp2"}):
        raise OriginalCheckpointError(f"{path}: networks {sorted(nets)}; only MEND with combine (mlp) or both "
                                      "sides transformed (mlp1 and mlp2) is supported, not one-sided variants")
    if len(ranks) != 1:
        raise OriginalCheckpointError(f"{path}: networks of different ranks {sorted(ranks)}")
    hp = replace(hparams, n_hidden=max(n_layers), rank=ranks.pop(), combine=nets == {"mlp"}, shared=shared.pop(),
                 norm=True, factor_positions="all")
    out["alphas"] = -state["edit_lrs"].float().reshape(-1)  # theirs: W + lr·g; ours: W - α·g
    return hp, out


def load_original(path: str | os.PathLike, model, hparams: MendHyperParams | None = None, *,
                  trusted: bool = False) -> MendEditor:
    """A :class:`MendEditor` for ``model`` from a MEND checkpoint written by the originals' code.

    Args:
        path: the originals' ``torch.save`` archive (``trainer.py``'s, or ROME's ``mend-*.pt``).
        model: the model it was trained for (the edited weights' names and shapes are checked;
            the editor records this model's fingerprint, as nothing in the file identifies it).
        hparams: supplies ``inner_params`` in the originals' order (default: the model's MEND
            preset, :func:`~workbench.editing.mend_hparams.mend_hparams_for`) and ``prepend_bos``;
            the network's shape comes from the file.
        trusted: fully unpickle a file that holds Python objects besides tensors and configs.

    Save the result with :meth:`MendEditor.save` to use it like any workbench editor.
    """
    from ..loading import model_fingerprint
    from .mend_net import default_inner_params

    path = Path(path)
    state = read_original_state(path, trusted=trusted)
    base = hparams or mend_hparams_for(model)
    names = tuple(base.inner_params or default_inner_params(model, base.n_blocks))
    n_lrs = int(state["edit_lrs"].numel())
    if n_lrs != len(names):
        raise OriginalCheckpointError(f"{path} has {n_lrs} edit_lrs but {len(names)} edited weights are named "
                                      f"({list(names)}); pass hparams with the checkpoint's inner_params")
    hp, tensors = convert_original_state(state, replace(base, inner_params=names), path)
    try:
        weights, _ = edited_weights(model, names)
    except MendModelMismatch as err:
        raise MendModelMismatch(f"{path}: {err}") from None
    editor = MendEditor(hp, weights, model_fingerprint(model), getattr(model, "workbench_spec", None),
                        info={"converted_from": path.name})
    missing, unexpected = editor.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise OriginalCheckpointError(f"{path} does not fit the editor it describes for this model (its networks "
                                      f"are for other weight shapes or other inner_params?): missing {missing[:6]}, "
                                      f"unexpected {unexpected[:6]}")
    editor.source = str(path)
    return editor.eval().to(model.cfg.device)

"""The editing methods an evaluation can run: the registry, and what each runs with.

A method is registered by name as ``"module:function"`` (imported when first used) or as a
callable; :func:`preset_name` and :func:`resolved_hparams` say which hyperparameters a built-in
method will use on a model, so result folders key on them.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from typing import Callable, Sequence

from ..facts import Fact

BASELINE = "unedited"
"""Method name of the baseline rows (the unedited model), whose locus is ``"-"``."""

METHODS: dict[str, str] = {
    "ft": "workbench.editing.ft:ft",
    "kn": "workbench.editing.kn:kn",
    "mend": "workbench.editing.mend:mend",
    "rome": "workbench.editing.rome:rome",
    "memit": "workbench.editing.memit:memit",
}
"""The method registry: name -> ``"module:function"`` (imported lazily); :func:`register_method` adds one."""

BATCH_METHODS: set[str] = {"memit"}
"""Registered methods that take a list of facts (they get a one-fact batch: one fact per edit)."""

PAPER_ORDER = ("ft", "kn", "mend", "rome", "memit")
"""The paper's row order; :func:`default_methods` is the registered ones in this order."""

METHOD_LABELS = {"ft": "FT", "kn": "KN", "rome": "ROME", "memit": "MEMIT", "mend": "MEND", BASELINE: "Unedited"}


def register_method(name: str, target: str | Callable, *, batch: bool = False, label: str | None = None) -> None:
    """Add an editing method to the registry: ``target`` is ``"module:function"`` or the function.

    The function is called ``f(model, fact, locus=..., **kwargs) -> Edit`` (``locus`` only if it
    accepts one), or with ``[fact]`` when ``batch``.
    """
    METHODS[name] = target  # type: ignore[assignment]
    if batch:
        BATCH_METHODS.add(name)
    if label:
        METHOD_LABELS[name] = label


def default_methods() -> tuple[str, ...]:
    """The registered methods in the paper's order (FT, KN, MEND, ROME, MEMIT), then any others."""
    return tuple(m for m in PAPER_ORDER if m in METHODS) + tuple(m for m in METHODS if m not in PAPER_ORDER)


def resolve_method(method: str | Callable) -> tuple[str, Callable]:
    """``(name, function)`` of a registered method name or a callable."""
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    if method not in METHODS:
        raise ValueError(f"unknown editing method {method!r}; choose from {sorted(METHODS)} or pass a callable")
    target = METHODS[method]
    if callable(target):
        return method, target
    module, name = target.split(":")
    return method, getattr(importlib.import_module(module), name)


def _takes(fn: Callable, name: str) -> bool:
    """Whether ``fn`` has a parameter called ``name`` (a ``**kwargs`` catch-all does not count)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def make_edit(name: str, fn: Callable, model, fact: Fact, locus: str, kwargs: dict | None = None):
    """Compute one edit of the request ``fact`` keyed at ``locus`` (batch methods get ``[fact]``)."""
    kwargs = dict(kwargs or {})
    if "progress" in _params(fn):
        kwargs.setdefault("progress", False)  # one bar for the whole evaluation
    if _accepts(fn, "locus"):
        kwargs["locus"] = locus
    from ..editing.edit import EditNotReachedWarning

    with warnings.catch_warnings():  # recorded per row (info_reached, info_p_new), not one warning per edit
        warnings.simplefilter("ignore", EditNotReachedWarning)
        return fn(model, [fact] if name in BATCH_METHODS else fact, **kwargs)


def _params(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def preset_name(name: str, model, kwargs: dict | None) -> str:
    """The hyperparameter preset a method runs with: its preset name, or ``"custom"`` when
    ``kwargs`` override hyperparameters."""
    kwargs = kwargs or {}
    if "preset" in kwargs:
        return str(kwargs["preset"])
    tuning = {k for k in kwargs if k not in ("progress", "verbose", "stats", "prepend_bos")}
    if name in ("rome", "memit"):
        from ..editing.hparams import _model_key

        base = f"{name}:{_model_key(model) or 'generic'}"
        return base if not tuning else f"{base}+custom"
    if name == "ft":
        from ..editing.ft import ft_hparams_for

        base = ft_hparams_for(model).preset
        return base if not tuning else f"{base}+custom"
    if name == "kn":
        from ..editing.kn import KNHyperParams

        base = KNHyperParams().preset
        return base if not tuning else f"{base}+custom"
    if name == "mend" and _builtin_mend():  # the editor is the preset: rows name it (and its SHA-256, info_editor_sha256)
        try:
            return f"mend:{_mend_editor(model, kwargs).label}"
        except (OSError, ValueError):  # no usable editor: the edit fails and its row says why
            return "mend:unavailable"
    return "custom" if tuning else "default"


def _builtin_mend() -> bool:
    """Whether ``"mend"`` is the workbench's own MEND (not a callable registered under that name)."""
    return METHODS.get("mend") == "workbench.editing.mend:mend"


def _mend_editor(model, kwargs: dict | None):
    """The MEND editor an evaluation of ``model`` uses (``kwargs["editor"]`` or the shipped one)."""
    from ..editing.mend import resolve_editor

    return resolve_editor(model, (kwargs or {}).get("editor"))


def method_problem(name: str, fn: Callable, model, kwargs: dict | None) -> Exception | None:
    """Why every edit of a built-in method would fail on ``model`` (checked once, before any edit),
    or ``None``. MEND: its editor is missing, damaged, or was trained for another model."""
    if name != "mend" or not _builtin_mend():
        return None
    try:
        _mend_editor(model, kwargs).check_model(model)
    except (OSError, ValueError) as err:  # FileNotFoundError, IntegrityError, MendModelMismatch
        hint = ("" if (kwargs or {}).get("editor") else
                " (no editor given: the one shipped for the bundled model was tried)")
        return type(err)(f"MEND cannot edit this model{hint}: {err}. Pass a MEND editor trained for it "
                         "(method_kwargs={'mend': {'editor': DIR}}, --mend-editor DIR) or leave MEND out")
    return None


def usable_methods(model, resolved: Sequence[tuple[str, Callable]], method_kwargs: dict[str, dict],
                   explicit: bool) -> list[tuple[str, Callable]]:
    """``resolved`` without the methods that could not edit ``model`` at all (:func:`method_problem`):
    an explicitly chosen one raises the problem up front; one of the default methods is left out
    with a warning that says why."""
    out = []
    for name, fn in resolved:
        problem = method_problem(name, fn, model, method_kwargs.get(name))
        if problem is None:
            out.append((name, fn))
        elif explicit:
            raise problem
        else:
            warnings.warn(f"{name} is left out of the default methods: {problem}", stacklevel=3)
    return out


def resolved_hparams(name: str, model, kwargs: dict | None = None) -> dict | None:
    """The hyperparameters (with the preset's name) a built-in method will use with ``kwargs`` on ``model``
    (``None``: a custom callable, or kwargs the method will reject anyway, which its rows record as failed)."""
    from dataclasses import fields, replace

    kw = dict(kwargs or {})
    try:
        if name in ("rome", "memit"):
            from ..editing.hparams import MEMITHyperParams, ROMEHyperParams, memit_hparams_for, rome_hparams_for
            from ..editing.rome import resolve_hparams

            if name == "rome":
                layers = [kw["layer"]] if kw.get("layer") is not None else None
                hp = resolve_hparams(model, kw.get("hparams"), ROMEHyperParams, rome_hparams_for, layers)
            else:
                layers = list(kw["layers"]) if kw.get("layers") else None
                hp = resolve_hparams(model, kw.get("hparams"), MEMITHyperParams, memit_hparams_for, layers)
            return {**hp.to_dict(), "preset": preset_name(name, model, kwargs)}
        if name in ("ft", "kn"):
            from ..editing.ft import FT_PRESETS, FTHyperParams, default_layer, ft_hparams_for
            from ..editing.kn import KN_PRESETS, KNHyperParams

            cls = FTHyperParams if name == "ft" else KNHyperParams
            presets = FT_PRESETS if name == "ft" else KN_PRESETS
            if kw.get("preset") is not None:
                base = presets[kw["preset"]]
            else:
                base = ft_hparams_for(model) if name == "ft" else KN_PRESETS["kn-original"]
            given = kw.get("hparams")
            hp = given if isinstance(given, cls) else replace(base, **(given or {}))
            names = {f.name for f in fields(cls)} - {"preset"}
            hp = replace(hp, **{k: v for k, v in kw.items() if k in names})
            if name == "ft" and hp.layer is None:
                hp = replace(hp, layer=default_layer(model))
            return {**hp.to_dict(), "preset": preset_name(name, model, kwargs)}
        if name == "mend" and _builtin_mend():
            editor = _mend_editor(model, kw)
            return {**editor.hparams.to_dict(), "editor": editor.label, "editor_sha256": editor.content_hash,
                    "preset": preset_name(name, model, kwargs)}
    except Exception:  # noqa: BLE001 - the method raises the same error per row, recorded there
        return None
    return None


def with_shared_stats(model, resolved: Sequence[tuple[str, Callable]], method_kwargs: dict[str, dict]
                      ) -> dict[str, dict]:
    """``method_kwargs`` plus ``stats={layer: LayerStats}`` for ROME and MEMIT (unless given):
    their covariance statistics, computed (or read from the cache) once, here, for the workers."""
    from ..editing.stats import layer_stats

    out = {k: dict(v or {}) for k, v in method_kwargs.items()}
    for name, _ in resolved:
        kw = out.setdefault(name, {})
        hp = resolved_hparams(name, model, kw) if name in ("rome", "memit") and "stats" not in kw else None
        if hp is None or (name == "rome" and not hp["mom2_adjustment"]):
            continue
        kw["stats"] = {int(layer): layer_stats(model, int(layer), corpus=hp["mom2_dataset"],
                                               n_tokens=hp["mom2_n_tokens"]) for layer in hp["layers"]}
    return out

"""The editing methods an evaluation can run: the registry, and what each runs with.

A method is registered by name as ``"module:function"`` (imported when first used) or as a
callable; :func:`preset_name` and :func:`resolved_hparams` say which hyperparameters a built-in
method will use on a model (through :func:`workbench.editing.presets.resolve_call`, the one
resolution the methods use too), so result folders key on them.
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
    "kn-subject": "workbench.editing.kn:kn_subject",
    "mend": "workbench.editing.mend:mend",
    "rome": "workbench.editing.rome:rome",
    "memit": "workbench.editing.memit:memit",
}
"""The method registry: name -> ``"module:function"`` (imported lazily); :func:`register_method` adds one."""

BATCH_METHODS: set[str] = {"memit"}
"""Registered methods that take a list of facts (they get a one-fact batch: one fact per edit)."""

PAPER_ORDER = ("ft", "kn", "kn-subject", "mend", "rome", "memit")
"""The paper's row order (with the ``kn-subject`` ablation beside KN); :func:`default_methods` is the
registered ones in this order."""

METHOD_LABELS = {"ft": "FT", "kn": "KN", "kn-subject": "KN (subject locus)", "rome": "ROME", "memit": "MEMIT",
                 "mend": "MEND", BASELINE: "Unedited"}


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


def _resolved(name: str, model, kwargs: dict | None):
    from ..editing.presets import resolve_call

    return resolve_call(name, model, kwargs)


def check_method_kwargs(method_kwargs: dict[str, dict] | None) -> None:
    """Refuse a ``preset`` a method does not have (per the preset registry, :mod:`workbench.editing.presets`)
    before any edit runs, where every edit of the method would fail; the message lists the presets there are."""
    from ..editing.presets import HyperParameterError, has_presets, preset_table

    for name, kwargs in (method_kwargs or {}).items():
        preset = (kwargs or {}).get("preset")
        if preset is None or not has_presets(name):
            continue
        table = preset_table(name)
        if preset not in table.named and preset not in table.by_model:
            raise HyperParameterError(f"{name} has no preset {preset!r}; choose from {', '.join(sorted(table.named))}")


def preset_name(name: str, model, kwargs: dict | None) -> str:
    """The hyperparameter preset a method runs with: its preset name (``+custom`` when ``kwargs``
    override hyperparameters); for a method without registered presets ``"default"`` or ``"custom"``."""
    from ..editing.presets import NOT_HYPERPARAMETERS, UnknownModelError, choose_preset, has_presets

    kwargs = kwargs or {}
    if name == "mend" and _builtin_mend():  # the editor is the preset: rows name it (and its SHA-256, info_editor_sha256)
        try:
            return f"mend:{_mend_editor(model, kwargs).label}"
        except (OSError, ValueError):  # no usable editor: the edit fails and its row says why
            return "mend:unavailable"
    if has_presets(name):
        try:
            return _resolved(name, model, kwargs).preset
        except UnknownModelError:
            raise
        except Exception:  # noqa: BLE001 - kwargs the method rejects: its rows record the error as failed
            try:
                return choose_preset(name, model, preset=kwargs.get("preset"), quiet=True)[0] + "+invalid"
            except Exception:  # noqa: BLE001 - e.g. an unknown preset name
                return "invalid"
    if "preset" in kwargs:
        return str(kwargs["preset"])
    return "custom" if any(k not in NOT_HYPERPARAMETERS for k in kwargs) else "default"


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
    (``None``: a method without registered presets, or kwargs the method will reject anyway, which its
    rows record as failed). An unknown model under strict presets raises here."""
    from ..editing.presets import UnknownModelError

    if name == "mend" and _builtin_mend():  # the editor's content is what MEND's rows depend on
        try:
            editor = _mend_editor(model, kwargs)
        except (OSError, ValueError):  # no usable editor: every edit fails, its rows say why
            return None
        return {**editor.hparams.to_dict(), "editor": editor.label, "editor_sha256": editor.content_hash,
                "preset": preset_name(name, model, kwargs)}
    try:
        resolved = _resolved(name, model, kwargs)
    except UnknownModelError:
        raise
    except Exception:  # noqa: BLE001 - the method raises the same error per row, recorded there
        return None
    return None if resolved is None else resolved.to_dict()


def with_shared_stats(model, resolved: Sequence[tuple[str, Callable]], method_kwargs: dict[str, dict]
                      ) -> dict[str, dict]:
    """``method_kwargs`` plus ``stats={layer: LayerStats}`` for ROME and MEMIT (unless given, or given as
    the path of the originals' ``.npz`` statistics, which is read here): their covariance statistics,
    computed (or read from the cache) once, here, for the workers."""
    import os

    from ..editing.stats import layer_stats, npz_layer_stats

    out = {k: dict(v or {}) for k, v in method_kwargs.items()}
    for name, _ in resolved:
        kw = out.setdefault(name, {})
        given = kw.get("stats")
        if name not in ("rome", "memit") or (given is not None and not isinstance(given, (str, os.PathLike))):
            continue
        hp = resolved_hparams(name, model, kw)
        if hp is None or (name == "rome" and not hp["mom2_adjustment"]):
            continue
        if given is not None:
            kw["stats"] = {int(layer): npz_layer_stats(given, int(layer), model) for layer in hp["layers"]}
            continue
        kw["stats"] = {int(layer): layer_stats(model, int(layer), corpus=hp["mom2_dataset"],
                                               n_tokens=hp["mom2_n_tokens"], n_samples=hp["mom2_n_samples"])
                       for layer in hp["layers"]}
    return out


def stats_key(stats, layers) -> object:
    """What the evaluation's store key records of a ``stats=`` argument: for the originals' ``.npz``
    statistics (a path), the SHA-256 of each used layer's file; for loaded statistics, their corpus ids."""
    import os

    from ..editing.stats import LayerStats, npz_layer_stats

    if isinstance(stats, (str, os.PathLike)):
        return {"npz": {int(l): npz_layer_stats(stats, int(l)).info["sha256"] for l in layers}}
    if isinstance(stats, dict):
        return {int(l): (v.corpus if isinstance(v, LayerStats) else stats_key(v, [l])) for l, v in stats.items()}
    if isinstance(stats, LayerStats):
        return stats.corpus
    return type(stats).__name__

"""Preset resolution, in one place: which hyperparameters a method runs with on a model.

Each method keeps its presets with itself (``hparams.py`` for ROME and MEMIT, ``ft.py``, ``kn.py``,
``mend.py``) and registers them here with :func:`register_presets`: one preset per known model
identity (:func:`workbench.identity.model_identity`, from the model's config, never its folder
name), named presets a caller can ask for, and a generic preset for models that are not known.
:func:`resolve` is the one function the methods and the evaluation both call: preset (asked for,
else the model's, else the generic one) -> the caller's ``hparams`` (an instance or a dict of
fields) -> single-field overrides -> the method's own check against the model.

An unknown model gets the generic preset with an :class:`UnknownModelWarning` that names it;
under strict presets (:func:`strict_presets`, ``set_strict_presets(True)``, the CLI's
``--strict-presets``, ``evaluate(strict_presets=True)``) that is an :class:`UnknownModelError`.
Methods whose presets do not depend on the model (KN) register ``model_independent=True`` and never warn.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import difflib
import warnings
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable, Iterator

from ..identity import ModelIdentity, as_model, model_identity


class HyperParameterError(ValueError):
    """A hyperparameter is unknown or out of range; the message names it and, for a typo, the likely field."""


class UnknownModelError(HyperParameterError):
    """Strict presets: the model is not a known model, so a method has no preset of its own for it."""


class UnknownModelWarning(UserWarning):
    """The model is not a known model: a method runs with its generic preset (the warning names both)."""


def unknown_keys_error(cls_name: str, unknown: list[str], known: list[str]) -> HyperParameterError:
    """The error for keys that are not fields, with a difflib suggestion for each."""
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return HyperParameterError(f"unknown {cls_name} field(s): {', '.join(parts)}; known fields: {', '.join(known)}")


@dataclass
class MethodPresets:
    """A method's presets: ``by_model`` identity key -> preset name, ``named`` preset name ->
    hyperparameters, ``generic(model) -> (name, hyperparameters)`` for unknown models, ``check(model, hp)
    -> hp`` (fills model-dependent fields, raises for values the model cannot take), ``aliases``
    keyword -> (field, converter) for call arguments that set a field (ROME's ``layer``)."""

    method: str
    by_model: dict[str, str] = field(default_factory=dict)
    named: dict[str, Any] = field(default_factory=dict)
    generic: Callable[[Any], tuple[str, Any]] | None = None
    check: Callable[[Any, Any], Any] | None = None
    aliases: dict[str, tuple[str, Callable[[Any], Any]]] = field(default_factory=dict)
    model_independent: bool = False
    sources: dict[str, str] = field(default_factory=dict)


_TABLES: dict[str, MethodPresets] = {}
_WARNED: set[tuple[str, str]] = set()
_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("workbench_strict_presets", default=False)


def register_presets(method: str, *, by_model: dict[str, tuple[str, Any]] | None = None,
                     named: dict[str, Any] | None = None, generic: Callable[[Any], tuple[str, Any]] | None = None,
                     check: Callable[[Any, Any], Any] | None = None,
                     aliases: dict[str, tuple[str, Callable[[Any], Any]]] | None = None,
                     model_independent: bool | None = None, sources: dict[str, str] | None = None) -> MethodPresets:
    """Add presets of ``method`` (merged into any registered before).

    ``by_model``: identity key (``"gpt2-xl"``, ``"gpt-j"``, ``"toy-facts"``, or one added with
    :func:`workbench.identity.register_known_model`) -> ``(preset name, hyperparameters)``;
    ``named``: more presets callers can ask for by name; ``generic``: ``model -> (name,
    hyperparameters)`` for unknown models; ``sources``: preset name -> the original file its values
    come from. Example (MEND)::

        register_presets("mend", by_model={"gpt2-xl": ("mend:gpt2-xl", MEND_GPT2_XL)},
                         generic=lambda model: ("mend:generic", MendHyperParams()))
    """
    table = _TABLES.setdefault(method, MethodPresets(method))
    for key, (name, hp) in (by_model or {}).items():
        table.by_model[key] = name
        table.named[name] = hp
    table.named.update(named or {})
    if generic is not None:
        table.generic = generic
    if check is not None:
        table.check = check
    table.aliases.update(aliases or {})
    if model_independent is not None:
        table.model_independent = model_independent
    table.sources.update(sources or {})
    return table


def preset_table(method: str) -> MethodPresets:
    """The registered presets of ``method`` (a :class:`KeyError` names the methods that have some)."""
    if method not in _TABLES:
        raise KeyError(f"no presets registered for {method!r}; methods with presets: {sorted(_TABLES)}")
    return _TABLES[method]


def has_presets(method: str) -> bool:
    return method in _TABLES


def set_strict_presets(on: bool = True) -> None:
    """Make an unknown model an error (``True``) or a warning (``False``, the default) from now on."""
    _STRICT.set(bool(on))


@contextlib.contextmanager
def strict_presets(on: bool = True) -> Iterator[None]:
    """Within the block, an unknown model is an :class:`UnknownModelError` instead of a warning."""
    token = _STRICT.set(bool(on))
    try:
        yield
    finally:
        _STRICT.reset(token)


def strict_presets_on() -> bool:
    """Whether strict presets are on (see :func:`strict_presets`)."""
    return _STRICT.get()


@dataclass(frozen=True)
class Resolved:
    """What :func:`resolve` gives: the hyperparameters, the preset's name (``+custom`` when the
    caller changed fields), the model's identity and whether the preset is the generic one."""

    hparams: Any
    preset: str
    identity: ModelIdentity | None
    generic: bool

    def to_dict(self) -> dict:
        """The hyperparameters' fields with ``preset`` (what result folders key on)."""
        return {**hparams_dict(self.hparams), "preset": self.preset}


def hparams_dict(hp: Any) -> dict:
    """``hp.to_dict()`` where it has one, else its dataclass fields."""
    return hp.to_dict() if hasattr(hp, "to_dict") else asdict(hp)


def _build(cls, base: Any, changes: dict) -> Any:
    """``base`` with ``changes`` (field names checked; ``from_dict`` used where the class has one)."""
    names = [f.name for f in fields(cls)]
    unknown = [k for k in changes if k not in names and not (hasattr(cls, "from_dict") and k in _extras(cls))]
    if unknown:
        raise unknown_keys_error(cls.__name__, unknown, names)
    if hasattr(cls, "from_dict"):
        return cls.from_dict({**hparams_dict(base), **changes})
    return replace(copy.deepcopy(base), **changes)


def _extras(cls) -> frozenset:
    return getattr(cls, "IGNORED_KEYS", frozenset())


def choose_preset(method: str, model, *, preset: str | None = None, strict: bool | None = None,
                  quiet: bool = False) -> tuple[str, Any, ModelIdentity | None, bool]:
    """``(name, hyperparameters (a copy), identity, generic)`` of the preset ``method`` uses on ``model``:
    ``preset`` if given, else the one of the model's identity, else the generic one (warned about,
    or an :class:`UnknownModelError` under strict presets; ``quiet`` neither warns nor raises). ``model``: a
    loaded bridge, or a model folder / config dict (identified without loading weights)."""
    table = preset_table(method)
    model = as_model(model)
    if preset is not None:
        if preset not in table.named:
            by_key = table.by_model.get(preset)
            if by_key is None:
                raise HyperParameterError(f"unknown {method} preset {preset!r}; choose from "
                                          f"{sorted(table.named)}")
            preset = by_key
        return preset, copy.deepcopy(table.named[preset]), None, False
    if table.model_independent and table.generic is not None:
        name, hp = table.generic(model)
        return name, copy.deepcopy(hp), None, False
    identity = model_identity(model)
    if identity.key in table.by_model:
        name = table.by_model[identity.key]
        return name, copy.deepcopy(table.named[name]), identity, False
    if table.generic is None:
        raise HyperParameterError(f"{method} has no preset for {identity.label} and no generic preset")
    name, hp = table.generic(model)
    if not quiet:
        known = ", ".join(sorted(table.by_model)) or "none"
        msg = (f"the model, a {identity.shape}, is not a known model (known to {method}: {known}; identified by config, not by "
               f"folder name): {method} uses its generic preset {name!r}. Pass hparams= / a preset to choose, or "
               f"register the model with workbench.identity.register_known_model")
        if strict if strict is not None else _STRICT.get():
            raise UnknownModelError(msg.replace(f"{method} uses its generic preset",
                                                f"strict presets refuse {method}'s generic preset"))
        if (method, identity.label) not in _WARNED:  # once per method and model, not once per edit
            _WARNED.add((method, identity.label))
            warnings.warn(msg, UnknownModelWarning, stacklevel=3)
    return name, copy.deepcopy(hp), identity, True


NOT_HYPERPARAMETERS = frozenset({"progress", "verbose", "stats", "prepend_bos", "preset", "hparams"})
"""Call arguments that never make a preset ``+custom`` (``prepend_bos`` is recorded on its own)."""


def resolve(method: str, model, *, preset: str | None = None, hparams: Any = None, overrides: dict | None = None,
            strict: bool | None = None, quiet: bool = False) -> Resolved:
    """The hyperparameters ``method`` runs with on ``model``: the preset (``preset``, else the model's,
    else the generic one), then ``hparams`` (an instance of the method's class, which replaces the
    preset, or a dict of fields), then ``overrides`` (fields, or the method's aliases such as ROME's
    ``layer``; ``None`` values are ignored), then the method's check against the model. ``model``: a
    loaded bridge, or a model folder / config dict (its ``config.json`` is enough)."""
    table = preset_table(method)
    model = as_model(model)
    name, base, identity, generic = choose_preset(method, model, preset=preset, strict=strict, quiet=quiet)
    cls = type(base)
    if hparams is None:
        hp = base
    elif isinstance(hparams, cls):
        hp = copy.deepcopy(hparams)
    elif isinstance(hparams, dict):
        hp = _build(cls, base, dict(hparams))
    else:
        raise TypeError(f"hparams must be {cls.__name__}, a dict or None, not {type(hparams).__name__}")
    changes: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in table.aliases:
            target, convert = table.aliases[key]
            changes[target] = convert(value)
        else:
            changes[key] = value
    if changes:
        hp = _build(cls, hp, changes)
    if hasattr(hp, "validate"):
        hp.validate()
    if table.check is not None:
        hp = table.check(model, hp)
    custom = hparams is not None or any(k not in NOT_HYPERPARAMETERS for k in changes)
    return Resolved(hparams=hp, preset=f"{name}+custom" if custom else name, identity=identity, generic=generic)


def resolve_call(method: str, model, kwargs: dict | None, *, strict: bool | None = None,
                 quiet: bool = False) -> Resolved | None:
    """:func:`resolve` for the keyword arguments of a call ``method(model, fact, **kwargs)`` (the
    evaluation's ``method_kwargs``): ``preset``, ``hparams``, and every field or alias; ``None`` when
    ``method`` has no registered presets."""
    if not has_presets(method):
        return None
    kw = dict(kwargs or {})
    table = preset_table(method)
    name, base, _, _ = choose_preset(method, model, preset=kw.get("preset"), quiet=True)
    names = {f.name for f in fields(type(base))} if is_dataclass(base) else set()
    overrides = {k: v for k, v in kw.items() if (k in names or k in table.aliases) and k not in NOT_HYPERPARAMETERS}
    return resolve(method, model, preset=kw.get("preset"), hparams=kw.get("hparams"), overrides=overrides,
                   strict=strict, quiet=quiet)


def editing_prepend_bos(model, *choices: bool | None) -> bool:
    """The BOS convention of an edit: the first of ``choices`` that is not ``None``, else the
    model's ROME preset's (``False`` for GPT-2 XL and GPT-J, as the originals), else the model's
    TransformerLens default."""
    from ..spans import default_prepend_bos

    for choice in (*choices, choose_preset("rome", model, quiet=True)[1].prepend_bos):
        if choice is not None:
            return bool(choice)
    return default_prepend_bos(model)

"""A figure list's ``params`` -> the analysis config (:mod:`sinkscope.config`) its run executes.

``params`` name fields of :class:`~sinkscope.config.ScanConfig`, :class:`~sinkscope.config.ProbeConfig`
or :class:`~sinkscope.config.FlowConfig` (``-`` or ``_`` alike), with TOML values converted to
the field's type: an integer where a float is expected (``threshold = 100`` is ``100.0``), a list
where a comma-separated selection is expected (``layers = [0, 6, 12]`` is ``"0,6,12"``), a list
or one string where a tuple is expected (``groups = "cls,mean"`` is split at commas), ``"48x40"``
or ``[48, 40]`` for ``image_size``. The CLI spellings of earlier lists still work
(:data:`PARAM_ALIASES`: ``text``, ``label``, ``analysis``, ``jobs``, ``no_report``, ``no_cache``).
The list's own keys own ``model`` and the data (``images`` / ``dataset``); the regeneration owns
``out``, ``resume`` and ``overwrite``.

>>> config_fields("scan", {"method": "all", "save_layers": [6, 12], "threshold": 100})
{'method': 'all', 'save_layers': '6,12', 'threshold': 100.0}
>>> config_fields("flow", {"analysis": ["rollout"], "vit-threshold": 100})
{'analyses': ('rollout',), 'vit_threshold': 100.0}
>>> config_fields("probe", {"folds": 2, "grups": "cls"})
Traceback (most recent call last):
...
sinkscope.figures.params.SpecError: unknown probe param 'grups'; params: batch_size, cache, device, dtype, folds, groups, image_size, labels, layers, max_images, n_jobs, relative, seed, sink_rule, threshold
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields
from typing import Any

from .._utils import SinkscopeError
from ..config import CONFIGS, RunConfig

#: CLI option names (without dashes) accepted in ``params`` -> (config field, value negated)
PARAM_ALIASES: dict[str, dict[str, tuple[str, bool]]] = {
    "scan": {"text": ("texts", False), "no_report": ("report", True)},
    "probe": {"label": ("labels", False), "jobs": ("n_jobs", False), "no_cache": ("cache", True)},
    "flow": {"analysis": ("analyses", False)},
}
#: config fields a list's ``params`` may not set: its model/data keys and the regeneration own them
OWNED = ("model", "images", "dataset", "out", "resume", "overwrite")
#: tuple fields where one string is a comma-separated list (names that never hold a comma)
_COMMA_TUPLES = ("groups", "analyses")


class SpecError(SinkscopeError):
    """The figure list is malformed; the message names the file, the entry and the problem."""


def param_names(analysis: str) -> list[str]:
    """The config fields ``params`` may set for ``analysis``."""
    return sorted(f.name for f in fields(CONFIGS[analysis]) if f.name not in OWNED)


def config_fields(analysis: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` as config keyword arguments, each value converted to its field's type.

    An unknown or owned key, or a value of the wrong type, raises ``SpecError`` naming the key.
    """
    cls = CONFIGS[analysis]
    hints = typing.get_type_hints(cls)
    allowed = param_names(analysis)
    aliases = PARAM_ALIASES.get(analysis, {})
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in params.items():
        k = str(key).replace("-", "_")
        name, negate = aliases.get(k, (k, False))
        if name in OWNED:
            raise SpecError(
                f"params may not set {key!r} (the list's model/data keys and the regeneration own it)"
            )
        if name not in allowed:
            raise SpecError(f"unknown {analysis} param {key!r}; params: {', '.join(allowed)}")
        if name in given:
            raise SpecError(f"params {given[name]!r} and {key!r} both set {name}")
        given[name] = key
        v = convert(name, hints[name], value, key)
        if negate:
            v = not v
        if name == "analyses" and "all" in v:
            continue  # every analysis that applies (the config's default, None)
        out[name] = v
    return out


def _union_args(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def convert(name: str, tp: Any, value: Any, key: str | None = None) -> Any:
    """A TOML ``value`` as the type ``tp`` of the config field ``name`` (``SpecError`` naming ``key``)."""
    key = key or name
    kinds = _union_args(tp)
    tuples = [a for a in kinds if typing.get_origin(a) is tuple]

    def bad(what: str) -> SpecError:
        return SpecError(f"param {key!r}: expected {what}, got {value!r}")

    if bool in kinds:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if int in kinds and tuples:  # image_size: 224, [336, 448] or "336x448"
        if _is_int(value):
            return value
        if isinstance(value, str):
            try:
                parts = [int(x) for x in value.lower().replace("x", ",").split(",")]
            except ValueError:
                raise bad("a size like 224 or '336x448' (height x width)") from None
            value = parts
        if isinstance(value, list) and len(value) in (1, 2) and all(_is_int(x) for x in value):
            return value[0] if len(value) == 1 else tuple(value)
        raise bad("a size like 224 or '336x448' (height x width)")
    if float in kinds:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad("a number")
        return float(value)
    if int in kinds:
        if not _is_int(value):
            raise bad("an integer")
        return value
    if str in kinds:  # selections such as layers: "all", "4:9", 12 or [0, 6, 12]
        if isinstance(value, str):
            return value
        if _is_int(value):
            return str(value)
        if isinstance(value, list) and value and all(_is_int(x) or isinstance(x, str) for x in value):
            return ",".join(str(x) for x in value)
        raise bad("a string or a list")
    if tuples:
        if isinstance(value, str):
            items = [s.strip() for s in value.split(",")] if name in _COMMA_TUPLES else [value]
            return tuple(s for s in items if s)
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return tuple(value)
        raise bad("a list of strings")
    raise bad(f"a value of type {tp}")


def build_config(analysis: str, kwargs: dict[str, Any]) -> RunConfig:
    """The config of ``analysis`` with ``kwargs``, checked by the config class (``SpecError`` on a bad value).

    A device is checked for its name here; whether it exists is asked when the run starts
    (:func:`sinkscope.runs.run`), so the paper tier's ``cuda`` lists on a laptop.
    """
    try:
        return CONFIGS[analysis](**kwargs)
    except SinkscopeError as e:
        raise SpecError(str(e)) from None


def describe_config(config: RunConfig) -> str:
    """``ScanConfig(model=..., threshold=100.0)``: the model and the fields that differ from the
    defaults (``out`` left out: the regeneration sets it)."""
    parts = []
    for f in fields(config):
        v = getattr(config, f.name)
        if f.name == "out" or (v == f.default and f.name != "model"):
            continue
        parts.append(f"{f.name}={v!r}")
    return f"{type(config).__name__}({', '.join(parts)})"

"""Config trees to and from plain dicts: YAML presets (with ``base:``), dotted ``key=value``
overrides, the old names of renamed options, type coercion of each value to its field's type,
and unknown keys rejected with the closest known one.

The dataclasses themselves are :mod:`speechrl.config`; :func:`speechrl.config.load_run_config`
puts these pieces together for a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from speechrl.config import ConfigError, RunConfig, did_you_mean

PACKAGE_CONFIG_DIR = Path(__file__).parent / "configs"  # a link to the repository's configs/

# Options that moved, old dotted key -> new: presets, overrides and the run configs recorded by
# older runs (``<stage>_config.json``) still load with the old keys, to the same settings.
RENAMED_KEYS = {
    "grpo.normalizer": "decoding.normalizer",
    "grpo.max_new_tokens": "decoding.max_new_tokens",
    "grpo.tokens_per_second": "decoding.tokens_per_second",
    "train.cache_encoder_outputs": "sft.cache_encoder_outputs",
    "train.llm_frozen_steps": "sft.llm_frozen_steps",
    "train.speech_ctc_weight": "sft.speech_ctc_weight",
}


def renamed_keys(data: Any, source: str | None = None) -> Any:
    """A copy of the nested :class:`RunConfig` dict ``data`` with each old key of
    :data:`RENAMED_KEYS` moved to its new name. ``source`` (``"override"``, a YAML file), when
    given, is named in a one-line note on stderr for each old key it used."""
    if not isinstance(data, Mapping):
        return data
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for old, new in RENAMED_KEYS.items():
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        section, target = out.get(old_section), out.setdefault(new_section, {})
        if not (isinstance(section, dict) and old_name in section and isinstance(target, dict)):
            continue
        value = section.pop(old_name)
        if new_name in target and target[new_name] != value:
            raise ConfigError(f"{old}={value!r} and {new}={target[new_name]!r} are one option "
                              f"({old} is its old name): give it once")
        target[new_name] = value
        if source:
            print(f"speechrl: {old} is now {new} ({source}); the old name still works",
                  file=sys.stderr)
    return {k: v for k, v in out.items() if v != {} or k in data}


def _renamed_preset(data: dict[str, Any], source: str) -> dict[str, Any]:
    """:func:`renamed_keys` of a preset's sections and of each of its ``stages:``."""
    stages = data.get("stages")
    data = renamed_keys({k: v for k, v in data.items() if k != "stages"}, source)
    if isinstance(stages, Mapping):
        data["stages"] = {name: renamed_keys(section, source)
                          for name, section in stages.items()}
    elif stages is not None:
        data["stages"] = stages
    return data


# --------------------------------------------------------------------------- generic machinery


def _resolve_type(tp: Any) -> tuple[Any, bool]:
    """(the concrete type inside Optional[...] / X | None, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], len(rest) < len(args)
    return tp, False


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """``value`` (from YAML or an override) as the field type ``tp``; ``key`` names the field in
    the :class:`ConfigError` a value of the wrong type raises."""
    tp, optional = _resolve_type(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError(f"{key} needs a value (got none)")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, _path=f"{key}.")
    if isinstance(value, Mapping):
        raise ConfigError(f"{key} is a single value, not a section: got {value!r}")
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        number = _as_number(value)
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}={value!r} is not a number (e.g. {key}=1e-4)")
        return float(number)
    if tp is int:
        number = _as_number(value)
        if number is None or not float(number).is_integer():
            raise ConfigError(f"{key}={value!r} is not a whole number (e.g. {key}=10)")
        return int(number)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, (str, int)) and str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}={value!r} is not a boolean (true or false)")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} is not a string")
    return value


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            return float(value)
        except ValueError:
            return None
    return None


def from_dict(cls: type, data: Mapping[str, Any] | None, *, _path: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested dict, rejecting unknown keys by name (with the
    closest known key) and values of the wrong type naming the key (:class:`ConfigError`).
    ``_path`` is the dotted prefix of ``cls`` inside a :class:`RunConfig` (``"train."``)."""
    section = _path.rstrip(".") or cls.__name__
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{section} is a section, not a value: set its options one by one "
                          f"(e.g. {_path or section + '.'}NAME=VALUE), not {data!r}")
    data = dict(data or {})
    if cls is RunConfig:
        data = renamed_keys(data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(_unknown_message(cls, unknown, names, _path))
    kwargs = {k: _coerce(hints[k], v, f"{_path}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _unknown_message(cls: type, unknown: list[str], names: list[str], path: str) -> str:
    keys = [f"{path}{k}" for k in unknown]
    text = f"unknown option{'s' if len(keys) > 1 else ''} {', '.join(keys)}"
    close = difflib.get_close_matches(unknown[0], names, n=1, cutoff=0.6)
    if close:
        return f"{text} (did you mean {path}{close[0]}?)"
    if path or cls is RunConfig:  # the name in another section: train.group_size
        elsewhere = [k for k in _dotted_keys(RunConfig) if k.rsplit(".", 1)[-1] == unknown[0]]
        moved = {new.rsplit(".", 1)[-1]: new for new in RENAMED_KEYS.values()}
        elsewhere += [moved[n] for n in difflib.get_close_matches(unknown[0], moved, n=1)]
        if elsewhere:
            return f"{text} (did you mean {elsewhere[0]}?)"
    section = path.rstrip(".")
    return text + f"; {section + ' options' if section else 'known'}: {', '.join(sorted(names))}"


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every option of the dataclass tree ``cls``, dotted (``train.lr``), sections included."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        tp, _ = _resolve_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            keys += _dotted_keys(tp, f"{key}.")
    return keys


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``; lists stay leaves."""
    out: dict[str, Any] = {}
    for k, v in nested.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) suitable for YAML / JSON."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [convert(x) for x in v]
        return v

    return convert(cfg)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "data.train=[a.jsonl,b.jsonl]"]`` -> nested dict; each value is
    parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r} is not a key=value override (e.g. train.lr=1e-4; a "
                              "preset goes after --config)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} has no key before '=' (e.g. train.lr=1e-4)")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: {raw!r} is not a value ("
                              f"{' '.join(str(err).split())})") from err
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(cfg: Any, overrides: list[str] | dict[str, Any]) -> Any:
    """A copy of the dataclass tree ``cfg`` with dotted ``key=value`` overrides applied."""
    update = parse_overrides(overrides) if isinstance(overrides, list) else overrides
    if isinstance(cfg, RunConfig):
        update = renamed_keys(update)
    return from_dict(type(cfg), merge(to_dict(cfg), update))


def presets() -> list[str]:
    """The preset names ``--config`` takes: the shipped ones and any in ``./configs``."""
    folders = (Path.cwd() / "configs", PACKAGE_CONFIG_DIR)
    return sorted({p.stem for folder in folders if folder.is_dir()
                   for p in folder.glob("*.yaml")})


def find_config(name_or_path: str) -> Path:
    """A preset name (``tiny``) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if path.is_file():
            return path
        raise ConfigError(f"no config file {path}; give a YAML file or a preset: "
                          f"{', '.join(presets())}")
    for folder in (Path.cwd() / "configs", PACKAGE_CONFIG_DIR):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.exists():
            return candidate
    raise ConfigError(f"no preset {name_or_path!r}; presets: {', '.join(presets())} (or give "
                      "a YAML file)" + did_you_mean(name_or_path, presets()))


def load_yaml(name_or_path: str) -> dict[str, Any]:
    """Load a preset, following an optional ``base: other-preset`` key."""
    path = find_config(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from err
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not sections (model:, data:, "
                          "train:, ...)")
    base = data.pop("base", None)
    data = _renamed_preset(data, str(path))
    if base:
        data = merge(load_yaml(base), data)
    return data

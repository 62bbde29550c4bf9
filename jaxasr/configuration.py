"""big_vision-style configs: a Python file with `get_config()` plus `--config.a.b=v` overrides.

    config = load_config("configs/demo.py:tiny", ["optimizer.peak_lr=3e-4", "data.batch_size=64"])

Overrides are parsed by the type of the field they replace, and an unknown key fails at once with
close matches. We do not go through `ml_collections.config_flags`: it is bound to absl's global
`FLAGS`/`sys.argv` (so it cannot serve a pure `load_config(path, overrides)`), it reports unknown
keys without suggestions and without the full dotted path, it defers a failed file load until the
config is first touched, and `ConfigDict`'s own type check loses a field's type once it was None
and silently turns `True` into `1.0`. We keep `ConfigDict` for the tree, its `lock()` and its
reference semantics.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import math
import statistics
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

__all__ = [
    "ConfigError",
    "load_config",
    "apply_overrides",
    "parse_train_args",
    "config_to_json",
    "config_from_json",
]

_TRUE = ("true", "1")
_FALSE = ("false", "0")
_NONE = ("none", "null")


class ConfigError(ValueError):
    """A config file, key or value that cannot be used."""


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Runs `get_config()` of the file at `path` (`file.py:arg` passes `arg`), overrides, locks.

    Each override is `key.sub=value` (a leading `--config.` is also accepted).
    """
    config = _call_get_config(path)
    apply_overrides(config, overrides)
    config.lock()
    return config


def _call_get_config(spec: str) -> ml_collections.ConfigDict:
    file, sep, arg = spec.partition(":")
    file_path = Path(file).expanduser()
    if not file_path.is_file():
        raise ConfigError(f"config file not found: {file!r}")
    # A fresh module name per file so two configs (e.g. train and export) never clash.
    name = "_jaxasr_config_" + "".join(c if c.isalnum() else "_" for c in str(file_path.resolve()))
    module_spec = importlib.util.spec_from_file_location(name, file_path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    module_spec.loader.exec_module(module)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"{file!r} defines no get_config()")
    try:
        config = get_config(arg) if sep else get_config()
    except TypeError as e:
        raise ConfigError(f"calling get_config({arg!r}) of {file!r} failed: {e}") from e
    if isinstance(config, dict):
        config = ml_collections.ConfigDict(config)
    elif isinstance(config, ml_collections.FrozenConfigDict):
        config = ml_collections.ConfigDict(config)
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() of {file!r} returned {type(config).__name__}, not a ConfigDict")
    return config


# ---------------------------------------------------------------------------------------------
# Overrides


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Sets each `key.sub=value` in place, parsing `value` by the type of the field it replaces."""
    for item in overrides:
        item = item.removeprefix("--config.")
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"config override {item!r} is not of the form key.sub=value")
        holder, field = _resolve(config, key)
        value = _parse_for_field(holder, field, key, text)
        try:
            holder[field] = value
        except (TypeError, ValueError, AttributeError) as e:  # e.g. a FieldReference's own check
            raise ConfigError(f"cannot set config key {key!r} to {text!r}: {e}") from e


def _dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    for k in config.keys():
        dotted = prefix + str(k)
        yield dotted
        child = config[k]
        if isinstance(child, ml_collections.ConfigDict):
            yield from _dotted_keys(child, dotted + ".")


def _unknown(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    keys = list(_dotted_keys(config))
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if close:  # keep only the near-best: 'optimizer.betas' is no help for 'optimizer.peak_lrr'
        best = difflib.SequenceMatcher(None, key, close[0]).ratio()
        close = [c for c in close if difflib.SequenceMatcher(None, key, c).ratio() >= best - 0.03]
    if not close:  # a typo in a parent component pulls the whole key far; try the leaf alone
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in keys if k.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [k.rsplit(".", 1)[-1] for k in keys], n=3, cutoff=0.8)][:3]
    hint = "; did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def _resolve(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict that holds `key`'s last component, and that component; fails if absent."""
    *parents, field = key.split(".")
    holder = config
    for part in parents:
        child = holder[part] if part in holder else None
        if not isinstance(child, ml_collections.ConfigDict):
            raise _unknown(config, key)
        holder = child
    if field not in holder:
        raise _unknown(config, key)
    return holder, field


def _parse_for_field(holder: ml_collections.ConfigDict, field: str, key: str, text: str) -> Any:
    current = holder[field]
    field_type = holder.get_type(field)  # a placeholder(int) reports int while its value is None
    # None is only accepted where the config already allows it (value None, e.g. a placeholder):
    # `peak_lr=None` on a float field is far more often a mistake than a wish.
    if current is None and text.strip().lower() in _NONE:
        return None
    try:
        return _parse_typed(field_type, current, text)
    except (ValueError, SyntaxError, TypeError) as e:
        name = getattr(field_type, "__name__", str(field_type))
        if field_type is ml_collections.ConfigDict:
            name = "dict"
        # float()/int() messages repeat the text; keep only those that add something.
        detail = f" ({e})" if str(e) and repr(text.strip()) not in str(e) else ""
        raise ConfigError(
            f"invalid value for config key {key!r}: expected {name}, got {text!r}{detail}") from None


def _parse_typed(field_type: type, current: Any, text: str) -> Any:
    if field_type is bool:
        return _parse_bool(text)
    if field_type is int:
        return _parse_int(text)
    if field_type is float:
        return float(text)
    if field_type is str:
        return text
    if field_type in (tuple, list):
        return field_type(_parse_sequence(current, text))
    if field_type is ml_collections.ConfigDict or field_type is dict:
        value = ast.literal_eval(text)
        if not isinstance(value, dict):
            raise ValueError("not a dict literal")
        return ml_collections.ConfigDict(value)
    if field_type is type(None):
        return _parse_literal(text)
    raise TypeError(f"fields of type {field_type.__name__} cannot be overridden from text")


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError("use true/false/1/0")


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        # `total_steps=1e5` is common shorthand; accept it when it is a whole number.
        value = float(text)
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError("not a whole number") from None
        return int(value)


def _parse_literal(text: str) -> Any:
    """A Python literal, `true`/`false`, or else the text itself as a string."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    try:
        return ast.literal_eval(t)
    except (ValueError, SyntaxError):
        return text


def _parse_sequence(current: Sequence[Any], text: str) -> list[Any]:
    t = text.strip()
    if t[:1] in "([":
        value = ast.literal_eval(t)
        if not isinstance(value, (tuple, list)):
            raise ValueError("not a tuple or list literal")
        return list(value)
    if not t:
        return []
    parts = [p.strip() for p in t.split(",")]
    if parts[-1] == "":  # allow a trailing comma: `a,` is a one-element tuple
        parts = parts[:-1]
    # Elements take the type the existing elements share (so `1,2` stays ints for a tuple of
    # ints and strings stay strings for a tuple of names); otherwise each is read as a literal.
    kinds = {type(x) for x in current}
    if len(kinds) == 1 and (kind := kinds.pop()) in (bool, int, float, str):
        return [_parse_typed(kind, None, p) for p in parts]
    return [_parse_literal(p) for p in parts]


# ---------------------------------------------------------------------------------------------
# Command line


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit 2; callers get a clear error
        raise ConfigError(message)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(`key=value` overrides from `--config.key=value` / `--config.key value` / bare
    `--config.flag` (= true), the other arguments) of a command line."""
    overrides, rest, argv, i = [], [], list(argv), 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--config."):
            if "=" in tok:
                overrides.append(tok)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(f"{tok}={argv[i + 1]}")
                i += 1
            else:
                overrides.append(f"{tok}=true")
        else:
            rest.append(tok)
        i += 1
    return overrides, rest


def parse_train_args(
    argv: Sequence[str], *, prog: str = "python -m jaxasr.train"
) -> tuple[ml_collections.ConfigDict, Path, list[str]]:
    """Parses `--config FILE[:arg] [--config.a.b=v | --config.a.b v ...] --workdir DIR [-- extra]`.

    Returns the loaded, overridden, locked config, the workdir, and the arguments after a bare
    `--` (untouched, for the caller). Unknown or misspelled flags raise ConfigError.
    A `--config.flag` with no value (followed by another flag or the end) means `true`.
    """
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]

    overrides, rest = split_overrides(argv)

    parser = _ArgumentParser(prog=prog, allow_abbrev=False)
    # Not `required=True`: argparse would report a missing flag before a misspelled one, and the
    # misspelling (`--workdri`) is the more useful message.
    parser.add_argument("--config", help="config file, optionally file.py:arg (required)")
    parser.add_argument("--workdir", type=Path, help="checkpoints, metrics, logs (required)")
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        flags = [a.option_strings[-1] for a in parser._actions if a.option_strings]
        bad = unknown[0]
        close = difflib.get_close_matches(bad.split("=", 1)[0], flags + ["--config.<key>"], n=2)
        hint = "; did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""
        raise ConfigError(f"unrecognized argument {bad!r}{hint}")
    for name in ("config", "workdir"):
        if getattr(args, name) is None:
            raise ConfigError(f"missing required flag --{name}")
    config = load_config(args.config, overrides)
    return config, args.workdir.expanduser(), extra


# ---------------------------------------------------------------------------------------------
# JSON


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The config as indented JSON (tuples become arrays; non-finite floats use JSON's NaN/Infinity
    extension, which Python's json reads back). Values JSON cannot hold raise ConfigError."""

    def plain(value: Any, key: str) -> Any:
        if isinstance(value, ml_collections.ConfigDict):
            return {str(k): plain(value[k], f"{key}.{k}" if key else str(k)) for k in value.keys()}
        if isinstance(value, dict):
            return {str(k): plain(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise ConfigError(f"config key {key!r} holds {type(value).__name__}, which JSON cannot store")

    return json.dumps(plain(config, ""), indent=2, sort_keys=False)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `config_to_json`, locked. Arrays come back as tuples (hashable, as configs
    conventionally hold them and as jit's static arguments need)."""

    def tuples(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: tuples(v) for k, v in value.items()}
        if isinstance(value, list):
            return tuple(tuples(v) for v in value)
        return value

    data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError("config JSON must be an object")
    config = ml_collections.ConfigDict(tuples(data))
    config.lock()
    return config


def selection_sets(best_set: str, set_names: Sequence[str], *, key: str = "config.eval.best_set") -> list[str]:
    """The eval sets whose WER picks the best checkpoint (or merge alpha): `best_set` names one set,
    or several joined by '+' for their mean WER (e.g. one dev set per domain); '' = the first set."""
    if not best_set:
        return list(set_names[:1])
    parts = best_set.split("+")
    unknown = [p for p in parts if p not in set_names]
    if unknown:
        raise ConfigError(f"{key}: {unknown[0]!r} is not one of the eval sets {sorted(set_names)}")
    return parts


def selection_wer(wer: Mapping[str, float], sets: Sequence[str]) -> float:
    """Mean WER over the selection sets (`wer`: set name -> WER)."""
    return statistics.fmean(wer[s] for s in sets)

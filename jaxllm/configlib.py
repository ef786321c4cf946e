"""The one config loader: YAML files + `a.b=c` overrides -> frozen, typed dataclasses.

Any frozen dataclass tree can be loaded (the training `Config`, curation configs, ...).
Rules that make configs safe to edit by hand:
  * an unknown or misspelt key is an error naming the file, line and the closest valid key;
  * a value of the wrong type is an error naming the key and the expected type;
  * a string where a dataclass section is expected names a preset file
    (`model: tiny` -> configs/model/tiny.yaml), so recipes state only what differs.
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from typing import Any

import yaml

from jaxllm.errors import UserError

REPO_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError):
    """A config file or override is invalid; the message says where and what would be valid."""


def _where(source: str, lines: dict[str, int], path: str) -> str:
    line = lines.get(path)
    return f"{source}, line {line}" if line else source


def _key_lines(text: str) -> dict[str, int]:
    """Map dotted key paths to 1-based line numbers, so errors can point into the file."""
    out: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}{k.value}"
                out[path] = k.start_mark.line + 1
                walk(v, path + ".")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return out


def _read_yaml(path: pathlib.Path) -> tuple[dict, dict[str, int]]:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(data).__name__}")
    return data, _key_lines(text)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str, where: str) -> Any:
    """Check `value` against annotation `tp`, with the few lossless coercions YAML needs."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: key '{key}' must be one of {list(choices)}, got {value!r}{hint}")
        return value
    if dataclasses.is_dataclass(tp):  # e.g. the items of tuple[SourceConfig, ...]
        if isinstance(value, tp):
            return value
        if isinstance(value, str):  # shorthand: a bare value sets the first field (a path)
            value = {dataclasses.fields(tp)[0].name: value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' expects a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, _merge(tp, {}, value, where, {}, f"{key}.", None), f"{key}.")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            if origin is tuple and len(typing.get_args(tp)) == 2 and typing.get_args(tp)[1] is Ellipsis:
                value = [value]   # `languages=en` means a one-element list
            else:
                raise ConfigError(f"{where}: key '{key}' expects a list ({_type_name(tp)}), got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: key '{key}' expects {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]", where) for i, (v, a) in enumerate(zip(args, value)))
        return tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}' expects a mapping, got {value!r}")
        _, vt = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, vt, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: key '{key}' expects bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: key '{key}' expects int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: key '{key}' expects float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: key '{key}' expects str, got {value!r}")
    return value


def _preset_path(cls, name: str, base_dir: pathlib.Path | None, section: str) -> pathlib.Path:
    """`model: tiny` -> the first of base_dir/../model/tiny.yaml, configs/model/tiny.yaml, or a path."""
    cand = []
    p = pathlib.Path(name)
    if p.suffix in (".yaml", ".yml"):
        cand += [p] + ([base_dir / p] if base_dir else []) + [REPO_CONFIGS / p]
    else:
        if base_dir:
            cand.append(base_dir.parent / section / f"{name}.yaml")
        cand.append(REPO_CONFIGS / section / f"{name}.yaml")
    for c in cand:
        if c.exists():
            return c
    avail = sorted(x.stem for x in (REPO_CONFIGS / section).glob("*.yaml"))
    close = difflib.get_close_matches(name, avail, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"no {section} preset '{name}' (looked in {[str(c) for c in cand]}); "
                      f"available: {avail}{hint}")


def _merge(cls, base: dict, data: dict, source: str, lines: dict, prefix: str,
           base_dir: pathlib.Path | None) -> dict:
    """Merge raw YAML `data` into the raw dict `base` for dataclass `cls`, validating keys."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    out = dict(base)
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"{_where(source, lines, path)}: unknown key '{path}'{hint} "
                              f"(valid keys here: {sorted(fields)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            sub = out.get(key, {})
            if isinstance(value, str):  # a preset name or file
                ppath = _preset_path(tp, value, base_dir, key)
                pdata, plines = _read_yaml(ppath)
                sub = _merge(tp, {}, pdata, str(ppath), plines, f"{path}.", ppath.parent)
            elif isinstance(value, dict):
                sub = _merge(tp, sub, value, source, lines, f"{path}.", base_dir)
            else:
                raise ConfigError(f"{_where(source, lines, path)}: key '{path}' expects a mapping "
                                  f"or a preset name, got {value!r}")
            out[key] = sub
        else:
            value = _coerce(value, tp, path, _where(source, lines, path))
            prev = out.get(key)
            if typing.get_origin(tp) is dict and prev is not None:
                value = {**prev[0], **value}   # dict fields merge key by key across layers
            out[key] = (value, source, lines.get(path))
    return out


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, raw[f.name], f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = raw[f.name][0]
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"invalid config section '{prefix.rstrip('.') or cls.__name__}': {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, val = text.split("=", 1)
    try:
        value = yaml.safe_load(val) if val != "" else ""
    except yaml.YAMLError as e:
        if val.lstrip().startswith(("[", "{")):   # meant as a list / mapping: not a plain string
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"override '{text}': the value is not valid YAML ({problem}); quote items "
                              f"that hold ':', '?', ',' or '#', e.g. {key}=['What is 2 + 3?']") from None
        value = val   # a plain string that YAML cannot read, e.g. a path with ': '
    return key.strip().split("."), value


def load(cls, path: str | pathlib.Path | None = None, overrides: typing.Sequence[str] = ()):
    """Load dataclass `cls` from a YAML file (optional) plus `a.b=c` overrides."""
    raw: dict = {}
    if path is not None:
        path = pathlib.Path(path)
        data, lines = _read_yaml(path)
        raw = _merge(cls, raw, data, str(path), lines, "", path.parent)
    for ov in overrides:
        keys, value = parse_override(ov)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        raw = _merge(cls, raw, nested, f"override '{ov}'", {}, "", None)
    return _build(cls, raw)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg, path: str | pathlib.Path) -> None:
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    pathlib.Path(path).write_text(yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False))

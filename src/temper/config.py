"""Typed configs: a tree of dataclasses <-> YAML files <-> `--section.key=value` flags.

Every recipe declares its config as dataclasses with a one-line docstring under each field; this
module derives the YAML keys, the command-line flags and `--help` from them. Unknown keys fail
with a "did you mean", wrong types fail naming the key, and a dataclass's `__post_init__` may
reject impossible combinations (its ValueError is re-raised naming the section).

It does not know any recipe: it only walks dataclasses.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import keyword
import sys
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from temper.errors import InputError

T = TypeVar("T")


# The characters str.splitlines() breaks at, written as escapes in a message: a key or value typed
# with one of them must not turn a one-line error into several.
_BREAKS = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in map(ord, "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")}


class ConfigError(InputError):
    """A config file or flag that cannot become the typed config; the message names the key, on one line."""

    def __init__(self, message: str) -> None:
        super().__init__(str(message).translate(_BREAKS))


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal right under each field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def key_of(field_name: str) -> str:
    """The config key of a dataclass field: its name, but `from_` (a Python keyword with the
    underscore Python needs) is the key `from`, so that `--init.from=...` reads as it should."""
    bare = field_name.rstrip("_")
    return bare if bare != field_name and keyword.iskeyword(bare) else field_name


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        keys.append(prefix + key_of(f.name))
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, prefix + key_of(f.name) + ".")
    return keys


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple) or tp in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if (origin or tp) is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: unsupported value {value!r} for type {tp}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build `cls` from a nested mapping, strictly: every key must be a field of the dataclass."""
    names = {key_of(f.name): f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            suggestion = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean '{prefix}{suggestion[0]}'?)" if suggestion else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        kwargs[names[key]] = _coerce(value, hints[names[key]], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        where = f"section '{prefix[:-1]}'" if prefix else "config"
        raise ConfigError(f"{where}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML/JSON-able data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    def keys(v: Any) -> Any:  # dataclasses.asdict keeps field names; the config's keys drop a keyword's "_"
        return {key_of(k): keys(x) for k, x in v.items()} if isinstance(v, dict) else v

    return keys(plain(dataclasses.asdict(cfg)))


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def _set_dotted(tree: dict, dotted: str, value: Any, cls: type) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: '{p}' is not a section")
    node[parts[-1]] = value


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of a dotted key, or None when it is not a field (or inside a dict field)."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = _hints(tp).get({key_of(f.name): f.name for f in dataclasses.fields(tp)}.get(part, part))
    return tp


def _members(tp: Any) -> tuple:
    """The alternatives of a Union (or the type itself), None excluded."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        return tuple(a for a in typing.get_args(tp) if a is not type(None))
    return (tp,)


def _is_list(tp: Any) -> bool:
    return any(typing.get_origin(a) in (list, tuple) or a in (list, tuple) for a in _members(tp))


def _list_above(cls: type, dotted: str) -> str | None:
    """The list field a dotted key reaches into, if any: a list (of sections too) is given whole, as
    one YAML value, never key by key (`--rewards.weight=2` would silently replace the whole list)."""
    parts = dotted.split(".")
    heads = (".".join(parts[:i]) for i in range(1, len(parts)))
    return next((head for head in heads if _is_list(_field_type(cls, head))), None)


def _is_text(tp: Any) -> bool:
    """str or list[str]: a flag's value is taken verbatim (`--prompt yes` is the word, not True)."""
    return any(a is str or typing.get_args(a) == (str,) or typing.get_args(a)[:1] == (str,) for a in _members(tp))


def yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error as one line, what is wrong and where: its own message spans several lines
    (it quotes the text, with a caret under the spot)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return " ".join(x for x in (e.context, e.problem) if x) + where
    return " ".join(str(e).split())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file; a clear error for a missing file or a document that is not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {yaml_problem(e)}") from e
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{path}: invalid YAML: collections nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return data


def overrides_from_argv(cls: type, argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split argv into config files (`--config F`, repeatable) and a nested dict of `--a.b=v` flags.

    Values are read as YAML scalars (`--lr=3e-4` is a float, `--x=null` is None); a list field
    given several times collects the values (`--input a --input b`).
    """
    files: list[str] = []
    flags: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw, i = argv[i + 1], i + 1
            else:
                raw = "true"  # a bare flag switches a boolean on
        i += 1
        key = key.replace("-", "_")
        if key == "config":
            files.append(raw)
            continue
        head = _list_above(cls, key)
        if head is not None:
            raise ConfigError(f"--{key}: {head} is a list, given whole: --{head}='[...]' (a YAML list)")
        tp = _field_type(cls, key)
        yaml_list = _is_list(tp) and raw.strip().startswith("[") and raw.strip().endswith("]")
        if (_is_text(tp) and not yaml_list) or not raw.strip():
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ConfigError(f"--{key}: cannot read value {raw!r}: {yaml_problem(e)}") from None
            except RecursionError:
                raise ConfigError(f"--{key}: cannot read value {raw[:40]!r}...: nested too deeply") from None
            if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("[", "{")):
                value = raw  # a string that merely looks like YAML structure (e.g. "a: b")
        if _is_list(tp) and key in flags:
            prev = flags[key]
            flags[key] = (prev if isinstance(prev, list) else [prev]) + (value if isinstance(value, list) else [value])
        else:
            flags[key] = value
    tree: dict[str, Any] = {}
    for key, value in flags.items():
        _set_dotted(tree, key, value, cls)
    return files, tree


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "") if typing.get_args(tp) else tp.__name__


def _section_item(tp: Any) -> type | None:
    """The item dataclass of a list-of-sections field (list[RewardConfig]), else None."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (list, tuple) else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def help_text(cls: type, prog: str = "") -> str:
    """`--help`: every key with its type, default and docstring, derived from the dataclasses."""
    lines = [f"usage: temper {prog} [--config FILE.yaml] [--section.key=value ...]", ""]

    def walk(klass: type, prefix: str, instance: Any) -> None:
        docs = field_docs(klass)
        hints = _hints(klass)
        fields = dataclasses.fields(klass)
        for f in sorted(fields, key=lambda f: dataclasses.is_dataclass(hints[f.name])):  # sections last
            tp = hints[f.name]
            value = getattr(instance, f.name)
            if dataclasses.is_dataclass(tp):
                lines.append(f"\n[{prefix}{key_of(f.name)}] {docs.get(f.name, '')}")
                walk(tp, prefix + key_of(f.name) + ".", value)
            elif (item := _section_item(tp)) is not None:  # a list of sections: one YAML value, its item keys below
                flow = yaml.safe_dump([to_dict(v) for v in value], default_flow_style=True, width=1 << 30).strip()
                lines.append(f"  --{prefix}{key_of(f.name)}='{flow}'  (list of sections)  {docs.get(f.name, '')}")
                item_docs, item_hints = field_docs(item), _hints(item)
                lines.extend(f"      {key_of(g.name)}: ({_type_name(item_hints[g.name])})  {item_docs.get(g.name, '')}"
                             for g in dataclasses.fields(item))
            else:
                lines.append(f"  --{prefix}{key_of(f.name)}={value!r}  ({_type_name(tp)})  {docs.get(f.name, '')}")

    walk(cls, "", cls())
    return "\n".join(lines)


def parse(cls: type[T], argv: list[str] | None = None, prog: str = "") -> T:
    """Build the recipe's config from YAML files and flags; `--help` prints the keys and exits."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, prog))
        raise SystemExit(0)
    files, flags = overrides_from_argv(cls, argv)
    # Start from the defaults of the whole tree, so that a section's own defaults (a recipe's
    # `field(default_factory=lambda: OptimConfig(lr=2e-4))`) survive an override of one of its keys.
    tree: dict[str, Any] = to_dict(cls())
    for f in files:
        tree = _merge(tree, load_yaml(f))
    tree = _merge(tree, flags)
    return from_dict(cls, tree)

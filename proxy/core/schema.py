"""Build frozen dataclasses from untrusted mappings (YAML, JSON), reporting every problem by path.

Rules (DESIGN rule 5):
- Unknown keys are errors. A field without a default is required.
- Every problem is collected with its key path (`listener.port`, `rules[2].to[0].methods`);
  `build()` raises one `ConfigError` listing all of them, never just the first.
- Supported field types: str, int, float, bool, Literal[...], X | None, tuple[X, ...], nested
  dataclasses, and dict[str, X]. Constraints come from `field(metadata=meta(...))`.
- bool is never accepted where a number is expected (YAML `yes` is not 1), and an int is accepted
  where a float is expected.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from proxy.errors import ConfigError, Problem

T = TypeVar("T")

_HINT_CACHE: dict[type, dict[str, Any]] = {}


def meta(
    *,
    min: float | None = None,
    max: float | None = None,
    nonempty: bool = False,
    pattern: str | None = None,
    check: Callable[[Any], str | None] | None = None,
    doc: str = "",
) -> dict[str, Any]:
    """Field metadata: numeric bounds, non-empty collections/strings, a regex for strings, and a
    custom `check(value) -> error message or None`."""
    return {"min": min, "max": max, "nonempty": nonempty, "pattern": pattern, "check": check,
            "doc": doc}


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if tp is str:
        return "a string"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    h = _HINT_CACHE.get(cls)
    if h is None:
        h = typing.get_type_hints(cls)
        _HINT_CACHE[cls] = h
    return h


class _Missing:
    pass


MISSING = _Missing()


Converter = Callable[[Any, str, list[Problem], Mapping[str, Any]], Any]
_CONVERTERS: dict[Any, Converter] = {}


def _convert(tp: Any, value: Any, path: str, problems: list[Problem], md: Mapping[str, Any]) -> Any:
    conv = _CONVERTERS.get(tp)
    if conv is None:
        conv = _CONVERTERS[tp] = _converter(tp)
    return conv(value, path, problems, md)


def _converter(tp: Any) -> Converter:
    """The conversion of values of one field type, with the type inspected once (here), not per
    value: a 10,000-rule policy converts ~200,000 values. Element types are looked up through
    `_convert` at conversion time, so recursive dataclasses work."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        only = args[0] if len(args) == 1 else None

        def optional(value: Any, path: str, problems: list[Problem], md: Mapping[str, Any]) -> Any:
            if value is None:
                return None
            if only is None:
                raise TypeError(f"unsupported union {tp}")
            return _convert(only, value, path, problems, md)
        return optional
    if origin is Literal:
        choices = get_args(tp)
        shown = ", ".join(map(str, choices))

        def literal(value: Any, path: str, problems: list[Problem], md: Mapping[str, Any]) -> Any:
            if value not in choices:
                problems.append(Problem(path, f"must be one of {shown}; got {value!r}"))
                return MISSING
            return value
        return literal
    if dataclasses.is_dataclass(tp):
        def nested(value: Any, path: str, problems: list[Problem], md: Mapping[str, Any]) -> Any:
            return _build(tp, value, path, problems)
        return nested
    if origin is tuple:
        (item_tp, _ellipsis) = get_args(tp)

        def tuple_of(value: Any, path: str, problems: list[Problem], md: Mapping[str, Any]) -> Any:
            if not _container(value, list, "a list", path, problems, md):
                return MISSING
            out = []
            for i, item in enumerate(value):
                v = _convert(item_tp, item, join(path, i), problems, _NO_META)
                if v is not MISSING:
                    out.append(v)
            return tuple(out)
        return tuple_of
    if origin is dict:
        _k, item_tp = get_args(tp)

        def dict_of(value: Any, path: str, problems: list[Problem], md: Mapping[str, Any]) -> Any:
            if not _container(value, dict, "a mapping", path, problems, md):
                return MISSING
            out_d = {}
            for k, item in value.items():
                if not isinstance(k, str):
                    problems.append(Problem(path, f"keys must be strings; got {k!r}"))
                    continue
                v = _convert(item_tp, item, join(path, k), problems, _NO_META)
                if v is not MISSING:
                    out_d[k] = v
            return types.MappingProxyType(out_d)
        return dict_of
    if tp is bool:
        def boolean(value: Any, path: str, problems: list[Problem], md: Mapping[str, Any]) -> Any:
            if not isinstance(value, bool):
                problems.append(Problem(path, f"must be true or false; got {value!r}"))
                return MISSING
            return value
        return boolean
    if tp in (int, float):
        def number(value: Any, path: str, problems: list[Problem], md: Mapping[str, Any]) -> Any:
            ok = isinstance(value, int) or (tp is float and isinstance(value, float))
            if isinstance(value, bool) or not ok:
                problems.append(Problem(path, f"must be {_type_name(tp)}; got {value!r}"))
                return MISSING
            value = tp(value)
            lo, hi = md.get("min"), md.get("max")
            if lo is not None and value < lo:
                problems.append(Problem(path, f"must be >= {lo}; got {value}"))
                return MISSING
            if hi is not None and value > hi:
                problems.append(Problem(path, f"must be <= {hi}; got {value}"))
                return MISSING
            return value
        return number
    if tp is str:
        def string(value: Any, path: str, problems: list[Problem], md: Mapping[str, Any]) -> Any:
            if not _container(value, str, "a string", path, problems, md, show_value=True):
                return MISSING
            pat = md.get("pattern")
            if pat is not None and not re.fullmatch(pat, value):
                problems.append(Problem(path, f"must match {pat}; got {value!r}"))
                return MISSING
            return value
        return string
    if tp is Any:
        return lambda value, path, problems, md: value

    def unsupported(value: Any, path: str, problems: list[Problem], md: Mapping[str, Any]) -> Any:
        raise TypeError(f"unsupported field type {tp!r} at {path}")
    return unsupported


def _container(value: Any, kind: type, noun: str, path: str, problems: list[Problem],
               md: Mapping[str, Any], *, show_value: bool = False) -> bool:
    """The first checks of a list, mapping or string value: its type (the problem names the type
    it got, or for a string the value itself), then `nonempty`."""
    if not isinstance(value, kind):
        got = repr(value) if show_value else type(value).__name__
        problems.append(Problem(path, f"must be {noun}; got {got}"))
        return False
    if md.get("nonempty") and not value:
        problems.append(Problem(path, "must not be empty"))
        return False
    return True


_NO_META: Mapping[str, Any] = types.MappingProxyType({})
_FIELDS: dict[type, dict[str, dataclasses.Field]] = {}


def _build(cls: type[T], data: Any, path: str, problems: list[Problem]) -> T | _Missing:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        problems.append(Problem(path, f"must be a mapping; got {type(data).__name__}"))
        return MISSING
    hints = _hints(cls)
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append(Problem(join(path, str(key)), f"unknown key (known keys: {known})"))
    kwargs: dict[str, Any] = {}
    failed = False
    for name, f in fields.items():
        fpath = join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(Problem(fpath, "is required"))
                failed = True
            continue
        before = len(problems)
        v = _convert(hints[name], data[name], fpath, problems, f.metadata)
        if v is MISSING or len(problems) > before:
            failed = True
            continue
        check = f.metadata.get("check")
        if check is not None and v is not None:
            msg = check(v)
            if msg:
                problems.append(Problem(fpath, msg))
                failed = True
                continue
        kwargs[name] = v
    if failed:
        return MISSING
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ cross-field checks
        problems.append(Problem(path, str(exc)))
        return MISSING
    return obj


def build(cls: type[T], data: Any, *, source: str = "", path: str = "") -> T:
    """Build `cls` from `data` or raise ConfigError listing every problem with its path."""
    problems: list[Problem] = []
    obj = _build(cls, data, path, problems)
    if problems or obj is MISSING:
        raise ConfigError(problems or [Problem(path, "invalid")], source=source)
    return obj  # type: ignore[return-value]


def collect(cls: type[T], data: Any, path: str, problems: list[Problem]) -> T | None:
    """Like `build` but appends to `problems` (for callers that validate several parts at once)."""
    obj = _build(cls, data, path, problems)
    return None if obj is MISSING else obj  # type: ignore[return-value]


def field_docs(cls: type) -> Iterable[tuple[str, str]]:
    """(key path, doc) for every documented field, recursively: used to check the example config
    documents every key."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        yield f.name, f.metadata.get("doc", "")
        tp = hints[f.name]
        if get_origin(tp) in (typing.Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else tp
        if get_origin(tp) is tuple:
            tp = get_args(tp)[0]
        if dataclasses.is_dataclass(tp):
            for sub, doc in field_docs(tp):
                yield f"{f.name}.{sub}", doc

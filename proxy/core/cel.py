"""CEL conditions (Common Expression Language, cel-spec `langdef.md`): parsed, type-checked against
declared variables and compiled ONCE at load; evaluated per request with a minimal activation.

The runtime is the PyPI package `common-expression-language` (import name `cel`, a Rust
interpreter). It has no type checker, so this module adds one. At load, `compile_condition`:

1. compiles the source with `cel.compile`: the runtime's parser is the authority on syntax, and its
   message (line:column) is the one reported for a syntax error;
2. parses the same source with the small recursive-descent parser below (the cel-spec grammar,
   without message construction `T{...}`, leading-dot names and optional syntax, which the
   runtime does not support either);
3. type-checks the tree against `Env` (gradual typing, cel-spec "Gradual Type Checking"): an
   unknown variable, an unknown field of a declared object, a key that a declared-keys map can
   never have, an unknown function or method, an operator on types it has no overload for
   (`'a' + 1`, `1 + 2.0`, `x < 'b'` for a number x, `'a' == 1`), a comprehension over a
   non-collection, a malformed macro, a duplicate literal map key, an invalid literal regular
   expression for `matches`, and a result whose type is not `bool` (nor `dyn`) are each a
   `CelCompileError` naming the column;
4. rewrites every *static reference* — a declared variable followed by field selections and
   literal indexes (`token.claims.department`, `action.params['amount']`, `token.actors[0]`) —
   into ONE flat variable, and `has(<static reference>.f)` into one flat bool variable, and
   compiles the rewritten source. Why: the runtime converts every Python value of the activation
   to a CEL value on every call (measured ~2 us per string or map entry, ~70 us for a whole
   token), so an activation of the few leaf values a condition reads is several times cheaper
   than nested maps. The rewrite preserves semantics: a reference whose value does not exist
   (a missing map key, an index out of range) is left out of the activation, and the runtime
   treats the undefined variable exactly like the missing key: an error, which `&&` / `||`
   absorb as CEL's commutative error rules say (`false && err` is false).

At request time `Condition.run(resolve)` asks `resolve(ref)` for each flat variable (`Ref`:
root variable, steps, `has` flag; the caller memoises) and returns True, False or an error string
(an evaluation error, or a non-bool result). It never raises.

Types (`CelType`): the cel-spec primitives, `list(T)`, `map(K, V)`, `dyn`, declared objects
(`object(name, fields)`: every field always present), and maps with declared keys
(`map(string, V)` plus `fields`: a static key must be one of them, with its own type). Values:
`to_cel` converts Python values for the runtime (Decimal -> double, int outside int64 -> double,
tuple / frozenset -> list, any Mapping -> map).

Functions the runtime has and the checker knows: size (global and method), int, uint, double,
string (not of bool), bytes, timestamp(string), duration(string), dyn; string methods contains,
startsWith, endsWith, matches; timestamp methods getFullYear, getMonth, getDate, getDayOfMonth,
getDayOfYear, getDayOfWeek, getHours, getMinutes, getSeconds, getMilliseconds (UTC, no time zone
argument); duration methods getHours, getMinutes, getSeconds, getMilliseconds; the macros has,
all, exists, exists_one, map (2 and 3 arguments) and filter.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Callable, Mapping

__all__ = [
    "BOOL", "BYTES", "DOUBLE", "DURATION", "DYN", "INT", "MISSING", "NULL", "STRING",
    "TIMESTAMP", "UINT", "CelCompileError", "CelType", "Condition", "Env", "Ref",
    "compile_condition", "list_of", "map_of", "object_of", "to_cel",
]


_cel: Any = None


def _compile(text: str) -> Any:
    """`cel.compile` of the runtime (common-expression-language), imported on first use: the
    runtime costs ~14 MiB of RSS per process, which a policy without conditions never pays."""
    global _cel
    if _cel is None:
        import cel

        _cel = cel
    return _cel.compile(text)


class CelCompileError(Exception):
    """A condition that cannot be loaded; `message` is ready for a `Problem`."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


#: a reference whose value does not exist (left out of the activation)
MISSING: Any = type("Missing", (), {"__repr__": lambda self: "MISSING"})()


# ------------------------------------------------------------------------------------------------
# Types
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CelType:
    """`kind`: bool int uint double string bytes null timestamp duration dyn list map object.
    `elem`: list element / map value type; `key`: map key type; `fields`: object fields, or the
    declared keys of a map (None: any key); `name`: shown in messages."""

    kind: str
    elem: CelType | None = None
    key: CelType | None = None
    fields: Mapping[str, CelType] | None = None
    name: str = ""

    def __str__(self) -> str:
        if self.name:
            return self.name
        if self.kind == "list":
            return f"list({self.elem})"
        if self.kind == "map":
            return f"map({self.key}, {self.elem})"
        return self.kind


BOOL = CelType("bool")
INT = CelType("int")
UINT = CelType("uint")
DOUBLE = CelType("double")
STRING = CelType("string")
BYTES = CelType("bytes")
NULL = CelType("null")
TIMESTAMP = CelType("timestamp")
DURATION = CelType("duration")
DYN = CelType("dyn")
_NUMERIC = frozenset({"int", "uint", "double"})


def list_of(elem: CelType) -> CelType:
    return CelType("list", elem=elem)


def map_of(key: CelType, value: CelType, *, keys: Mapping[str, CelType] | None = None,
           name: str = "") -> CelType:
    """A map; with `keys`, a map whose static keys must be among them (each with its type)."""
    return CelType("map", elem=value, key=key,
                   fields=None if keys is None else MappingProxyType(dict(keys)), name=name)


def object_of(name: str, fields: Mapping[str, CelType]) -> CelType:
    """A declared object (a map at run time whose fields are always present)."""
    return CelType("object", fields=MappingProxyType(dict(fields)), name=name)


#: declared variables: name -> type
Env = Mapping[str, CelType]


# ------------------------------------------------------------------------------------------------
# Lexer
# ------------------------------------------------------------------------------------------------

_STRING_BODY = (r"(?:'''(?:[^\\]|\\.)*?'''|\"\"\"(?:[^\\]|\\.)*?\"\"\"|'(?:[^'\\\n\r]|\\.)*'"
                r"|\"(?:[^\"\\\n\r]|\\.)*\")")
_RAW_BODY = r"(?:'''.*?'''|\"\"\".*?\"\"\"|'[^'\n\r]*'|\"[^\"\n\r]*\")"
_TOKEN = re.compile(
    r"(?P<ws>\s+|//[^\n]*)"
    r"|(?P<str>(?:[bB]?[rR]|[rR][bB])" + _RAW_BODY + r"|[bB]?" + _STRING_BODY + r")"
    r"|(?P<float>[0-9]*\.[0-9]+(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+)"
    r"|(?P<uint>(?:0[xX][0-9a-fA-F]+|[0-9]+)[uU])"
    r"|(?P<int>0[xX][0-9a-fA-F]+|[0-9]+)"
    r"|(?P<ident>[_a-zA-Z][_a-zA-Z0-9]*)"
    r"|(?P<op>&&|\|\||==|!=|<=|>=|[-+*/%<>!?:.,()\[\]{}])",
    re.S)
_RESERVED = frozenset({"as", "break", "const", "continue", "else", "for", "function", "if",
                       "import", "let", "loop", "package", "namespace", "return", "var", "void",
                       "while"})


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # str float uint int ident op eof
    text: str
    pos: int


def _lex(src: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    n = len(src)
    while pos < n:
        m = _TOKEN.match(src, pos)
        if m is None:
            raise CelCompileError(f"unexpected character {src[pos]!r} (column {pos + 1})")
        kind = m.lastgroup or ""
        if kind != "ws":
            text = m.group()
            if kind == "ident" and text == "in":
                kind = "op"
            out.append(_Tok(kind, text, pos))
        pos = m.end()
    out.append(_Tok("eof", "", n))
    return out


# ------------------------------------------------------------------------------------------------
# Syntax tree
# ------------------------------------------------------------------------------------------------


class _Node:
    __slots__ = ("pos", "type")

    def __init__(self, pos: int) -> None:
        self.pos = pos
        self.type: CelType = DYN


class _Lit(_Node):
    __slots__ = ("kind", "text", "value")

    def __init__(self, pos: int, kind: str, text: str, value: Any) -> None:
        super().__init__(pos)
        self.kind, self.text, self.value = kind, text, value


class _Ident(_Node):
    __slots__ = ("name",)

    def __init__(self, pos: int, name: str) -> None:
        super().__init__(pos)
        self.name = name


class _Select(_Node):
    __slots__ = ("operand", "field")

    def __init__(self, pos: int, operand: _Node, fld: str) -> None:
        super().__init__(pos)
        self.operand, self.field = operand, fld


class _Index(_Node):
    __slots__ = ("operand", "index")

    def __init__(self, pos: int, operand: _Node, index: _Node) -> None:
        super().__init__(pos)
        self.operand, self.index = operand, index


class _Call(_Node):
    __slots__ = ("fn", "target", "args")

    def __init__(self, pos: int, fn: str, target: _Node | None, args: list[_Node]) -> None:
        super().__init__(pos)
        self.fn, self.target, self.args = fn, target, args


class _Op(_Node):
    """Operators: unary `!` `-`, binary, and the conditional `?:` (3 args)."""

    __slots__ = ("op", "args")

    def __init__(self, pos: int, op: str, args: list[_Node]) -> None:
        super().__init__(pos)
        self.op, self.args = op, args


class _List(_Node):
    __slots__ = ("items",)

    def __init__(self, pos: int, items: list[_Node]) -> None:
        super().__init__(pos)
        self.items = items


class _Map(_Node):
    __slots__ = ("entries",)

    def __init__(self, pos: int, entries: list[tuple[_Node, _Node]]) -> None:
        super().__init__(pos)
        self.entries = entries


class _Has(_Node):
    __slots__ = ("select",)

    def __init__(self, pos: int, select: _Select) -> None:
        super().__init__(pos)
        self.select = select


class _Comp(_Node):
    """A comprehension macro: target.all|exists|exists_one|filter(var, pred) or
    target.map(var, [pred,] transform)."""

    __slots__ = ("macro", "target", "var", "args")

    def __init__(self, pos: int, macro: str, target: _Node, var: str, args: list[_Node]) -> None:
        super().__init__(pos)
        self.macro, self.target, self.var, self.args = macro, target, var, args


_MACROS = {"all": (2,), "exists": (2,), "exists_one": (2,), "filter": (2,), "map": (2, 3)}
_RELOPS = ("<", "<=", ">=", ">", "==", "!=", "in")


class _Parser:
    def __init__(self, src: str) -> None:
        self.src = src
        self.toks = _lex(src)
        self.i = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def next(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def accept(self, text: str) -> bool:
        t = self.toks[self.i]
        if t.kind == "op" and t.text == text:
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> _Tok:
        t = self.next()
        if t.kind != "op" or t.text != text:
            raise self.error(t, f"expected {text!r}")
        return t

    def error(self, t: _Tok, msg: str) -> CelCompileError:
        got = "end of input" if t.kind == "eof" else repr(t.text)
        return CelCompileError(f"{msg}, found {got} (column {t.pos + 1})")

    def parse(self) -> _Node:
        e = self.expr()
        t = self.peek()
        if t.kind != "eof":
            raise self.error(t, "expected end of expression")
        return e

    def expr(self) -> _Node:
        c = self.or_()
        t = self.peek()
        if self.accept("?"):
            a = self.or_()
            self.expect(":")
            b = self.expr()
            return _Op(t.pos, "?:", [c, a, b])
        return c

    def or_(self) -> _Node:
        e = self.and_()
        while True:
            t = self.peek()
            if not self.accept("||"):
                return e
            e = _Op(t.pos, "||", [e, self.and_()])

    def and_(self) -> _Node:
        e = self.rel()
        while True:
            t = self.peek()
            if not self.accept("&&"):
                return e
            e = _Op(t.pos, "&&", [e, self.rel()])

    def rel(self) -> _Node:
        e = self.add()
        while True:
            t = self.peek()
            if t.kind == "op" and t.text in _RELOPS:
                self.i += 1
                e = _Op(t.pos, t.text, [e, self.add()])
            else:
                return e

    def add(self) -> _Node:
        e = self.mul()
        while True:
            t = self.peek()
            if t.kind == "op" and t.text in ("+", "-"):
                self.i += 1
                e = _Op(t.pos, t.text, [e, self.mul()])
            else:
                return e

    def mul(self) -> _Node:
        e = self.unary()
        while True:
            t = self.peek()
            if t.kind == "op" and t.text in ("*", "/", "%"):
                self.i += 1
                e = _Op(t.pos, t.text, [e, self.unary()])
            else:
                return e

    def unary(self) -> _Node:
        t = self.peek()
        if t.kind == "op" and t.text in ("!", "-"):
            ops = []
            while self.peek().kind == "op" and self.peek().text == t.text:
                ops.append(self.next())
            e = self.member()
            if t.text == "-" and len(ops) % 2 == 1 and isinstance(e, _Lit) \
                    and e.kind in ("int", "float") and e.pos == ops[-1].pos + 1:
                # a negative number literal (so -9223372036854775808 stays one literal)
                e = _Lit(ops[-1].pos, e.kind, "-" + e.text, -e.value)
                ops = ops[:-1]
            for op in reversed(ops):
                e = _Op(op.pos, "!_" if op.text == "!" else "-_", [e])
            return e
        return self.member()

    def member(self) -> _Node:
        e = self.primary()
        while True:
            t = self.peek()
            if self.accept("."):
                name = self.next()
                if name.kind != "ident":
                    raise self.error(name, "expected a field or method name after '.'")
                if self.accept("("):
                    args = self.args(")")
                    e = self.call(name, e, args)
                else:
                    e = _Select(name.pos, e, name.text)
            elif self.accept("["):
                idx = self.expr()
                self.expect("]")
                e = _Index(t.pos, e, idx)
            elif t.kind == "op" and t.text == "{" and isinstance(e, (_Ident, _Select)):
                raise self.error(t, "message construction is not supported")
            else:
                return e

    def args(self, close: str) -> list[_Node]:
        out: list[_Node] = []
        if self.accept(close):
            return out
        while True:
            out.append(self.expr())
            if self.accept(close):
                return out
            self.expect(",")
            if self.accept(close):  # trailing comma
                return out

    def call(self, name: _Tok, target: _Node | None, args: list[_Node]) -> _Node:
        fn = name.text
        if target is None and fn == "has":
            if len(args) != 1 or not isinstance(args[0], _Select):
                raise CelCompileError(f"invalid argument to has(): it takes one field selection "
                                      f"like has(token.claims.x) (column {name.pos + 1})")
            return _Has(name.pos, args[0])
        if target is not None and fn in _MACROS:
            if len(args) not in _MACROS[fn]:
                want = " or ".join(str(n) for n in _MACROS[fn])
                raise CelCompileError(f"{fn}() takes {want} arguments (column {name.pos + 1})")
            if not isinstance(args[0], _Ident):
                raise CelCompileError(f"the first argument of {fn}() must be a simple name "
                                      f"(column {args[0].pos + 1})")
            return _Comp(name.pos, fn, target, args[0].name, args[1:])
        return _Call(name.pos, fn, target, args)

    def primary(self) -> _Node:
        t = self.next()
        k = t.kind
        if k == "ident":
            if t.text in _RESERVED:
                raise CelCompileError(f"reserved identifier {t.text!r} (column {t.pos + 1})")
            if t.text in ("true", "false"):
                return _Lit(t.pos, "bool", t.text, t.text == "true")
            if t.text == "null":
                return _Lit(t.pos, "null", t.text, None)
            if self.accept("("):
                return self.call(t, None, self.args(")"))
            return _Ident(t.pos, t.text)
        if k == "int":
            return _Lit(t.pos, k, t.text, int(t.text, 0))
        if k == "uint":
            return _Lit(t.pos, k, t.text, int(t.text[:-1], 0))
        if k == "float":
            return _Lit(t.pos, k, t.text, float(t.text))
        if k == "str":
            kind = "bytes" if t.text[:2].lower() in ("b'", 'b"', "br", "rb") else "string"
            return _Lit(t.pos, kind, t.text, _literal_value(t.text))
        if k == "op":
            if t.text == "(":
                e = self.expr()
                self.expect(")")
                return e
            if t.text == "[":
                return _List(t.pos, self.args("]"))
            if t.text == "{":
                entries: list[tuple[_Node, _Node]] = []
                if not self.accept("}"):
                    while True:
                        key = self.expr()
                        self.expect(":")
                        entries.append((key, self.expr()))
                        if self.accept("}"):
                            break
                        self.expect(",")
                        if self.accept("}"):
                            break
                return _Map(t.pos, entries)
            if t.text == ".":
                raise self.error(t, "leading-dot names are not supported")
        raise self.error(t, "expected an expression")


def _literal_value(text: str) -> Any:
    """The value of a literal token, as the runtime reads it (it is the authority on escapes)."""
    try:
        return _compile(text).execute({})
    except Exception as exc:  # noqa: BLE001 - the runtime raises several types
        raise CelCompileError(f"invalid literal {text}: {_first_line(str(exc))}") from None


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else msg


# ------------------------------------------------------------------------------------------------
# Type checker
# ------------------------------------------------------------------------------------------------

_CONVERSIONS: dict[str, tuple[frozenset[str], CelType]] = {
    "int": (frozenset({"int", "uint", "double", "string"}), INT),
    "uint": (frozenset({"int", "uint", "double", "string"}), UINT),
    "double": (frozenset({"int", "uint", "double", "string"}), DOUBLE),
    "string": (frozenset({"int", "uint", "double", "string", "bytes", "timestamp", "duration"}),
               STRING),
    "bytes": (frozenset({"string", "bytes"}), BYTES),
    "timestamp": (frozenset({"string"}), TIMESTAMP),
    "duration": (frozenset({"string"}), DURATION),
}
_STRING_METHODS = frozenset({"contains", "startsWith", "endsWith", "matches"})
_TIMESTAMP_METHODS = frozenset({"getFullYear", "getMonth", "getDate", "getDayOfMonth",
                                "getDayOfYear", "getDayOfWeek", "getHours", "getMinutes",
                                "getSeconds", "getMilliseconds"})
_DURATION_METHODS = frozenset({"getHours", "getMinutes", "getSeconds", "getMilliseconds"})
_SIZED = frozenset({"string", "bytes", "list", "map", "object"})


def _col(node: _Node) -> str:
    return f"(column {node.pos + 1})"


def _is(t: CelType, *kinds: str) -> bool:
    return t.kind == "dyn" or t.kind in kinds


class _Checker:
    def __init__(self, env: Env) -> None:
        self.env = env

    def fail(self, node: _Node, msg: str) -> CelCompileError:
        return CelCompileError(f"{msg} {_col(node)}")

    def check(self, node: _Node, scope: Mapping[str, CelType]) -> CelType:
        t = self._check(node, scope)
        node.type = t
        return t

    def _check(self, n: _Node, scope: Mapping[str, CelType]) -> CelType:  # noqa: C901
        if isinstance(n, _Lit):
            return {"bool": BOOL, "null": NULL, "int": INT, "uint": UINT, "float": DOUBLE,
                    "string": STRING, "bytes": BYTES}[n.kind]
        if isinstance(n, _Ident):
            if n.name in scope:
                return scope[n.name]
            if n.name in self.env:
                return self.env[n.name]
            raise self.fail(n, f"unknown variable {n.name!r} (declared: "
                               f"{', '.join(sorted(self.env))})")
        if isinstance(n, _Select):
            return self.select(n, self.check(n.operand, scope), n.field, n)
        if isinstance(n, _Has):
            ot = self.check(n.select.operand, scope)
            if not _is(ot, "map", "object"):
                raise self.fail(n, f"has() needs a map or an object; got {ot}")
            self.select(n.select, ot, n.select.field, n.select)
            return BOOL
        if isinstance(n, _Index):
            ot = self.check(n.operand, scope)
            it = self.check(n.index, scope)
            if ot.kind == "list":
                if not _is(it, "int", "uint"):
                    raise self.fail(n, f"a list index must be an int; got {it}")
                return ot.elem or DYN
            if ot.kind in ("map", "object"):
                if isinstance(n.index, _Lit) and n.index.kind == "string":
                    return self.select(n, ot, n.index.value, n)
                if ot.kind == "object":
                    raise self.fail(n, f"{ot} has fixed fields: select them with '.name'")
                if ot.key is not None and it.kind != "dyn" and ot.key.kind != "dyn" \
                        and it.kind != ot.key.kind:
                    raise self.fail(n, f"{ot} is indexed by {ot.key}; got {it}")
                return ot.elem or DYN
            if ot.kind == "dyn":
                return DYN
            raise self.fail(n, f"{ot} cannot be indexed")
        if isinstance(n, _List):
            types = [self.check(x, scope) for x in n.items]
            return list_of(_join(types))
        if isinstance(n, _Map):
            keys, vals, seen = [], [], set()
            for k, v in n.entries:
                kt = self.check(k, scope)
                if not _is(kt, "string", "int", "uint", "bool"):
                    raise self.fail(k, f"a map key must be a string, int, uint or bool; got {kt}")
                if isinstance(k, _Lit):
                    if (k.kind, k.value) in seen:
                        raise self.fail(k, f"duplicate map key {k.text}")
                    seen.add((k.kind, k.value))
                keys.append(kt)
                vals.append(self.check(v, scope))
            return map_of(_join(keys), _join(vals))
        if isinstance(n, _Comp):
            tt = self.check(n.target, scope)
            if tt.kind == "list":
                vt = tt.elem or DYN
            elif tt.kind in ("map", "object"):
                vt = tt.key or STRING
            elif tt.kind == "dyn":
                vt = DYN
            else:
                raise self.fail(n, f"{n.macro}() needs a list or a map; got {tt}")
            inner = {**scope, n.var: vt}
            types = [self.check(a, inner) for a in n.args]
            if n.macro in ("all", "exists", "exists_one", "filter") or \
                    (n.macro == "map" and len(n.args) == 3):
                if not _is(types[0], "bool"):
                    raise self.fail(n.args[0], f"the predicate of {n.macro}() must be a bool; "
                                               f"got {types[0]}")
            if n.macro == "filter":
                return tt if tt.kind == "list" else list_of(vt)
            if n.macro == "map":
                return list_of(types[-1])
            return BOOL
        if isinstance(n, _Op):
            return self.op(n, [self.check(a, scope) for a in n.args])
        if isinstance(n, _Call):
            return self.call(n, scope)
        raise self.fail(n, "unsupported expression")  # pragma: no cover

    def select(self, n: _Node, ot: CelType, name: str, where: _Node) -> CelType:
        if ot.kind == "dyn":
            return DYN
        if ot.kind == "object":
            assert ot.fields is not None
            ft = ot.fields.get(name)
            if ft is None:
                raise self.fail(where, f"{ot} has no field {name!r} (fields: "
                                       f"{', '.join(sorted(ot.fields))})")
            return ft
        if ot.kind == "map":
            if ot.key is not None and ot.key.kind not in ("string", "dyn"):
                raise self.fail(where, f"{ot} has no string keys")
            if ot.fields is not None:
                ft = ot.fields.get(name)
                if ft is None:
                    known = ", ".join(sorted(ot.fields)) or "none"
                    raise self.fail(where, f"{ot} never has the key {name!r} (its keys: "
                                           f"{known})")
                return ft
            return ot.elem or DYN
        raise self.fail(where, f"{ot} has no fields (selecting {name!r})")

    def op(self, n: _Op, ts: list[CelType]) -> CelType:  # noqa: C901
        op = n.op
        if op == "!_":
            if not _is(ts[0], "bool"):
                raise self.fail(n, f"'!' needs a bool; got {ts[0]}")
            return BOOL
        if op == "-_":
            if not _is(ts[0], "int", "double"):
                raise self.fail(n, f"unary '-' needs an int or a double; got {ts[0]}")
            return ts[0]
        if op in ("&&", "||"):
            for a, t in zip(n.args, ts):
                if not _is(t, "bool"):
                    raise self.fail(a, f"'{op}' needs bool operands; got {t}")
            return BOOL
        if op == "?:":
            if not _is(ts[0], "bool"):
                raise self.fail(n.args[0], f"the condition of '?:' must be a bool; got {ts[0]}")
            return _join(ts[1:])
        a, b = ts
        if op in ("==", "!="):
            if not _comparable_eq(a, b):
                raise self.fail(n, f"no overload of '{op}' for ({a}, {b}): it is never true "
                                   "(CEL does not convert between types)")
            return BOOL
        if op in ("<", "<=", ">", ">="):
            if a.kind == "dyn" or b.kind == "dyn" or (a.kind in _NUMERIC and b.kind in _NUMERIC) \
                    or (a.kind == b.kind and a.kind in ("string", "bytes", "bool", "timestamp",
                                                        "duration")):
                return BOOL
            raise self.fail(n, f"no overload of '{op}' for ({a}, {b})")
        if op == "in":
            if b.kind == "list":
                if not _comparable_eq(a, b.elem or DYN):
                    raise self.fail(n, f"'in' on {b} with a {a}: never true")
                return BOOL
            if b.kind == "map":
                if b.key is not None and not _comparable_eq(a, b.key):
                    raise self.fail(n, f"'in' on {b} with a {a}: never true")
                return BOOL
            if b.kind == "object":
                if not _is(a, "string"):
                    raise self.fail(n, f"'in' on {b} needs a string; got {a}")
                return BOOL
            if b.kind == "dyn":
                return BOOL
            raise self.fail(n, f"'in' needs a list or a map on the right; got {b}")
        # arithmetic
        if a.kind == "dyn" or b.kind == "dyn":
            other = b if a.kind == "dyn" else a
            return other if other.kind in _NUMERIC and op != "+" else DYN
        if op == "+":
            if a.kind == b.kind and a.kind in ("int", "uint", "double", "string", "bytes"):
                return a
            if a.kind == b.kind == "list":
                return list_of(_join([a.elem or DYN, b.elem or DYN]))
            if a.kind == b.kind == "duration":
                return DURATION
            if {a.kind, b.kind} == {"timestamp", "duration"}:
                return TIMESTAMP
        elif op == "-":
            if a.kind == b.kind and a.kind in ("int", "uint", "double", "duration"):
                return a
            if a.kind == b.kind == "timestamp":
                return DURATION
            if a.kind == "timestamp" and b.kind == "duration":
                return TIMESTAMP
        elif op in ("*", "/"):
            if a.kind == b.kind and a.kind in _NUMERIC:
                return a
        elif op == "%":
            if a.kind == b.kind and a.kind in ("int", "uint"):
                return a
        hint = " (CEL does not mix int, uint and double in arithmetic: write 1.0, or " \
               "convert with double(x) / int(x))" if a.kind in _NUMERIC and b.kind in _NUMERIC \
            else ""
        raise self.fail(n, f"no overload of '{op}' for ({a}, {b}){hint}")

    def call(self, n: _Call, scope: Mapping[str, CelType]) -> CelType:
        fn = n.fn
        ts = [self.check(a, scope) for a in n.args]
        if n.target is None:
            if fn == "size" and len(ts) == 1:
                return self._size(n, ts[0])
            if fn == "dyn" and len(ts) == 1:
                return DYN
            conv = _CONVERSIONS.get(fn)
            if conv is not None:
                if len(ts) != 1:
                    raise self.fail(n, f"{fn}() takes one argument")
                if not _is(ts[0], *conv[0]):
                    raise self.fail(n, f"no overload of {fn}() for {ts[0]} (accepts "
                                       f"{', '.join(sorted(conv[0]))})")
                if fn in ("timestamp", "duration") and isinstance(n.args[0], _Lit):
                    self._literal_call(n)
                return conv[1]
            raise self.fail(n, f"unknown function {fn}()")
        tt = self.check(n.target, scope)
        if fn == "size" and not ts:
            return self._size(n, tt)
        if fn in _STRING_METHODS and _is(tt, "string") and len(ts) == 1:
            if not _is(ts[0], "string"):
                raise self.fail(n, f"{fn}() needs a string argument; got {ts[0]}")
            if fn == "matches" and isinstance(n.args[0], _Lit):
                self._literal_call(n)
            return BOOL
        if not ts and tt.kind in ("timestamp", "dyn") and fn in _TIMESTAMP_METHODS:
            return INT
        if not ts and tt.kind == "duration" and fn in _DURATION_METHODS:
            return INT
        known = sorted(_STRING_METHODS | _TIMESTAMP_METHODS | {"size"})
        if fn in known:
            raise self.fail(n, f"no overload of {fn}() on {tt} with {len(ts)} argument(s)")
        raise self.fail(n, f"unknown method {fn}() (known: {', '.join(known)})")

    def _size(self, n: _Node, t: CelType) -> CelType:
        if not _is(t, *_SIZED):
            raise self.fail(n, f"size() needs a string, bytes, list or map; got {t}")
        return INT

    def _literal_call(self, n: _Call) -> None:
        """A literal regex / timestamp / duration: check it now with the runtime itself."""
        arg = n.args[0]
        assert isinstance(arg, _Lit)
        probe = f"''.matches({arg.text})" if n.fn == "matches" else f"{n.fn}({arg.text})"
        try:
            _compile(probe).execute({})
        except Exception as exc:  # noqa: BLE001
            what = "regular expression" if n.fn == "matches" else n.fn
            raise self.fail(arg, f"invalid {what} {arg.text}: "
                                 f"{_first_line(str(exc)).split(' Check ')[0]}") from None


def _comparable_eq(a: CelType, b: CelType) -> bool:
    if a.kind in ("dyn", "null") or b.kind in ("dyn", "null"):
        return True
    if a.kind in _NUMERIC and b.kind in _NUMERIC:
        return True
    kinds = {a.kind, b.kind}
    if kinds <= {"map", "object"}:
        return True
    return a.kind == b.kind


def _join(types: list[CelType]) -> CelType:
    """The common type of list items / map values / conditional branches, else dyn."""
    if not types:
        return DYN
    first = types[0]
    return first if all(t == first for t in types[1:]) else DYN


# ------------------------------------------------------------------------------------------------
# Rewriting static references into flat variables
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ref:
    """One flat variable of a rewritten condition: `root` (a declared variable), `steps` (field
    names and literal string keys as str, literal list indexes as int) and `has` (True: the value
    is whether the last step exists). `text` is how the condition spelled it."""

    root: str
    steps: tuple[str | int, ...]
    has: bool = False
    text: str = ""


class _Rewriter:
    def __init__(self, env: Env, prefix: str) -> None:
        self.env = env
        self.prefix = prefix
        self.refs: dict[tuple[str, tuple[str | int, ...], bool], tuple[str, Ref]] = {}

    def static(self, n: _Node, scope: frozenset[str]) -> tuple[str, tuple[str | int, ...]] | None:
        if isinstance(n, _Ident):
            if n.name in scope or n.name not in self.env:
                return None
            return n.name, ()
        if isinstance(n, _Select):
            p = self.static(n.operand, scope)
            return None if p is None else (p[0], p[1] + (n.field,))
        if isinstance(n, _Index) and isinstance(n.index, _Lit) and \
                n.index.kind in ("string", "int"):
            p = self.static(n.operand, scope)
            return None if p is None else (p[0], p[1] + (n.index.value,))
        return None

    def var(self, root: str, steps: tuple[str | int, ...], has: bool) -> str:
        key = (root, steps, has)
        got = self.refs.get(key)
        if got is None:
            name = f"{self.prefix}{len(self.refs)}"
            text = root + "".join(f".{s}" if isinstance(s, str) and s.isidentifier() else
                                  f"[{s!r}]" for s in steps)
            got = self.refs[key] = (name, Ref(root, steps, has,
                                              f"has({text})" if has else text))
        return got[0]

    def emit(self, n: _Node, scope: frozenset[str]) -> str:  # noqa: C901
        p = self.static(n, scope)
        if p is not None:
            return self.var(p[0], p[1], False)
        if isinstance(n, _Lit):
            return n.text
        if isinstance(n, _Ident):
            return n.name
        if isinstance(n, _Select):
            return f"{self.emit(n.operand, scope)}.{n.field}"
        if isinstance(n, _Index):
            return f"{self.emit(n.operand, scope)}[{self.emit(n.index, scope)}]"
        if isinstance(n, _Has):
            p = self.static(n.select.operand, scope)
            if p is not None:
                return self.var(p[0], p[1] + (n.select.field,), True)
            return f"has({self.emit(n.select.operand, scope)}.{n.select.field})"
        if isinstance(n, _List):
            return "[" + ", ".join(self.emit(x, scope) for x in n.items) + "]"
        if isinstance(n, _Map):
            return "{" + ", ".join(f"{self.emit(k, scope)}: {self.emit(v, scope)}"
                                   for k, v in n.entries) + "}"
        if isinstance(n, _Comp):
            inner = scope | {n.var}
            args = ", ".join([n.var] + [self.emit(a, inner) for a in n.args])
            return f"{self.emit(n.target, scope)}.{n.macro}({args})"
        if isinstance(n, _Call):
            args = ", ".join(self.emit(a, scope) for a in n.args)
            if n.target is None:
                return f"{n.fn}({args})"
            return f"{self.emit(n.target, scope)}.{n.fn}({args})"
        if isinstance(n, _Op):
            a = [self.emit(x, scope) for x in n.args]
            if n.op == "!_":
                return f"(!{a[0]})"
            if n.op == "-_":
                return f"(-{a[0]})"
            if n.op == "?:":
                return f"({a[0]} ? {a[1]} : {a[2]})"
            return f"({a[0]} {n.op} {a[1]})"
        raise CelCompileError("unsupported expression")  # pragma: no cover


def _idents(n: _Node, out: set[str]) -> None:
    if isinstance(n, _Ident):
        out.add(n.name)
    elif isinstance(n, _Comp):
        out.add(n.var)
    for name in getattr(type(n), "__slots__", ()):
        v = getattr(n, name, None)
        for child in (v if isinstance(v, list) else [v]):
            if isinstance(child, tuple):
                for c in child:
                    _idents(c, out)
            elif isinstance(child, _Node):
                _idents(child, out)


# ------------------------------------------------------------------------------------------------
# Compiled conditions
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """A compiled condition: the original `source`, the `rewritten` source the runtime runs,
    its `program`, and its flat variables (`names[i]` holds the value of `refs[i]`)."""

    source: str
    rewritten: str
    program: Any = field(repr=False, compare=False)
    names: tuple[str, ...] = ()
    refs: tuple[Ref, ...] = ()
    result_type: CelType = BOOL

    def run(self, resolve: Callable[[Ref], Any]) -> bool | str:
        """True / False, or an error message (evaluation error, non-bool result). `resolve(ref)`
        returns the CEL value of a reference or `MISSING`. Never raises."""
        act = {}
        try:
            for name, ref in zip(self.names, self.refs):
                v = resolve(ref)
                if v is not MISSING:
                    act[name] = v
        except Exception as exc:  # noqa: BLE001 - a failing resolver is an error result
            return f"{type(exc).__name__}: {exc}"
        return self.execute(act)

    def execute(self, activation: dict[str, Any]) -> bool | str:
        """Run the program on an activation of flat variables (`names` -> value; a missing
        one is an undefined variable): True / False, or an error message. Never raises."""
        try:
            r = self.program.execute(activation)
        except Exception as exc:  # noqa: BLE001 - any runtime failure is an error result
            return self._error(exc)
        if r is True or r is False:
            return r
        return f"the condition returned {type(r).__name__} {str(r)[:40]!r}, not a bool"

    def _error(self, exc: Exception) -> str:
        msg = _first_line(str(exc)).split(". Check ")[0].split(". CEL does not")[0]
        m = re.match(r"Undefined variable or function: '([^']*)'", msg)
        if m is not None and m.group(1) in self.names:
            return f"no value for {self.refs[self.names.index(m.group(1))].text}"
        for name, ref in zip(self.names, self.refs):  # show the condition's own spelling
            msg = re.sub(rf"\b{re.escape(name)}\b", ref.text, msg)
        return f"{type(exc).__name__}: {msg}"


def compile_condition(source: str, env: Env) -> Condition:
    """Parse, type-check against `env`, rewrite and compile; raise `CelCompileError`."""
    if not isinstance(source, str) or not source.strip():
        raise CelCompileError("must be a non-empty CEL expression")
    try:
        _compile(source)
    except Exception as exc:  # noqa: BLE001
        raise CelCompileError(_syntax_message(str(exc))) from None
    tree = _Parser(source).parse()
    result = _Checker(env).check(tree, {})
    if result.kind not in ("bool", "dyn"):
        raise CelCompileError(f"the condition must be a bool; its type is {result}")
    names: set[str] = set()
    _idents(tree, names)
    prefix = "_p"
    while any(n.startswith(prefix) for n in names):
        prefix += "_"
    rw = _Rewriter(env, prefix)
    rewritten = rw.emit(tree, frozenset())
    try:
        program = _compile(rewritten)
    except Exception as exc:  # noqa: BLE001 - a bug of the rewriter: refuse the policy
        raise CelCompileError(f"internal error compiling the condition: "
                              f"{_first_line(str(exc))}") from None
    items = sorted(rw.refs.values(), key=lambda nr: int(nr[0][len(prefix):]))
    return Condition(source=source, rewritten=rewritten, program=program,
                     names=tuple(n for n, _ in items), refs=tuple(r for _, r in items),
                     result_type=result)


def _syntax_message(msg: str) -> str:
    m = re.search(r"ERROR: <input>:(\d+):(\d+): ([^\n]*)", msg)
    if m is None:
        return f"syntax error: {_first_line(msg)}"
    return f"syntax error at {m.group(1)}:{m.group(2)}: {m.group(3).strip()}"


# ------------------------------------------------------------------------------------------------
# Values
# ------------------------------------------------------------------------------------------------

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1


def to_cel(v: Any) -> Any:
    """A Python value as the runtime should see it: str, bool, None, float, int within int64
    unchanged; an int outside int64 and a Decimal become a double (the runtime itself turns big
    ints into doubles); tuples, lists and sets become lists (sets sorted); mappings become dicts
    (recursively). Anything else is passed on, and the runtime's conversion error fails the
    condition."""
    t = type(v)
    if t is str or t is bool or v is None or t is float:
        return v
    if t is int:
        return v if _INT64_MIN <= v <= _INT64_MAX else float(v)
    if t is Decimal:
        f = float(v)
        return f if not math.isnan(f) else MISSING
    if t is tuple or t is list:
        return [to_cel(x) for x in v]
    if isinstance(v, Mapping):
        return {k: to_cel(x) for k, x in v.items()}
    if t is frozenset or t is set:
        return sorted(to_cel(x) for x in v)
    return v

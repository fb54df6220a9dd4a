"""The configuration reference (``docs/config.md``), generated from :mod:`adfed.config`.

Every key of :class:`adfed.config.Config` is listed with its type or allowed values, its
default, the constraint its ``__post_init__`` checks, and the comment written beside it
in ``adfed/config.py``. Regenerate after changing a config dataclass::

    python -m adfed.configdoc > docs/config.md

``tests/unit/test_configdoc.py`` fails while ``docs/config.md`` differs from
:func:`render`.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from typing import Any, Literal

from adfed import config as config_mod

#: the command that regenerates the reference (quoted in the page and in the test)
COMMAND = "python -m adfed.configdoc > docs/config.md"


@dataclasses.dataclass(frozen=True, kw_only=True)
class KeyDoc:
    """One config key as the reference lists it."""

    key: str  # "section.key", or "key" at the top level
    type: str  # "int", "list of int", '"a" | "b"', ...
    default: str  # TOML spelling of the default
    constraint: str  # what __post_init__ checks ("" if nothing)
    text: str  # the comments beside the field in the source


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(f'"{c}"' if isinstance(c, str) else repr(c) for c in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _field_comments(cls: type) -> dict[str, str]:
    """Comment text per field of a dataclass: the comment lines directly above the field
    (no blank line between) and the comment at the end of its line(s)."""
    lines, _ = inspect.getsourcelines(cls)
    source = textwrap.dedent("".join(lines))
    comments: dict[int, str] = {}  # 1-based line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    src_lines = source.splitlines()
    out: dict[str, str] = {}
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.ClassDef):
        raise TypeError(f"{cls!r} is not a class defined in source")
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        above: list[str] = []
        line = stmt.lineno - 1
        while line >= 1 and line in comments and src_lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line])
            line -= 1
        end = stmt.end_lineno or stmt.lineno
        inline = [comments[n] for n in range(stmt.lineno, end + 1) if n in comments]
        out[stmt.target.id] = " ".join(above + inline)
    return out


def _text_of(node: ast.expr) -> str | None:
    """A string constant, or an f-string with its fields shown as "…"."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else "…"
                       for v in node.values)
    return None


def _constraints(cls: type) -> dict[str, list[str]]:
    """What ``cls.__post_init__`` checks, per full key (in order), from its ``_check(cond,
    key, constraint, value)`` calls; a loop ``for key in ("a", "b"): _check(..., f"s.{key}", ...)``
    gives each name of the tuple."""
    post = cls.__dict__.get("__post_init__")
    if post is None:
        return {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(post)))
    out: dict[str, list[str]] = {}

    def visit(node: ast.AST, loop: tuple[str, list[str]] | None) -> None:
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name) and isinstance(node.iter, ast.Tuple):
            names = [e.value for e in node.iter.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
            for stmt in node.body:
                visit(stmt, (node.target.id, names))
            return
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_check"
                and len(node.args) >= 3):
            constraint = _text_of(node.args[2]) or ""
            key_node = node.args[1]
            keys: list[str] = []
            if isinstance(key_node, ast.Constant) and isinstance(key_node.value, str):
                keys = [key_node.value]
            elif isinstance(key_node, ast.JoinedStr) and loop is not None:
                prefix = "".join(v.value for v in key_node.values
                                 if isinstance(v, ast.Constant) and isinstance(v.value, str))
                keys = [prefix + name for name in loop[1]]
            for key in keys:
                out.setdefault(key, []).append(constraint)
        for child in ast.iter_child_nodes(node):
            visit(child, loop)

    visit(tree, None)
    return out


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def key_docs(root: type = config_mod.Config) -> dict[str, list[KeyDoc]]:
    """Every key of ``root`` by section ("" for the top level), in source order."""
    constraints: dict[str, list[str]] = {}
    sections: dict[str, list[KeyDoc]] = {"": []}
    classes: list[tuple[str, type]] = [("", root)]
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        if dataclasses.is_dataclass(hints[f.name]):
            classes.append((f.name, hints[f.name]))
    for _, cls in classes[1:] + classes[:1]:  # a section's own checks before the cross-section ones
        for key, checks in _constraints(cls).items():
            constraints.setdefault(key, []).extend(checks)
    for section, cls in classes:
        comments = _field_comments(cls)
        cls_hints = typing.get_type_hints(cls)
        docs = sections.setdefault(section, [])
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(cls_hints[f.name]):
                continue
            key = f"{section}.{f.name}" if section else f.name
            docs.append(KeyDoc(key=key, type=_type_name(cls_hints[f.name]), default=_toml(_default(f)),
                               constraint="; ".join(constraints.get(key, [])), text=comments.get(f.name, "")))
    return sections


def _cell(text: str) -> str:
    text = text.replace("|", "\\|")
    # a path to a docs page becomes a link relative to docs/
    return re.sub(r"docs/([\w./-]+\.md)", r"[docs/\1](\1)", text)


_HEADER = f"""\
# Configuration reference

<!-- Generated from adfed/config.py by `{COMMAND}`; do not edit by hand.
     tests/unit/test_configdoc.py fails while this file is out of date. -->

A run's configuration is TOML, loaded into the frozen dataclasses of `adfed/config.py`
and validated on load: an unknown key or a bad value stops with one line naming the key.
Every key can be set in a file (`adfed train --config FILE`) or on the command line with
one `--set section.key=value` per key (the value in TOML syntax; a bare word is a string:
`--set fl.strategy=fedadam`, `--set model.tower=[64,32]`). Common keys also have flags
(`--data`, `--mode`, `--seed`, `--rounds`, `--clients-per-round`, `--backend`). A run
writes its resolved configuration to `RUN/config.toml`.

```toml
seed = 0
[fl]
rounds = 200
strategy = "fedavg"
```
"""


def render(root: type = config_mod.Config) -> str:
    """The whole reference page as Markdown."""
    parts = [_HEADER]
    for section, docs in key_docs(root).items():
        if not docs:
            continue
        parts.append(f"\n## {'top level' if not section else f'[{section}]'}\n\n")
        parts.append("| key | type / allowed values | default | checked | notes |\n")
        parts.append("| --- | --- | --- | --- | --- |\n")
        for d in docs:
            parts.append(f"| `{d.key}` | {_cell(d.type)} | `{d.default}` | {_cell(d.constraint)} "
                         f"| {_cell(d.text)} |\n")
    return "".join(parts)


if __name__ == "__main__":  # pragma: no cover - the command line
    sys.stdout.write(render())

"""The generated configuration reference: docs/config.md is current and complete, and the
generator reads types, defaults, checks and comments from the dataclasses' source."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from adfed import configdoc
from adfed.config import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def _check(cond: bool, key: str, constraint: str, value: Any) -> None:
    """Stand-in for adfed.config._check: the generator reads the calls, not the function."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Section:
    # the comment above
    # spans two lines
    alpha: int = 3  # and one at the end
    beta: Literal["x", "y"] = "y"

    gamma: tuple[float, ...] = (0.5, 1.0)

    def __post_init__(self) -> None:
        _check(self.alpha >= 1, "s.alpha", "an int >= 1", self.alpha)
        for key in ("gamma",):
            _check(bool(getattr(self, key)), f"s.{key}", "a non-empty list", getattr(self, key))


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Root:
    seed: int = 0
    s: _Section = dataclasses.field(default_factory=_Section)


def _all_keys(cfg_type: type, prefix: str = "") -> list[str]:
    keys: list[str] = []
    hints = typing.get_type_hints(cfg_type)
    for f in dataclasses.fields(cfg_type):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(_all_keys(hints[f.name], f"{f.name}."))
        else:
            keys.append(prefix + f.name)
    return keys


def test_docs_config_md_is_up_to_date() -> None:
    # Prepare
    expected = configdoc.render()

    # Execute
    current = DOC.read_text() if DOC.exists() else ""

    # Assert
    assert current == expected, (
        f"docs/config.md is out of date with adfed/config.py; regenerate it with: {configdoc.COMMAND}")


def test_every_config_key_is_listed() -> None:
    # Prepare
    keys = _all_keys(Config)

    # Execute
    listed = [d.key for docs in configdoc.key_docs().values() for d in docs]

    # Assert
    assert listed == keys
    page = configdoc.render()
    assert all(f"| `{key}` |" in page for key in keys)


def test_types_defaults_checks_and_comments_come_from_the_source() -> None:
    # Prepare / Execute
    docs = {d.key: d for section in configdoc.key_docs(_Root).values() for d in section}

    # Assert
    assert list(docs) == ["seed", "s.alpha", "s.beta", "s.gamma"]
    assert docs["s.alpha"] == configdoc.KeyDoc(
        key="s.alpha", type="int", default="3", constraint="an int >= 1",
        text="the comment above spans two lines and one at the end")
    assert docs["s.beta"].type == '"x" | "y"' and docs["s.beta"].default == '"y"'
    assert docs["s.beta"].text == ""  # a comment is taken only from the field's own lines
    assert docs["s.gamma"].type == "list of float" and docs["s.gamma"].default == "[0.5, 1.0]"
    assert docs["s.gamma"].constraint == "a non-empty list"  # the key of a loop's f-string


def test_table_cells_escape_pipes_and_link_docs_pages() -> None:
    # Prepare
    page = configdoc.render(_Root)

    # Execute
    row = next(line for line in page.splitlines() if line.startswith("| `s.beta` |"))

    # Assert
    assert '"x" \\| "y"' in row
    assert configdoc._cell("see docs/results/a.md") == "see [docs/results/a.md](results/a.md)"

"""Sphinx configuration for trio_multifd."""

from __future__ import annotations

import os
import re
from typing import Any

from sphinx.domains.python import PythonDomain

import trio_multifd

project = "trio_multifd"
author = "trio_multifd developers"
copyright = "2026, trio_multifd developers"
release = trio_multifd.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
html_theme = "furo"
html_title = "trio_multifd"
exclude_patterns = ["_build"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

nitpicky = True
# No intersphinx here (no network for inventories): references into the standard library,
# Trio and attrs cannot resolve, so they are the only ones ignored.
nitpick_ignore_regex = [
    (r"py:.*", r"(trio|attrs|enum|uuid|collections\.abc|typing|contextlib|types|logging)\..*"),
    (r"py:.*", r"uuid_mod\.UUID"),
    (r"py:.*", r"(UUID|Stream|Listener|Awaitable|Callable|Iterable|Sequence|Buffer)"),
    (r"py:.*", r"(AsyncIterator|AsyncGenerator|TaskStatus|Path|PathLike|Mapping)"),
    (r"py:class", r"(memoryview|bytes|bytearray|int|str|float|bool|object|type|None)"),
    (r"py:class", r"(Exception|BaseException|ValueError|TypeError|OSError)"),
    (r"py:class", r"trio_multifd\._.*"),
    (r"py:obj", r"trio_multifd\._.*"),
]


# -- the changelog ------------------------------------------------------------------------
# CHANGELOG.md at the root is the one source; docs/changelog.rst is filled from it at build
# time (no Markdown parser is installed here). It uses a small subset of Markdown:
# headings, "- " bullets with indented continuation lines, `code` and [text](url).

_CHANGELOG = os.path.join(os.path.dirname(__file__), os.pardir, "CHANGELOG.md")
_UNDERLINES = {1: "=", 2: "-", 3: "~"}


def _inline(text: str) -> str:
    text = re.sub(r"`([^`]+)`", r"``\1``", text)
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", r"`\1 <\2>`__", text)


def changelog_rst(markdown: str) -> str:
    """Convert CHANGELOG.md's Markdown subset to reStructuredText."""
    out: list[str] = []
    for line in markdown.splitlines():
        heading = re.match(r"(#{1,3}) (.*)", line)
        if heading:
            title = _inline(heading.group(2))
            out += [title, _UNDERLINES[len(heading.group(1))] * len(title), ""]
        else:
            out.append(_inline(line))
    return "\n".join(out) + "\n"


def _fill_changelog(app: object, docname: str, source: list[str]) -> None:
    if docname == "changelog":
        with open(_CHANGELOG, encoding="utf-8") as f:
            source[0] = changelog_rst(f.read())


# A type annotation such as ``bytes`` is looked up "fuzzily": any documented object whose
# name ends in ``.bytes`` matches, and TransferStats.bytes and ChannelStats.bytes make it
# ambiguous (and would link a type to a counter). Built-in type names are never ours.
_BUILTIN_TYPES = frozenset(
    {"bytes", "bytearray", "memoryview", "int", "str", "float", "bool", "object", "type"}
)


class _PythonDomain(PythonDomain):
    def find_obj(
        self, env: Any, modname: Any, classname: Any, name: str, type: Any, searchmode: int = 0
    ) -> Any:
        if searchmode == 1 and name in _BUILTIN_TYPES:
            return []
        return super().find_obj(env, modname, classname, name, type, searchmode)


def setup(app: Any) -> None:
    app.connect("source-read", _fill_changelog)
    app.add_domain(_PythonDomain, override=True)

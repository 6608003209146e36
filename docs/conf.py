"""Sphinx configuration for trio_multifd."""

from __future__ import annotations

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
    (r"py:.*", r"(UUID|Stream|Listener|Awaitable|Callable|Iterable|Sequence|Buffer)"),
    (r"py:.*", r"(AsyncIterator|AsyncGenerator|TaskStatus|Path|PathLike|Mapping)"),
    (r"py:class", r"(memoryview|bytes|bytearray|int|str|float|bool|object|type|None)"),
    (r"py:class", r"(Exception|BaseException|ValueError|TypeError|OSError)"),
    (r"py:class", r"trio_multifd\._.*"),
    (r"py:obj", r"trio_multifd\._.*"),
]

"""The docs keep up with the package: every public name has its entry in the reference."""

from __future__ import annotations

import re
from pathlib import Path

import trio_multifd

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _documented(text: str) -> set[str]:
    return set(re.findall(r"^\.\. auto\w+:: (\w+)", text, flags=re.MULTILINE))


def test_every_public_name_is_in_the_api_reference() -> None:
    # In api.rst, or with its own entry on a topic page (e.g. precopy.rst).
    documented = set().union(*(_documented(p.read_text()) for p in DOCS.rglob("*.rst")))
    missing = sorted(set(trio_multifd.__all__) - documented)
    assert not missing, f"add to docs/api.rst: {missing}"


def test_the_docs_document_only_public_names() -> None:
    documented = set().union(*(_documented(p.read_text()) for p in DOCS.rglob("*.rst")))
    assert documented <= set(trio_multifd.__all__)

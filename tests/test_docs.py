"""The docs keep up with the package: every public name has its entry in the reference,
and the front page's fragment works as written."""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

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


def _front_page_programs() -> tuple[Callable[..., Awaitable[None]], ...]:
    """The two halves of index.rst's fragment, each as the body of an async function of
    the names it uses but does not define."""
    text = (DOCS / "index.rst").read_text()
    match = re.search(r"code-block:: python\n\n(.*?)\n\n(?=\S)", text, flags=re.DOTALL)
    assert match is not None, "index.rst has no python fragment"
    sending, receiving = textwrap.dedent(match[1]).split("# the receiving program")
    namespace: dict[str, Any] = {"trio_multifd": trio_multifd}
    for header, body in (
        ("async def sending(connect, block):", sending),
        ("async def receiving(listeners, block):", receiving),
    ):
        exec(f"{header}\n{textwrap.indent(body, '    ')}", namespace)
    return namespace["sending"], namespace["receiving"]


async def test_the_front_page_fragment_completes_on_both_ends() -> None:
    sending, receiving = _front_page_programs()
    source = bytearray(os.urandom(256 * 4096))
    target = bytearray(len(source))
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def connect(channel: int) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", port)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(receiving, listeners, trio_multifd.RAMBlock("b", target))
                # The sender's exit succeeds only once the receiver confirmed every round.
                await sending(connect, trio_multifd.RAMBlock("b", source))
    finally:
        for listener in listeners:
            await listener.aclose()
    assert target == source

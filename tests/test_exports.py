"""The public surface: what ``import trio_multifd`` promises."""

from __future__ import annotations

import inspect
import subprocess
import sys

import trio_multifd


def test_every_name_in_all_is_exported() -> None:
    for name in trio_multifd.__all__:
        assert hasattr(trio_multifd, name), name


def test_public_names_live_in_all_and_nothing_private_leaks() -> None:
    public = {n for n in dir(trio_multifd) if not n.startswith("_")}
    assert public == set(trio_multifd.__all__)


def test_all_has_no_duplicates() -> None:
    assert len(set(trio_multifd.__all__)) == len(trio_multifd.__all__)


def test_public_objects_claim_the_package_as_home() -> None:
    for name in trio_multifd.__all__:
        obj = getattr(trio_multifd, name)
        if isinstance(obj, type) or inspect.isfunction(obj):
            assert obj.__module__.startswith("trio_multifd"), name


def test_exceptions_form_one_hierarchy() -> None:
    errors = [getattr(trio_multifd, n) for n in trio_multifd.__all__ if n.endswith("Error")]
    for error in errors:
        assert issubclass(error, trio_multifd.MultiFDError), error


def test_import_in_a_fresh_process_exposes_the_codec() -> None:
    code = "import trio_multifd as m; print(m.decode_handshake, m.RAMBlock, m.MultiFDError)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "decode_handshake" in result.stdout

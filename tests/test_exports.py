"""The public surface: what ``import trio_multifd`` promises."""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
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


def _data_docstrings(module_name: str) -> dict[str, str]:
    """The docstrings of a module's assignments: the string right after ``NAME = ...``,
    where Sphinx's autodata finds them (a constant or an alias has no ``__doc__``)."""
    module = importlib.import_module(module_name)
    found: dict[str, str] = {}
    for node, after in itertools.pairwise(ast.parse(inspect.getsource(module)).body):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            found.update((t.id, after.value.value) for t in targets if isinstance(t, ast.Name))
    return found


def test_every_public_name_has_a_docstring() -> None:
    # Classes and functions by their own __doc__ (not one inherited from a base); data by
    # the string after its assignment in the module that defines it.
    missing = []
    for name in trio_multifd.__all__:
        obj = getattr(trio_multifd, name)
        if inspect.isclass(obj):
            doc = vars(obj).get("__doc__")
        elif inspect.isfunction(obj):
            doc = obj.__doc__
        else:
            defining = next(
                node.module
                for node in ast.parse(inspect.getsource(trio_multifd)).body
                if isinstance(node, ast.ImportFrom)
                and any(alias.name == name for alias in node.names)
            )
            doc = _data_docstrings(f"trio_multifd.{defining}").get(name)
        if not (doc and doc.strip()):
            missing.append(name)
    assert not missing, f"public names without a docstring: {missing}"


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

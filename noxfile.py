"""Check sessions for trio_multifd: ``nox`` runs tests, lint, typecheck and docs."""

from __future__ import annotations

import os
import tempfile

import nox

nox.options.sessions = ["tests", "lint", "typecheck", "docs"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = True
nox.options.reuse_existing_virtualenvs = True

PYPROJECT = nox.project.load_toml("pyproject.toml")


def _group(name: str) -> list[str]:
    # pip 23 (what nox's venvs get) has no `--group`: nox reads PEP 735 groups itself.
    return list(nox.project.dependency_groups(PYPROJECT, name))


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite under coverage (JUnit XML in .ci/junit.xml for the summary)."""
    session.install("-e", ".", *_group("test"))
    junit = os.path.join(".ci", "junit.xml")
    session.run(
        "coverage",
        "run",
        "-m",
        "pytest",
        f"--junitxml={junit}",
        *session.posargs,
    )
    session.run("coverage", "report")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check."""
    session.install(*_group("lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package and the tests."""
    session.install("-e", ".", *_group("typecheck"))
    session.run("mypy", "--strict", "trio_multifd", "tests", "examples")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the Sphinx docs, nitpicky, warnings as errors."""
    session.install("-e", ".", *_group("docs"))
    with tempfile.TemporaryDirectory() as out:
        session.run("sphinx-build", "-n", "-W", "--keep-going", "-b", "html", "docs", out)


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark (not a default session): ``nox -s bench -- --size 1GiB --repeat 3``."""
    session.install("-e", ".")
    session.run("trio-multifd", "bench", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """The soak run (not a default session): ``nox -s soak -- --seconds 90``."""
    session.install("-e", ".")
    session.run("python", "-m", "tests.soak", *session.posargs)

"""nox sessions: `nox -s tests` (the CI test command in a fresh venv), `nox -s lint`, `nox -s quickstart`."""

import nox

nox.options.sessions = ["lint", "tests"]
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install(*TORCH)
    session.install("-e", ".[test,export]")
    session.run("python", "-m", "pytest", "-q", "-n", "2", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "maskformer_cli", "tests", "benchmarks", "noxfile.py")


@nox.session
def quickstart(session: nox.Session) -> None:
    session.install(*TORCH)
    session.install("-e", ".")
    session.run("maskformer", "train", "recipes/quickstart.yaml", "--exist-ok")

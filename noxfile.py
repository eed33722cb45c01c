"""`./dev test-all`: the pytest suite on every Python >= 3.11 this machine has.

nox rather than tox: the sessions are plain Python (the same language as the project),
and nox creates each interpreter's venv with the standard library's venv module, under
.nox/, leaving the project's .venv alone. An interpreter that is not installed is skipped
with a line saying so. Each run makes its venvs afresh; `./dev test-all -r` reuses them
(faster, but a venv left half-made by an interrupted run is not repaired). ruff and mypy
do not depend on the interpreter (mypy checks for 3.11 whatever runs it) and run in
`./dev test`, which is what CI runs.
"""

from pathlib import Path

import nox

PYTHONS = ["3.11", "3.12", "3.13", "3.14"]

nox.options.sessions = ["tests"]
nox.options.default_venv_backend = "venv"
nox.options.error_on_missing_interpreters = False  # skip, also where CI=true is set

# Keep the venvs out of git without touching the project's .gitignore.
_envdir = Path(__file__).parent / ".nox"
_envdir.mkdir(exist_ok=True)
(_envdir / ".gitignore").write_text("*\n")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """pytest on one interpreter; arguments after `--` go to pytest."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)

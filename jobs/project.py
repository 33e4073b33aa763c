"""Where this project's checkout is: the directory that holds pyproject.toml and the four packages
(jobs, model, pipelines, storage), found once, here, by walking up from this package.

`m3 submit` ships it as a Ray job's working directory and `m3 schedule` runs its child rebuilds in
it; a path like `Path(__file__).parents[1]` in each of them says the same only while the module
stays at that depth (it said `jobs/` once they moved to jobs/ops/, and the jobs shipped only the
jobs package). An m3 installed as a package, without its checkout, has no project root: None,
and what needs one says so (`project_root`).
"""

from __future__ import annotations

from pathlib import Path

from model.errors import M3Error

PACKAGES = ("jobs", "model", "pipelines", "storage")


def _find(start: Path) -> Path | None:
    """The first directory above `start` that holds a pyproject.toml, if it also holds the
    packages (otherwise it is some other project's, e.g. one whose .venv m3 is installed in)."""
    for d in start.parents:
        if (d / "pyproject.toml").is_file():
            return d if all((d / p / "__init__.py").is_file() for p in PACKAGES) else None
    return None


ROOT: Path | None = _find(Path(__file__).resolve())


def project_root(what: str = "this") -> Path:
    """ROOT, or one M3Error saying that `what` needs the project's checkout."""
    if ROOT is None:
        raise M3Error(
            f"{what} needs this project's checkout (pyproject.toml beside jobs/, model/, pipelines/, "
            f"storage/), and this m3 runs from an installed package ({Path(__file__).resolve().parent}): "
            f"run it from the checkout's .venv"
        )
    return ROOT

"""The import contracts in pyproject.toml ([tool.importlinter]): each layer imports only
downward (model <- storage <- pipelines <- jobs, and inside jobs: shared parts <- stages <-
inference <- training <- ops <- cli) and no package's modules import each other in a circle. A broken
contract fails here with import-linter's report of the offending chain."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    import re
    import tomllib

    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    counted = re.search(r"(\d+) kept, (\d+) broken", out.stdout)
    assert counted, out.stdout[-4000:]
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    # every contract pyproject declares was checked, however many there are now
    assert int(counted[2]) == 0 and int(counted[1]) >= len(declared)


def test_every_error_m3_raises_on_purpose_has_one_root():
    """The CLI prints an M3Error as one line and lets anything else (a bug) keep its traceback,
    so every error class of the project must derive from it."""
    import importlib
    import inspect
    import pkgutil

    from model.errors import M3Error

    found = []
    for pkg in ("jobs", "model", "pipelines", "storage"):
        for info in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}."):
            if info.name.endswith("__main__"):
                continue
            mod = importlib.import_module(info.name)
            for name, obj in vars(mod).items():
                if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == mod.__name__:
                    found.append(obj)
    assert len(found) >= 13
    assert [c.__qualname__ for c in found if not issubclass(c, M3Error)] == []


def test_cli_prints_a_user_error_in_one_line_and_a_bug_with_its_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunking:\n  ref_max_tokens: -3\n")
    out = subprocess.run(
        [sys.executable, "-m", "jobs", "validate", "-c", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("m3 validate: error:") and "ref_max_tokens" in out.stderr
    code = (
        "import sys; import jobs.cli.main as cli; "
        "cli.COMMANDS['validate'] = lambda cfg, args: 1 / 0; sys.exit(cli.main(['validate']))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" in out.stderr and "ZeroDivisionError" in out.stderr

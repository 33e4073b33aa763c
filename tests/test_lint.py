"""One style, checked: ruff's linter (pyflakes, pycodestyle, import order) and formatter, as
configured in pyproject.toml ([tool.ruff]). A failure prints what ruff would change; the fix is
`ruff format . && ruff check --fix .`."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUFF = Path(sys.executable).parent / "ruff"


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUFF), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_linter_finds_nothing():
    out = _ruff("check", "--no-cache", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_every_file_is_formatted():
    out = _ruff("format", "--no-cache", "--check", ".")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_the_linter_fails_on_a_bad_file(tmp_path):
    # the check above can fail: an unused import and an unsorted block are reported
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nimport os\n\nprint(os.sep)\n")
    out = subprocess.run(
        [str(RUFF), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1 and "F401" in out.stdout and "I001" in out.stdout

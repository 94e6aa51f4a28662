"""The docs site: built from the committed notebooks and docs/ without executing anything, and
refused when a link or cross-reference is broken."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")


def _build(source: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sphinx", "-E", "-q", "-W", "--keep-going", "-b", "html",
           "-c", str(REPO / "docs"), str(source), str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=source, timeout=600)


def test_the_site_builds_with_every_lesson_and_its_figures(tmp_path):
    done = _build(REPO, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    page = (tmp_path / "notebooks" / "01_sparsity_patterns.html").read_text()
    assert "<img" in page  # the committed figure outputs are on the page
    for name in ("docs/index.html", "docs/reference.html", "docs/api.html", "index.html"):
        assert (tmp_path / name).exists(), name


def test_a_broken_link_fails_the_build(tmp_path):
    src = tmp_path / "src"
    for part in ("docs", "notebooks", "figures"):
        shutil.copytree(REPO / part, src / part)
    (src / "data").mkdir()
    shutil.copy(REPO / "data" / "README.md", src / "data" / "README.md")
    readme = (REPO / "README.md").read_text() + "\nSee [a page](docs/no_such_page.md).\n"
    (src / "README.md").write_text(readme)
    done = _build(src, tmp_path / "html")
    assert done.returncode != 0
    assert "no_such_page" in done.stderr

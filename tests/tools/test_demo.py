"""``python -m mpt_relax demo``: builds the bundled trained model once, then writes readable text."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "mpt_relax", *args], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=600)


def test_cli_demo_builds_once_and_generates_readable_text(tmp_path):
    proc = cli("demo", "--dist", str(tmp_path), "--max-new-tokens", "48")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tiny-mpt-q0f32" / "mpt-config.json").is_file()
    assert "compile llvm" in proc.stderr and "trained on Python standard-library sources" in proc.stderr
    assert proc.stdout.startswith('def read_config(path):\n    """') and "48 tokens" in proc.stderr
    new = proc.stdout[len('def read_config(path):\n    """'):]
    # readable: printable ASCII (the corpus is Python and English licence text) and real words
    assert sum(c.isascii() and (c.isprintable() or c in "\n\t") for c in new) >= 0.95 * len(new)
    assert sum(w.isalpha() for w in new.split()) >= 4
    again = cli("demo", "--dist", str(tmp_path), "--max-new-tokens", "48")
    assert again.returncode == 0 and again.stdout == proc.stdout and "compile llvm" not in again.stderr

"""README.md matches the code: every ``python`` block runs, and every flag a documented command
uses is one that command accepts."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)
ENTRY_POINTS = {"scripts/build.py": ["scripts/build.py"], "bfloat16_to_float16.py": ["bfloat16_to_float16.py"]}


def _commands():
    """(entry argv, flags) for each documented ``python -m mpt_relax CMD`` / script line."""
    found = []
    for lang, body in BLOCKS:
        if lang not in ("bash", "text", ""):
            continue
        for line in body.splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith("python "):
                continue
            words = shlex.split(line.replace("|", " ").replace("[", " ").replace("]", " "))
            if words[1:3] == ["-m", "mpt_relax"] and len(words) > 3 and not words[3].startswith("-"):
                entry = ["-m", "mpt_relax", words[3]]
            elif words[1] in ENTRY_POINTS:
                entry = ENTRY_POINTS[words[1]]
            else:
                continue
            found.append((tuple(entry), sorted({w.split("=")[0] for w in words if w.startswith("--")})))
    return found


COMMANDS = _commands()


def test_readme_documents_commands():
    entries = {e for e, _ in COMMANDS}
    assert {("-m", "mpt_relax", c) for c in ("build", "convert", "generate", "chat", "bench", "demo")} <= entries
    assert ("scripts/build.py",) in entries and ("bfloat16_to_float16.py",) in entries


@pytest.mark.parametrize("entry, flags", COMMANDS, ids=[" ".join(e) for e, _ in COMMANDS])
def test_documented_flags_exist(entry, flags):
    help_text = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True, cwd=REPO,
                               timeout=120).stdout
    missing = [f for f in flags if f not in help_text]
    assert not missing, f"{' '.join(entry)} --help lacks {missing}"


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_python_block_runs(index, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-c", BLOCKS[index][1]], capture_output=True, text=True, cwd=tmp_path,
                         env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]

"""The README's Serve examples (curl and the openai client) run against a live server."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
SECTION = README[README.index("## Serve"):README.index("\n## ", README.index("## Serve") + 1)]
MODEL = "mpt-7b-chat-q4f16_1"  # the model id the examples use


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", SECTION, flags=re.S)


@pytest.fixture(scope="module")
def live(start_server):
    return start_server(service={"model_name": MODEL})


def test_openai_example_runs(live):
    (code,) = blocks("py")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("http://127.0.0.1:8000", live.base), {})
    assert "completion_tokens" in out.getvalue()


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl_example_runs(live):
    (command,) = [b for b in blocks("bash") if b.startswith("curl")]
    command = command.replace("http://127.0.0.1:8000", live.base).replace("\\\n", " ")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, check=True).stdout
    assert '"chat.completion"' in out and '"usage"' in out

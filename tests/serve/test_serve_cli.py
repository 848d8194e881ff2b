"""``python -m mpt_relax serve`` as a process: options, API key, and a clean exit on SIGTERM /
SIGINT with a request still streaming."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "mpt_relax", "serve", "--port", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, base: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not become healthy")


def test_serve_exits_cleanly_on_sigterm_mid_stream(serve_artifact):
    """The stream gets the grace period, then an error event and [DONE]; the process exits 0. (The grace
    is short: an idle machine generates the whole 512-token window of the tiny model in ~0.3 s.)"""
    proc, base = serve("--artifact", str(serve_artifact), "--device", "cpu", "--api-key", "k3y",
                       "--model-name", "tiny", "--shutdown-timeout", "0.05", "--max-batch-size", "4")
    try:
        wait_healthy(proc, base)
        key = {"Authorization": "Bearer k3y"}
        assert httpx.get(base + "/v1/models").status_code == 401
        assert httpx.get(base + "/v1/models", headers=key).json()["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 500, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", base + "/v1/completions", json=body, headers=key, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"code": "cancelled"' in rest[-2]
        assert proc.wait(30) == 0
        err = proc.stderr.read()
        assert "Shutting down" in err and "Application shutdown complete" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_missing_artifact_in_one_line(tmp_path, capsys):
    from mpt_relax.__main__ import main

    assert main(["serve", "--artifact", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1

"""Helpers of the fault suite: run a CLI, check its one-line error, hash trees before and after."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build.py"
CONVERT = REPO / "bfloat16_to_float16.py"


def env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout first on the path, one TVM thread."""
    out = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "TVM_NUM_THREADS": "1"}
    out.pop("MPT_RELAX_DEBUG", None)
    out.update(extra)
    return out


def run(args: list, *, timeout: float = 300, input: bytes | None = None, cwd: Path | None = None,
        **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` to the end; stdout/stderr as text (invalid bytes replaced)."""
    proc = subprocess.run([sys.executable, *map(os.fsencode, args)], capture_output=True, input=input, env=env(**extra_env),
                          timeout=timeout, cwd=cwd)
    proc.stdout, proc.stderr = (x.decode("utf-8", "replace") for x in (proc.stdout, proc.stderr))
    return proc


def assert_one_line(stderr: str, *words: str) -> str:
    """``stderr`` ends in exactly one ``error: ...`` line holding ``words`` and has no traceback;
    other lines (progress, the log) may come before it. Returns the error line."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip("\n").splitlines()[-1] == errors[0], stderr
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    return errors[0]


def tree_hash(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (hidden ones included); symlinks by target."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def leftovers(parent: Path, name: str) -> list[str]:
    """Staging or backup directories of output ``name`` in ``parent`` (``.NAME.tmp-*``, ``.NAME.old-*``)."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(f".{name}."))


def start(args: list, **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(**extra_env))


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, step: float = 0.002) -> None:
    """Poll ``predicate`` until true; fails if ``proc`` ends first or time runs out."""
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended (rc {proc.returncode}) first: {proc.stderr.read().decode()}")
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(step)


def signal_and_wait(proc: subprocess.Popen, sig: int, timeout: float = 120) -> tuple[int, str]:
    """Send ``sig``; (return code, stderr) once the process has ended."""
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode("utf-8", "replace")


SIGNAL_RC = {signal.SIGINT: 130, signal.SIGTERM: 143}


def build_main(capsys, *args) -> tuple[int, str]:
    """``python -m mpt_relax build ... --target llvm --quantization q0f32`` in-process; (status, stderr)."""
    from mpt_relax.__main__ import main

    rc = main(["build", *map(str, args), "--target", "llvm", "--quantization", "q0f32", "--quiet"])
    return rc, capsys.readouterr().err

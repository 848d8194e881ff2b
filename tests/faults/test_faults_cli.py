"""Every CLI: one line ``error: ...`` for any failure, no traceback unless asked for."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from faultkit import BUILD, CONVERT, assert_one_line, build_main, env, leftovers, run, tree_hash

import mpt_relax
from mpt_relax import __main__ as cli_main
from mpt_relax.tools import cli


def test_invalid_utf8_prompt(tiny_art):
    proc = run(["-m", "mpt_relax", "generate", "--artifact", tiny_art, "--prompt", b"caf\xe9 \xff"])
    assert proc.returncode == 1
    assert_one_line(proc.stderr, "prompt", "not valid UTF-8", "0xe9")


def test_invalid_utf8_on_chat_stdin(tiny_art):
    proc = run(["-m", "mpt_relax", "chat", "--artifact", tiny_art, "--max-new-tokens", "2"],
               input=b"hello\n\xc3\x28 bad\n")
    assert proc.returncode == 1
    assert_one_line(proc.stderr, "stdin line 2", "not valid UTF-8")


@pytest.mark.parametrize("args,words", [(["--runs", "0"], ("--runs", "at least 1")),
                                        (["--threads", "-4"], ("--threads", "at least 1")),
                                        (["--gen-len", "x"], ("--gen-len", "not an integer"))])
def test_bench_arguments_refused_before_work(tiny_art, args, words):
    t0 = time.perf_counter()
    proc = run(["-m", "mpt_relax", "bench", "--artifact", tiny_art, *args])
    assert proc.returncode == 2 and time.perf_counter() - t0 < 30
    assert_one_line(proc.stderr, *words, "--help")


def test_bench_api_refuses_zero_runs(tiny_art):
    from mpt_relax.tools import bench
    with pytest.raises(mpt_relax.EngineError, match="runs must be an integer >= 1"):
        bench.run(tiny_art, runs=0)


@pytest.mark.parametrize("script,args", [(BUILD, ["--no-such-flag"]), (BUILD, []), (CONVERT, []),
                                         (CONVERT, ["--model", "a", "--model-path", "b"]),
                                         ("-m", ["mpt_relax", "generate"])])
def test_usage_errors_are_one_line(script, args):
    proc = run([script, *args])
    assert proc.returncode == 2 and proc.stdout == ""
    assert_one_line(proc.stderr, "--help")


def test_corrupt_artifact_files_via_the_cli(tiny_art, tmp_path):
    for name in ("tensor-cache.json", "mpt-config.json", "tokenizer.json"):
        art = shutil.copytree(tiny_art, tmp_path / name)
        (art / name).write_text("garbage")
        before = tree_hash(art)
        proc = run(["-m", "mpt_relax", "generate", "--artifact", art, "--prompt", "hi"])
        assert proc.returncode == 1
        assert_one_line(proc.stderr, str(art / name), "rebuild")
        assert tree_hash(art) == before


def test_any_exception_is_one_line_and_verbose_shows_the_traceback(monkeypatch, capsys, tmp_path):
    def boom(args):
        raise RuntimeError("Traceback (most recent call last):\n  File x.cc, line 3\n"
                           "InternalError: Check failed: (ptr != nullptr) is false")

    monkeypatch.setattr(cli_main, "cmd_generate", boom)
    argv = ["generate", "--artifact", str(tmp_path), "--prompt", "x"]
    assert cli_main.main(argv) == 1
    err = capsys.readouterr().err
    assert_one_line(err, "InternalError: Check failed", "MPT_RELAX_DEBUG")
    assert cli_main.main(argv + ["--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("error: RuntimeError")
    monkeypatch.setenv("MPT_RELAX_DEBUG", "1")
    assert cli_main.main(argv) == 1 and "Traceback" in capsys.readouterr().err


def test_one_line_picks_the_telling_line():
    link = RuntimeError("Compilation error:\n/usr/bin/ld: final link failed: No space left on device\n"
                        "collect2: error: ld returned 1 exit status")
    assert cli.one_line(link) == "RuntimeError: /usr/bin/ld: final link failed: No space left on device"
    assert cli.one_line(KeyError("records")) == "KeyError: 'records'"
    assert cli.one_line(mpt_relax.ConfigError("a\nb")) == "a b"


FULL_DISK_LINKER = """#!/bin/sh
[ "$1" = "-dumpmachine" ] && { echo x86_64-linux-gnu; exit 0; }
out=""; while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done
[ -n "$out" ] && printf 'half a library' > "$out"
echo "/usr/bin/ld: final link failed: No space left on device"
echo "collect2: error: ld returned 1 exit status"
exit 1
"""


def test_disk_full_during_the_link(tiny_ckpt, tmp_path):
    """The linker fails as on a full disk (a stand-in linker via CXX): one line, nothing left."""
    linker = tmp_path / "bin" / "c++"
    linker.parent.mkdir()
    linker.write_text(FULL_DISK_LINKER)
    linker.chmod(0o755)
    out = tmp_path / "out" / "art"
    proc = run([BUILD, "--model", tiny_ckpt, "--output", out, "--target", "llvm", "--quantization", "q0f32", "--quiet"],
               CXX=str(linker))
    assert proc.returncode == 1
    assert_one_line(proc.stderr, "final link failed: No space left on device")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_interrupt_during_the_build_in_process(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from mpt_relax.compile import builder

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(builder.artifact, "write_config", interrupted)
    rc, err = build_main(capsys, "--model", tiny_ckpt, "--output", tmp_path / "art")
    assert rc == 130 and err == "error: interrupted; nothing was written\n"
    assert leftovers(tmp_path, "art") == [] and not (tmp_path / "art").exists()


def test_converter_cli_does_not_import_tvm(tmp_path):
    """bfloat16_to_float16.py is a torch-only job: TVM stays out of its process."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "mpt"}')
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.ones(4, 4, dtype=torch.bfloat16)}, str(src / "model.safetensors"))
    code = ("import runpy, sys\nsys.argv = ['bfloat16_to_float16.py', '--model-path', sys.argv[1], '--quiet']\n"
            "try:\n    runpy.run_path(sys.argv[0] if False else %r, run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print(sorted(m for m in sys.modules if m == 'tvm' or m.startswith('tvm.')))\n") % str(CONVERT)
    proc = subprocess.run([sys.executable, "-c", code, str(src)], capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_usage_error_line_names_the_program(capsys):
    assert cli_main.main(["bench"]) == 2
    line = assert_one_line(capsys.readouterr().err, "--artifact")
    assert line.endswith("(see python -m mpt_relax bench --help)")
    assert json.dumps(line)

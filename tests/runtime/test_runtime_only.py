"""The runtime without TVM's compiler: what a GPU box or a container runs.

A virtual environment (cached in build/runtime-only-venv) sees this machine's packages but holds
its own copy of the installed ``tvm`` package minus ``libtvm_compiler.so``; with
``TVM_USE_RUNTIME_LIB=1`` it loads an artifact built by the full install and must generate the
same tokens, load a copy whose params were re-written by ``write_params``, and never import
the compile side of mpt_relax or tvm.relax.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mpt_relax
from mpt_relax.tools.demo import write_checkpoint

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / "build" / "runtime-only-venv"
COMPILER_LIB = "libtvm_compiler.so"
PROMPT, GREEDY_TOKENS = "Once upon a time", 12
SAMPLED = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3, template="none")

CHILD = r"""
import json, shutil, sys
from pathlib import Path
from tvm import base
import mpt_relax
from mpt_relax.io import artifact

art, copy = Path(sys.argv[1]), Path(sys.argv[2])
eng = mpt_relax.Engine(art, device="cpu")
greedy = eng.generate(sys.argv[3], max_new_tokens=int(sys.argv[4]))
streamed = "".join(eng.stream(sys.argv[3], max_new_tokens=int(sys.argv[4])))
sampled = eng.generate([5, 6, 7], **json.loads(sys.argv[5]))
shutil.copytree(art, copy, ignore=shutil.ignore_patterns("params_shard_*", "tensor-cache.json"))
artifact.write_params(copy, artifact.read_params(art))
rewritten = mpt_relax.Engine(copy, device="cpu").generate([5, 6, 7], **json.loads(sys.argv[5]))
try:  # TVM skips its CUDA runtime without the compiler; the engine loads it (and says why it could not)
    mpt_relax.Engine(art, device="cuda")
    cuda_error = None
except mpt_relax.EngineError as err:
    cuda_error = str(err)
compile_side = ("mpt_relax.compile", "mpt_relax.kernels", "mpt_relax.quantization", "mpt_relax.models.mpt.model",
                "mpt_relax.models.mpt.loader", "tvm.relax")
print(json.dumps({
    "runtime_only": base._RUNTIME_ONLY,
    "tvm_file": base.__file__,
    "compiler_mapped": "libtvm_compiler" in Path("/proc/self/maps").read_text(),
    "compile_modules": sorted(m for m in sys.modules if m.startswith(compile_side)),
    "greedy": greedy.token_ids, "text": greedy.text, "streamed": streamed,
    "sampled": sampled.token_ids, "rewritten": rewritten.token_ids, "cuda_error": cuda_error,
}))
"""


def runtime_only_venv() -> Path:
    """A venv over this Python's packages whose own ``tvm`` lacks the compiler library; made
    once (about a second: no pip, one copy of the ~50 MB runtime part) and reused while the
    installed TVM is the same."""
    import tvm

    src = Path(tvm.__file__).parent
    marker = VENV / "tvm-source.json"
    stamp = {"tvm": str(src), "version": tvm.__version__, "runtime": (src / "lib" / "libtvm_runtime.so").stat().st_size}
    python = VENV / "bin" / "python"
    if python.exists() and marker.is_file() and json.loads(marker.read_text()) == stamp:
        return python
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(VENV)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    shutil.copytree(src, Path(site) / "tvm", ignore=shutil.ignore_patterns(COMPILER_LIB, "__pycache__"))
    marker.write_text(json.dumps(stamp))
    return python


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-only")
    art = mpt_relax.build(write_checkpoint(root / "demo-ckpt"), target="llvm", quantization="q0f32",
                          output=root / "art", quiet=True)
    eng = mpt_relax.Engine(art, device="cpu")
    expected = {"greedy": eng.generate(PROMPT, max_new_tokens=GREEDY_TOKENS),
                "sampled": eng.generate([5, 6, 7], **SAMPLED)}
    return root, art, expected


def test_runtime_only_generates_the_same_tokens(built):
    root, art, expected = built
    python = runtime_only_venv()
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(python), "-c", CHILD, str(art), str(root / "rewritten"), PROMPT, str(GREEDY_TOKENS),
                           json.dumps(SAMPLED)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["runtime_only"] and not got["compiler_mapped"]
    assert got["tvm_file"].startswith(str(VENV)), got["tvm_file"]
    assert not (Path(got["tvm_file"]).parent / "lib" / COMPILER_LIB).exists()
    assert got["compile_modules"] == []
    assert got["greedy"] == expected["greedy"].token_ids and got["text"] == expected["greedy"].text
    assert got["streamed"] == expected["greedy"].text
    assert got["sampled"] == expected["sampled"].token_ids
    assert got["rewritten"] == expected["sampled"].token_ids
    assert got["cuda_error"] and "cuda" in got["cuda_error"]  # no GPU here, or no cuda library in the artifact

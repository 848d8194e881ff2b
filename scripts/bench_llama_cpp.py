"""Decode and prefill speed of mpt_relax next to llama.cpp, on the same MPT weights, on the CPU.

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llama-sdist
    PYTHONPATH=. python scripts/bench_llama_cpp.py dist/models/mpt-125m-random \\
        --llama-src /tmp/llama-sdist/llama_cpp_python-*.tar.gz [--threads 1,2] [--runs 3] [--keep-gguf DIR] [--rows A,B]
    # GGUF files only, e.g. for testing a GGUF reader:
    PYTHONPATH=. python scripts/bench_llama_cpp.py CKPT --llama-src ... --keep-gguf DIR --convert-only

Not run in CI. Needs llama-cpp-python, which compiles llama.cpp (the install line that
:func:`install_hint` prints turns on only the host's instruction sets: a -march=native build,
or one with an instruction set the CPU lacks, dies of SIGILL), gguf, and llama.cpp's own
converter, taken from a llama-cpp-python source tarball (``--llama-src``; a llama.cpp source
tree works too): its convert_hf_to_gguf.py, conversion/ and gguf-py/ are copied into a
temporary directory and run from there, never from this repository.

1. The checkpoint is converted to F32 and F16 GGUFs through a temporary view of it whose config.json
   has the keys the converter reads (``architectures``, ``attn_config.clip_qkv``); the
   converter's pre-tokenizer lookup is patched in memory to answer "mpt", since a test
   tokenizer's hash is not in its table. ``llama_cpp.llama_model_quantize`` then makes Q8_0,
   Q4_0, Q4_K_M and Q5_K_M with llama.cpp's defaults: in Q4_0 the tied embedding (also the LM
   head) becomes Q6_K, or Q8_0 where its rows are not a multiple of 256; Q4_K_M / Q5_K_M are
   Q4_K / Q5_K with some layers and the head in Q6_K (from the F16 file). ``--keep-gguf DIR`` keeps
   the six files.
2. mpt_relax artifacts are built for the host CPU (``mpt_relax.build``, target llvm): from the
   checkpoint in q0f32, q0f16, q8f16_1, q4f16_1, q8f16_1 / q4f16_1 with a quantized embedding
   ("-emb"; q4 also with an 8-bit one, "-emb8"), and q8/q4 with the int8 decode and prefill kernels ("-a8-p8"; with AMX-BF16 or AVX512-BF16 also
   "-a8-amx", the bf16 prefill, and q0f16-amx), with and without "-emb" (llama.cpp's Q8_0 file is all Q8_0,
   its tied head included, so q8f16_1-emb-a8-p8 is the equal-bits row); ``--rows`` picks some;
   and from each of the GGUF files ("gguf F16" ...: ``--quantization gguf``, the file's own
   blocks; Q8_0 / Q4_0 repacked into our group layout; those and Q4_K_M / Q5_K_M also with the fastest
   int8 options: "gguf Q4_0-a8-amx"). Each is measured by :func:`mpt_relax.tools.bench.run` (a spawned child,
   ``TVM_NUM_THREADS`` = T).
3. llama.cpp (``llama_cpp.Llama``, n_threads = n_threads_batch = T, logits of the last token
   only) runs the same token-id prompt in a spawned child: a warm-up, then ``--runs`` runs of a
   prefill and greedy decoding (numpy argmax over the logits, as the Engine samples on the
   host), timed as bench.py times HF: prefill tokens/s = prompt tokens / prefill time, decode
   tokens/s = (new tokens - 1) / time from the first to the last new token.

Both sides report the median over ``--runs`` (bench.py's statistic); llama.cpp is measured again
right after each of our rows, so that a ratio compares neighbouring runs. The table pairs q0f16 with
q0f32 with F32, q0f16 with F16, every q8f16_1 row with Q8_0 and every q4f16_1 row with Q4_0; ratio = mpt_relax /
llama.cpp.
"/HF bf16" is the row's prefill over transformers' ``MptForCausalLM`` in bfloat16 on the same
checkpoint and prompt (measured once per T, as bench --compare-hf --hf-dtype bfloat16 measures it;
on a CPU with AMX that is oneDNN on the tiles). "/bound" is decode tokens/s over the bandwidth
bound of :mod:`mpt_relax.tools.bandwidth`: one copy bandwidth per T (measured once, used for both
sides) / bytes read per decode token (each side's own tensor sizes plus its KV cache). "same"
counts the leading greedy tokens both engines agree on (random weights give near-ties, so
different rounding splits them early).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpt_relax.runtime.cpu_features import host_features, normal_form  # noqa: E402

# GGML's CMake switch -> the instruction set's normal-form name (mpt_relax.runtime.cpu_features)
_GGML_FLAGS = {"AVX512": "avx512f", "AVX512_VNNI": "avx512vnni", "AVX512_BF16": "avx512bf16",
               "AVX_VNNI": "avxvnni", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c"}


def install_hint(cpu_flags: frozenset[str]) -> str:
    """The llama-cpp-python install line for a CPU with these instruction sets (normal form, as
    :func:`host_features` gives them): each GGML instruction set ON only where the CPU has it
    (AMD Zen 4 has AVX512-VNNI but not the VEX AVX-VNNI; a build with GGML_AVX_VNNI=ON dies of
    SIGILL there, as does a native build here)."""
    args = " ".join(f"-DGGML_{name}={'ON' if flag in cpu_flags else 'OFF'}" for name, flag in _GGML_FLAGS.items())
    return (f'CMAKE_ARGS="-DGGML_NATIVE=OFF {args}" CMAKE_BUILD_PARALLEL_LEVEL=2 '
            'pip install --no-cache-dir llama-cpp-python')


try:
    import llama_cpp
except ImportError:
    sys.exit("error: llama_cpp is not installed; install llama-cpp-python (it compiles llama.cpp) with: "
             + install_hint(host_features() or frozenset()))
try:
    from gguf import GGUFReader
except ImportError:
    sys.exit("error: gguf is not installed; install it with: pip install gguf")

import mpt_relax  # noqa: E402
from mpt_relax.io.artifact import read_config  # noqa: E402
from mpt_relax.models.mpt.config import MPTConfig  # noqa: E402
from mpt_relax.tools import bandwidth, bench  # noqa: E402

# the CPU kernels: int8 decode (--int8-activations) with the int8 prefill (--int8-prefill) and,
# where this CPU has AMX-BF16 or AVX512-BF16, with the bf16 prefill (--amx-prefill) instead (q0f16 too)
FEATURES = host_features() or frozenset()  # normal-form names
BF16 = {normal_form(f) for f in ("amx-bf16", "amx-tile")} <= FEATURES or normal_form("avx512bf16") in FEATURES
FAST = [{"int8_activations": True, "int8_prefill": True}] + ([{"int8_activations": True, "amx_prefill": True}] if BF16 else [])
# (mpt_relax quantization, its build options, the llama.cpp file type it is compared with)
ROWS = (("q0f32", {}, "F32"), ("q0f16", {}, "F16"), *((("q0f16", {"amx_prefill": True}, "F16"),) if BF16 else ()),
        ("q8f16_1", {}, "Q8_0"), *(("q8f16_1", f, "Q8_0") for f in FAST),
        # Q8_0 holds its tied head in Q8_0 too
        ("q8f16_1", {"quantize_embedding": True}, "Q8_0"), *(("q8f16_1", {"quantize_embedding": True, **f}, "Q8_0") for f in FAST),
        ("q4f16_1", {}, "Q4_0"), ("q4f16_1", {"quantize_embedding": True}, "Q4_0"), *(("q4f16_1", f, "Q4_0") for f in FAST),
        *(("q4f16_1", {"quantize_embedding": True, **f}, "Q4_0") for f in FAST),
        # llama.cpp's Q4_0 keeps the tied head in Q6_K: ours in 8 bits is the nearest mix with as many bits
        ("q4f16_1", {"quantize_embedding": 8}, "Q4_0"), *(("q4f16_1", {"quantize_embedding": 8, **f}, "Q4_0") for f in FAST))

# mpt_relax built from llama.cpp's own file (--quantization gguf): as it is, and for Q8_0 / Q4_0
# (repacked into our group layout) with the fastest int8 kernel options too
GGUF_ROWS = (("F16", {}), ("Q8_0", {}), ("Q4_0", {}), ("Q8_0", FAST[-1]), ("Q4_0", FAST[-1]),
             # llama.cpp's most used mixes: Q4_K / Q5_K, some layers and the head Q6_K
             ("Q4_K_M", {}), ("Q4_K_M", FAST[-1]), ("Q5_K_M", {}), ("Q5_K_M", FAST[-1]))


def gguf_label(ftype: str, options: dict) -> str:
    """gguf Q4_0-a8-amx: a row built from llama.cpp's ``ftype`` file with ``options``."""
    return f"gguf {ftype}{label('', options)}"


def label(q: str, options: dict) -> str:
    """q4f16_1-emb-a8-p8: the scheme and its options, as in artifact directory names."""
    embedding = options.get("quantize_embedding")
    return q + ("-emb" + ("" if embedding is True else str(embedding)) if embedding else "") + "".join(
        suffix for key, suffix in (("int8_activations", "-a8"), ("amx_prefill", "-amx"), ("int8_prefill", "-p8"))
        if options.get(key))


FTYPES = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
          "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M}
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
KV_BYTES = 2  # llama.cpp's default KV cache is f16
# Runs llama.cpp's converter from the copy at argv[1], its pre-tokenizer lookup answering "mpt".
CONVERT = """
import runpy, sys
root = sys.argv.pop(1)
sys.path[:0] = [root, root + "/gguf-py"]
from conversion.mpt import MPTModel
MPTModel.get_vocab_base_pre = lambda self, tokenizer: "mpt"
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def copy_converter(src: Path, dest: Path) -> Path:
    """Copy llama.cpp's converter out of a llama-cpp-python sdist (or a source tree) into ``dest``."""
    if src.is_dir():
        root = src / "vendor" / "llama.cpp" if (src / "vendor" / "llama.cpp").is_dir() else src
        for part in CONVERTER_PARTS:
            (shutil.copytree if (root / part).is_dir() else shutil.copy)(root / part, dest / part)
        return dest
    with tarfile.open(src) as tar:
        for member in tar:
            rel = member.name.partition("/vendor/llama.cpp/")[2]
            if rel.split("/")[0] in CONVERTER_PARTS and (member.isfile() or member.isdir()):
                member.name = rel
                tar.extract(member, dest, filter="data")
    return dest


def converter_view(ckpt: Path, dest: Path) -> Path:
    """``ckpt`` seen through links (under its own name, which the converter records), with a config.json
    that has what the converter reads."""
    dest.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f.resolve())
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["MPTForCausalLM"]
    config.setdefault("attn_config", {}).setdefault("clip_qkv", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def make_ggufs(ckpt: Path, llama_src: Path, out_dir: Path, tmp: Path, threads: int) -> dict[str, Path]:
    """F32, F16, Q8_0, Q4_0, Q4_K_M and Q5_K_M GGUF files of ``ckpt`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    converter = copy_converter(llama_src, tmp / "converter")
    files = {name: out_dir / f"{ckpt.name}-{name}.gguf" for name in ("F32", "F16", *FTYPES)}
    view = converter_view(ckpt, tmp / "view" / ckpt.name)
    for name in ("F32", "F16"):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CONVERT, str(converter), str(view), "--outtype", name.lower(),
                               "--outfile", str(files[name])], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"error: convert_hf_to_gguf.py --outtype {name.lower()} failed (rc {proc.returncode}):\n"
                     f"{proc.stderr[-3000:]}")
        print(f"converted to {files[name]} in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    for name, ftype in FTYPES.items():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, threads
        if llama_cpp.llama_model_quantize(str(files["F16"]).encode(), str(files[name]).encode(), ctypes.byref(params)):
            sys.exit(f"error: llama_model_quantize to {name} failed")
        print(f"quantized to {files[name]}", file=sys.stderr)
    return files


def measure_llama(gguf: str, threads: int, ids: list[int], gen_len: int, runs: int) -> dict:
    """bench.py's figures for llama.cpp on ``gguf`` (runs in a spawned child)."""
    llm = llama_cpp.Llama(gguf, n_ctx=len(ids) + gen_len, n_batch=len(ids), n_ubatch=len(ids), n_threads=threads,
                          n_threads_batch=threads, logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    def once(n: int) -> tuple[dict[str, float], list[int]]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t_prefill = time.perf_counter()
        tokens = [greedy()]
        t_first = time.perf_counter()
        for _ in range(n - 1):
            llm.eval(tokens[-1:])
            tokens.append(greedy())
        t_end = time.perf_counter()
        return {"prefill_tokens_per_s": len(ids) / (t_prefill - t0), "decode_tokens_per_s": (n - 1) / (t_end - t_first),
                "time_to_first_token_s": t_first - t0}, tokens

    once(2)
    results = [once(gen_len) for _ in range(runs)]
    return {**bench._median([r[0] for r in results]), "token_ids": results[-1][1]}


def llama_logits(gguf: str, ids: list[int]) -> dict:
    """llama.cpp's float32 logits [len(ids), vocab] at every prompt position (runs in a spawned child)."""
    llm = llama_cpp.Llama(gguf, n_ctx=len(ids), n_batch=len(ids), n_ubatch=len(ids), logits_all=True, verbose=False)
    llm.eval(ids)
    return {"logits": np.array(llm.scores[: len(ids)], dtype=np.float32)}


def logits_difference(artifact: Path, gguf: Path, ids: list[int]) -> float:
    """||ours - llama.cpp|| / ||llama.cpp|| over the logits of every prompt position, same GGUF file."""
    ours = mpt_relax.Engine(artifact, device="cpu").logits(ids)
    theirs = bench.in_child(llama_logits, 1, str(gguf), ids)["logits"]
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def llama_report(gguf: Path, config: MPTConfig, threads: int, ids: list[int], gen_len: int, runs: int) -> dict:
    """measure_llama's figures plus the bytes read per decode token, from the GGUF file's own tensor sizes."""
    out = bench.in_child(measure_llama, threads, str(gguf), threads, ids, gen_len, runs)
    tensors = [(t.name, tuple(int(d) for d in t.shape), int(t.n_bytes)) for t in GGUFReader(gguf).tensors]
    out["bytes_per_token"] = bandwidth.decode_bound(config, tensors, KV_BYTES, len(ids), gen_len, 1.0)["bytes_per_token"]
    return out


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


HEADERS = ("mpt_relax", "llama.cpp", "T", "decode: ours", "llama", "ratio", "prefill: ours", "llama", "ratio",
           "/HF bf16", "/bound: ours", "llama", "same")
WIDTHS = (24, 10, 3, 14, 8, 7, 15, 8, 7, 9, 14, 7, 6)


def line(cells) -> str:
    return "".join(f"{c:{'<' if i < 2 else '>'}{w}}" for i, (c, w) in enumerate(zip(cells, WIDTHS)))


def table_row(label: str, ftype: str | None, threads: int, bytes_per_s: float, ours: dict, theirs: dict | None,
              hf_prefill: float) -> str:
    """One line of the table, "-" in llama.cpp's cells where no file type is paired. "/HF bf16" = our prefill
    tokens/s over ``hf_prefill`` (transformers in bfloat16, the same prompt). "/bound" = bytes read per
    second while decoding / ``bytes_per_s``, one copy bandwidth for both sides."""
    def figures(f: dict) -> dict[str, float]:
        return {"decode": f["decode_tokens_per_s"], "prefill": f["prefill_tokens_per_s"],
                "bound": f["decode_tokens_per_s"] * f["bytes_per_token"] / bytes_per_s}

    a, b = figures(ours), theirs and figures(theirs)
    cells = [label, ftype or "-", str(threads)]
    for key, fmt in (("decode", ".1f"), ("prefill", ".1f"), ("bound", ".2f")):
        cells += [format(a[key], fmt), format(b[key], fmt) if b else "-"]
        if key != "bound":
            cells.append(f"{a[key] / b[key]:.2f}x" if b else "-")
        if key == "prefill":
            cells.append(f"{a[key] / hf_prefill:.2f}x")
    cells.append(str(same_prefix(ours["token_ids"], theirs["token_ids"])) if theirs else "-")
    return line(cells)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="HF MPT checkpoint directory")
    p.add_argument("--llama-src", type=Path, required=True,
                   help="llama-cpp-python source tarball (pip download --no-binary) or a llama.cpp source tree")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--keep-gguf", type=Path, metavar="DIR", help="write the GGUF files here and keep them")
    p.add_argument("--convert-only", action="store_true", help="stop after writing the GGUF files")
    p.add_argument("--rows", help="comma-separated mpt_relax rows to measure, e.g. q0f16,q8f16_1-emb-a8-p8 "
                                  "(default all; the gguf rows are named 'gguf F16' ...)")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if not (args.checkpoint / "config.json").is_file():
        p.error(f"{args.checkpoint} is not an HF checkpoint (no config.json)")
    if not args.llama_src.exists():
        p.error(f"--llama-src {args.llama_src} does not exist")
    if args.convert_only and not args.keep_gguf:
        p.error("--convert-only needs --keep-gguf DIR")
    names = [label(q, o) for q, o, _ in ROWS] + [gguf_label(f, o) for f, o in GGUF_ROWS]
    wanted = set(names) if args.rows is None else {r.strip() for r in args.rows.split(",")}
    if wanted - set(names):
        p.error(f"--rows: unknown {', '.join(sorted(wanted - set(names)))}; rows are {', '.join(names)}")
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's per-tensor log lines
    with tempfile.TemporaryDirectory(prefix="bench-llama-cpp-") as tmp:
        ggufs = make_ggufs(args.checkpoint, args.llama_src, args.keep_gguf or Path(tmp) / "gguf", Path(tmp),
                           max(threads))
        if args.convert_only:
            return 0
        rows = [(label(q, o), q, o, f) for q, o, f in ROWS if label(q, o) in wanted]
        artifacts = {name: mpt_relax.build(args.checkpoint, target="llvm", quantization=q, quiet=True, **o)
                     for name, q, o, _ in rows}
        gguf_rows = [(gguf_label(f, o), f, o) for f, o in GGUF_ROWS if gguf_label(f, o) in wanted]
        artifacts.update({name: mpt_relax.build(ggufs[f], target="llvm", quiet=True, **o,
                                                output=Path(tmp) / name.replace(" ", "-")) for name, f, o in gguf_rows})
        meta = read_config(next(iter(artifacts.values())))
        config = MPTConfig.from_dict(meta["model_config"])
        ids = bench.prompt_ids(config.vocab_size, args.prompt_len)  # the ids bench.run uses (seed 0)
        lines = [f"{args.checkpoint.name}: prompt {args.prompt_len} token ids, {args.gen_len} greedy new tokens, "
                 f"median of {args.runs} runs, CPU", line(HEADERS)]
        for t in threads:
            bytes_per_s = bench.measure_bandwidth("cpu", t)
            hf = bench.in_child(bench.measure_hf, t, str(args.checkpoint), "bfloat16", "cpu", ids, args.gen_len, args.runs)
            lines.append(f"T={t}: copy bandwidth {bytes_per_s / 1e9:.1f} GB/s; HF transformers bfloat16: prefill "
                         f"{hf['prefill_tokens_per_s']:.1f} tokens/s, decode {hf['decode_tokens_per_s']:.1f}")
            for name, ftype in [(name, f) for name, _, _, f in rows] + [(name, f) for name, f, _ in gguf_rows]:
                ours = bench.run(artifacts[name], device="cpu", prompt_len=args.prompt_len, gen_len=args.gen_len,
                                 runs=args.runs, threads=t)["mpt_relax"]
                # llama.cpp measured right after each row: on a shared machine a ratio of two runs
                # minutes apart measures the neighbours' load as much as the engines
                theirs = llama_report(ggufs[ftype], config, t, ids, args.gen_len, args.runs) if ftype else None
                lines.append(table_row(name, ftype, t, bytes_per_s, ours, theirs, hf["prefill_tokens_per_s"]))
                print(lines[-1], file=sys.stderr, flush=True)
        if gguf_rows:
            lines.append("logits at every prompt position, mpt_relax built from the GGUF file vs llama.cpp on it "
                         "(||ours - llama|| / ||llama||): " + ", ".join(
                             f"{name.removeprefix('gguf ')} {logits_difference(artifacts[name], ggufs[f], ids):.2e}"
                             for name, f, _ in gguf_rows))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

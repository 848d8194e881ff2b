"""``python -m mpt_relax``: build, convert, generate, chat, serve, bench, perplexity, demo (the default).

    python -m mpt_relax build --model mpt-7b-instruct --quantization q4f16_1   # = scripts/build.py
    python -m mpt_relax convert --model mpt-7b-instruct          # bf16 -> fp16; = bfloat16_to_float16.py
    python -m mpt_relax demo                                     # the bundled trained tiny MPT, built on first use
    python -m mpt_relax generate --artifact DIR --prompt "..."   # streams the reply
    python -m mpt_relax chat --artifact DIR                      # one user message per line; EOF ends
    python -m mpt_relax serve --artifact DIR [--port 8000]       # OpenAI-compatible HTTP server
    python -m mpt_relax bench --artifact DIR --prompt-len 128 --gen-len 128 [--compare-hf [--hf-dtype bfloat16]] [--json]
    python -m mpt_relax perplexity --artifact DIR --text FILE [--context N --stride S] [--decode] [--compare-hf] [--json]

Errors print one line ``error: ...`` on stderr and exit with status 1 (2 for a usage mistake,
130 on Ctrl-C, 143 on SIGTERM); ``--verbose`` or MPT_RELAX_DEBUG=1 also prints the traceback
(see :mod:`mpt_relax.tools.cli`). Only light modules are imported before the command runs, so a
Ctrl-C at any point of start-up is one line too.
"""

from __future__ import annotations

from mpt_relax.interrupts import StartupHold

# Run as ``python -m mpt_relax``: signals are held from here until main()'s guard (one line, never
# a traceback from the imports below). Imported as a module, nothing changes.
_HOLD = StartupHold() if __name__ == "__main__" else None

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Sequence  # noqa: E402

from mpt_relax import defaults  # noqa: E402
from mpt_relax.sizes import SizeError, parse_bytes  # noqa: E402
from mpt_relax.targets import DEVICE_NAMES, TARGET_NAMES  # noqa: E402
from mpt_relax.tools import cli  # noqa: E402  (light, standard library only: the rest is imported under cli.run)
from mpt_relax.tools.cli import int_at_least  # noqa: E402

if TYPE_CHECKING:
    from mpt_relax.runtime.generation import GenerationResult

_Parser = cli.Parser
WRITING_COMMANDS = ("build", "convert")  # an interruption says that nothing was written
DEMO_PROMPT = 'def read_config(path):\n    """'


def _sampling(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed,
            "stop": tuple(args.stop or ())}


def _summary(result: GenerationResult) -> str:
    rate = lambda x: f"{x:.1f}" if x is not None else "-"  # noqa: E731
    return (f"[{len(result.token_ids)} tokens, finish: {result.finish_reason}, prefill {rate(result.prefill_tokens_per_s)}"
            f" tokens/s, decode {rate(result.decode_tokens_per_s)} tokens/s, first token after "
            f"{result.time_to_first_token_s * 1e3:.0f} ms]")


def _print_stream(stream) -> None:
    for piece in stream:
        print(piece, end="", flush=True)
    print(flush=True)


def _engine(args: argparse.Namespace, artifact=None):
    """The Engine for ``--artifact`` / ``--device``; TVM is imported here, with Ctrl-C held back."""
    with cli.deferred_interrupts():
        from mpt_relax.runtime.engine import Engine
    return Engine(args.artifact if artifact is None else artifact, args.device)


def cmd_build(args: argparse.Namespace) -> int:
    with cli.deferred_interrupts():  # TVM's import must not see a Ctrl-C half-way
        from mpt_relax.compile.builder import build

    build(args.model, target=args.target, quantization=args.quantization, output=args.output,
          quantize_embedding=args.quantize_embedding,
          int8_activations=args.int8_activations, amx_prefill=args.amx_prefill,
          int8_prefill=args.int8_prefill, max_seq_len=args.max_seq_len, cuda_arch=args.cuda_arch,
          mcpu=args.mcpu, force=args.force, dist_root=args.dist, quiet=args.quiet)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import logging

    with cli.deferred_interrupts():
        from mpt_relax.tools.convert import convert_checkpoint  # torch only: no TVM on this path

    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    src = Path(args.models_dir or Path(args.dist) / "models") / args.model if args.model else args.model_path
    dst = args.output or src.with_name(src.name + "-float16")
    report = convert_checkpoint(src, dst, strict=args.strict, force=args.force, verify=not args.no_verify,
                                any_arch=args.any_arch, shard_size=args.shard_size,
                                progress=False if args.quiet else None)
    print(report.summary(details=not args.quiet))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    eng = _engine(args)
    stream = eng.stream(args.prompt, template=args.template, **_sampling(args))
    _print_stream(stream)
    print(_summary(stream.result), file=sys.stderr)
    return 0


def _lines(interactive: bool):
    """User messages: prompted lines on a terminal, else one per line of stdin; EOF ends.

    A line that is not valid UTF-8 ends the chat with one line naming it."""
    from mpt_relax.runtime.generation import GenerationError

    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")  # undecodable bytes reach the check below
    number = 0
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        number += 1
        if not interactive and not line:
            return
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as err:
            raise GenerationError(f"stdin line {number} is not valid UTF-8 text (byte "
                                  f"0x{ord(line[err.start]) & 0xFF:02x} at character {err.start + 1}); "
                                  "send UTF-8") from None
        if line.strip():
            yield line.rstrip("\n")


def cmd_chat(args: argparse.Namespace) -> int:
    eng = _engine(args)
    sampling = _sampling(args)
    with eng.chat_session(args.system, template=args.template, **sampling) as session:
        single = not session.template.multi_turn
        if single:
            print(f"note: the {session.template.name} template holds one instruction; each line is answered "
                  "on its own", file=sys.stderr)
        for message in _lines(sys.stdin.isatty()):
            if single:
                session.reset()
            _print_stream(session.stream(message))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from mpt_relax.serve.server import ServeOptions, run  # FastAPI / uvicorn only when serving

    return run(ServeOptions(
        artifact=args.artifact, host=args.host, port=args.port, device=args.device,
        max_batch_size=args.max_batch_size, kv_memory=args.kv_memory, max_queue=args.max_queue,
        prefill_chunk_size=args.prefill_chunk_size, api_key=args.api_key or os.environ.get("MPT_RELAX_API_KEY"),
        model_name=args.model_name, template=args.template, max_body_bytes=args.max_body_bytes,
        shutdown_timeout=args.shutdown_timeout, log_level=args.log_level,
    ))


def cmd_bench(args: argparse.Namespace) -> int:
    with cli.deferred_interrupts():
        from mpt_relax.tools import bench

    report = bench.run(args.artifact, device=args.device, prompt_len=args.prompt_len, gen_len=args.gen_len,
                       runs=args.runs, compare_hf=args.compare_hf, hf_model=args.hf_model, threads=args.threads,
                       seed=args.seed, hf_dtype=args.hf_dtype)
    print(json.dumps(report, indent=2) if args.json else bench.format_table(report))
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    with cli.deferred_interrupts():
        from mpt_relax.tools import perplexity

    report = perplexity.run(args.artifact, args.text, context=args.context, stride=args.stride,
                            compare_hf=args.compare_hf, hf_model=args.hf_model, device=args.device,
                            decode=args.decode)
    print(json.dumps(report, indent=2) if args.json else perplexity.format_report(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    with cli.deferred_interrupts():
        from mpt_relax.tools import demo
    art = demo.ensure_trained(args.dist)
    eng = _engine(args, art)
    print(f"demo: {demo.TRAINED_DESCRIPTION}, so it writes Python-like code and licence text "
          f"({art} on {eng.device}); prompt: {args.prompt!r}", file=sys.stderr)
    stream = eng.stream(args.prompt, template="none", max_new_tokens=args.max_new_tokens, seed=args.seed,
                        temperature=args.temperature, top_k=40)
    print(args.prompt, end="")
    _print_stream(stream)
    print(_summary(stream.result), file=sys.stderr)
    return 0


def _add_engine(p: argparse.ArgumentParser, artifact: bool = True) -> None:
    _add_verbose(p)
    if artifact:
        p.add_argument("--artifact", required=True, help="artifact directory, e.g. dist/mpt-7b-instruct-q4f16_1")
    p.add_argument("--device", default=defaults.DEVICE, choices=DEVICE_NAMES)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", help="print the traceback of an error (or set MPT_RELAX_DEBUG=1)")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    with cli.deferred_interrupts():
        from mpt_relax.models.mpt.templates import NAMES as TEMPLATE_NAMES
        from mpt_relax.runtime.generation import SamplingParams
    d = SamplingParams()
    p.add_argument("--template", choices=TEMPLATE_NAMES, help="prompt template (default: from the artifact's config)")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int_at_least(0), default=d.top_k, help="0 = no limit")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--seed", type=int_at_least(0))
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def _size_arg(text: str) -> int:
    try:
        size = parse_bytes(text, "shard size")
    except SizeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return size


def parser() -> argparse.ArgumentParser:
    root = _Parser(prog="python -m mpt_relax", description="Compile MPT checkpoints with TVM Relax and run them.")
    _add_verbose(root)
    sub = root.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("build", help="compile a checkpoint (or a preset's shapes) into dist/<model>-<quant>/")
    _add_verbose(p)
    p.add_argument("--model", required=True,
                   help="preset name (looked up under DIST/models/), checkpoint directory or .gguf file")
    p.add_argument("--target", nargs="+", default=[defaults.TARGET], choices=TARGET_NAMES, help="one library each")
    p.add_argument("--quantization",
                   help=f"q0f32, q0f16, q4f16_1 or q8f16_1 (default {defaults.QUANTIZATION}); gguf for a .gguf "
                   "model (its default): every weight kept in the file's own type")
    p.add_argument("--quantize-embedding", nargs="?", const=True, default=False, type=int, choices=[4, 8], metavar="BITS",
                   help="q4f16_1/q8f16_1: quantize the token embedding (the tied LM head) too, in the scheme's bits "
                        "or in BITS (8: q8f16_1 codes under q4f16_1, as llama.cpp keeps the head in more bits) "
                        "(default: kept fp16)")
    p.add_argument("--int8-activations", action="store_true",
                   help="q4f16_1/q8f16_1/gguf (its Q4_0/Q8_0/Q4_K/Q5_K/Q6_K weights), CPU: decode on activations "
                        "quantized to int8 per group of 32 (VNNI integer dot products; changes logits slightly, see "
                        "README; default: exact)")
    p.add_argument("--amx-prefill", action="store_true",
                   help="q0f16/q0f32/q4f16_1/q8f16_1/gguf (its Q4_0/Q8_0/Q4_K/Q5_K/Q6_K weights), CPU with AMX-BF16 "
                        "or AVX512-BF16: prefill matmuls in bf16 products, on the AMX tiles or with vdpbf16ps (exact on "
                        "other targets; default: exact, on the AMX tiles too for fp16 models)")
    p.add_argument("--int8-prefill", action="store_true",
                   help="q4f16_1/q8f16_1, CPU: prefill matmuls on activations quantized to int8 per group of 32 "
                        "(VNNI integer dot products, like --int8-activations for decode; default: exact)")
    p.add_argument("--max-seq-len", type=int_at_least(1), help="context window to build for (ALiBi extrapolates)")
    p.add_argument("--cuda-arch", help="e.g. sm_90 (default: the local GPU's, else sm_80)")
    p.add_argument("--mcpu", help="CPU to compile CPU code for: native (default, this machine) or an LLVM name "
                   "such as x86-64-v3 to run the artifact on other machines")
    p.add_argument("--output", help="artifact directory (default DIST/<model>-<quantization>); only an earlier "
                   "artifact (or an empty directory) there is ever replaced")
    p.add_argument("--dist", default=defaults.DIST, help="dist root (default ./dist)")
    p.add_argument("--force", action="store_true", help="rebuild even if the artifact is up to date")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=cmd_build)

    p = sub.add_parser("convert", help="bf16 -> fp16 checkpoint, streaming and verified")
    _add_verbose(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint name under DIST/models (or --models-dir)")
    source.add_argument("--model-path", type=Path, help="any checkpoint directory")
    p.add_argument("--output", type=Path, help="destination directory (default: <source>-float16 beside it)")
    p.add_argument("--dist", default=defaults.DIST, help="dist root whose models/ --model names (default ./dist)")
    p.add_argument("--models-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--strict", action="store_true", help="fail instead of clamping values beyond +-65504")
    p.add_argument("--force", action="store_true", help="replace an existing destination (a checkpoint directory only)")
    p.add_argument("--no-verify", action="store_true", help="skip re-reading and checking the output")
    p.add_argument("--any-arch", action="store_true", help="convert checkpoints whose model_type is not mpt")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no per-tensor/file details")
    p.add_argument("--shard-size", type=_size_arg, default="2GiB", help="output shard bound (default 2GiB)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("generate", help="stream a reply to one prompt")
    _add_engine(p)
    p.add_argument("--prompt", required=True)
    _add_sampling(p)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat on stdin (one message per line)")
    _add_engine(p)
    p.add_argument("--system", help="system message (chatml)")
    _add_sampling(p)
    p.set_defaults(run=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat) with continuous batching")
    _add_engine(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=8, help="most requests decoded together")
    p.add_argument("--kv-memory", help="KV-cache size, e.g. 2GB (default: max-batch-size full context windows)")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting; beyond it: 429")
    p.add_argument("--prefill-chunk-size", type=int, help="most prompt tokens prefilled per step")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (also: $MPT_RELAX_API_KEY)")
    p.add_argument("--model-name", help="the model id clients send (default: the artifact directory's name)")
    with cli.deferred_interrupts():
        from mpt_relax.models.mpt.templates import NAMES as TEMPLATE_NAMES
    p.add_argument("--template", choices=TEMPLATE_NAMES, help="chat template (default: from the artifact's config)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 2**20, help="largest request body accepted")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests get to finish on SIGINT/SIGTERM before they are cancelled")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("bench", help="prefill/decode speed, time to first token, peak RSS")
    _add_engine(p)
    p.add_argument("--prompt-len", type=int_at_least(1), default=128)
    p.add_argument("--gen-len", type=int_at_least(2), default=128)
    p.add_argument("--runs", type=int_at_least(1), default=3, help="measured runs after one warm-up; medians are shown")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers' MptForCausalLM on the same weights")
    p.add_argument("--hf-model", help="HF checkpoint for --compare-hf (default: the artifact's recorded source)")
    p.add_argument("--hf-dtype", choices=["float32", "float16", "bfloat16"],
                   help="HF's dtype for --compare-hf (default: float32 on the CPU, the artifact's dtype elsewhere)")
    p.add_argument("--threads", type=int_at_least(1), help="CPU threads for both runtimes (TVM_NUM_THREADS, torch)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the random prompt")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file (optionally HF's too)")
    _add_engine(p)
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--context", type=int, help="tokens per window (default: the artifact's context window)")
    p.add_argument("--stride", type=int, help="tokens between window starts, 1..context (default: context / 2)")
    p.add_argument("--compare-hf", action="store_true", help="also score with transformers' MptForCausalLM (fp32, CPU)")
    p.add_argument("--hf-model", help="HF checkpoint for --compare-hf (default: the artifact's recorded source)")
    p.add_argument("--decode", action="store_true",
                   help="score each token from a one-token decode step after prefilling the history "
                        "(measures the decode kernels, e.g. --int8-activations; default: one prefill per window)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_perplexity)

    p = sub.add_parser("demo", help="build the bundled trained tiny MPT (once) and generate from it")
    _add_engine(p, artifact=False)
    p.add_argument("--dist", default="dist", help="where the artifact dist/tiny-mpt-q0f32 goes")
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.set_defaults(run=cmd_demo)
    return root


def main(argv: Sequence[str] | None = None, *, hold: StartupHold | None = None) -> int:
    """The command line; every failure is one line on stderr (see the module docstring).

    ``hold``: the entry point's :class:`~mpt_relax.interrupts.StartupHold` (``python -m`` makes one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    writes = bool(argv) and argv[0] in WRITING_COMMANDS
    return cli.run(lambda: _main(argv), argv, interrupted="nothing was written" if writes else "",
                   hold=hold if hold is not None else _HOLD)


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        args = parser().parse_args(["demo", *(["--verbose"] if args.verbose else [])])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

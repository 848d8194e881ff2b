"""``python -m mpt_relax``: generate, chat, bench, perplexity, demo (the default).

    python -m mpt_relax demo                                     # tiny random model, built on first use
    python -m mpt_relax generate --artifact DIR --prompt "..."   # streams the reply
    python -m mpt_relax chat --artifact DIR                      # one user message per line; EOF ends
    python -m mpt_relax bench --artifact DIR --prompt-len 128 --gen-len 128 [--compare-hf] [--json]
    python -m mpt_relax perplexity --artifact DIR --text FILE [--context N --stride S] [--compare-hf] [--json]

Errors print one line ``error: ...`` on stderr and exit with status 1 (130 on Ctrl-C); set
MPT_RELAX_DEBUG=1 to get the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from mpt_relax.tools import bench
from mpt_relax.tools import demo
from mpt_relax.runtime.engine import Engine
from mpt_relax.runtime.generation import GenerationResult, SamplingParams
from mpt_relax.models.mpt.templates import NAMES as TEMPLATE_NAMES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


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


def cmd_generate(args: argparse.Namespace) -> int:
    eng = Engine(args.artifact, args.device)
    stream = eng.stream(args.prompt, template=args.template, **_sampling(args))
    _print_stream(stream)
    print(_summary(stream.result), file=sys.stderr)
    return 0


def _lines(interactive: bool):
    """User messages: prompted lines on a terminal, else one per line of stdin; EOF ends."""
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def cmd_chat(args: argparse.Namespace) -> int:
    eng = Engine(args.artifact, args.device)
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


def cmd_bench(args: argparse.Namespace) -> int:
    report = bench.run(args.artifact, device=args.device, prompt_len=args.prompt_len, gen_len=args.gen_len,
                       runs=args.runs, compare_hf=args.compare_hf, hf_model=args.hf_model, threads=args.threads,
                       seed=args.seed)
    print(json.dumps(report, indent=2) if args.json else bench.format_table(report))
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from mpt_relax.tools import perplexity

    report = perplexity.run(args.artifact, args.text, context=args.context, stride=args.stride,
                            compare_hf=args.compare_hf, hf_model=args.hf_model, device=args.device)
    print(json.dumps(report, indent=2) if args.json else perplexity.format_report(report))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    art = demo.ensure_demo(args.dist)
    eng = Engine(art, args.device)
    print(f"demo model (random weights) from {art} on {eng.device}; prompt: {args.prompt!r}", file=sys.stderr)
    stream = eng.stream(args.prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, temperature=0.8, top_k=40)
    print(args.prompt, end="")
    _print_stream(stream)
    print(_summary(stream.result), file=sys.stderr)
    return 0


def _add_engine(p: argparse.ArgumentParser, artifact: bool = True) -> None:
    if artifact:
        p.add_argument("--artifact", required=True, help="artifact directory, e.g. dist/mpt-7b-instruct-q4f16_1")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "metal", "vulkan"])


def _add_sampling(p: argparse.ArgumentParser) -> None:
    d = SamplingParams()
    p.add_argument("--template", choices=TEMPLATE_NAMES, help="prompt template (default: from the artifact's config)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=d.top_k, help="0 = no limit")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def parser() -> argparse.ArgumentParser:
    root = _Parser(prog="python -m mpt_relax", description="Run MPT artifacts built by mpt_relax.")
    sub = root.add_subparsers(dest="command", parser_class=_Parser)

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

    p = sub.add_parser("bench", help="prefill/decode speed, time to first token, peak RSS")
    _add_engine(p)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="measured runs after one warm-up; medians are shown")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers' MptForCausalLM on the same weights")
    p.add_argument("--hf-model", help="HF checkpoint for --compare-hf (default: the artifact's recorded source)")
    p.add_argument("--threads", type=int, help="CPU threads for both runtimes (TVM_NUM_THREADS, torch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_bench)

    p = sub.add_parser("perplexity", help="sliding-window perplexity of a text file (optionally HF's too)")
    _add_engine(p)
    p.add_argument("--text", required=True, help="UTF-8 text file to score")
    p.add_argument("--context", type=int, help="tokens per window (default: the artifact's context window)")
    p.add_argument("--stride", type=int, help="tokens between window starts, 1..context (default: context / 2)")
    p.add_argument("--compare-hf", action="store_true", help="also score with transformers' MptForCausalLM (fp32, CPU)")
    p.add_argument("--hf-model", help="HF checkpoint for --compare-hf (default: the artifact's recorded source)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=cmd_perplexity)

    p = sub.add_parser("demo", help="build a tiny random-weight model (once) and generate from it")
    _add_engine(p, artifact=False)
    p.add_argument("--dist", default="dist", help="where dist/models/demo and dist/demo-q0f32 go")
    p.add_argument("--prompt", default="Once upon a time")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=cmd_demo)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command is None:
        args = parser().parse_args(["demo"])
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's contract: one line, no traceback
        if os.environ.get("MPT_RELAX_DEBUG"):
            raise
        lines = [line for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        print(f"error: {lines[-1] if lines[0].startswith('Traceback') else lines[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

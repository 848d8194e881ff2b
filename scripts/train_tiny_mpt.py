"""Train the small MPT that ships in ``mpt_relax/data/tiny-mpt`` (the demo model, and realistic
weights for quantization and perplexity checks).

The corpus is text found on any Debian + CPython machine, chosen deterministically:

- every top-level ``*.py`` module of the running interpreter's standard library (sorted by name;
  machine-specific ``_sysconfigdata*`` and the ROT13 ``this.py`` left out),
- every regular file in ``/usr/share/common-licenses`` (symlinks skipped: they duplicate files).

Every 20th module of the sorted list (index % 20 == 5) is held out for evaluation; the rest and
all licence texts are the training split. The tokenizer is a byte-level BPE trained with
``tokenizers`` on the training split only, in the GPT-NeoX layout (``<|endoftext|>`` = 0,
``<|padding|>`` = 1). The model is Hugging Face's ``MptForCausalLM`` with the mpt-7b design
(ALiBi, tied LM head, no biases) scaled down. Training is seeded (data order, initialisation)
and runs a fixed number of steps on a fixed number of threads, so a rerun with the same Python,
torch and tokenizers versions on the same kind of CPU gives the same weights.

    nice -n 10 python scripts/train_tiny_mpt.py                     # -> mpt_relax/data/tiny-mpt
    python scripts/train_tiny_mpt.py --write-heldout dist/heldout.txt   # only write the held-out text

The output directory is written to a temporary sibling first and renamed into place at the end.
It holds ``config.json``, ``model.safetensors`` (fp16), ``tokenizer.json``,
``tokenizer_config.json``, ``training.json`` (settings, corpus manifest with sha256 of every
file, held-out perplexity) and ``train_log.txt`` (the printed progress).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizer training: one thread, as the rest
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

LICENSE_DIR = Path("/usr/share/common-licenses")
SKIP_MODULES = ("this.py",)  # ROT13 text
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")
HELDOUT_EVERY, HELDOUT_AT = 20, 5
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "mpt_relax" / "data" / "tiny-mpt"


# --------------------------------------------------------------------------- corpus

def corpus_files(stdlib: Path | None = None, licenses: Path = LICENSE_DIR) -> dict[str, list[Path]]:
    """``{"train": [...], "heldout": [...]}``: the corpus files in a fixed order."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    modules = sorted(p for p in stdlib.glob("*.py")
                     if p.is_file() and not p.name.startswith("_sysconfigdata") and p.name not in SKIP_MODULES)
    if not modules:
        raise SystemExit(f"error: no Python modules found in {stdlib}")
    heldout = [p for i, p in enumerate(modules) if i % HELDOUT_EVERY == HELDOUT_AT]
    train = [p for i, p in enumerate(modules) if i % HELDOUT_EVERY != HELDOUT_AT]
    if licenses.is_dir():
        train += sorted(p for p in licenses.iterdir() if p.is_file() and not p.is_symlink())
    return {"train": train, "heldout": heldout}


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def heldout_text(stdlib: Path | None = None) -> str:
    """The held-out split as one text (files joined by a blank line), for perplexity runs."""
    return "\n\n".join(read_text(p) for p in corpus_files(stdlib)["heldout"])


def manifest(files: dict[str, list[Path]]) -> dict:
    out = {}
    for split, paths in files.items():
        out[split] = [{"path": str(p), "bytes": p.stat().st_size,
                       "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in paths]
    return out


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, (name, tok.token_to_id(name))
    return tok


def tokenizer_config(max_length: int) -> dict:
    eot, pad = SPECIAL_TOKENS
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
            "unk_token": eot, "pad_token": pad, "model_max_length": max_length, "add_prefix_space": False}


# --------------------------------------------------------------------------- model

def mpt_config(args):
    from transformers import MptConfig

    return MptConfig(
        d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, expansion_ratio=4,
        max_seq_len=args.context, vocab_size=args.vocab, no_bias=True, learned_pos_emb=False, layer_norm_epsilon=1e-5,
        attn_config={"alibi": True, "alibi_bias_max": 8, "attn_type": "multihead_attention"},
        resid_pdrop=0.0, emb_pdrop=0.0, initializer_range=0.02, use_cache=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=True,
    )


def sliding_nll(model, ids, context: int, stride: int) -> tuple[float, int]:
    """Summed negative log-likelihood and scored-token count over ``ids`` with windows of
    ``context`` tokens advanced by ``stride``; each window scores only the tokens the previous
    window did not (the first window scores all but its first token)."""
    import torch

    windows, prev_end = [], 0
    for start in range(0, len(ids), stride):
        end = min(start + context, len(ids))
        windows.append((start, end, end - prev_end))  # score the last (end - prev_end) tokens
        prev_end = end
        if end == len(ids):
            break
    total, count = 0.0, 0
    with torch.no_grad():
        for start, end, new in windows:
            x = torch.tensor(ids[start:end]).unsqueeze(0)
            logits = model(input_ids=x).logits[0].float()
            logp = torch.log_softmax(logits[:-1], dim=-1)
            target = x[0, 1:]
            nll = -logp.gather(1, target[:, None])[:, 0]
            scored = min(new, end - start - 1)
            total += float(nll[-scored:].sum()) if scored > 0 else 0.0
            count += max(scored, 0)
    return total, count


# --------------------------------------------------------------------------- training

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--short-steps", type=int, default=200,
                    help="the first steps train on half-length sequences (same tokens per step, cheaper attention)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the committed model: 2)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-stride", type=int, default=256)
    ap.add_argument("--write-heldout", type=Path, help="only write the held-out text to this file and exit")
    return ap


def recorded_settings(args: argparse.Namespace) -> dict:
    """The settings that determine the model, as training.json records them."""
    return {k: v for k, v in vars(args).items() if k not in ("output", "write_heldout")}


def main(argv=None) -> int:
    args = parser().parse_args(argv)

    if args.write_heldout:
        args.write_heldout.parent.mkdir(parents=True, exist_ok=True)
        args.write_heldout.write_text(heldout_text(), encoding="utf-8")
        print(f"wrote {args.write_heldout} ({args.write_heldout.stat().st_size} bytes)")
        return 0

    import torch
    from safetensors.torch import save_file
    from transformers import MptForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    log_lines: list[str] = []
    t_start = time.time()

    def log(msg: str) -> None:
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        log_lines.append(line)

    files = corpus_files()
    train_texts = [read_text(p) for p in files["train"]]
    held_text = heldout_text()
    log(f"python {sys.version.split()[0]}, stdlib {sysconfig.get_paths()['stdlib']}; torch {torch.__version__}")
    log(f"corpus: {len(files['train'])} training files ({sum(map(len, train_texts))} chars), "
        f"{len(files['heldout'])} held-out files ({len(held_text)} chars)")

    tok = train_tokenizer(train_texts, args.vocab)
    eot = tok.token_to_id(SPECIAL_TOKENS[0])
    train_ids: list[int] = []
    for text in train_texts:
        train_ids += tok.encode(text).ids + [eot]
    held_ids = tok.encode(held_text).ids
    log(f"tokenizer: {tok.get_vocab_size()} ids; {len(train_ids)} training tokens "
        f"({sum(map(len, train_texts)) / len(train_ids):.2f} chars/token), {len(held_ids)} held-out tokens")

    # fixed, non-overlapping training sequences of context+1 tokens (inputs + shifted labels)
    n = args.context
    data = torch.tensor(train_ids, dtype=torch.long)
    n_seq = (len(data) - 1) // n
    seqs = torch.stack([data[i * n:i * n + n + 1] for i in range(n_seq)])
    gen = torch.Generator().manual_seed(args.seed)

    model = MptForCausalLM(mpt_config(args))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: d_model {args.d_model}, {args.n_layers} layers, {args.n_heads} heads, vocab {args.vocab}, "
        f"context {n}: {n_params} parameters (tied head); {n_seq} training sequences; "
        f"{args.steps} steps x {args.batch} x {n} = {args.steps * args.batch * n} tokens "
        f"({args.steps * args.batch / n_seq:.2f} epochs); the first {args.short_steps} steps on {n // 2}-token halves")
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    eval_ids = held_ids[: 8 * n]  # quick check during training; the full split at the end
    order = torch.randperm(n_seq, generator=gen)
    pos, history = 0, []
    t_train = time.time()
    for step in range(args.steps):
        if pos + args.batch > n_seq:
            order, pos = torch.randperm(n_seq, generator=gen), 0
        batch = seqs[order[pos:pos + args.batch]]
        pos += args.batch
        if step < args.short_steps:  # sequence-length warm-up: each window as two halves
            half = n // 2
            batch = torch.cat([batch[:, :half + 1], batch[:, half:]])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        logits = model(input_ids=batch[:, :-1]).logits
        loss_t = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        loss = loss_t.item()
        history.append(loss)
        if step % 10 == 0 or step == args.steps - 1:
            elapsed = time.time() - t_train
            rate = (step + 1) * args.batch * n / elapsed
            eta = (args.steps - step - 1) * args.batch * n / rate
            log(f"step {step:4d}/{args.steps} loss {loss:.4f} lr {lr_at(step):.2e} grad-norm {gnorm:.2f} "
                f"{rate:.0f} tokens/s, eta {eta / 60:.1f} min")
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            model.eval()
            nll, cnt = sliding_nll(model, eval_ids, n, args.eval_stride)
            model.train()
            log(f"step {step + 1}: held-out sample ({cnt} tokens) perplexity {math.exp(nll / cnt):.3f}")
    train_s = time.time() - t_train

    model.eval()
    log(f"training done in {train_s / 60:.1f} min; evaluating the full held-out split")
    nll32, cnt = sliding_nll(model, held_ids, n, args.eval_stride)
    model.half()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    model.float()  # the fp16-rounded weights, back in fp32, as the artifact converter reads them
    nll16, _ = sliding_nll(model, held_ids, n, args.eval_stride)
    ppl32, ppl16 = math.exp(nll32 / cnt), math.exp(nll16 / cnt)
    log(f"held-out perplexity (context {n}, stride {args.eval_stride}, {cnt} tokens): "
        f"fp32 weights {ppl32:.4f}, saved fp16 weights {ppl16:.4f}")

    out_dir: Path = args.output.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        cfg = mpt_config(args)
        cfg.architectures = ["MptForCausalLM"]
        cfg.dtype = "float16"
        cfg.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(n), indent=2) + "\n")
        record = {
            "description": "tiny MPT trained by scripts/train_tiny_mpt.py on Python standard-library "
                           "modules and /usr/share/common-licenses",
            "settings": recorded_settings(args),
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__,
                         "tokenizers": __import__("tokenizers").__version__},
            "parameters": n_params,
            "train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
            "train_seconds": round(train_s, 1),
            "final_train_loss_mean_last_20": round(sum(history[-20:]) / len(history[-20:]), 4),
            "heldout": {"context": n, "stride": args.eval_stride, "scored_tokens": cnt,
                        "perplexity_fp32": round(ppl32, 4), "perplexity_fp16": round(ppl16, 4)},
            "corpus": manifest(files),
        }
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        log(f"writing {out_dir}")
        (tmp / "train_log.txt").write_text("\n".join(log_lines) + "\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"wrote {out_dir} ({size / 1e6:.1f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

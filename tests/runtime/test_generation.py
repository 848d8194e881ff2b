"""Text generation: HF-exact greedy decoding, batches, sampling, stops, streaming, chat, CLI.

One tiny HF checkpoint (d_model 64, 2 layers, vocab 320) with a byte-level BPE tokenizer
trained on text with accents, CJK and emoji is built once for the module. Generation logic
that needs exact control of the tokens (eos, special stop tokens, characters split across
tokens) runs on a scripted stand-in that honours the engine's sequence contract.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mpt_relax
from factory import hf_checkpoint
from mpt_relax.tools import bench
from mpt_relax.tools.demo import train_tokenizer, write_tokenizer
from mpt_relax.runtime import threads
from mpt_relax.runtime.generation import GenerationError
from mpt_relax.runtime.sampling import apply_repetition_penalty, sample
from mpt_relax.models.mpt.templates import get_template

REPO = Path(__file__).resolve().parents[2]
VOCAB = 320
WINDOW = 256  # the ChatML default system prompt alone is ~100 tokens of this small vocabulary
CORPUS = [
    "Once upon a time there was a café in Genève where crème brûlée cost déjà trop. ",
    "日本の東京で、日本語を話す人に会いました。日本はきれいです。 ",
    "Rockets 🚀 fly, the world 🌍 turns, cake 🍰 is sweet, thumbs 👍 go up. ",
    "The quick brown fox jumps over the lazy dog; one two three four five six seven eight. ",
] * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model fp32, Engine on the CPU, artifact dir, checkpoint dir)."""
    ckpt = tmp_path_factory.mktemp("gen-ckpt")
    model = hf_checkpoint(ckpt, seed=3, vocab_size=VOCAB, max_seq_len=WINDOW)
    write_tokenizer(train_tokenizer(CORPUS, VOCAB), ckpt, max_length=WINDOW)
    art = mpt_relax.build(ckpt, target="llvm", output=tmp_path_factory.mktemp("gen") / "art", quantization="q0f32", quiet=True)
    return model, mpt_relax.Engine(art, device="cpu"), art, ckpt


@pytest.fixture
def eng(tiny):
    return tiny[1]


def hf_generate(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=0, pad_token_id=0)
    return out[0, len(ids):].tolist()


class Spy:
    """Records the engine's sequence calls (forward batches, adds, removes) on one instance."""

    def __init__(self, engine, monkeypatch):
        self.batches, self.added, self.removed = [], [], []
        forward, add, remove = engine.forward, engine.add_sequence, engine.remove_sequence

        def spy_forward(seq_ids, tokens):
            self.batches.append([list(t) for t in tokens])
            return forward(seq_ids, tokens)

        def spy_add():
            self.added.append(add())
            return self.added[-1]

        def spy_remove(seq_id):
            self.removed.append(seq_id)
            remove(seq_id)

        monkeypatch.setattr(engine, "forward", spy_forward)
        monkeypatch.setattr(engine, "add_sequence", spy_add)
        monkeypatch.setattr(engine, "remove_sequence", spy_remove)


# ----------------------------------------------------------------------------- the real tiny model
def test_greedy_32_tokens_match_hf_generate(tiny):
    model, eng, _, _ = tiny
    prompt = "Once upon a time in 日本"
    result = eng.generate(prompt, max_new_tokens=32)
    ids = eng.tokenizer.encode(prompt).ids
    assert result.finish_reason == "length" and len(result.token_ids) == 32
    assert len(set(result.token_ids)) > 4, "degenerate random model: greedy output should vary"
    assert result.token_ids == hf_generate(model, ids, 32)
    assert result.text == eng.tokenizer.decode(result.token_ids)
    assert result.prompt_tokens == len(ids)
    assert result.prefill_tokens_per_s > 0 and result.decode_tokens_per_s > 0
    assert 0 < result.prefill_s <= result.time_to_first_token_s


def test_batch_gives_each_prompt_its_single_run_tokens(eng, monkeypatch):
    prompts = ["Once upon a time", "日本", [5, 17, 99, 3, 42, 7, 8, 250, 11, 12, 13], "Rockets 🚀 fly, the"]
    singles = [eng.generate(p, max_new_tokens=12) for p in prompts]
    # a stop string from the first reply's early text ends that sequence while the others go on
    stop = singles[0].text[len(eng.tokenizer.decode(singles[0].token_ids[:3])):][:2]
    singles = [eng.generate(p, max_new_tokens=12, stop=stop) for p in prompts]
    spy = Spy(eng, monkeypatch)
    batch = eng.generate(prompts, max_new_tokens=12, stop=stop)
    assert [r.token_ids for r in batch] == [r.token_ids for r in singles]
    assert [r.text for r in batch] == [r.text for r in singles]
    assert [r.finish_reason for r in batch] == [r.finish_reason for r in singles]
    assert len({len(r.token_ids) for r in batch}) > 1, "sequences should finish at different steps"
    sizes = [len(b) for b in spy.batches]
    assert sizes[0] == len(prompts) and sizes == sorted(sizes, reverse=True) and sizes[-1] < len(prompts)
    assert sorted(spy.removed) == sorted(spy.added)  # every sequence freed


def test_seeded_sampling_is_reproducible(eng):
    kw = dict(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=50)
    a = eng.generate("The quick brown", seed=7, **kw)
    b = eng.generate("The quick brown", seed=7, **kw)
    c = eng.generate("The quick brown", seed=8, **kw)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids
    params = mpt_relax.SamplingParams(seed=8, **kw)  # the same request as a SamplingParams; keywords override it
    assert eng.generate("The quick brown", sampling=params).token_ids == c.token_ids
    assert eng.generate("The quick brown", sampling=params, seed=7).token_ids == a.token_ids
    greedy = eng.generate("The quick brown", max_new_tokens=24)
    assert a.token_ids != greedy.token_ids
    assert eng.generate("The quick brown", max_new_tokens=24, temperature=1.5, top_k=1, seed=3).token_ids == \
        greedy.token_ids
    penalized = eng.generate("The quick brown", max_new_tokens=24, repetition_penalty=1.3)
    assert penalized.token_ids != greedy.token_ids and len(penalized.token_ids) == 24


def test_batch_sampling_matches_single_runs_with_the_same_seed(eng):
    kw = dict(max_new_tokens=10, temperature=0.9, seed=11)
    batch = eng.generate(["Once", "one two three four"], **kw)
    assert [r.token_ids for r in batch] == [eng.generate(p, **kw).token_ids for p in ["Once", "one two three four"]]


def test_stop_string_ends_generation(eng):
    full = eng.generate("one two three", max_new_tokens=24)
    start = len(eng.tokenizer.decode(full.token_ids[:6]))
    stop = full.text[start:start + 3]
    cut = full.text.find(stop)
    result = eng.generate("one two three", max_new_tokens=24, stop=["never-seen", stop])
    assert result.finish_reason == "stop" and result.text == full.text[:cut]
    assert result.token_ids == full.token_ids[:len(result.token_ids)] and len(result.token_ids) < 24
    assert eng.tokenizer.decode(result.token_ids).startswith(result.text + stop)
    assert full.finish_reason == "length"


def test_streamed_pieces_join_to_the_text(eng):
    stream = eng.stream("Rockets 🚀 and 日本", max_new_tokens=40, temperature=1.2, seed=5)
    pieces = list(stream)
    result = stream.result
    assert all(pieces) and "".join(pieces) == result.text == eng.tokenizer.decode(result.token_ids)
    assert len(pieces) > 5


def test_abandoned_stream_frees_its_sequence(eng, monkeypatch):
    spy = Spy(eng, monkeypatch)
    stream = eng.stream("Once upon", max_new_tokens=30)
    for _ in zip(range(3), stream):
        pass
    del stream
    assert spy.added and spy.removed == spy.added


def test_chat_session_feeds_only_the_new_turn(eng, monkeypatch):
    chatml = get_template("chatml")
    session = eng.chat_session("Be brief.", template="chatml", max_new_tokens=6)
    first = session.send("Hello there")
    assert session.messages[-1] == {"role": "assistant", "content": first.text}
    cached = session.token_ids
    rendered = chatml.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert cached == eng.tokenizer.encode(rendered).ids + first.token_ids[:-1]
    spy = Spy(eng, monkeypatch)
    second = session.send("日本?")
    fed = spy.batches[0][0]
    pending = [] if first.finish_reason == "stop" else first.token_ids[-1:]
    assert fed == pending + eng.tokenizer.encode(chatml.next_turn("日本?"), add_special_tokens=False).ids
    assert not spy.added and not spy.removed  # same sequence, kept alive
    monkeypatch.undo()
    fresh = eng.generate(cached + fed, template="chatml", max_new_tokens=6)
    assert second.token_ids == fresh.token_ids and second.text == fresh.text
    assert len(session.messages) == 5
    session.close()


def test_chat_renders_the_conversation(eng):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye"}]
    ids = eng.tokenizer.encode(get_template("chatml").render(messages)).ids
    result = eng.chat(messages, template="chatml", max_new_tokens=8)
    assert result.token_ids == eng.generate(ids, template="chatml", max_new_tokens=8).token_ids


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(seed=-3), "seed must be"),
    (dict(stop=[""]), "stop must be non-empty"),
    (dict(temperature=-1, top_k=-1), "temperature must be >= 0.*; top_k must be"),
    (dict(topp=0.5), "unknown generation option"),
])
def test_bad_parameters_fail_before_any_work(eng, monkeypatch, kwargs, match):
    spy = Spy(eng, monkeypatch)
    with pytest.raises(GenerationError, match=match):
        eng.generate("Once", **kwargs)
    assert not spy.added and not spy.batches


def test_too_long_prompt_fails_before_any_work(eng, monkeypatch):
    spy = Spy(eng, monkeypatch)
    with pytest.raises(mpt_relax.EngineError, match=f"exceed the context window of {WINDOW}"):
        eng.generate(list(range(1, 221)), max_new_tokens=40)
    with pytest.raises(mpt_relax.EngineError, match="context window"):
        eng.generate(["short", list(range(1, 251))], max_new_tokens=10)
    with pytest.raises(mpt_relax.EngineError, match="token ids must be in"):
        eng.generate([1, 2, VOCAB])
    with pytest.raises(GenerationError, match="prompt must be"):
        eng.generate([])
    with pytest.raises(GenerationError, match="one prompt"):
        eng.stream(["a", "b"])
    assert not spy.added and not spy.batches


def test_artifact_without_tokenizer_takes_token_ids(tiny, tmp_path):
    _, eng, art, _ = tiny
    bare = tmp_path / "bare"
    shutil.copytree(art, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    plain = mpt_relax.Engine(bare, device="cpu")
    ids = [5, 17, 99, 3]
    result = plain.generate(ids, max_new_tokens=8)
    assert result.text == "" and result.token_ids == eng.generate(ids, max_new_tokens=8).token_ids
    with pytest.raises(GenerationError, match="no tokenizer.json"):
        plain.generate("text")


# ----------------------------------------------------------------------------- sampling on its own
def test_sampling_filters_and_penalty():
    logits = np.array([1.0, 3.0, 2.0, -1.0, 0.5], np.float32)  # softmax: .084 .624 .229 .011 .051
    rng = np.random.default_rng(0)
    draw = lambda n, **kw: {sample(logits, rng, **{"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw})  # noqa: E731
                            for _ in range(n)}
    assert draw(300, top_k=2) == {1, 2}
    assert draw(300, top_p=0.8) == {1, 2} and draw(300, top_p=0.9) == {0, 1, 2}
    assert draw(20, top_p=0.01) == {1} and draw(20, temperature=0.0) == {1} and draw(20, top_k=1) == {1}
    assert draw(600) == {0, 1, 2, 3, 4}
    np.testing.assert_allclose(apply_repetition_penalty(logits, [1, 3, 3], 2.0), [1.0, 1.5, 2.0, -2.0, 0.5])
    assert apply_repetition_penalty(logits, [1], 1.0) is logits


# ----------------------------------------------------------------------------- scripted engine
class ScriptedEngine:
    """The engine's sequence contract with fixed output: the k-th token a sequence samples is
    ``script[k]`` (its logit is 10, all others 0), whatever the input."""

    def __init__(self, tokenizer, script: list[int], vocab: int = VOCAB, template: str | None = None):
        self.tokenizer, self.script = tokenizer, script
        self.vocab_size, self.context_window, self.path = vocab, 128, Path("scripted")
        self.config = SimpleNamespace(prompt_template=template)
        self.steps: dict[int, int] = {}

    check_tokens = mpt_relax.Engine.check_tokens
    generate = mpt_relax.Engine.generate
    stream = mpt_relax.Engine.stream

    def add_sequence(self) -> int:
        seq_id = len(self.steps)
        self.steps[seq_id] = 0
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        self.steps[seq_id] = -1

    def forward(self, seq_ids, tokens) -> np.ndarray:
        out = np.zeros((len(seq_ids), self.vocab_size), np.float32)
        for b, s in enumerate(seq_ids):
            assert self.steps[s] >= 0, "forward on a removed sequence"
            out[b, self.script[self.steps[s]]] = 10.0
            self.steps[s] += 1
        return out


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, VOCAB)


def test_stream_holds_back_split_characters(tokenizer):
    text = "café 日本 🚀🌍 déjà 👍!"
    script = tokenizer.encode(text).ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in script), "want characters split across tokens"
    stream = ScriptedEngine(tokenizer, script + [0]).stream([1, 2], max_new_tokens=40)
    pieces = list(stream)
    assert "".join(pieces) == text == stream.result.text
    assert all(p and "\ufffd" not in p for p in pieces) and len(pieces) > 3
    assert stream.result.finish_reason == "stop" and stream.result.token_ids == script + [0]


def test_eos_and_chatml_stop_tokens(tokenizer):
    body = tokenizer.encode("one two").ids
    im_end = tokenizer.token_to_id("<|im_end|>")
    eos = ScriptedEngine(tokenizer, body + [0, 5, 6]).generate([3], max_new_tokens=10)
    assert (eos.finish_reason, eos.text, eos.token_ids) == ("stop", "one two", body + [0])
    scripted = ScriptedEngine(tokenizer, body + [im_end, 5, 6])
    plain = scripted.generate([3], max_new_tokens=len(body) + 2)
    assert plain.finish_reason == "length" and plain.text == "one two" + tokenizer.decode([5])
    chat = scripted.generate([3], template="chatml", max_new_tokens=10)
    assert (chat.finish_reason, chat.text) == ("stop", "one two")
    assert scripted.generate([3], max_new_tokens=10, ignore_eos=True, stop=["<|im_end|>"]).token_ids == body + [im_end]
    no_eos = ScriptedEngine(tokenizer, body + [0] * 4).generate([3], max_new_tokens=len(body) + 3, ignore_eos=True)
    assert no_eos.finish_reason == "length" and len(no_eos.token_ids) == len(body) + 3


def test_stop_string_spanning_tokens_is_never_streamed(tokenizer):
    text = "one two three four five"
    scripted = ScriptedEngine(tokenizer, tokenizer.encode(text).ids + [0])
    stream = scripted.stream([1], max_new_tokens=30, stop=["three fo"])
    pieces = list(stream)
    assert "".join(pieces) == "one two " and stream.result.finish_reason == "stop"
    assert all(scripted.steps[s] == -1 for s in scripted.steps)  # removed once finished


# ----------------------------------------------------------------------------- CLI
def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "mpt_relax", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", env=env, timeout=300)


def test_engine_runs_on_every_physical_core(tiny):
    """In a fresh process without a user setting, a CPU Engine's kernels run on
    physical_cores() threads (TVM alone takes half the logical CPUs: 1 of 2 on a VM without SMT)."""
    env = {k: v for k, v in os.environ.items() if k not in threads.USER_VARIABLES}
    code = ("import sys, tvm, mpt_relax; e = mpt_relax.Engine(sys.argv[1], device='cpu'); "
            "e.generate([1, 2, 3], max_new_tokens=2); print(tvm.runtime.num_threads())")
    out = subprocess.run([sys.executable, "-c", code, str(tiny[2])], env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) == threads.physical_cores()


def test_cli_generate_streams_the_greedy_reply(tiny):
    _, eng, art, _ = tiny
    proc = cli("generate", "--artifact", str(art), "--prompt", "Once upon a time", "--max-new-tokens", "10",
               "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == eng.generate("Once upon a time", max_new_tokens=10).text + "\n"
    assert "10 tokens, finish: length" in proc.stderr


def test_cli_chat_reads_piped_lines(tiny):
    _, eng, art, _ = tiny
    proc = cli("chat", "--artifact", str(art), "--template", "chatml", "--max-new-tokens", "6",
               stdin="Hello there\n\n日本?\n")
    assert proc.returncode == 0, proc.stderr
    with eng.chat_session(template="chatml", max_new_tokens=6) as session:
        expected = "".join(session.send(m).text + "\n" for m in ("Hello there", "日本?"))
    assert proc.stdout == expected


def test_cli_errors_are_one_line(tiny, tmp_path):
    art = str(tiny[2])
    for args in (("generate", "--artifact", str(tmp_path / "missing"), "--prompt", "x"),
                 ("generate", "--artifact", art, "--prompt", "x", "--top-p", "2"),
                 ("generate", "--artifact", art)):
        proc = cli(*args)
        assert proc.returncode != 0 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_cli_bench_compares_with_hf(tiny):
    art = tiny[2]
    proc = cli("bench", "--artifact", str(art), "--prompt-len", "8", "--gen-len", "4", "--runs", "1", "--threads", "1",
               "--compare-hf", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for side in ("mpt_relax", "hf"):
        assert report[side]["prefill_tokens_per_s"] > 0 and report[side]["decode_tokens_per_s"] > 0
        assert report[side]["time_to_first_token_s"] > 0 and report[side]["peak_rss_mb"] > 50
    assert report["same_tokens"] is True and len(report["mpt_relax"]["token_ids"]) == 4
    # both read every fp32 weight (the head is tied) and the fp32 KV cache of 8 + 4/2 tokens
    config = tiny[1].config
    kv = 2 * config.n_layers * config.d_model * 4 * (8 + 4 / 2)
    for side in ("mpt_relax", "hf"):
        assert report[side]["bytes_per_token"] == config.num_parameters() * 4 + kv
        bound = report["copy_bandwidth_gb_s"] * 1e9 / report[side]["bytes_per_token"]
        assert report[side]["bound_tokens_per_s"] == pytest.approx(bound)
        assert report[side]["fraction_of_bound"] == pytest.approx(report[side]["decode_tokens_per_s"] / bound)
    table = bench.format_table(report)
    for row in ("decode (tokens/s)", "peak RSS (MB)", "decode bound (tokens/s)", "decode / bound", "same greedy tokens: yes"):
        assert row in table


def test_cli_bench_hf_dtype(tiny):
    """--hf-dtype bfloat16: HF runs (and is charged for reading) bf16 weights; a bad dtype is refused."""
    art = tiny[2]
    proc = cli("bench", "--artifact", str(art), "--prompt-len", "8", "--gen-len", "4", "--runs", "1", "--threads", "1",
               "--compare-hf", "--hf-dtype", "bfloat16", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    config = tiny[1].config
    assert report["hf_dtype"] == "bfloat16" and report["hf"]["decode_tokens_per_s"] > 0
    assert report["hf"]["bytes_per_token"] == config.num_parameters() * 2 + 2 * config.n_layers * config.d_model * 2 * (8 + 4 / 2)
    with pytest.raises(mpt_relax.EngineError, match="--hf-dtype must be one of"):
        bench.run(art, compare_hf=True, hf_dtype="int8")

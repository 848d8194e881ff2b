"""Text generation over the engine's sequence contract: batches, stop conditions, streaming, chat.

Works with any engine that offers ``add_sequence()``, ``remove_sequence(seq_id)``,
``forward(seq_ids, tokens) -> float32 [batch, vocab]``, ``check_tokens(ids, extra)``,
``tokenizer`` (a ``tokenizers.Tokenizer`` or None) and ``config.prompt_template``.

A call prefills all its prompts in one ``forward`` and then decodes the sequences that are
still running together, one token each per ``forward``; a sequence that finishes leaves the
batch and frees its cache at once. Sampling runs on the host in numpy (:mod:`.sampling`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from mpt_relax.runtime.sampling import apply_repetition_penalty, sample
from mpt_relax.models.mpt.templates import Message, Template, get_template
from mpt_relax.runtime.tokenizer import StreamDecoder
from mpt_relax.errors import MPTRelaxError

MPT_EOS_ID = 0  # <|endoftext|> in the GPT-NeoX tokenizer; the stop token when an artifact has no tokenizer


class GenerationError(MPTRelaxError):
    """A generation request that cannot run (bad parameters, no tokenizer for text, ...)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 (or top_k 1) is greedy; top_k 0 and top_p 1 mean no limit; repetition_penalty
    1 is off. ``stop`` strings end the reply (the text is cut before the match). Each sequence
    gets its own ``numpy.random.Generator`` seeded with ``seed`` (fresh entropy if None), so a
    prompt gives the same tokens alone or in a batch. ``ignore_eos`` disables the stop tokens
    (eos and the template's), e.g. to benchmark exactly ``max_new_tokens``.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        object.__setattr__(self, "stop", stop)
        problems = _problems(self)
        if problems:
            raise GenerationError("invalid generation parameters: " + "; ".join(problems))

    @classmethod
    def from_kwargs(cls, sampling: "SamplingParams | None" = None, **kwargs: Any) -> "SamplingParams":
        """``sampling`` (or the defaults) with the fields in ``kwargs`` replaced."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise GenerationError(f"unknown generation option(s) {', '.join(unknown)}; options are: {', '.join(names)}")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise GenerationError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        return dataclasses.replace(sampling, **kwargs) if sampling is not None else cls(**kwargs)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _problems(p: SamplingParams) -> list[str]:
    checks = [
        (_is_int(p.max_new_tokens) and p.max_new_tokens >= 1, f"max_new_tokens must be an integer >= 1 (got {p.max_new_tokens!r})"),
        (_is_real(p.temperature) and p.temperature >= 0, f"temperature must be >= 0, 0 = greedy (got {p.temperature!r})"),
        (_is_int(p.top_k) and p.top_k >= 0, f"top_k must be an integer >= 0, 0 = no limit (got {p.top_k!r})"),
        (_is_real(p.top_p) and 0 < p.top_p <= 1, f"top_p must be in (0, 1] (got {p.top_p!r})"),
        (_is_real(p.repetition_penalty) and p.repetition_penalty > 0,
         f"repetition_penalty must be > 0, 1 = off (got {p.repetition_penalty!r})"),
        (p.seed is None or (_is_int(p.seed) and p.seed >= 0), f"seed must be None or an integer >= 0 (got {p.seed!r})"),
        (all(isinstance(s, str) and s for s in p.stop), f"stop must be non-empty strings (got {p.stop!r})"),
    ]
    return [message for ok, message in checks if not ok]


@dataclasses.dataclass
class GenerationResult:
    """One finished reply.

    ``token_ids`` are the new tokens only, including the stop token that ended the reply, if
    any; ``text`` is their decoding without stop tokens, cut before a stop string ("" when the
    artifact has no tokenizer). ``finish_reason``: "stop" (stop token or string) or "length"
    (``max_new_tokens`` reached). Times are wall-clock seconds from the start of generation
    (after tokenization and checks): ``prefill_s`` is the prefill ``forward`` (shared by a
    batch), ``time_to_first_token_s`` runs to the first sampled token, ``decode_s`` from there
    to the last token. ``prompt_tokens`` counts the tokens prefilled (a chat turn: the new ones).
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    prefill_s: float
    time_to_first_token_s: float
    decode_s: float

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per second of decoding; None for a single-token reply."""
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None


class _TextStream:
    """The new tokens' text, cut at the first stop string. A piece is released only once it can
    no longer be the beginning of a stop string. Without a tokenizer the text stays ""."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
        self.stops = tuple(stops)
        self.text = ""
        self.shown = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.decoder is not None:
            self.text += self.decoder.push(token_id)
        return self._release(final=False)

    def close(self) -> str:
        if self.decoder is not None:
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # A stop string cannot start before ``shown``: text that might begin one is held back.
        hits = [i for i in (self.text.find(s, self.shown) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        piece, self.shown = self.text[self.shown:end], end
        return piece

    def _held(self) -> int:
        """Length of the longest tail of the unshown text that is a proper prefix of a stop string."""
        tail = self.text[self.shown:]
        for k in range(min(len(tail), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-k:]) for s in self.stops):
                return k
        return 0


class _Sequence:
    """One reply in progress: the tokens fed to its engine sequence, sampling state, stops."""

    def __init__(self, feed: list[int], history: list[int], params: SamplingParams, stop_ids: frozenset[int],
                 tokenizer, text_stops: Sequence[str], seq_id: int | None = None):
        self.seq_id = seq_id  # None until the run adds it to the engine
        self.feed = feed
        self.history = list(history)  # every token of the sequence, for the repetition penalty
        self.params = params
        self.stop_ids = stop_ids
        self.rng = np.random.default_rng(params.seed)
        self.text = _TextStream(tokenizer, text_stops)
        self.token_ids: list[int] = []
        self.fed = 0  # how many of token_ids the engine's cache holds
        self.finish_reason: str | None = None
        self.t_start = self.t_first = self.t_end = self.prefill_s = 0.0

    def choose(self, logits: np.ndarray) -> int:
        """logits [vocab] float32 -> the next token id."""
        p = self.params
        row = apply_repetition_penalty(logits, self.history, p.repetition_penalty)
        return sample(row, self.rng, p.temperature, p.top_k, p.top_p)

    def push(self, token_id: int) -> str:
        """Record a sampled token; returns the text it completes (maybe "")."""
        self.token_ids.append(token_id)
        self.history.append(token_id)
        if token_id in self.stop_ids:
            self.finish_reason = "stop"
            return self.text.close()
        piece = self.text.push(token_id)
        at_limit = len(self.token_ids) >= self.params.max_new_tokens
        if at_limit and not self.text.stopped:
            piece += self.text.close()
        if self.text.stopped or at_limit:
            self.finish_reason = "stop" if self.text.stopped else "length"
        return piece

    def result(self) -> GenerationResult:
        return GenerationResult(
            text=self.text.text,
            token_ids=list(self.token_ids),
            finish_reason=self.finish_reason,
            prompt_tokens=len(self.feed),
            prefill_s=self.prefill_s,
            time_to_first_token_s=self.t_first - self.t_start,
            decode_s=self.t_end - self.t_first,
        )


def _run(engine, seqs: list[_Sequence], keep: bool = False) -> Iterator[tuple[int, str]]:
    """Generate every sequence to its end; yields ``(index, text piece)`` as pieces complete.

    Sequences without an id are added to the engine here. Unless ``keep``, each sequence is
    removed from the engine as it finishes, and all are when the run is abandoned or fails.
    """
    t_start = time.perf_counter()
    alive = []
    try:
        for s in seqs:
            if s.seq_id is None:
                s.seq_id = engine.add_sequence()
            alive.append(s)
        logits = engine.forward([s.seq_id for s in seqs], [s.feed for s in seqs])
        prefill_s = time.perf_counter() - t_start
        for s in seqs:
            s.t_start, s.prefill_s = t_start, prefill_s
        live = list(range(len(seqs)))
        while True:
            for row, i in enumerate(live):
                s = seqs[i]
                piece = s.push(s.choose(logits[row]))
                now = time.perf_counter()
                s.t_first = s.t_first or now
                if s.finish_reason:
                    s.t_end = now
                    if not keep:
                        alive.remove(s)
                        engine.remove_sequence(s.seq_id)
                if piece:
                    yield i, piece
            live = [i for i in live if seqs[i].finish_reason is None]
            if not live:
                return
            logits = engine.forward([seqs[i].seq_id for i in live], [[seqs[i].token_ids[-1]] for i in live])
            for i in live:
                seqs[i].fed += 1
    finally:
        if not keep:
            for s in alive:
                engine.remove_sequence(s.seq_id)


class Stream:
    """The text pieces of one reply, each valid UTF-8, as they are generated.

    ``for piece in stream: ...``; afterwards ``stream.result`` is the GenerationResult (None
    until the stream is exhausted). Stopping early ends the generation and frees its sequence.
    Timings include the time the consumer spends between pieces.
    """

    def __init__(self, events: Iterator[tuple[int, str]], seq: _Sequence,
                 on_close: Callable[[_Sequence, bool], None] | None = None):
        self._events, self._seq, self._on_close = events, seq, on_close
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        completed = False
        try:
            for _, piece in self._events:
                yield piece
            completed = True
            self.result = self._seq.result()
        finally:
            self._events.close()
            if self._on_close is not None:
                self._on_close(self._seq, completed)


# ---------------------------------------------------------------------------- requests
def _template(engine, name: str | None) -> Template:
    return get_template(name if name is not None else engine.config.prompt_template)


def _tokenizer(engine, why: str):
    if engine.tokenizer is None:
        raise GenerationError(f"{engine.path} has no tokenizer.json, needed for {why}; pass token ids, or rebuild "
                              "the artifact from a checkpoint directory that holds tokenizer.json")
    return engine.tokenizer


def _stops(engine, template: Template, params: SamplingParams) -> tuple[frozenset[int], tuple[str, ...]]:
    """(stop token ids, stop strings matched on the text). A stop string that is a special token
    (e.g. "<|im_end|>", which decoding drops) becomes a stop token."""
    tok = engine.tokenizer
    if params.stop:
        _tokenizer(engine, "stop strings")
    ids = set()
    if not params.ignore_eos:
        if tok is None:
            ids.add(MPT_EOS_ID)
        else:
            ids.update(i for i in map(tok.token_to_id, template.stop_tokens) if i is not None)
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special} if tok else {}
    ids.update(specials[s] for s in params.stop if s in specials)
    return frozenset(ids), tuple(s for s in params.stop if s not in specials)


def _encode(engine, text: str, special_tokens: bool = True) -> list[int]:
    return _tokenizer(engine, "text prompts").encode(text, add_special_tokens=special_tokens).ids


def _split_batch(prompt) -> tuple[list, bool]:
    """(prompts, is_batch) from a string, token ids (list or 1-D array), or a list of those."""
    def ids(x) -> list[int] | None:
        x = x.tolist() if isinstance(x, np.ndarray) else x
        return list(x) if isinstance(x, (list, tuple)) and x and all(_is_int(t) for t in x) else None

    prompt = prompt.tolist() if isinstance(prompt, np.ndarray) else prompt
    if isinstance(prompt, str):
        return [prompt], False
    if ids(prompt) is not None:
        return [ids(prompt)], False
    items = list(prompt) if isinstance(prompt, (list, tuple)) else []
    if items and all(isinstance(x, str) or ids(x) is not None for x in items):
        return [x if isinstance(x, str) else ids(x) for x in items], True
    raise GenerationError("prompt must be a string, a non-empty list of token ids, or a non-empty list of those (a batch)")


def _prepare(engine, prompt, template: str | None, sampling: dict) -> tuple[list[_Sequence], bool]:
    """(sequences, is_batch) for generate/stream: strings wrapped in the template and encoded."""
    params = SamplingParams.from_kwargs(**sampling)
    prompts, is_batch = _split_batch(prompt)
    tmpl = _template(engine, template)
    return _sequences(engine, [tmpl.prompt(p) if isinstance(p, str) else p for p in prompts], tmpl, params), is_batch


def _sequences(engine, prompts: list, tmpl: Template, params: SamplingParams) -> list[_Sequence]:
    """Checked, tokenized sequences (strings are encoded as they are); nothing runs yet."""
    stop_ids, text_stops = _stops(engine, tmpl, params)
    seqs = []
    for p in prompts:
        ids = engine.check_tokens(_encode(engine, p) if isinstance(p, str) else p, extra=params.max_new_tokens).tolist()
        seqs.append(_Sequence(ids, ids, params, stop_ids, engine.tokenizer, text_stops))
    return seqs


def _finish(engine, seqs: list[_Sequence]) -> list[GenerationResult]:
    for _ in _run(engine, seqs):
        pass
    return [s.result() for s in seqs]


def generate(engine, prompt, template: str | None = None, **sampling: Any):
    """Reply to ``prompt``: a string (wrapped in the template), token ids (used as they are),
    or a list of either, generated as one batch. Returns a GenerationResult, or a list of them
    for a batch. ``sampling``: the fields of :class:`SamplingParams`."""
    seqs, is_batch = _prepare(engine, prompt, template, sampling)
    results = _finish(engine, seqs)
    return results if is_batch else results[0]


def stream(engine, prompt, template: str | None = None, **sampling: Any) -> Stream:
    """Like :func:`generate` for one prompt, as a :class:`Stream` of text pieces."""
    _tokenizer(engine, "streaming text")
    seqs, is_batch = _prepare(engine, prompt, template, sampling)
    if is_batch:
        raise GenerationError("stream() takes one prompt; use generate() for a batch")
    return Stream(_run(engine, seqs), seqs[0])


def chat(engine, messages: Sequence[Message], template: str | None = None, **sampling: Any) -> GenerationResult:
    """The assistant's reply to a whole conversation, rendered with the template (one-shot;
    :class:`ChatSession` keeps the cache between turns)."""
    params = SamplingParams.from_kwargs(**sampling)
    tmpl = _template(engine, template)
    return _finish(engine, _sequences(engine, [tmpl.render(messages)], tmpl, params))[0]


class ChatSession:
    """A conversation that keeps its sequence in the engine between turns.

    Each ``send`` feeds only the new turn's tokens (the template's turn separator and the user
    message) after the cached history, so earlier turns are never recomputed. The cache holds
    the replies as generated: a reply cut by a stop string keeps the tokens of the stop string,
    a reply cut by ``max_new_tokens`` is closed by the next turn's separator. A reply whose
    stream is not read to the end is dropped from the conversation (the next turn re-renders
    the history into a fresh sequence). ``close()`` (or ``with``) frees the sequence.
    """

    def __init__(self, engine, system: str | None = None, template: str | None = None, **defaults: Any):
        SamplingParams.from_kwargs(**defaults)
        self.engine = engine
        self.template = _template(engine, template)
        _tokenizer(engine, "chat")
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system is not None else []
        if system is not None:
            self.template.render(self.messages + [{"role": "user", "content": ""}])  # rejects a system message early
        self.defaults = defaults
        self._seq: int | None = None
        self._ids: list[int] = []  # tokens in the sequence's cache
        self._pending: list[int] = []  # the last reply's final token when it is not yet cached

    @property
    def token_ids(self) -> list[int]:
        """The conversation's tokens held in the engine's cache."""
        return list(self._ids)

    def send(self, message: str, **sampling: Any) -> GenerationResult:
        """The assistant's reply to ``message``; ``sampling`` overrides the session defaults."""
        s = self.stream(message, **sampling)
        for _ in s:
            pass
        return s.result

    def stream(self, message: str, **sampling: Any) -> Stream:
        """Like :meth:`send`, as a :class:`Stream` of text pieces."""
        params = SamplingParams.from_kwargs(**{**self.defaults, **sampling})
        user = {"role": "user", "content": message}
        if self._seq is None:
            feed = _encode(self.engine, self.template.render(self.messages + [user]))
        else:
            feed = self._pending + _encode(self.engine, self.template.next_turn(message), special_tokens=False)
        feed = self.engine.check_tokens(feed, extra=len(self._ids) + params.max_new_tokens).tolist()
        stop_ids, text_stops = _stops(self.engine, self.template, params)
        seq = _Sequence(feed, self._ids + feed, params, stop_ids, self.engine.tokenizer, text_stops, self._seq)

        def on_close(s: _Sequence, completed: bool) -> None:
            self._seq = s.seq_id  # the run adds the first turn's sequence
            if not completed:
                self._drop_sequence()
                return
            self._ids += s.feed + s.token_ids[: s.fed]
            self._pending = [t for t in s.token_ids[s.fed:] if t not in s.stop_ids]
            self.messages += [user, {"role": "assistant", "content": s.text.text}]

        return Stream(_run(self.engine, [seq], keep=True), seq, on_close)

    def _drop_sequence(self) -> None:
        if self._seq is not None:
            self.engine.remove_sequence(self._seq)
        self._seq, self._ids, self._pending = None, [], []

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and free the engine sequence."""
        self._drop_sequence()
        self.messages = self.messages[:1] if self.messages[:1] and self.messages[0]["role"] == "system" else []

    def close(self) -> None:
        """Free the engine sequence; the messages stay and a later send starts a fresh one."""
        self._drop_sequence()

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

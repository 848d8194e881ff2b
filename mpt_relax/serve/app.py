"""The HTTP application: OpenAI's completions and chat endpoints over one scheduler.

``create_app(service)`` returns the FastAPI app; :class:`Service` is the model behind it, a
:class:`~mpt_relax.runtime.scheduler.SchedulerThread` (which loads the engine and is the only
thread that touches it) plus metrics. Handlers run on the event loop: they validate and
tokenize a request, hand it to the scheduler and relay its events, which the scheduler thread
posts to the loop, as one JSON body or as server-sent events (``data: {...}`` ... ``data:
[DONE]``, one chunk per sampled token, its text maybe "" while a character or a possible
stop string is incomplete). A client that disconnects cancels its request; the scheduler frees
its KV pages at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mpt_relax.errors import MPTRelaxError
from mpt_relax.runtime import generation
from mpt_relax.runtime.scheduler import (
    QueueFullError,
    Request as ScheduledRequest,
    RequestCancelled,
    SchedulerClosedError,
    SchedulerThread,
)
from mpt_relax.serve import protocol
from mpt_relax.serve.metrics import Metrics
from mpt_relax.serve.protocol import APIError

OPEN_PATHS = ("/health",)  # answered without an API key
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
RETRY_AFTER_S = "1"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Service:
    """The model behind the API: a scheduler thread over one engine, its metrics and limits.

    ``engine_factory`` is called on the scheduler thread; until it returns, requests get 503.
    ``template``: the chat template name (None: the artifact's).
    """

    def __init__(self, engine_factory: Callable[[], Any], *, model_name: str, max_batch_size: int | None = None,
                 max_queue: int | None = 64, prefill_chunk_size: int | None = None, template: str | None = None):
        self.model_name = model_name
        self.template = template
        self.metrics = Metrics()
        self.created = int(time.time())
        self.thread = SchedulerThread(engine_factory, max_batch_size=max_batch_size, max_queue=max_queue,
                                      prefill_chunk_size=prefill_chunk_size)
        self.on_load_error: Callable[[BaseException], None] | None = None
        self.shutting_down = False

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.thread.stop(timeout)

    def begin_shutdown(self, grace: float) -> None:
        """New requests get 503 from now on (once the socket closes, none arrive); running ones
        get ``grace`` seconds to finish, then they are cancelled and their clients told so."""
        self.shutting_down = True
        timer = threading.Timer(grace, self.thread.cancel_all)
        timer.daemon = True
        timer.start()

    @property
    def engine(self):
        return self.thread.engine

    @property
    def stats(self) -> dict:
        return self.thread.stats

    def check_ready(self) -> None:
        if self.thread.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.thread.load_error}", type="server_error",
                           code="model_load_failed")
        if not self.thread.alive or self.shutting_down:
            raise APIError(503, "the model is loading (or the server is shutting down); retry shortly",
                           type="server_error", code="model_not_ready", headers={"Retry-After": RETRY_AFTER_S})

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(400, f"the model {model!r} does not exist; this server has {self.model_name!r}",
                           param="model", code="model_not_found")

    # ------------------------------------------------------------ requests
    def sequence(self, prompt: str | list[int], template_name: str, max_tokens: int | None, req, param: str):
        """A checked generation sequence (generation's ``_Sequence``) for one prompt."""
        eng = self.engine
        try:
            ids = generation._encode(eng, prompt) if isinstance(prompt, str) else list(prompt)
            window = eng.context_window
            if len(ids) + (max_tokens or 1) > window:
                asked = f" + {max_tokens} max_tokens" if max_tokens else ""
                raise APIError(400, f"this model's context window is {window} tokens; the prompt has "
                               f"{len(ids)}{asked}. Shorten the prompt or lower max_tokens", param=param,
                               code="context_length_exceeded")
            params = generation.SamplingParams.from_kwargs(**req.sampling(max_tokens or window - len(ids)))
            tmpl = generation._template(eng, template_name)
            return generation._sequences(eng, [ids], tmpl, params)[0]
        except APIError:
            raise
        except MPTRelaxError as err:
            raise APIError(400, str(err), param=param) from None

    def submit(self, seqs: list, top_logprobs: int | None) -> "Group":
        self.check_ready()
        group = Group(self, asyncio.get_running_loop())
        try:
            for i, seq in enumerate(seqs):
                request = ScheduledRequest(seq, top_logprobs=top_logprobs, on_event=group.on_event, tag=i)
                group.requests.append(request)
                self.thread.submit(request)
        except BaseException as err:
            group.cancel()
            if isinstance(err, QueueFullError):
                raise APIError(429, f"the server is at capacity: {err}; retry later", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After": RETRY_AFTER_S}) from None
            if isinstance(err, SchedulerClosedError):
                self.check_ready()
                raise APIError(503, str(err), type="server_error", code="model_not_ready",
                               headers={"Retry-After": RETRY_AFTER_S}) from None
            if isinstance(err, MPTRelaxError):
                raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from None
            raise
        return group

    def token_text(self, token_id: int) -> str:
        tok = self.engine.tokenizer
        return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)


class Group:
    """The scheduler requests of one HTTP request (one per prompt), seen from the event loop."""

    def __init__(self, service: Service, loop: asyncio.AbstractEventLoop):
        self.service, self.loop = service, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list[ScheduledRequest] = []
        self._last: dict[int, float] = {}

    def on_event(self, ev) -> None:
        """On the scheduler thread: metrics, then hand the event to the loop."""
        m, r = self.service.metrics, ev.request
        if ev.token_id is not None:
            previous = self._last.get(r.tag)
            if previous is None:
                m.first_token(ev.time - r.t_submit)
            else:
                m.next_token(ev.time - previous)
            self._last[r.tag] = ev.time
        if ev.finished:
            m.finished(r.seq.finish_reason if ev.error is None else
                       "cancelled" if isinstance(ev.error, RequestCancelled) else "error")
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)
        except RuntimeError:  # the loop is gone (shutdown); nobody is listening
            pass

    def cancel(self) -> None:
        for r in self.requests:
            if not r.finished:
                self.service.thread.cancel(r)

    async def events(self, http: Request | None = None) -> AsyncIterator:
        """Every event until all requests end; with ``http``, a disconnected client cancels."""
        open_ = len(self.requests)
        while open_:
            try:
                ev = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    self.cancel()
                    return
                continue
            open_ -= ev.finished
            yield ev


def _fail(ev) -> APIError:
    err = ev.error
    if isinstance(err, (RequestCancelled, SchedulerClosedError)):
        return APIError(503, f"the request was cancelled: {err}", type="server_error", code="cancelled")
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")


# ---------------------------------------------------------------------------- the app
def create_app(service: Service, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    async def lifespan(app):
        service.start()
        watcher = asyncio.create_task(_watch_load(service))
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="mpt_relax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        if err.status in (413, 429, 503):
            service.metrics.rejected_request(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        body = protocol.error_body(str(err.detail), code=str(err.status_code))
        return JSONResponse(body, status_code=err.status_code)

    @app.get("/health")
    async def health():
        try:
            service.check_ready()
        except APIError as err:
            return JSONResponse({"status": "unavailable", "detail": err.message}, status_code=503, headers=err.headers)
        return {"status": "ok", "model": service.model_name}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(service.stats, service.model_name),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": service.created,
                                            "owned_by": "mpt_relax"}]}

    @app.post("/v1/completions")
    async def completions(http: Request):
        req = protocol.parse(protocol.CompletionRequest, await _json(http))
        service.check_model(req.model)
        service.check_ready()
        seqs = [service.sequence(p, "none", req.max_tokens, req, "prompt") for p in req.prompts()]
        group = service.submit(seqs, req.logprobs)
        rid, created = protocol.new_id("cmpl"), int(time.time())
        if req.stream:
            return StreamingResponse(_stream(group, req, rid, created, chat=False), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await _complete(group, http, req, rid, created, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: Request):
        req = protocol.parse(protocol.ChatCompletionRequest, await _json(http))
        service.check_model(req.model)
        service.check_ready()
        tmpl = generation._template(service.engine, service.template)
        try:
            text = tmpl.render([m.as_template_message() for m in req.messages])
        except MPTRelaxError as err:
            raise APIError(400, str(err), param="messages") from None
        seq = service.sequence(text, tmpl.name, req.requested_max_tokens, req, "messages")
        group = service.submit([seq], (req.top_logprobs or 0) if req.logprobs else None)
        rid, created = protocol.new_id("chatcmpl"), int(time.time())
        if req.stream:
            return StreamingResponse(_stream(group, req, rid, created, chat=True), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await _complete(group, http, req, rid, created, chat=True)

    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes, metrics=service.metrics)
    return app


async def _watch_load(service: Service) -> None:
    await asyncio.to_thread(service.thread.ready.wait)
    if service.thread.load_error is not None and service.on_load_error is not None:
        service.on_load_error(service.thread.load_error)


async def _json(http: Request) -> Any:
    body = await http.body()
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None


async def _complete(group: Group, http: Request, req, rid: str, created: int, chat: bool) -> dict:
    svc = group.service
    pieces: dict[int, list[str]] = {r.tag: [] for r in group.requests}
    entries: dict[int, list[dict]] = {r.tag: [] for r in group.requests}
    async for ev in group.events(http):
        if ev.error is not None:
            group.cancel()
            raise _fail(ev)
        pieces[ev.request.tag].append(ev.piece)
        if ev.logprobs is not None:
            entries[ev.request.tag].append(ev.logprobs)
    if not all(r.finished for r in group.requests):  # the client went away
        return JSONResponse(protocol.error_body("client disconnected"), status_code=499)
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for r in group.requests:
        seq, text = r.seq, "".join(pieces[r.tag])
        prompt_tokens += len(seq.feed)
        completion_tokens += len(seq.token_ids)
        if chat:
            logprobs = protocol.chat_logprobs(entries[r.tag], svc.token_text) if req.logprobs else None
            choices.append({"index": r.tag, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                            "finish_reason": seq.finish_reason})
        else:
            logprobs = None if req.logprobs is None else protocol.completion_logprobs(entries[r.tag], svc.token_text)
            choices.append({"index": r.tag, "text": text, "logprobs": logprobs, "finish_reason": seq.finish_reason})
    kind = "chat.completion" if chat else "text_completion"
    return protocol.envelope(kind, rid, svc.model_name, choices, created,
                             usage=protocol.usage(prompt_tokens, completion_tokens))


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(group: Group, req, rid: str, created: int, chat: bool) -> AsyncIterator[str]:
    """Server-sent events for a streamed request; ends with ``data: [DONE]``."""
    svc = group.service
    kind = "chat.completion.chunk" if chat else "text_completion"
    extra = {"usage": None} if req.include_usage else {}
    pending: dict[int, list[dict]] = {r.tag: [] for r in group.requests}
    offsets = {r.tag: 0 for r in group.requests}

    def chunk(choices: list) -> str:
        return _sse(protocol.envelope(kind, rid, svc.model_name, choices, created, **extra))

    try:
        if chat:
            yield chunk([{"index": r.tag, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for r in group.requests])
        async for ev in group.events():
            i = ev.request.tag
            if ev.error is not None:
                group.cancel()
                yield _sse(_fail(ev).body())
                break
            if ev.logprobs is not None:
                pending[i].append(ev.logprobs)
            if ev.token_id is None and not ev.finished:
                continue
            finish = ev.request.seq.finish_reason if ev.finished else None
            logprobs = None
            if pending[i]:
                if chat:
                    logprobs = protocol.chat_logprobs(pending[i], svc.token_text)
                else:
                    logprobs = protocol.completion_logprobs(pending[i], svc.token_text, offsets[i])
                pending[i] = []
            offsets[i] += len(ev.piece)
            if chat:  # as OpenAI: the finish_reason comes in a chunk of its own, with an empty delta
                if ev.token_id is not None:
                    yield chunk([{"index": i, "delta": {"content": ev.piece}, "logprobs": logprobs,
                                  "finish_reason": None}])
                    logprobs = None
                if finish:
                    yield chunk([{"index": i, "delta": {}, "logprobs": logprobs, "finish_reason": finish}])
            else:
                yield chunk([{"index": i, "text": ev.piece, "logprobs": logprobs, "finish_reason": finish}])
        else:
            if req.include_usage:
                prompt = sum(len(r.seq.feed) for r in group.requests)
                done = sum(len(r.seq.token_ids) for r in group.requests)
                yield _sse(protocol.envelope(kind, rid, svc.model_name, [], created,
                                             usage=protocol.usage(prompt, done)))
        yield "data: [DONE]\n\n"
    finally:
        group.cancel()  # a client that went away: free its pages at the next step


class _Guard:
    """ASGI middleware: the API key (``Authorization: Bearer KEY``) and the request body limit."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, max_body_bytes, metrics
        self.key = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization")
            if given is None or not hmac.compare_digest(given, self.key):
                what = "no API key was given" if given is None else "the API key is not valid"
                self.metrics.rejected_request(401)
                err = APIError(401, f"{what}: send the header 'Authorization: Bearer <key>'", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                return await _send_error(send, err)
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            self.metrics.rejected_request(413)
            return await _send_error(send, APIError(413, f"the request body exceeds {self.max_body} bytes"))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise APIError(413, f"the request body exceeds {self.max_body} bytes")
            return message

        return await self.app(scope, limited, send)


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

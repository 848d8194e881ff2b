"""Run the server: ``python -m mpt_relax serve --artifact DIR [options]``.

The socket is bound at once and answers 503 while the engine loads on the scheduler thread.
SIGINT / SIGTERM stop accepting connections, give running requests ``shutdown_timeout``
seconds to finish, then cancel what is left and free the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from pathlib import Path

from mpt_relax.serve.app import DEFAULT_MAX_BODY_BYTES, Service, create_app

log = logging.getLogger("mpt_relax.serve")


@dataclasses.dataclass
class ServeOptions:
    artifact: str
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    max_batch_size: int = 8
    kv_memory: str | None = None
    max_queue: int = 64
    prefill_chunk_size: int | None = None
    api_key: str | None = None
    model_name: str | None = None
    template: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    shutdown_timeout: float = 10.0
    log_level: str = "info"


def engine_factory(opts: ServeOptions):
    def load():
        from mpt_relax.runtime.engine import Engine

        return Engine(opts.artifact, opts.device, max_batch_size=opts.max_batch_size, kv_memory=opts.kv_memory,
                      prefill_chunk_size=opts.prefill_chunk_size)

    return load


def make_service(opts: ServeOptions) -> Service:
    from mpt_relax.io import artifact

    artifact.read_config(Path(opts.artifact))  # a wrong path fails here, before the socket is bound
    return Service(engine_factory(opts), model_name=opts.model_name or Path(opts.artifact).resolve().name,
                   max_batch_size=opts.max_batch_size, max_queue=opts.max_queue,
                   prefill_chunk_size=opts.prefill_chunk_size, template=opts.template)


def run(opts: ServeOptions) -> int:
    """Serve until SIGINT / SIGTERM; returns the exit status (1 when the model failed to load)."""
    import uvicorn

    service = make_service(opts)
    app = create_app(service, api_key=opts.api_key, max_body_bytes=opts.max_body_bytes)
    # uvicorn's own grace period is a backstop: the service ends what still runs after
    # shutdown_timeout itself, so that every stream is closed properly (an error event, [DONE]).
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level, lifespan="on",
                            timeout_graceful_shutdown=opts.shutdown_timeout + 5, access_log=opts.log_level == "debug")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                service.begin_shutdown(opts.shutdown_timeout)
            super().handle_exit(sig, frame)

    server = Server(config)

    def failed(err: BaseException) -> None:
        server.should_exit = True

    service.on_load_error = failed
    print(f"mpt_relax serve: {service.model_name} on http://{opts.host}:{opts.port}/v1 (loading the engine)",
          file=sys.stderr, flush=True)
    # uvicorn handles SIGINT / SIGTERM (graceful shutdown) and afterwards re-raises the signal
    # to the handler it found: make that one a no-op, so that a requested stop exits with 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if service.thread.load_error is not None:
        raise service.thread.load_error
    print("mpt_relax serve: stopped", file=sys.stderr, flush=True)
    return 0

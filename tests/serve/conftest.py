"""Fixtures of the server tests: one tiny model for the whole folder, live servers on free ports.

The model is an HF MPT checkpoint (d_model 64, 2 layers, vocab 320, context 512, ChatML)
with a byte-level BPE tokenizer, built for the CPU once per session. ``start_server`` runs
the real application with uvicorn on a thread of the test process, bound to a free localhost
port, so that tests can talk HTTP to it and also look at its scheduler.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn

import mpt_relax
from factory import hf_checkpoint
from mpt_relax.tools.demo import train_tokenizer, write_tokenizer
from mpt_relax.serve.app import Service, create_app

VOCAB = 320
WINDOW = 512
CORPUS = [
    "Once upon a time there was a café in Genève where crème brûlée cost déjà trop. ",
    "日本の東京で、日本語を話す人に会いました。日本はきれいです。 ",
    "Rockets 🚀 fly, the world 🌍 turns, cake 🍰 is sweet, thumbs 👍 go up. ",
    "The quick brown fox jumps over the lazy dog; one two three four five six seven eight. ",
] * 3
MODEL = "tiny-chat"


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("serve-ckpt")
    hf_checkpoint(ckpt, seed=3, vocab_size=VOCAB, max_seq_len=WINDOW)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "prompt_template": "chatml"}))
    write_tokenizer(train_tokenizer(CORPUS, VOCAB), ckpt, max_length=WINDOW)
    return mpt_relax.build(ckpt, target="llvm", output=tmp_path_factory.mktemp("serve") / "art", quiet=True)


class LiveServer:
    """The app served by uvicorn on a thread; ``url`` is its ``/v1`` base."""

    def __init__(self, service: Service, **app_options):
        self.service = service
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        config = uvicorn.Config(create_app(service, **app_options), log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, wait_ready: bool = True) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        if wait_ready:
            assert self.service.thread.ready.wait(120) and self.service.thread.load_error is None
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """The scheduler's stats once nothing runs or waits and every KV page is free."""
        deadline = time.time() + timeout
        while True:
            s = self.service.stats
            if s["running"] == 0 and s["queued"] == 0 and s["kv_pages_free"] == s["kv_pages_total"]:
                return s
            assert time.time() < deadline, f"scheduler not idle: {s}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def start_server(serve_artifact):
    """start_server(engine=dict(...), service=dict(...), app=dict(...), factory=None, wait_ready=True) ->
    LiveServer; all are stopped when the module ends."""
    servers = []

    def start(engine: dict | None = None, service: dict | None = None, app: dict | None = None, factory=None,
              wait_ready: bool = True) -> LiveServer:
        engine_kw = {"max_batch_size": 16, **(engine or {})}
        load = factory or (lambda: mpt_relax.Engine(serve_artifact, device="cpu", **engine_kw))
        svc = Service(load, **{"model_name": MODEL, "max_batch_size": engine_kw["max_batch_size"], **(service or {})})
        live = LiveServer(svc, **(app or {}))
        servers.append(live)
        return live.start(wait_ready)

    yield start
    for live in servers:
        live.stop()

"""``python -m mpt_relax serve``: an OpenAI-compatible HTTP server with continuous batching.

    app.py       the FastAPI application and the Service (scheduler thread + metrics) behind it
    protocol.py  request validation, response / stream-chunk bodies, OpenAI-shaped errors
    metrics.py   Prometheus text metrics
    server.py    the command: options, uvicorn, signals
"""

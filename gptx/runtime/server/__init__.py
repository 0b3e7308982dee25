"""`gptx serve`: an OpenAI-compatible HTTP server over the runtime's async pool, and its Ray Serve deployment.

    app.py       create_app(engine, ServerConfig) -> FastAPI (routes, errors, auth, per-request log)
    schemas.py   request bodies (pydantic) and OpenAI's error body
    chat.py      the plain transcript template that turns chat messages into a GPT-2 prompt
    metrics.py   Prometheus metrics (prometheus-client)
    command.py   the `gptx serve` Typer command (uvicorn, or Ray Serve with --ray)
    ray_app.py   the same app as a Ray Serve deployment (one engine + pool per replica)

Nothing here imports PyTorch; the HTTP stack comes from the `serve` extra (fastapi, uvicorn, prometheus-client),
Ray from the `ray` extra. This file imports nothing, so `gptx --help` stays fast.
"""

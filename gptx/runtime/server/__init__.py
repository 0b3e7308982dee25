"""`gptx serve`: an OpenAI-compatible HTTP server over the runtime's async pool (app.py), on uvicorn or Ray Serve.

Nothing here imports PyTorch; the HTTP stack comes from the `serve` extra, Ray from the `ray` extra. This file imports
nothing, so `gptx --help` stays fast.
"""

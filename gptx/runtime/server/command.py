"""`gptx serve DIR` (parsed by gptx/cli.py): the OpenAI-compatible server on uvicorn, or on Ray Serve with --ray.
Everything heavy (the engine, FastAPI, uvicorn, Ray) is imported when it runs, so `gptx --help` stays fast."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from ..errors import GptxError, InvalidInput


def run_serve(directory: Path, host: str, port: int, max_batch: int, max_queue: int, max_tokens_limit: int | None,
              prefill_chunk: int | None, prefix_cache_mb: float | None, backend: str, device: str, threads: int | None,
              api_key: str | None, model_name: str | None, chat_template: Path | None, max_body_bytes: int,
              shutdown_timeout: float, ray: bool, replicas: int, autoscale: str | None, ray_address: str | None,
              replica_cpus: float | None, max_connections: int = 512, header_timeout: float = 10.0,
              body_timeout: float = 30.0, keep_alive_timeout: float = 5.0) -> None:
    from .app import ServerConfig
    from .chat import ChatTemplate
    from .edge import EdgeLimits, reserve_file_descriptors

    directory = Path(directory).resolve()
    scheduling = {k: v for k, v in (("prefill_chunk", prefill_chunk), ("prefix_cache_mb", prefix_cache_mb))
                  if v is not None}  # unset: the pool's defaults
    config = ServerConfig(model_name=model_name or directory.name, max_batch=max_batch, max_queue=max_queue,
                          max_tokens_limit=max_tokens_limit, api_key=checked_api_key(api_key), **scheduling,
                          max_body_bytes=max_body_bytes, chat_template=ChatTemplate.from_file(chat_template)
                          if chat_template else ChatTemplate())
    limits = EdgeLimits(max_connections=max_connections, header_timeout=header_timeout, body_timeout=body_timeout,
                        keep_alive_timeout=keep_alive_timeout)
    if threads is not None and backend not in ("auto", "onnxruntime"):
        raise InvalidInput("--threads sets ONNX Runtime's thread pool: use it with --backend onnxruntime")
    load_options = {"backend": backend, "device": device, **({} if threads is None else {"threads": threads})}
    setup_logging()
    if ray:
        from .ray_app import run_on_ray

        low, sep, high = (autoscale or "1:1").partition(":")
        if not sep or not low.strip().isdigit() or not high.strip().isdigit() or not 0 < int(low) <= int(high):
            raise InvalidInput(f"--autoscale takes MIN:MAX replicas with 1 <= MIN <= MAX, got {autoscale!r}")
        run_on_ray(directory, load_options, config, host=host, port=port, replicas=replicas,
                   autoscale=(int(low), int(high)) if autoscale else None, address=ray_address,
                   replica_cpus=replica_cpus, shutdown_timeout=shutdown_timeout)
        return
    if autoscale or ray_address or replica_cpus or replicas != 1:
        raise InvalidInput("--replicas, --autoscale, --ray-address and --replica-cpus need --ray")
    import gptx.runtime

    reserve_file_descriptors(limits.max_connections)  # before loading: a limit that cannot be met fails at once
    engine = gptx.runtime.load(directory, **load_options)
    run_uvicorn(engine, config, host, port, shutdown_timeout, limits)


def checked_api_key(api_key: str | None) -> str | None:
    """The key, or None for no authentication; an empty key (`--api-key ''`, `GPTX_API_KEY=`) is refused."""
    if api_key is None and os.environ.get("GPTX_API_KEY") == "":  # the CLI reads an empty variable as unset
        api_key = ""
    if api_key is not None and not api_key.strip():
        raise InvalidInput("the API key is empty (--api-key or GPTX_API_KEY): give a key, or set neither to serve "
                           "without authentication")
    return api_key


def setup_logging() -> None:
    """One line per request on stderr (logger gptx.server), beside uvicorn's own startup lines."""
    logger = logging.getLogger("gptx")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def announce(url: str, config, where: str) -> None:
    """The URL and a curl line to try, printed when the server starts."""
    auth = ' -H "Authorization: Bearer $GPTX_API_KEY"' if config.api_key else ""
    print(f"gptx serve: {config.model_name} ({where}) at {url}/v1  (max batch {config.max_batch}, queue "
          f"{config.max_queue}{', API key required' if config.api_key else ''}; SIGTERM or Ctrl-C stops)\n"
          f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} \\\n"
          f"    -d '{{\"model\": \"{config.model_name}\", \"prompt\": \"Hello,\", \"max_tokens\": 16}}'",
          flush=True)


def run_uvicorn(engine, config, host: str, port: int, shutdown_timeout: float, limits) -> None:
    import uvicorn

    from .app import create_app
    from .edge import DrainingServer, protocol_for

    app = create_app(engine, config)
    server = DrainingServer(uvicorn.Config(
        app, host=host, port=port, access_log=False, lifespan="on", log_level="info", ws="none",
        http=protocol_for(limits), h11_max_incomplete_event_size=limits.max_header_bytes,
        timeout_keep_alive=limits.keep_alive_timeout, timeout_graceful_shutdown=FLUSH_SECONDS),
        drain=app.state.drain, shutdown_timeout=shutdown_timeout)
    if host not in ("127.0.0.1", "localhost", "::1") and not config.api_key:
        logging.getLogger("gptx.server").warning("listening on %s without an API key", host)
    host_in_url = f"[{host}]" if ":" in host else host
    announce(f"http://{host_in_url}:{port}", config, engine.backend.describe())
    # After draining, uvicorn re-raises the signal with the handler it found: a no-op here, so a clean shutdown
    # exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if not server.started:  # e.g. the port is taken (uvicorn has logged why)
        raise GptxError(f"the server could not start on {host}:{port}")


FLUSH_SECONDS = 5  # after draining: time for the last bytes of finished responses to reach their clients

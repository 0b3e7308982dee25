"""The same FastAPI app on Ray Serve: one engine and one pool per replica, replicas spread over a Ray cluster.

`gptx serve DIR --ray [--replicas N | --autoscale MIN:MAX] [--ray-address auto]`, or Ray's own
`serve run gptx.runtime.server.ray_app:build directory=DIR` (KubeRay's RayService uses the same import path). Each
replica loads the export itself (the same path on every node) and stamps its id on every response (x-gptx-replica).
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
from pathlib import Path

from ray import serve

from ..errors import InvalidInput
from ..manifest import load_manifest
from .app import ServerConfig, create_app
from .command import announce, checked_api_key, setup_logging

APP_NAME = "gptx"
HEALTH_CHECK_PERIOD_S = 2.0   # a dead replica is noticed (and replaced) within about this
REQUEST_SLACK = 8             # requests a full replica still takes in (to answer 429, /health, /metrics)
NUMBERS = {"max_batch": int, "max_queue": int, "max_tokens_limit": int, "max_body_bytes": int, "prefill_chunk": int,
           "prefix_cache_mb": float}  # build()'s numeric arguments, which arrive as strings


@serve.deployment(name="gptx")
@serve.ingress()  # the app is built per replica, by __serve_build_asgi_app__, once the engine is loaded
class GptxReplica:
    def __init__(self, directory: str, load_options: dict, config: ServerConfig):
        import gptx.runtime

        setup_logging()  # the one line per request, in the replica's log (Ray forwards it to the driver)
        self.engine = gptx.runtime.load(directory, **load_options)
        self.config = dataclasses.replace(config, replica=serve.get_replica_context().replica_tag)

    def __serve_build_asgi_app__(self):
        return create_app(self.engine, self.config)


def deployment(directory: str | Path, load_options: dict, config: ServerConfig, *, replicas: int = 1,
               autoscale: tuple[int, int] | None = None, replica_cpus: float = 1.0, shutdown_timeout: float = 10.0):
    """The bound application: num_replicas, or autoscaling on ongoing requests (max_batch per replica)."""
    options = dict(ray_actor_options={"num_cpus": replica_cpus},
                   # every request reaches a replica, so the pool's own bound answers 429 (Ray's proxy would queue)
                   max_ongoing_requests=config.max_batch + config.max_queue + REQUEST_SLACK,
                   health_check_period_s=HEALTH_CHECK_PERIOD_S,
                   graceful_shutdown_timeout_s=shutdown_timeout)
    scale = {"num_replicas": replicas} if autoscale is None else {"autoscaling_config": {
        "min_replicas": autoscale[0], "max_replicas": autoscale[1], "target_ongoing_requests": config.max_batch}}
    return GptxReplica.options(**options, **scale).bind(str(directory), load_options, config)


def run_on_ray(directory: Path, load_options: dict, config: ServerConfig, *, host: str, port: int, replicas: int,
               autoscale: tuple[int, int] | None, address: str | None, replica_cpus: float | None,
               shutdown_timeout: float) -> None:
    """Deploy, print the URL, wait for SIGTERM / Ctrl-C, then remove the app (and stop a Ray we started)."""
    import ray

    load_manifest(directory)  # a missing or broken export fails here, in one line, not in every replica
    most = autoscale[1] if autoscale else replicas
    local = address is None
    replica_cpus = replica_cpus or ((os.cpu_count() or 1) / most if local else 1.0)
    if local:
        # logical CPUs: enough for every replica, at least this machine's cores
        ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(most * replica_cpus)), include_dashboard=False)
        print(f"gptx serve: started a local Ray (GCS at {ray.get_runtime_context().gcs_address})", flush=True)
    else:
        ray.init(address=address)
    if "threads" not in load_options and load_options.get("backend") in ("auto", "onnxruntime"):
        # ONNX Runtime would start one thread per core in every replica: keep to the CPUs reserved
        load_options = {**load_options, "threads": max(1, int(replica_cpus))}
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(directory, load_options, config, replicas=replicas, autoscale=autoscale,
                             replica_cpus=replica_cpus, shutdown_timeout=shutdown_timeout),
                  name=APP_NAME, route_prefix="/")
        scale = f"{autoscale[0]}-{autoscale[1]} replicas" if autoscale else f"{replicas} replica(s)"
        where = f"Ray Serve, {scale}, {replica_cpus:g} CPU each, {'local Ray' if local else address}"
        announce(f"http://{host}:{port}", config, where)
        stop.wait()
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)  # leave the cluster's Serve (and other apps) running
        ray.shutdown()


def build(args: dict) -> serve.Application:
    """Application builder for `serve run gptx.runtime.server.ray_app:build directory=DIR [key=value ...]` and for a
    RayService's `import_path`; the API key comes from GPTX_API_KEY, replicas and CPUs from the Serve config's
    `deployments:` section (deployment "gptx")."""
    known = {"directory", "model_name", "backend", "device", "threads", *NUMBERS}
    unknown = sorted(set(args) - known)
    if unknown or "directory" not in args:
        raise InvalidInput(f"build() takes directory=DIR and optionally {', '.join(sorted(known - {'directory'}))}"
                           + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    directory = Path(str(args["directory"]))

    def number(key):
        try:
            return NUMBERS.get(key, int)(args[key])
        except (TypeError, ValueError):
            kind = "an integer" if NUMBERS.get(key, int) is int else "a number"
            raise InvalidInput(f"{key} must be {kind}, got {args[key]!r}") from None

    given = {key: number(key) for key in NUMBERS if args.get(key) is not None}  # the rest: defaults
    config = ServerConfig(model_name=str(args.get("model_name") or directory.name),
                          api_key=checked_api_key(os.environ.get("GPTX_API_KEY")), **given)
    load_options = {"backend": str(args.get("backend", "auto")), "device": str(args.get("device", "cpu"))}
    if args.get("threads") is not None:
        load_options["threads"] = number("threads")
    return deployment(directory, load_options, config)

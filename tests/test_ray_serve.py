"""`gptx serve --ray`: the same app on Ray Serve, a local Ray started by the command (a subprocess), two replicas.
Requests spread over both (the x-gptx-replica header says which served each); one replica's actor is killed
mid-load and Ray replaces it; the test prints how many requests failed meanwhile and bounds that number."""

from __future__ import annotations

import importlib.util
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_process import ServerProcess

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="gptx serve --ray needs gptx[ray]")]

CLIENTS = 4             # concurrent clients during the kill
MAX_FAILED = 2 * CLIENTS  # requests in flight on the killed replica, and a few routed to it before it is noticed
TIMEOUT = 60


@pytest.fixture(scope="module")
def ray_server(shakespeare_dir, tmp_path_factory):
    proc = ServerProcess([shakespeare_dir, "--ray", "--replicas", "2", "--max-batch", "4", "--shutdown-timeout", "2"],
                         tmp_path_factory.mktemp("ray") / "serve.log", ready_timeout=120)
    yield proc
    assert proc.stop(60) == 0, proc.output()[-3000:]


def complete(url: str, i: int) -> tuple[int | str, str | None]:
    """(status or exception name, replica) of one short completion."""
    try:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": f"Request {i}:", "max_tokens": 12, "temperature": 0},
                       timeout=TIMEOUT)
        return r.status_code, r.headers.get("x-gptx-replica")
    except httpx.HTTPError as e:
        return type(e).__name__, None


def test_replicas_share_the_load_and_a_killed_replica_is_replaced(ray_server, monkeypatch):
    url = ray_server.url
    with ThreadPoolExecutor(CLIENTS) as pool:
        first = list(pool.map(lambda i: complete(url, i), range(24)))
    assert {status for status, _ in first} == {200}
    replicas = {replica for _, replica in first}
    assert len(replicas) == 2, first

    gcs = re.search(r"started a local Ray \(GCS at ([^)\s]+)\)", ray_server.output()).group(1)  # before deploying
    # the command's local Ray uses token auth (its token is in ~/.ray); Ray reads the mode when first imported
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    import ray

    ray.init(address=gcs, log_to_driver=False)
    try:
        victim = min(replicas)
        actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith("SERVE_REPLICA::") and a["name"].endswith(f"#{victim}"))
        outcomes: list[tuple[float, int | str, str | None]] = []
        stop = threading.Event()

        def client(k: int):
            i = 0
            while not stop.is_set() and i < 2000:
                status, replica = complete(url, 1000 * k + i)
                outcomes.append((time.monotonic(), status, replica))
                i += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            killed_at = time.monotonic()
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))
            deadline = killed_at + TIMEOUT
            while time.monotonic() < deadline and not any(r not in replicas for _, s, r in outcomes if s == 200):
                time.sleep(0.1)
            replaced_at = time.monotonic()
            time.sleep(1.0)  # and keep going on the restored pair
        finally:
            stop.set()
            for t in threads:
                t.join(TIMEOUT)
    finally:
        ray.shutdown()

    new = {r for _, s, r in outcomes if s == 200} - replicas
    failed = [(t - killed_at, s) for t, s, _ in outcomes if s != 200]
    after = [(s, r) for t, s, r in outcomes if t > replaced_at]
    print(f"\n{len(failed)} of {len(outcomes)} requests failed while replica {victim} was killed and replaced by "
          f"{sorted(new)} ({replaced_at - killed_at:.1f}s): {failed}")
    assert len(new) == 1, "no replacement replica served a request"
    assert len(failed) <= MAX_FAILED
    assert after and {s for s, _ in after} == {200}
    assert {r for s, r in after} <= (replicas - {victim}) | new


def test_application_builder_for_serve_run_and_kuberay(shakespeare_dir):
    """`serve run gptx.runtime.server.ray_app:build directory=DIR ...` (and a RayService's import_path): the arguments
    arrive as strings and are checked before anything is deployed."""
    from ray.serve import Application

    from gptx.runtime.errors import InvalidInput
    from gptx.runtime.server.ray_app import build

    assert isinstance(build({"directory": str(shakespeare_dir), "max_batch": "4", "threads": "1"}), Application)
    with pytest.raises(InvalidInput, match="directory"):
        build({"max_batch": "4"})
    with pytest.raises(InvalidInput, match="unknown: colour"):
        build({"directory": str(shakespeare_dir), "colour": "red"})
    with pytest.raises(InvalidInput, match="max_batch must be an integer"):
        build({"directory": str(shakespeare_dir), "max_batch": "many"})

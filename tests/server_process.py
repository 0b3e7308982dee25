"""`gptx serve` as a real subprocess on a free 127.0.0.1 port, for the server and Ray tests.

The process runs where `import torch` fails (the server is part of the runtime-only install), in its own
session so that stop() can end it and anything it started (Ray's processes) by its process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = "import sys; sys.modules['torch'] = None; from gptx import cli; sys.argv[0] = 'gptx'; cli.main()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, ready_timeout: float = 60.0, open_files: int | None = None):
        """open_files: the process's RLIMIT_NOFILE (soft and hard), as `ulimit -n` would set it."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

        def limit_open_files():
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", *map(str, args),
                                          "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                         cwd=ROOT, start_new_session=True,
                                         preexec_fn=limit_open_files if open_files else None)
        try:
            self.wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gptx serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"gptx serve not ready within {timeout:.0f}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """The server's resident memory now (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS in /proc")

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value} (the samples only)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit code. Whatever else is left in its process
        group (Ray's processes with --ray) is killed either way."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return self.proc.returncode

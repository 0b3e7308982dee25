"""The connection edge under uvicorn: bounded headers, deadlines for a request still arriving, a connection cap.

uvicorn bounds header bytes (h11) and keep-alive, but a client that connects and sends nothing, or trickles its
headers, holds its connection forever, and its `limit_concurrency` answers 503 on every connection at the cap. This is
uvicorn's h11 protocol plus a header deadline (from accept, or a kept-alive request's first byte), a body deadline,
431 for headers over `max_header_bytes`, and one 503 for a connection past `max_connections` (open ones keep working).
A response, once its request is fully received, is not limited: only the client going away ends it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from dataclasses import dataclass
from http import HTTPStatus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import InvalidInput
from .schemas import error_body

log = logging.getLogger("gptx.server")

FD_RESERVE = 64   # file descriptors beside the connections: the listener, logs, the model's files, the event loop


@dataclass(frozen=True)
class EdgeLimits:
    max_connections: int = 512
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_header_bytes: int = 64 * 1024


# The one answer a connection past the cap gets (written before anything is read from it, then closed).
_BUSY_BODY = json.dumps(error_body("the server has too many open connections (--max-connections); retry",
                                   "server_error", code="too_many_connections")).encode()
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n" % len(_BUSY_BODY)) + _BUSY_BODY


class GuardedH11Protocol(H11Protocol):
    """uvicorn's H11Protocol with the deadlines and the connection cap above (`limits` is set by `protocol_for`)."""

    limits: EdgeLimits
    refused = False

    def connection_made(self, transport) -> None:
        self._deadline = None
        self._phase: str | None = None
        if len(self.connections) >= self.limits.max_connections:
            self.refused = True
            transport.write(BUSY)
            transport.close()
            return
        super().connection_made(transport)
        self._arm("headers", self.limits.header_timeout)

    def connection_lost(self, exc) -> None:
        self._disarm()
        if not self.refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase is None and self.conn.their_state is h11.IDLE:  # the first byte of a kept-alive request
            self._arm("headers", self.limits.header_timeout)
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow()  # a pipelined request may have been read meanwhile

    def send_400_response(self, msg: str) -> None:
        """h11 refuses a request it cannot parse; headers over the bound get 431 rather than a generic 400."""
        if self._phase == "headers" and len(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
            self._send_error(431, f"the request headers are over this server's limit of "
                                  f"{self.limits.max_header_bytes} bytes")
        else:
            self._send_error(400, msg)

    def _send_error(self, status: int, message: str) -> None:
        self._disarm()
        body = json.dumps(error_body(message, code="request_header_fields_too_large" if status == 431 else None))
        head = h11.Response(status_code=status, reason=HTTPStatus(status).phrase.encode(),
                            headers=[(b"content-type", b"application/json"), (b"connection", b"close")])
        for event in (head, h11.Data(data=body.encode()), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _follow(self) -> None:
        """Move the deadline along with h11's view of the request: headers -> body -> received (none)."""
        state = self.conn.their_state
        if state is h11.SEND_BODY and self._phase == "headers":
            self._arm("body", self.limits.body_timeout)
        elif state is not h11.IDLE and state is not h11.SEND_BODY:
            self._disarm()

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._phase = None, None

    def _expired(self) -> None:
        log.debug("closing %s: its request's %s did not arrive in time", self.client, self._phase)
        self._deadline, self._phase = None, None
        if not self.transport.is_closing():
            self.transport.close()


def protocol_for(limits: EdgeLimits) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, carrying these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


def reserve_file_descriptors(max_connections: int) -> None:
    """Raise this process's open-file limit to what --max-connections needs (up to the hard limit), or refuse."""
    needed = max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise InvalidInput(f"--max-connections {max_connections} needs about {needed} open files, but this "
                               f"process may open {hard} (ulimit -n): lower --max-connections or raise the limit")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but the first SIGTERM (or Ctrl-C) runs the app's `drain(shutdown_timeout)` before uvicorn
    shuts down as usual; a second signal skips the rest of the drain."""

    def __init__(self, config: uvicorn.Config, drain, shutdown_timeout: float):
        super().__init__(config)
        self.drain, self.shutdown_timeout = drain, shutdown_timeout
        self.drain_requested, self.drain_task = False, None

    def handle_exit(self, sig, frame) -> None:
        if self.started and not self.drain_requested and not self.should_exit:
            self._captured_signals.append(sig)  # uvicorn re-raises it once it has shut down
            self.drain_requested = True          # picked up by on_tick, in the event loop
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self.drain_task is None:
            self.drain_task = asyncio.create_task(self.drain(self.shutdown_timeout))
            self.drain_task.add_done_callback(lambda _: setattr(self, "should_exit", True))
        return await super().on_tick(counter)

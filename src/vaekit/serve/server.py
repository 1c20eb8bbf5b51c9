"""`vaekit serve`: the demo app on uvicorn, on a socket bound before the run is loaded (so a
taken port is a one-line error at once, not after loading), with the connection limits that
matter once --host opens it to other machines."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from pathlib import Path

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ConfigError
from .app import create_app, load

STALL_SECONDS = 15.0    # a request's headers and body must all arrive within this long
CONNECTIONS = 64        # open at once; uvicorn answers 503 beyond


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port); ConfigError when it cannot be had."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port; choose one in 1..65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise ConfigError(f"--host {host} is not an address or known host name; try 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a restart need not wait for TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    sock.listen()   # from now on connections wait in the backlog until uvicorn takes them
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class StallGuard(H11Protocol):
    """uvicorn's HTTP/1.1 connection, closed when a request has not fully arrived (headers and
    body) within `stall_seconds` of the connection opening or of the previous answer: a client
    that stalls, or sends a byte at a time, would otherwise hold its connection for ever."""
    stall_seconds = STALL_SECONDS
    _stall: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._stall = self.loop.call_later(self.stall_seconds, self.transport.close)

    def _disarm(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def _request_incomplete(self) -> bool:
        return self.conn.their_state is h11.IDLE or self.conn.their_state is h11.SEND_BODY

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._request_incomplete():
            self._disarm()          # the whole request is in (or the connection is over)

    def on_response_complete(self) -> None:
        super().on_response_complete()      # may start on a pipelined request already received
        if not self.transport.is_closing() and self._request_incomplete():
            self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def server_config(app, stall_seconds: float = STALL_SECONDS) -> uvicorn.Config:
    """uvicorn's settings for the demo: HTTP/1.1 by h11 with the stall guard, at most CONNECTIONS
    connections at once, idle keep-alive connections closed after 5 s."""
    guard = type("StallGuard", (StallGuard,), {"stall_seconds": stall_seconds})
    return uvicorn.Config(app, http=guard, log_level="warning", limit_concurrency=CONNECTIONS, timeout_keep_alive=5)


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          data_dir: str | Path | None = None, precision: str = "auto") -> None:
    """Serves the demo of `run` until Ctrl-C. Off loopback anyone who reaches the port can use it:
    the demo has no login, so that is said on the way."""
    if not is_loopback(host):
        print(f"vaekit: warning: --host {host} lets other machines reach the demo, which has no login",
              file=sys.stderr)
    sock = bind(host, port)
    try:
        app = create_app(load(run, device, data_dir, precision), host)
        print(f"vaekit: the demo of {run} is on {url_of(sock)} (Ctrl-C stops it)", file=sys.stderr)
        try:
            uvicorn.Server(server_config(app)).run(sockets=[sock])
        except KeyboardInterrupt:   # uvicorn stops gracefully on Ctrl-C, then raises it again for its caller
            pass
        print("vaekit: the demo stopped", file=sys.stderr)
    finally:
        sock.close()

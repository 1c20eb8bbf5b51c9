"""`vaekit serve`: the demo app on uvicorn, on a socket bound before the run is loaded (so a
taken port is a one-line error at once, not after loading)."""
from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import uvicorn

from ..config import ConfigError
from .app import create_app, load


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


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
          data_dir: str | Path | None = None) -> None:
    """Serves the demo of `run` until Ctrl-C. Off loopback anyone who reaches the port can use it:
    the demo has no login, so that is said on the way."""
    if not is_loopback(host):
        print(f"vaekit: warning: --host {host} lets other machines reach the demo, which has no login",
              file=sys.stderr)
    sock = bind(host, port)
    try:
        app = create_app(load(run, device, data_dir))
        print(f"vaekit: the demo of {run} is on {url_of(sock)} (Ctrl-C stops it)", file=sys.stderr)
        try:
            uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
        except KeyboardInterrupt:   # uvicorn stops gracefully on Ctrl-C, then raises it again for its caller
            pass
        print("vaekit: the demo stopped", file=sys.stderr)
    finally:
        sock.close()

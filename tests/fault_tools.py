"""Fault injection through processes we own: a Redis we may kill, a TCP proxy we may cut (in front of
PostgreSQL), an HTTP proxy that answers 503 SlowDown (in front of S3), a worker whose scratch disk is a
small tmpfs we may fill. Shared by tests/test_faults.py and benchmarks/faults.py."""

import http.client
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

from tests.conftest import Service, free_port, process_env, rebasin_command


def wait_for_port(port: int, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class RedisProcess:
    """A redis-server of our own, without persistence: a restart comes back empty, like a failover."""

    def __init__(self, log_dir: Path):
        self.port, self.log_dir, self.process = free_port(), log_dir, None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.log_dir / "redis.log", "ab")
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart_empty(self) -> None:
        self.kill()
        self.start()


class TcpProxy:
    """Forwards a local port to a target; ``cut()`` drops every connection and refuses new ones
    (as a network partition or a database restart looks to a client) until ``restore()``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_off = threading.Event()
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut_off.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # idle connections (a pool's) stay open as long as they would directly
            with self.lock:
                self.connections |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with self.lock:
                    self.connections.discard(sock)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def cut(self) -> None:
        self.cut_off.set()
        with self.lock:
            connections = list(self.connections)
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self) -> None:
        self.cut_off.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class S3FaultProxy:
    """An HTTP proxy in front of an S3 endpoint; while ``failing`` it answers every request with
    503 SlowDown, as S3 does when it throttles or a node is overloaded."""

    def __init__(self, target_url: str):
        target = urlparse(target_url)
        self.target = (target.hostname, target.port)
        self.failing = threading.Event()
        self.refused = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                if proxy.failing.is_set():
                    proxy.refused += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection(*proxy.target, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                reply = upstream.getresponse()
                content = reply.read()
                self.send_response(reply.status, reply.reason)
                for key, value in reply.getheaders():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(content)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def spawn_worker_with_scratch(service: Service, scratch: Path, size: str = "64m") -> subprocess.Popen:
    """A ``rebasin worker`` whose temporary directory is a tmpfs of ``size`` in its own mount namespace
    (root needed; the mount disappears with the process)."""
    scratch.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o size={size} rebasin-scratch "{scratch}" && exec "$@"'
    command = ["unshare", "--mount", "sh", "-c", script, "sh", *rebasin_command("worker", "--device", "cpu")]
    log = open(service.log_dir / f"worker-{len(service.processes)}.log", "wb")
    process = subprocess.Popen(
        command, env=process_env(service.env | {"TMPDIR": str(scratch)}), stdout=log, stderr=subprocess.STDOUT,
        cwd=service.log_dir, start_new_session=True,
    )
    service.processes.append(process)
    return process


def scratch_of(worker: subprocess.Popen, scratch: Path) -> Path:
    """The worker's scratch directory as seen from here (through its mount namespace)."""
    return Path(f"/proc/{worker.pid}/root") / scratch.relative_to("/")


def fill_disk(worker: subprocess.Popen, scratch: Path) -> Path:
    """Fill the worker's scratch tmpfs to the last byte."""
    filler = scratch_of(worker, scratch) / "filler"
    with open(filler, "wb", buffering=0) as out:
        block = b"\0" * (1 << 20)
        try:
            while True:
                out.write(block)
        except OSError:
            pass
    return filler


def free_disk(filler: Path) -> None:
    filler.unlink(missing_ok=True)


def pause(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGSTOP)


def resume(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGCONT)


def have_tmpfs_namespaces() -> bool:
    return shutil.which("unshare") is not None and os.geteuid() == 0

"""Fault injection through processes we own: a Redis we may kill, a TCP proxy we may cut (in front of
PostgreSQL), an HTTP proxy that answers 503 SlowDown (in front of S3), a worker whose scratch disk is a
small tmpfs we may fill. Shared by tests/test_faults.py and benchmarks/faults.py."""

import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import boto3
import httpx
from safetensors.torch import save as save_safetensors
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from storage.models import Job
from tests.conftest import (
    S3_CREDENTIALS,
    Service,
    die_with_test_run,
    free_port,
    process_env,
    rebasin_command,
)
from tests.service_helpers import TERMINAL, make_mlp

SIZES = [16, 32, 32, 4]
TENANT_KEYS = {t: f"key-{t}" for t in "abcdefgh"}
ARTIFACTS = {"aligned.safetensors", "merged.safetensors", "permutation.json", "report.json"}


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
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=die_with_test_run)
        wait_for_port(self.port)

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


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
        self.server.handle_error = lambda request, address: None  # clients hanging up mid-request: not news
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
        cwd=service.log_dir, start_new_session=True, preexec_fn=die_with_test_run,
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


@dataclass
class Stack:
    """PostgreSQL (own database, behind a proxy), own Redis, moto S3 (behind a proxy), the API and two workers."""

    service: Service
    workers: list[subprocess.Popen]
    scratch: list[Path]
    redis: RedisProcess
    postgres: TcpProxy
    s3: S3FaultProxy
    db_url: str  # straight to PostgreSQL, for checks from outside
    bucket: str
    moto: str
    cleanup: list = field(default_factory=list)
    checkpoints: dict[str, list[str]] = field(default_factory=dict)

    def client(self, tenant: str = "a") -> httpx.Client:
        return self.service.client(headers={"Authorization": f"Bearer {TENANT_KEYS[tenant]}"})

    def jobs(self) -> list[Job]:
        engine = create_engine(self.db_url)
        try:
            with Session(engine) as session:
                return list(session.scalars(select(Job)))
        finally:
            engine.dispose()

    def restart_worker(self, index: int) -> None:
        """Warm shutdown (the running job finishes first), then a fresh worker on the same scratch."""
        old = self.workers[index]
        old.terminate()
        old.wait(timeout=120)
        self.workers[index] = spawn_worker_with_scratch(self.service, self.scratch[index], size="16m")

    def restart_api(self) -> None:
        server = next(p for p in self.service.processes if "serve" in p.args and p.poll() is None)
        server.terminate()
        server.wait(timeout=60)
        self.service.start_server()  # the old process stays listed: log names keep counting up

    def close(self) -> None:
        self.service.stop()
        for action in reversed(self.cleanup):
            action()


def build_stack(root: Path, admin_url: str, moto_endpoint: str, extra_env: dict[str, str], tenants: str = "".join(TENANT_KEYS)) -> Stack:
    """The stack, with two checkpoints uploaded for each of ``tenants``."""
    admin_url = make_url(admin_url)
    name = f"rebasin_faults_{secrets.token_hex(4)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop_database():
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    postgres = TcpProxy(admin_url.port or 5432, admin_url.host or "127.0.0.1")
    redis = RedisProcess(root)
    redis.start()
    bucket = f"faults-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=moto_endpoint, **s3_credentials()).create_bucket(Bucket=bucket)
    s3 = S3FaultProxy(moto_endpoint)
    env = S3_CREDENTIALS | {
        "REBASIN_DATABASE_URL": admin_url.set(host="127.0.0.1", port=postgres.port, database=name).render_as_string(hide_password=False),
        "REBASIN_BROKER_URL": redis.url,
        "REBASIN_ARTIFACT_URI": f"s3://{bucket}/rebasin",
        "REBASIN_S3_ENDPOINT_URL": s3.url,
        "REBASIN_DATA_DIR": str(root / "data"),
        "REBASIN_API_KEYS": ",".join(f"{t}:{k}" for t, k in TENANT_KEYS.items()),
    } | extra_env
    subprocess.run(rebasin_command("db", "upgrade"), env=process_env(env), check=True, cwd=root, timeout=120)
    service = Service(env=env, log_dir=root)
    scratch = [root / f"scratch-{i}" for i in range(2)]
    workers = [spawn_worker_with_scratch(service, path, size="16m") for path in scratch]
    stack = Stack(service, workers, scratch, redis, postgres, s3, admin_url.set(database=name).render_as_string(hide_password=False),
                  bucket, moto_endpoint, cleanup=[drop_database, postgres.close, s3.close, redis.kill])
    try:
        service.start_server()
        for tenant in tenants:
            with stack.client(tenant) as client:
                stack.checkpoints[tenant] = [upload(client, seed) for seed in (0, 1)]
    except BaseException:
        stack.close()
        raise
    return stack


def s3_credentials() -> dict[str, str]:
    return {"aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": S3_CREDENTIALS["AWS_DEFAULT_REGION"]}


def upload(client: httpx.Client, seed: int) -> str:
    response = client.post("/v1/checkpoints", files={"file": ("m.safetensors", save_safetensors(make_mlp(seed, SIZES).state_dict()))})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def job_body(stack: Stack, tenant: str) -> dict:
    return {"method": "weight_matching", "checkpoints": stack.checkpoints[tenant], "architecture": {"name": "mlp"}}


def submit(stack: Stack, count: int, tenant: str = "a") -> list[str]:
    with stack.client(tenant) as client:
        ids = []
        for _ in range(count):
            response = client.post("/v1/jobs", json=job_body(stack, tenant))
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        return ids


def wait_all(stack: Stack, ids: list[str], tenant: str = "a", timeout_s: float = 120) -> list[dict]:
    """The jobs once all have ended, or as they are at the deadline."""
    deadline = time.monotonic() + timeout_s
    with stack.client(tenant) as client:
        while True:
            jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in ids]
            if all(job.get("status") in TERMINAL for job in jobs) or time.monotonic() > deadline:
                return jobs
            time.sleep(0.3)

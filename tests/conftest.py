"""Shared fixtures: real servers (uvicorn in a subprocess), real PostgreSQL and Redis.

PostgreSQL and Redis are found through REBASIN_TEST_POSTGRES_URL and
REBASIN_TEST_REDIS_URL. Without them these tests skip on a laptop and fail
under CI=true, so that CI can never pass by skipping them.
"""

import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def require_env(name: str) -> str:
    value = os.environ.get(name)
    if value:
        return value
    message = f"{name} is not set (see README: Running the tests)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + "; CI must provide it")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rebasin_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def process_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBASIN_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env | extra


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    """Signal a spawned process and its children (each runs in its own session)."""
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass


_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def die_with_test_run() -> None:
    """``preexec_fn`` of every service process a test starts: the kernel kills it when the test run dies, even by
    SIGKILL, so a killed run leaves no worker behind to take a later run's broker messages."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Service:
    """A running API server (and maybe separate workers), configured by environment."""

    env: dict[str, str]
    log_dir: Path
    url: str = ""
    processes: list[subprocess.Popen] = field(default_factory=list)

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}-{len(self.processes)}.log", "wb")
        process = subprocess.Popen(
            rebasin_command(*args), env=process_env(self.env), stdout=log, stderr=subprocess.STDOUT, cwd=self.log_dir,
            start_new_session=True, preexec_fn=die_with_test_run,
        )
        self.processes.append(process)
        return process

    def start_server(self, *extra: str) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        server = self.spawn("server", "serve", "--port", str(port), *extra)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"server did not come up:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.log_dir.glob("*.log")))

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """SIGTERM: each process shuts down in order (as under a supervisor), killed if it takes too long.
        SIGKILL: each process and its children die at once, as in a crash."""
        for process in self.processes:
            if signum == signal.SIGKILL:
                _signal_group(process, signum)
            elif process.poll() is None:
                process.send_signal(signum)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than two competing ones."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def test_device() -> str:
    """The device matching and job tests run on: REBASIN_TEST_DEVICE (cpu, cuda, cuda:N), cpu by default.
    Asking for a GPU that is not there fails: a GPU run must never pass by quietly running on the CPU."""
    import torch

    device = os.environ.get("REBASIN_TEST_DEVICE", "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"REBASIN_TEST_DEVICE={device} but torch sees no CUDA device")
    return device


@pytest.fixture
def postgres_url():
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = make_url(require_env("REBASIN_TEST_POSTGRES_URL"))
    name = f"rebasin_test_{secrets.token_hex(6)}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield admin_url.set(database=name).render_as_string(hide_password=False)
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def redis_url():
    """A Redis database emptied before the test, so no earlier queue leaks in."""
    import redis

    url = require_env("REBASIN_TEST_REDIS_URL")
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.fixture
def make_embedded_service(tmp_path):
    """Factory: ``rebasin serve`` on the embedded default (SQLite, local artifacts, filesystem broker,
    in-process worker), with extra environment."""
    services = []

    def make(**env) -> Service:
        root = tmp_path / f"embedded-{len(services)}"
        root.mkdir()
        service = Service(env={"REBASIN_DATA_DIR": str(root / "data")} | env, log_dir=root)
        services.append(service)
        service.start_server()
        return service

    yield make
    for service in services:
        service.stop()


@pytest.fixture
def embedded_service(make_embedded_service):
    return make_embedded_service()


@pytest.fixture
def make_production_service(tmp_path, postgres_url, redis_url):
    """Factory: PostgreSQL + Redis, migrated by ``rebasin db upgrade``, API plus ``workers`` separately
    started ``rebasin worker`` processes, with extra environment."""
    services = []

    def make(workers: int = 1, **env) -> Service:
        env = {
            "REBASIN_DATABASE_URL": postgres_url,
            "REBASIN_BROKER_URL": redis_url,
            "REBASIN_ARTIFACT_URI": (tmp_path / "artifacts").as_uri(),
            "REBASIN_DATA_DIR": str(tmp_path / "data"),
        } | env
        if not services:
            subprocess.run(rebasin_command("db", "upgrade"), env=process_env(env), check=True, cwd=tmp_path, timeout=120)
        service = Service(env=env, log_dir=tmp_path)
        services.append(service)
        for _ in range(workers):
            service.spawn("worker", "worker", "--device", "cpu")
        service.start_server()
        return service

    yield make
    for service in services:
        service.stop()


@pytest.fixture
def production_service(make_production_service):
    return make_production_service()


@pytest.fixture(params=["embedded", "postgres+redis"])
def service(request):
    """Each end-to-end test runs on both ways of running the service."""
    fixture = "embedded_service" if request.param == "embedded" else "production_service"
    return request.getfixturevalue(fixture)


# --- Storage: a real S3 (moto over HTTP) and the API on both storage backends -------------------------

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_endpoint():
    """A moto S3 server on a free loopback port, reached through boto3 over real HTTP."""
    from moto.server import ThreadedMotoServer

    saved = {name: os.environ.get(name) for name in S3_CREDENTIALS}
    os.environ.update(S3_CREDENTIALS)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def s3_bucket(moto_endpoint):
    """A fresh bucket for one test: (endpoint URL, bucket name)."""
    import boto3

    name = f"rebasin-test-{secrets.token_hex(6)}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return moto_endpoint, name


@dataclass
class StorageBackend:
    """Environment for one storage configuration: database URL plus artifact store URI."""

    name: str
    env: dict[str, str]

    def settings(self, **overrides):
        from core.config import Settings

        fields = {k.removeprefix("REBASIN_").lower(): v for k, v in self.env.items()}
        return Settings(_env_file=None, **(fields | overrides))


def _storage_backend(request, tmp_path, name: str):
    from storage import db

    (tmp_path / "data").mkdir()
    env = {"REBASIN_DATA_DIR": str(tmp_path / "data")}
    if name == "sqlite+local":
        env["REBASIN_DATABASE_URL"] = f"sqlite:///{tmp_path / 'data' / 'rebasin.db'}"
        env["REBASIN_ARTIFACT_URI"] = (tmp_path / "artifacts").as_uri()
    else:
        endpoint, bucket = request.getfixturevalue("s3_bucket")
        env["REBASIN_DATABASE_URL"] = request.getfixturevalue("postgres_url")
        env["REBASIN_ARTIFACT_URI"] = f"s3://{bucket}/rebasin"
        env["REBASIN_S3_ENDPOINT_URL"] = endpoint
        env |= S3_CREDENTIALS
    db.upgrade(env["REBASIN_DATABASE_URL"])
    yield StorageBackend(name, env)
    db.get_engine(env["REBASIN_DATABASE_URL"]).dispose()


@pytest.fixture(params=["sqlite+local", "postgres+s3"])
def storage_backend(request, tmp_path):
    """Each storage test runs on SQLite + a local directory and on PostgreSQL + S3 (moto over HTTP), migrated."""
    yield from _storage_backend(request, tmp_path, request.param)


@pytest.fixture
def s3_storage_backend(request, tmp_path):
    """PostgreSQL + S3 only, for what only S3 can do (presigned direct uploads)."""
    yield from _storage_backend(request, tmp_path, "postgres+s3")


@pytest.fixture
def local_storage_backend(request, tmp_path):
    yield from _storage_backend(request, tmp_path, "sqlite+local")

"""Checkpoints imported by reference, over HTTP against a real ``rebasin serve``: from S3 (moto) and from an
HTTPS server with a test CA they merge like uploads; every source the policy refuses is a 4xx problem and
fetches nothing (the HTTPS server's request log is the proof)."""

import hashlib
import io
import socket
import time

import boto3
import pytest
import torch
from safetensors.torch import save as save_safetensors

from core.config import Settings
from storage import sources
from tests.conftest import S3_CREDENTIALS
from tests.import_helpers import FileServer, make_test_ca
from tests.service_helpers import make_mlp, run_job, upload
from tests.test_storage_api import RunsCode

MAX_UPLOAD_BYTES = 2 * 1024 * 1024
ALLOWED_ADDRESS = "127.0.0.2"  # the one loopback address the operator allows, as for an internal model store


@pytest.fixture
def tls(tmp_path):
    return make_test_ca(tmp_path, ["localhost", "models.test", socket.gethostname()],
                        [ALLOWED_ADDRESS, "127.0.0.1", "169.254.169.254"])


@pytest.fixture
def https_server(tls):
    server = FileServer(cert=tls[1], key=tls[2]).start()
    yield server
    server.stop()


def import_env(tls, bucket: str, moto: str) -> dict:
    return {
        "REBASIN_IMPORT_S3_BUCKETS": f"{bucket},another-bucket",
        "REBASIN_S3_ENDPOINT_URL": moto,
        # On the list, so that what refuses them is the address check, not the list.
        "REBASIN_IMPORT_HTTP_HOSTS": f"{ALLOWED_ADDRESS},127.0.0.1,localhost,169.254.169.254,{socket.gethostname()}",
        "REBASIN_IMPORT_HTTP_ALLOWED_NETWORKS": f"{ALLOWED_ADDRESS}/32",
        "REBASIN_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "SSL_CERT_FILE": str(tls[0]),
        "REBASIN_JOB_SWEEP_INTERVAL_S": "1",
    } | S3_CREDENTIALS


def start_import(client, source: str, **extra):
    return client.post("/v1/checkpoints/imports", json={"source": source} | extra)


def wait_import(client, import_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = client.get(f"/v1/checkpoints/imports/{import_id}").json()
        if row["status"] in ("succeeded", "failed"):
            return row
        time.sleep(0.2)
    pytest.fail(f"import {import_id} still {row}")


def imported(client, source: str) -> dict:
    response = start_import(client, source)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/checkpoints/imports/{response.json()['id']}"
    assert response.json()["status"] == "queued" and response.json()["checkpoint_id"] is None
    return wait_import(client, response.json()["id"])


def test_imports_from_s3_and_https_merge_like_uploads_and_refusals_fetch_nothing(
    make_embedded_service, tls, https_server, s3_bucket
):
    moto, bucket = s3_bucket
    a, b = (save_safetensors(make_mlp(seed).state_dict()) for seed in (1, 2))
    boto3.client("s3", endpoint_url=moto).put_object(Bucket=bucket, Key="models/a.safetensors", Body=a)
    port = https_server.port
    base = f"https://{ALLOWED_ADDRESS}:{port}"
    https_server.files |= {"/b.safetensors": b, "/big.safetensors": b"x" * (MAX_UPLOAD_BYTES + 1),
                           "/big-unsized.safetensors": b"x" * (MAX_UPLOAD_BYTES + 1)}
    https_server.unsized.add("/big-unsized.safetensors")
    https_server.redirects |= {
        "/to-loopback": f"https://127.0.0.1:{port}/b.safetensors",
        "/to-other-host": f"https://models.test:{port}/b.safetensors",
        "/to-file": "file:///etc/passwd",
        "/relative": "/b.safetensors",
    }
    evil = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": RunsCode(str(https_server.cert.parent / "pwned"))}, evil)
    https_server.files["/evil.pt"] = evil.getvalue()

    service = make_embedded_service(**import_env(tls, bucket, moto))
    with service.client() as client:
        from_s3 = imported(client, f"s3://{bucket}/models/a.safetensors")
        from_https = imported(client, f"{base}/b.safetensors")
        assert from_s3["status"] == from_https["status"] == "succeeded", (from_s3, from_https, service.logs())
        checkpoints = [client.get(f"/v1/checkpoints/{row['checkpoint_id']}").json() for row in (from_s3, from_https)]
        assert [c["sha256"] for c in checkpoints] == [hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()]
        assert [c["name"] for c in checkpoints] == ["a.safetensors", "b.safetensors"]
        # A redirect within the policy is followed.
        relative = imported(client, f"{base}/relative")
        assert relative["status"] == "succeeded", relative
        # Deduplicated by content like uploads: uploading the same bytes shares the stored object.
        uploaded = [upload(client, make_mlp(seed).state_dict(), f"u{seed}") for seed in (1, 2)]
        assert [u["sha256"] for u in uploaded] == [c["sha256"] for c in checkpoints]

        body = {"architecture": {"name": "mlp"}, "options": {"seed": 0}}
        merged_imports = run_job(client, body | {"checkpoints": [c["id"] for c in checkpoints]})
        merged_uploads = run_job(client, body | {"checkpoints": [u["id"] for u in uploaded]})
        assert merged_imports["status"] == merged_uploads["status"] == "succeeded", merged_imports
        digests = [{a["name"]: a["sha256"] for a in job["artifacts"]} for job in (merged_imports, merged_uploads)]
        assert digests[0]["merged.safetensors"] == digests[1]["merged.safetensors"]

        # Refused at once, before anything is fetched: a 422 problem each.
        fetched_before = list(https_server.log)
        refused_now = {
            "bucket not allowed": f"s3://not-allowed-{bucket}/models/a.safetensors",
            "127.0.0.1": f"https://127.0.0.1:{port}/b.safetensors",
            "localhost": f"https://localhost:{port}/b.safetensors",
            "metadata service": f"https://169.254.169.254:{port}/latest/meta-data/",
            "own host name (loopback)": f"https://{socket.gethostname()}:{port}/b.safetensors",
            "host not on the list": f"https://models.test:{port}/b.safetensors",
            "file": "file:///etc/passwd",
            "gopher": f"gopher://{ALLOWED_ADDRESS}:{port}/_GET%20/b.safetensors",
            "ftp": f"ftp://{ALLOWED_ADDRESS}:{port}/b.safetensors",
            "http (not allowed)": f"http://{ALLOWED_ADDRESS}:{port}/b.safetensors",
            "credentials in the URL": f"https://user:pw@{ALLOWED_ADDRESS}:{port}/b.safetensors",
            "mlflow without a server": "models:/mlp/1",
        }
        for case, source in refused_now.items():
            response = start_import(client, source)
            assert response.status_code == 422, (case, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["type"].endswith("/import-refused"), (case, response.json())
        assert https_server.log == fetched_before

        # Found while fetching: the import fails with a 4xx problem, and what was refused is never requested.
        refused_later = {
            "/to-loopback": (422, "import-refused"),
            "/to-other-host": (422, "import-refused"),
            "/to-file": (422, "import-refused"),
            "/big.safetensors": (413, "upload-too-large"),
            "/big-unsized.safetensors": (413, "upload-too-large"),
            "/evil.pt": (422, "invalid-file"),
            "/missing.safetensors": (422, "import-failed"),
        }
        stored_before = len(client.get("/v1/checkpoints").json()["items"])
        for path, (status, kind) in refused_later.items():
            row = imported(client, base + path)
            assert row["status"] == "failed" and row["checkpoint_id"] is None, (path, row)
            assert row["error"]["status"] == status and row["error"]["type"].endswith("/" + kind), (path, row["error"])
        assert len(client.get("/v1/checkpoints").json()["items"]) == stored_before
        assert not (https_server.cert.parent / "pwned").exists()
        requested = https_server.paths()[len(fetched_before):]
        assert sorted(set(requested)) == sorted(refused_later), requested  # the redirect targets: never
        assert "/b.safetensors" not in requested
        assert not list((service.log_dir / "embedded-0" / "data" / "staging").glob("*/*"))

        assert client.get("/v1/checkpoints/imports/imp_missing").status_code == 404


def settings_for(tls_ca, **overrides) -> Settings:
    fields = {"import_http_hosts": "models.test", "import_http_allowed_networks": f"{ALLOWED_ADDRESS}/32"}
    return Settings(_env_file=None, **(fields | overrides))


def resolving(monkeypatch, *answers: str):
    """Make ``models.test`` resolve to each answer in turn (a DNS server that changes its mind: rebinding)."""
    real, queue = socket.getaddrinfo, list(answers)

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "models.test":
            address = queue.pop(0) if len(queue) > 1 else queue[0]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("address", ["10.1.2.3", "172.16.0.9", "192.168.1.1", "100.64.0.1", "169.254.169.254",
                                     "127.0.0.1", "0.0.0.0", "::1", "fe80::1", "fd00::1", "::ffff:10.0.0.1"])
def test_a_name_resolving_to_a_private_address_is_refused(monkeypatch, tls, address):
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: (
        [(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        if host == "models.test" else real(host, port, *a, **k)))
    with pytest.raises(sources.SourceRefused, match="public addresses only"):
        sources.check_source("https://models.test/m.safetensors", settings_for(tls[0]))


def test_the_connection_goes_to_the_checked_address_dns_rebinding_included(monkeypatch, tls, https_server, tmp_path):
    monkeypatch.setenv("SSL_CERT_FILE", str(tls[0]))
    https_server.files["/m.safetensors"] = b"weights"
    url = f"https://models.test:{https_server.port}/m.safetensors"
    settings = settings_for(tls[0])

    # Allowed address: connected to it, and TLS verified the certificate for the name.
    resolving(monkeypatch, ALLOWED_ADDRESS)
    received = bytearray()
    sources.fetch_http(sources.check_source(url, settings), settings, 100, lambda: received.extend)
    assert bytes(received) == b"weights" and https_server.log == [(f"models.test:{https_server.port}", "/m.safetensors")]

    # Public at the check, loopback when the worker connects: refused, and nothing reaches the server.
    resolving(monkeypatch, "93.184.216.34", "127.0.0.1")
    source = sources.check_source(url, settings)
    with pytest.raises(sources.SourceRefused):
        sources.fetch_http(source, settings, 100, lambda: received.extend)
    assert len(https_server.log) == 1


def test_an_untrusted_certificate_fails_without_retrying(monkeypatch, tls, https_server):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the test CA is not trusted
    https_server.files["/m.safetensors"] = b"weights"
    resolving(monkeypatch, ALLOWED_ADDRESS)
    settings = settings_for(tls[0])
    source = sources.check_source(f"https://models.test:{https_server.port}/m.safetensors", settings)
    with pytest.raises(sources.SourceFailed, match="not trusted") as failure:
        sources.fetch_http(source, settings, 100, lambda: bytearray().extend)
    assert failure.value.status == 422 and not failure.value.retry


def test_an_import_survives_the_death_of_its_worker(make_production_service, tls, https_server, s3_bucket):
    import os
    import signal
    import threading

    moto, bucket = s3_bucket
    https_server.files["/slow.safetensors"] = save_safetensors(make_mlp(3).state_dict())
    https_server.gates["/slow.safetensors"] = threading.Event()
    service = make_production_service(**import_env(tls, bucket, moto) | {"REBASIN_JOB_HEARTBEAT_TIMEOUT_S": "3"})
    with service.client() as client:
        started = start_import(client, f"https://{ALLOWED_ADDRESS}:{https_server.port}/slow.safetensors").json()
        deadline = time.monotonic() + 120
        while "/slow.safetensors" not in https_server.paths() and time.monotonic() < deadline:
            time.sleep(0.2)
        row = client.get(f"/v1/checkpoints/imports/{started['id']}").json()
        assert row["status"] == "running" and row["attempts"] == 1, row
        worker = service.processes[0]
        os.killpg(worker.pid, signal.SIGKILL)  # mid-download: the worker and its pool die at once
        worker.wait(timeout=30)
        https_server.gates["/slow.safetensors"].set()
        service.spawn("worker", "worker", "--device", "cpu")
        row = wait_import(client, started["id"], timeout_s=180)
        assert row["status"] == "succeeded" and row["attempts"] == 2, (row, service.logs())
        assert https_server.paths().count("/slow.safetensors") == 2
        checkpoint = client.get(f"/v1/checkpoints/{row['checkpoint_id']}").json()
        assert checkpoint["sha256"] == hashlib.sha256(https_server.files["/slow.safetensors"]).hexdigest()

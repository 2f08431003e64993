"""The checkpoint and dataset API over both storage backends: SQLite + local directory, PostgreSQL + S3 (moto).

The same tests run on both (``storage_backend`` is parametrised). Downloads from S3 are 307 redirects
to a presigned URL, which these tests follow over real HTTP.
"""

import io
import pickle
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select

from api.main import create_app
from storage.artifacts import open_store
from storage.db import session_scope
from storage.models import Blob, Checkpoint, Dataset, Job, JobInput
from storage.objects import OBJECTS_PREFIX

KEYS = "alice:key-alice,bob:key-bob"


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"fc1.weight": torch.randn(32, 16, generator=generator), "fc1.bias": torch.randn(32, generator=generator)}


def safetensors_bytes(seed: int = 0) -> bytes:
    return save_safetensors(state(seed))


class Api:
    """A TestClient on the backend, plus views of its database and store for the assertions."""

    def __init__(self, backend, **overrides):
        self.settings = backend.settings(**overrides)
        self.app = create_app(self.settings)
        self.store = open_store(self.settings.resolved_artifact_uri(), self.settings.s3_endpoint_url)
        self.db_url = self.settings.resolved_database_url()

    def client(self, key: str | None = None) -> TestClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return TestClient(self.app, headers=headers)

    def objects(self) -> list[str]:
        return sorted(key for key, _ in self.store.list_keys(""))

    def count(self, model) -> int:
        with session_scope(self.db_url) as session:
            return session.scalar(select(func.count()).select_from(model))

    def staging_leftovers(self) -> list[Path]:
        root = self.store.staging_dir() or self.settings.data_dir.resolve() / "staging"
        return list(root.iterdir()) if root.is_dir() else []


@pytest.fixture
def api(storage_backend):
    return Api(storage_backend)


def upload(client, content: bytes, filename: str = "model.safetensors", path: str = "/v1/checkpoints", **form):
    return client.post(path, files={"file": (filename, content)}, data=form)


def download(client, path: str, headers: dict | None = None) -> httpx.Response:
    """GET the content, following a 307 to S3 over real HTTP (TestClient would send it to the app)."""
    response = client.get(path, headers=headers or {}, follow_redirects=False)
    if response.status_code == 307:
        assert "X-Amz-Signature" in response.headers["location"]
        return httpx.get(response.headers["location"], headers=headers or {}, timeout=30)
    return response


def test_upload_get_list_download_delete(api):
    content = safetensors_bytes()
    with api.client() as client:
        response = upload(client, content, name="first")
        assert response.status_code == 201, response.text
        checkpoint = response.json()
        assert response.headers["location"] == f"/v1/checkpoints/{checkpoint['id']}"
        assert checkpoint["name"] == "first"
        assert checkpoint["format"] == "safetensors"
        assert checkpoint["size_bytes"] == len(content)
        assert checkpoint["num_tensors"] == 2 and checkpoint["num_parameters"] == 32 * 16 + 32
        import hashlib

        assert checkpoint["sha256"] == hashlib.sha256(content).hexdigest()
        assert client.get(f"/v1/checkpoints/{checkpoint['id']}").json() == checkpoint
        assert [c["id"] for c in client.get("/v1/checkpoints").json()["items"]] == [checkpoint["id"]]

        downloaded = download(client, f"/v1/checkpoints/{checkpoint['id']}/content")
        assert downloaded.status_code == 200
        assert downloaded.content == content

        assert client.delete(f"/v1/checkpoints/{checkpoint['id']}").status_code == 204
        assert client.get(f"/v1/checkpoints/{checkpoint['id']}").status_code == 404
        assert client.delete(f"/v1/checkpoints/{checkpoint['id']}").status_code == 404
    assert api.objects() == []
    assert api.count(Blob) == 0
    assert api.staging_leftovers() == []


def test_range_download(api):
    content = safetensors_bytes()
    with api.client() as client:
        checkpoint = upload(client, content).json()
        path = f"/v1/checkpoints/{checkpoint['id']}/content"
        partial = download(client, path, {"Range": "bytes=100-199"})
        assert partial.status_code == 206
        assert partial.content == content[100:200]
        assert partial.headers["content-range"] == f"bytes 100-199/{len(content)}"
        tail = download(client, path, {"Range": "bytes=-10"})
        assert tail.status_code == 206 and tail.content == content[-10:]
        assert download(client, path, {"Range": f"bytes={len(content) + 10}-"}).status_code == 416


def test_pytorch_state_dict_is_stored_as_safetensors(api):
    buffer = io.BytesIO()
    torch.save({"state_dict": state(3)}, buffer)
    with api.client() as client:
        response = upload(client, buffer.getvalue(), filename="model.pt")
        assert response.status_code == 201, response.text
        checkpoint = response.json()
        assert checkpoint["format"] == "pytorch" and checkpoint["name"] == "model.pt"
        stored = download(client, f"/v1/checkpoints/{checkpoint['id']}/content").content
    loaded = load_safetensors(stored)
    assert loaded.keys() == state(3).keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state(3).items())
    assert checkpoint["size_bytes"] == len(stored)


def test_identical_bytes_are_stored_once_and_deleted_with_the_last_reference(api):
    content = safetensors_bytes(1)
    with api.client() as client:
        first, second = upload(client, content).json(), upload(client, content).json()
        assert first["id"] != second["id"] and first["sha256"] == second["sha256"]
        dataset_like = upload(client, safetensors_bytes(2)).json()
        assert len(api.objects()) == 2

        assert client.delete(f"/v1/checkpoints/{first['id']}").status_code == 204
        assert download(client, f"/v1/checkpoints/{second['id']}/content").content == content
        assert len(api.objects()) == 2

        assert client.delete(f"/v1/checkpoints/{second['id']}").status_code == 204
        assert len(api.objects()) == 1
        assert client.delete(f"/v1/checkpoints/{dataset_like['id']}").status_code == 204
    assert api.objects() == []


def test_tenants_share_no_bytes_and_see_only_their_own(storage_backend):
    api = Api(storage_backend, api_keys=KEYS)
    content = safetensors_bytes(4)
    with api.client("key-alice") as alice, api.client("key-bob") as bob:
        assert upload(api.client(), content).status_code == 401
        mine, theirs = upload(alice, content).json(), upload(bob, content).json()
        assert len(api.objects()) == 2  # same bytes, two tenants: two objects
        assert {key.split("/")[1] for key in api.objects()} == {"alice", "bob"}
        assert bob.get(f"/v1/checkpoints/{mine['id']}").status_code == 404
        assert bob.get(f"/v1/checkpoints/{mine['id']}/content").status_code == 404
        assert bob.delete(f"/v1/checkpoints/{mine['id']}").status_code == 404
        assert [c["id"] for c in bob.get("/v1/checkpoints").json()["items"]] == [theirs["id"]]
        assert alice.delete(f"/v1/checkpoints/{mine['id']}").status_code == 204
        assert download(bob, f"/v1/checkpoints/{theirs['id']}/content").content == content


class RunsCode:
    """Unpickling this would create a file: the payload of a malicious checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_files(tmp_path: Path) -> dict[str, tuple[bytes, str]]:
    marker = tmp_path / "pwned"
    zipped = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": RunsCode(str(marker))}, zipped)
    scripted = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    nan_state = state()
    nan_state["fc1.bias"][5] = float("nan")
    return {
        "pickle": (pickle.dumps(RunsCode(str(marker)), protocol=4), "refused to load"),
        "torch.save with a payload": (zipped.getvalue(), "refused to load"),
        "torchscript": (scripted.getvalue(), "TorchScript"),
        "garbage": (b"this is not a checkpoint at all", "unknown file format"),
        "empty": (b"", "empty"),
        "nan": (save_safetensors(nan_state), "NaN"),
        "truncated safetensors": (safetensors_bytes()[:-7], "outside the file"),
    }


@pytest.mark.parametrize(
    "case",
    ["pickle", "torch.save with a payload", "torchscript", "garbage", "empty", "nan", "truncated safetensors"],
)
def test_refused_files_leave_nothing(api, tmp_path, case):
    content, reason = malicious_files(tmp_path)[case]
    with api.client() as client:
        response = upload(client, content, filename="model.pt")
        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["type"].endswith("/invalid-file") and reason in problem["detail"]
    assert not (tmp_path / "pwned").exists()
    assert api.objects() == [] and api.count(Checkpoint) == 0 and api.count(Blob) == 0
    assert api.staging_leftovers() == []


def test_dataset_layout_is_checked(api):
    good = save_safetensors({"inputs": torch.randn(10, 4), "targets": torch.arange(10) % 3})
    bad = save_safetensors({"inputs": torch.randn(10, 4), "targets": torch.randn(10)})
    with api.client() as client:
        response = upload(client, good, path="/v1/datasets", name="toy")
        assert response.status_code == 201, response.text
        assert response.json()["num_examples"] == 10
        assert response.headers["location"] == f"/v1/datasets/{response.json()['id']}"
        refused = upload(client, bad, path="/v1/datasets")
        assert refused.status_code == 422 and "int64" in refused.json()["detail"]
    assert api.count(Dataset) == 1 and len(api.objects()) == 1


def test_token_dataset_layout_is_checked(api):
    """Token ids: int64 inputs [N, T] with next-token targets [N, T] (or class labels [N]); other shapes refused."""
    tokens = torch.randint(16, (10, 9))
    sequence = save_safetensors({"inputs": tokens[:, :-1].contiguous(), "targets": tokens[:, 1:].contiguous()})
    classes = save_safetensors({"inputs": tokens, "targets": torch.arange(10) % 3})
    ragged = save_safetensors({"inputs": tokens, "targets": tokens[:, :4].contiguous()})
    with api.client() as client:
        for content, examples in ((sequence, 10), (classes, 10)):
            response = upload(client, content, path="/v1/datasets")
            assert response.status_code == 201, response.text
            assert response.json()["num_examples"] == examples
        refused = upload(client, ragged, path="/v1/datasets")
        assert refused.status_code == 422 and "next-token targets" in refused.json()["detail"]
    assert api.count(Dataset) == 2


def test_upload_over_the_limit_is_refused_while_streaming(storage_backend):
    api = Api(storage_backend, max_upload_bytes=4096)
    content = safetensors_bytes()  # a little over 2 KiB of tensors... make sure it is over the limit:
    content = save_safetensors({"w": torch.zeros(4096)})
    with api.client() as client:
        announced = upload(client, content)
        assert announced.status_code == 413, announced.text

        # No Content-Length (chunked): refused by counting, not by the header check.
        boundary = "limit-boundary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="w.safetensors"\r\n\r\n'.encode()
            + content
            + f"\r\n--{boundary}--\r\n".encode()
        )

        def chunks():
            for start in range(0, len(body), 1000):
                yield body[start : start + 1000]

        streamed = client.post(
            "/v1/checkpoints", content=chunks(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        assert streamed.status_code == 413, streamed.text
        assert "REBASIN_MAX_UPLOAD_BYTES" in streamed.json()["detail"]
    assert api.objects() == [] and api.count(Checkpoint) == 0
    assert api.staging_leftovers() == []


def test_malformed_requests_are_4xx_problems(api):
    with api.client() as client:
        missing = client.post("/v1/checkpoints", data={"name": "x"}, files={"other": ("a", b"b")})
        assert missing.status_code == 422 and "file" in missing.json()["detail"]
        wrong_type = client.post("/v1/checkpoints", content=b"raw", headers={"Content-Type": "application/octet-stream"})
        assert wrong_type.status_code == 415
        two_files = client.post(
            "/v1/checkpoints", files=[("file", ("a", safetensors_bytes())), ("file", ("b", safetensors_bytes()))]
        )
        assert two_files.status_code == 422
        long_name = upload(client, safetensors_bytes(), name="n" * 300)
        assert long_name.status_code == 422
        assert client.get("/v1/checkpoints/ckpt_nope/content").status_code == 404
    assert api.objects() == [] and api.count(Checkpoint) == 0


def test_delete_of_an_input_of_an_active_job_is_refused(api):
    with api.client() as client:
        checkpoint = upload(client, safetensors_bytes()).json()
        with session_scope(api.db_url) as session:
            job = Job(tenant="default", method="weight_matching", request={}, status="running")
            job.inputs = [JobInput(resource_id=checkpoint["id"], position=0, role="checkpoint")]
            session.add(job)
            session.commit()
            job_id = job.id
        response = client.delete(f"/v1/checkpoints/{checkpoint['id']}")
        assert response.status_code == 409 and response.json()["type"].endswith("/in-use")
        assert download(client, f"/v1/checkpoints/{checkpoint['id']}/content").status_code == 200

        with session_scope(api.db_url) as session:
            session.get(Job, job_id).status = "succeeded"
            session.commit()
        assert client.delete(f"/v1/checkpoints/{checkpoint['id']}").status_code == 204
    assert api.objects() == []


def test_objects_live_under_the_content_addressed_prefix(api):
    with api.client() as client:
        checkpoint = upload(client, safetensors_bytes()).json()
    (key,) = api.objects()
    assert key == f"{OBJECTS_PREFIX}default/{checkpoint['sha256'][:2]}/{checkpoint['sha256']}.safetensors"

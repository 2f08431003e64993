"""Direct-to-S3 multipart uploads with presigned part URLs (moto over HTTP), and their refusal on a local store."""

import hashlib
from datetime import timedelta

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors
from sqlalchemy import update

from storage.db import session_scope
from storage.models import Checkpoint, DirectUpload, utcnow
from tests.test_storage_api import Api, download

MIB = 1024**2


def big_checkpoint(nan: bool = False) -> bytes:
    """A little over 6 MiB of float32: two parts at the 5 MiB S3 minimum."""
    weight = torch.randn(1600, 1000, generator=torch.Generator().manual_seed(0))
    if nan:
        weight[-1, -1] = float("nan")  # in the last part, far from the header
    return save_safetensors({"layer.weight": weight, "layer.bias": torch.zeros(1000)})


def put_parts(upload: dict, content: bytes) -> list[dict]:
    parts = []
    for part in upload["parts"]:
        chunk = content[part["offset"] : part["offset"] + part["size_bytes"]]
        response = httpx.put(part["url"], content=chunk, timeout=60)  # signed by boto3, sent by a plain client
        assert response.status_code == 200, response.text
        parts.append({"part_number": part["part_number"], "etag": response.headers["etag"]})
    return parts


@pytest.fixture
def s3_api(s3_storage_backend):
    return Api(s3_storage_backend)


def start(client, size: int, kind: str = "checkpoint", **extra) -> dict:
    response = client.post("/v1/uploads", json={"kind": kind, "name": "big", "size_bytes": size, "part_size_bytes": 5 * MIB} | extra)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/v1/uploads/{response.json()['id']}"
    return response.json()


def test_multipart_upload_end_to_end(s3_api):
    content = big_checkpoint()
    with s3_api.client() as client:
        upload = start(client, len(content))
        assert upload["part_count"] == 2 and len(upload["parts"]) == 2 and upload["status"] == "pending"
        parts = put_parts(upload, content)

        wrong = client.post(f"/v1/uploads/{upload['id']}/complete", json={"parts": [parts[1], parts[0]]})
        assert wrong.status_code == 422  # out of order: the upload stays pending, the client can retry
        response = client.post(f"/v1/uploads/{upload['id']}/complete", json={"parts": parts})
        assert response.status_code == 201, response.text
        checkpoint = response.json()
        assert response.headers["location"] == f"/v1/checkpoints/{checkpoint['id']}"
        assert checkpoint["sha256"] == hashlib.sha256(content).hexdigest()
        assert checkpoint["size_bytes"] == len(content) and checkpoint["name"] == "big"
        assert download(client, f"/v1/checkpoints/{checkpoint['id']}/content").content == content

        status = client.get(f"/v1/uploads/{upload['id']}").json()
        assert status["status"] == "completed" and status["resource_id"] == checkpoint["id"] and status["parts"] is None
        again = client.post(f"/v1/uploads/{upload['id']}/complete", json={"parts": parts})
        assert again.status_code == 409
    # Only the content-addressed object is left: the temporary upload key is gone.
    assert s3_api.objects() == [f"objects/default/{checkpoint['sha256'][:2]}/{checkpoint['sha256']}.safetensors"]


def test_invalid_multipart_upload_is_refused_and_removed(s3_api):
    content = big_checkpoint(nan=True)
    with s3_api.client() as client:
        upload = start(client, len(content))
        response = client.post(f"/v1/uploads/{upload['id']}/complete", json={"parts": put_parts(upload, content)})
        assert response.status_code == 422, response.text
        assert "NaN" in response.json()["detail"]
        status = client.get(f"/v1/uploads/{upload['id']}").json()
        assert status["status"] == "failed" and "NaN" in status["error"]["detail"]
    assert s3_api.objects() == [] and s3_api.count(Checkpoint) == 0
    assert list(s3_api.store.client.list_multipart_uploads(Bucket=s3_api.store.bucket).get("Uploads", [])) == []


def test_size_mismatch_and_bad_etags(s3_api):
    content = big_checkpoint()
    with s3_api.client() as client:
        upload = start(client, len(content))
        parts = put_parts(upload, content)
        bad = client.post(f"/v1/uploads/{upload['id']}/complete", json={"parts": [parts[0], {"part_number": 2, "etag": '"0000"'}]})
        assert bad.status_code == 400 and bad.json()["type"].endswith("/parts-rejected")
        assert client.post(f"/v1/uploads/{upload['id']}/complete", json={"parts": parts}).status_code == 201

        short = start(client, len(content) + 1)  # announces one byte more than it sends
        response = client.post(f"/v1/uploads/{short['id']}/complete", json={"parts": put_parts(short, content)})
        assert response.status_code == 422 and "announced" in response.json()["detail"]
    assert len(s3_api.objects()) == 1


def test_abort_expire_limits_and_tenancy(s3_storage_backend):
    api = Api(s3_storage_backend, api_keys="alice:ka,bob:kb", max_upload_bytes=100 * MIB)
    with api.client("ka") as alice, api.client("kb") as bob:
        assert alice.post("/v1/uploads", json={"kind": "checkpoint", "name": "x", "size_bytes": 101 * MIB}).status_code == 413
        assert alice.post("/v1/uploads", json={"kind": "model", "name": "x", "size_bytes": 10}).status_code == 422

        aborted = start(alice, 6 * MIB)
        assert bob.get(f"/v1/uploads/{aborted['id']}").status_code == 404
        assert bob.delete(f"/v1/uploads/{aborted['id']}").status_code == 404
        assert alice.delete(f"/v1/uploads/{aborted['id']}").status_code == 204
        assert alice.get(f"/v1/uploads/{aborted['id']}").json()["status"] == "aborted"
        assert alice.post(f"/v1/uploads/{aborted['id']}/complete", json={"parts": [{"part_number": 1, "etag": "x"}]}).status_code == 410

        stale = start(alice, 6 * MIB)
        with session_scope(api.db_url) as session:
            session.execute(update(DirectUpload).where(DirectUpload.id == stale["id"]).values(expires_at=utcnow() - timedelta(seconds=1)))
            session.commit()
        from api.routers.uploads import sweep_once

        assert sweep_once(api.settings, api.store)["direct_uploads_expired"] == 1
        assert alice.get(f"/v1/uploads/{stale['id']}").json()["status"] == "expired"
    uploads = api.store.client.list_multipart_uploads(Bucket=api.store.bucket).get("Uploads", [])
    assert uploads == []


def test_local_store_answers_a_clear_4xx(local_storage_backend):
    api = Api(local_storage_backend)
    with api.client() as client:
        response = client.post("/v1/uploads", json={"kind": "checkpoint", "name": "x", "size_bytes": 10})
        assert response.status_code == 409
        assert response.json()["type"].endswith("/direct-uploads-unavailable")
        assert "POST /v1/checkpoints" in response.json()["detail"]


def test_a_model_folder_archive_completes_as_a_folder_checkpoint(s3_api):
    """A model folder's archive uploaded straight to S3 is unpacked, checked and stored like one sent to
    POST /v1/checkpoints: one safetensors object holding the folder's layout, named by the archive's sha256."""
    import io
    import json
    import tarfile

    from safetensors.torch import load as load_safetensors

    state = {"encoder.weight": torch.randn(8, 4), "encoder.bias": torch.zeros(8)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("config.json", json.dumps({"model_type": "bert"}).encode()), ("model.safetensors", save_safetensors(state))):
            info = tarfile.TarInfo(f"model/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    content = buffer.getvalue()
    with s3_api.client() as client:
        upload = start(client, len(content))
        response = client.post(f"/v1/uploads/{upload['id']}/complete", json={"parts": put_parts(upload, content)})
        assert response.status_code == 201, response.text
        checkpoint = response.json()
        assert checkpoint["format"] == "hf-folder" and checkpoint["num_tensors"] == 2
        assert checkpoint["sha256"] == hashlib.sha256(content).hexdigest()
        stored = download(client, f"/v1/checkpoints/{checkpoint['id']}/content").content
        assert all(torch.equal(load_safetensors(stored)[k], v) for k, v in state.items())
        assert b'"rebasin.folder"' in stored[:4096] and checkpoint["size_bytes"] == len(stored)
    assert s3_api.objects() == [f"objects/default/{checkpoint['sha256'][:2]}/{checkpoint['sha256']}.safetensors"]

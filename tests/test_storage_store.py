"""The artifact store backends: atomic commits, listing, and the sweep of abandoned temporaries."""

import os
import subprocess
import sys
import time
from pathlib import Path

import boto3

from storage.artifacts import DIRECT_UPLOADS_PREFIX, LocalStore, S3Store, open_store


def test_local_put_is_atomic_and_temporaries_are_swept(tmp_path):
    store = LocalStore(tmp_path / "store")
    source = tmp_path / "source"
    source.write_bytes(b"x" * 10_000)
    store.put_file("a/b.bin", source)
    assert store.open("a/b.bin").read() == b"x" * 10_000
    assert [key for key, _ in store.list_keys("")] == ["a/b.bin"]

    # What a killed process leaves: a half-written temporary next to objects, a staging directory.
    leftover = store.root / "a" / ".tmp-abandoned"
    leftover.write_bytes(b"partial")
    staged = store.staging_dir() / "upload-dead"
    staged.mkdir()
    (staged / "upload").write_bytes(b"partial upload")
    fresh = store.staging_dir() / "upload-live"
    fresh.mkdir()
    assert [key for key, _ in store.list_keys("")] == ["a/b.bin"]  # invisible to readers

    old = time.time() - 7200
    for path in (leftover, staged, staged / "upload"):
        os.utime(path, (old, old))
    assert store.sweep(older_than_s=3600) == 2
    assert not leftover.exists() and not staged.exists() and fresh.exists()
    assert store.exists("a/b.bin")


def test_local_move_consumes_the_source_and_refuses_dot_keys(tmp_path):
    store = LocalStore(tmp_path / "store")
    staged = store.staging_dir() / "upload"
    staged.write_bytes(b"data")
    store.move_file("objects/k", staged)
    assert not staged.exists() and store.open("objects/k").read() == b"data"
    for bad in (".staging/x", "a/.tmp-x", "../escape"):
        try:
            store.local_path(bad)
        except ValueError:
            continue
        raise AssertionError(f"key {bad!r} was accepted")


def test_s3_store_over_http(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    store = open_store(f"s3://{bucket}/prefix", endpoint)
    assert isinstance(store, S3Store)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(9 * 1024**2))  # above boto3's multipart threshold: a multipart put
    store.put_file("objects/a", source)
    store.copy("objects/a", "objects/b")
    assert sorted(key for key, _ in store.list_keys("objects/")) == ["objects/a", "objects/b"]
    assert store.size("objects/b") == source.stat().st_size
    assert store.open("objects/b").read() == source.read_bytes()

    # An incomplete multipart upload (a process died mid-put) is invisible and swept; direct uploads are not.
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_multipart_upload(Bucket=bucket, Key="prefix/objects/dead")
    client.create_multipart_upload(Bucket=bucket, Key=f"prefix/{DIRECT_UPLOADS_PREFIX}t/upl_1")
    assert "objects/dead" not in {key for key, _ in store.list_keys("")}
    assert store.sweep(older_than_s=60) == 1
    remaining = [upload["Key"] for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    assert remaining == [f"prefix/{DIRECT_UPLOADS_PREFIX}t/upl_1"]
    store.delete("objects/a")
    assert not store.exists("objects/a") and store.exists("objects/b")
    assert store.presigned_get_url("objects/b", "b.safetensors").startswith(endpoint)
    Path(source).unlink()


# Run in its own process: the moto server lives in this one and holds every object it receives.
TRANSFER_PROBE = """
import sys
from pathlib import Path
from matching.memory import PeakSampler
from storage.artifacts import open_store
endpoint, bucket, source, back = sys.argv[1:]
store = open_store(f"s3://{bucket}/p", endpoint)
store.check()  # the client's connection pool and credentials exist before the baseline
with PeakSampler() as up:
    store.put_file("big", Path(source))
with PeakSampler() as down:
    store.get_file("big", Path(back))
print(up.peak_bytes - up.start_bytes, down.peak_bytes - down.start_bytes)
"""


def test_s3_transfers_stream_in_parts_with_bounded_memory(s3_bucket, tmp_path):
    """A worker's artifact upload and input download: multipart from the file, ranged into the file, with
    anonymous memory growing by a fraction of the file (measured +11 MiB each way for 64 MiB at load 6; boto3's
    default download queue let it reach +42 MiB on a loaded machine)."""
    endpoint, bucket = s3_bucket
    source, back = tmp_path / "source", tmp_path / "back"
    size = 64 * 1024**2
    with open(source, "wb") as handle:
        for _ in range(size // 2**20):
            handle.write(os.urandom(2**20))
    probe = subprocess.run([sys.executable, "-c", TRANSFER_PROBE, endpoint, bucket, str(source), str(back)],
                           capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONPATH": str(Path.cwd())})
    assert probe.returncode == 0, probe.stderr
    upload_growth, download_growth = map(int, probe.stdout.split())
    etag = boto3.client("s3", endpoint_url=endpoint).head_object(Bucket=bucket, Key="p/big")["ETag"]
    assert etag.strip('"').endswith("-8")  # eight 8 MiB parts
    assert back.read_bytes() == source.read_bytes()
    assert upload_growth < size / 2 and download_growth < size / 2, (upload_growth, download_growth)

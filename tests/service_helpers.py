"""What the end-to-end tests do over HTTP, written once."""

import time

import pytest
import torch
from safetensors.torch import save as save_safetensors

import matching

TERMINAL = ("succeeded", "failed", "cancelled")
SIZES = [64, 256, 256, 10]


def make_mlp(seed: int, sizes: list[int] = SIZES) -> torch.nn.Module:
    torch.manual_seed(seed)
    return matching.build_model("mlp", sizes=sizes)


def upload(client, state: dict, name: str, kind: str = "checkpoints") -> dict:
    response = client.post(f"/v1/{kind}", files={"file": (f"{name}.safetensors", save_safetensors(state))})
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/v1/{kind}/{response.json()['id']}"
    return response.json()


def submit(client, body: dict, **headers) -> dict:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
    return response.json()


def wait_for(client, job_id: str, until=lambda job: job["status"] in TERMINAL, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.2)
    pytest.fail(f"job {job_id} did not get there in {timeout_s} s: {job}")


def run_job(client, body: dict, timeout_s: float = 180) -> dict:
    return wait_for(client, submit(client, body)["id"], timeout_s=timeout_s)


def artifact(client, job: dict, name: str) -> bytes:
    response = client.get(f"/v1/jobs/{job['id']}/artifacts/{name}")
    assert response.status_code == 200, response.text
    return response.content

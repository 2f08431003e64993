"""The walking skeleton, end to end over real HTTP: upload, merge by weight matching, download.

Runs on the embedded default and on PostgreSQL + Redis with a separate worker.
"""

import json

import pytest
import torch
from safetensors.torch import load as load_safetensors

import matching
from tests.service_helpers import SIZES, artifact, make_mlp, run_job, upload


def linear_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def shuffle_hidden_units(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    """Permute every hidden layer's units in place (rows of one layer, columns of the next)."""
    generator = torch.Generator().manual_seed(seed)
    layers = linear_layers(model)
    perms = []
    with torch.no_grad():
        for layer, following in zip(layers[:-1], layers[1:]):
            perm = torch.randperm(layer.out_features, generator=generator)
            layer.weight.copy_(layer.weight[perm])
            layer.bias.copy_(layer.bias[perm])
            following.weight.copy_(following.weight[:, perm])
            perms.append(perm)
    return perms


def outputs(state: dict[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    model = matching.build_model("mlp", sizes=SIZES)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(inputs)


def test_merge_two_independent_mlps(service):
    model_a, model_b = make_mlp(seed=1), make_mlp(seed=2)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    with service.client() as client:
        checkpoint_a, checkpoint_b = upload(client, state_a, "a"), upload(client, state_b, "b")
        assert checkpoint_a["num_parameters"] == sum(p.numel() for p in model_a.parameters())
        assert client.get(f"/v1/checkpoints/{checkpoint_a['id']}").json() == checkpoint_a

        job = run_job(client, {"method": "weight_matching", "checkpoints": [checkpoint_a["id"], checkpoint_b["id"]],
                               "architecture": {"name": "mlp"}})
        assert job["status"] == "succeeded", service.logs() + json.dumps(job, indent=1)
        assert {"merged.safetensors", "aligned.safetensors", "permutation.json", "report.json"} <= {
            a["name"] for a in job["artifacts"]
        }
        matching_report = job["result"]["matching"]
        assert matching_report["objective_final"] >= matching_report["objective_initial"]

        aligned = load_safetensors(artifact(client, job, "aligned.safetensors"))
        merged = load_safetensors(artifact(client, job, "merged.safetensors"))
        permutation = json.loads(artifact(client, job, "permutation.json"))
        report = json.loads(artifact(client, job, "report.json"))

    inputs = torch.randn(128, SIZES[0], generator=torch.Generator().manual_seed(0))
    assert (outputs(aligned, inputs) - outputs(state_b, inputs)).abs().max() <= 1e-5
    assert aligned.keys() == state_a.keys() == merged.keys()
    for name in state_a:
        torch.testing.assert_close(merged[name], (state_a[name] + aligned[name]) / 2)
    # Alignment moved B: it is not B any more, only functionally equal to it.
    assert any(not torch.equal(aligned[name], state_b[name]) for name in state_b)

    hidden_sizes = sorted(SIZES[1:-1])
    perms = permutation["permutations"]
    assert sorted(len(p) for p in perms.values()) == hidden_sizes
    for perm in perms.values():
        assert sorted(perm) == list(range(len(perm)))
    assert report["matching"] == job["result"]["matching"]


def test_planted_shuffle_is_recovered_exactly(service):
    model_a = make_mlp(seed=3)
    model_b = make_mlp(seed=3)
    shuffle_hidden_units(model_b, seed=4)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert any(not torch.equal(state_a[name], state_b[name]) for name in state_a)
    with service.client() as client:
        ids = [upload(client, state_a, "a")["id"], upload(client, state_b, "b")["id"]]
        job = run_job(client, {"method": "weight_matching", "checkpoints": ids, "architecture": {"name": "mlp"}})
        assert job["status"] == "succeeded", json.dumps(job, indent=1)
        aligned = load_safetensors(artifact(client, job, "aligned.safetensors"))
    for name in state_a:
        assert torch.equal(aligned[name], state_a[name]), name


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"", "the file is empty"),
        (b"this is not a checkpoint at all, just some text" * 10, "unknown file format"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}", "not a safetensors file"),
    ],
)
def test_bad_upload_is_a_problem_and_server_keeps_serving(embedded_service, payload, reason):
    with embedded_service.client() as client:
        response = client.post("/v1/checkpoints", files={"file": ("bad.safetensors", payload)})
        assert response.status_code == 422, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert {"type", "title", "status", "detail"} <= problem.keys() and problem["status"] == 422
        assert reason in problem["detail"]
        assert client.get("/v1/checkpoints").json()["items"] == []
        assert client.get("/healthz").status_code == 200


def test_every_contract_endpoint_is_in_the_openapi_docs(embedded_service):
    contract = {
        ("post", "/v1/checkpoints"), ("get", "/v1/checkpoints"), ("get", "/v1/checkpoints/{resource_id}"),
        ("get", "/v1/checkpoints/{resource_id}/content"), ("delete", "/v1/checkpoints/{resource_id}"),
        ("post", "/v1/datasets"), ("get", "/v1/datasets"), ("get", "/v1/datasets/{resource_id}"),
        ("delete", "/v1/datasets/{resource_id}"), ("post", "/v1/jobs"), ("get", "/v1/jobs"), ("get", "/v1/jobs/{job_id}"),
        ("post", "/v1/jobs/{job_id}/cancel"), ("get", "/v1/jobs/{job_id}/artifacts/{name}"), ("get", "/v1/architectures"),
        ("get", "/healthz"), ("get", "/readyz"), ("get", "/v1/usage"),
    }  # fmt: skip
    with embedded_service.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
        assert contract <= {(method, path) for path, methods in paths.items() for method in methods}
        # the CONTRACT's 429 + Retry-After (request rate, quotas) on every tenant operation, open mode included
        for method, path in contract - {("get", "/v1/architectures")}:  # the public list counts against no tenant
            if path.startswith("/v1/"):
                assert "Retry-After" in paths[path][method]["responses"]["429"]["headers"], (method, path)
        assert client.get("/docs").status_code == 200
        assert client.get("/metrics").status_code == 200

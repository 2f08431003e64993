"""Streaming weight matching (issue 22): the memory-mapped, tensor-by-tensor path gives what the in-memory one
gives: the same spec, permutations, objective and output tensors, in the checkpoints' dtype and sharding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from matching import merge
from matching.checkpoints import load_checkpoint, map_safetensors
from matching.cli import _load_inputs
from matching.evaluate import interpolate
from matching.folders import load_folder
from matching.spec import apply_permutation, spec_to_json
from matching.weight_matching import weight_matching

transformers = pytest.importorskip("transformers")
from tests.hf_models import tiny  # noqa: E402


def in_memory(states, architecture, configs=None, merge_lambda=0.5):
    """What merge_checkpoints computed before streaming: a verified spec from the real model, float32 copies of
    whole checkpoints, unbounded caches, outputs built whole."""
    states = [{k: v.clone() for k, v in s.items()} for s in states]
    model, spec, _ = merge._model_and_spec(architecture, {k: tuple(v.shape) for k, v in states[0].items()}, configs)
    full = [merge._full_state(model, s) for s in states]
    perms, info = weight_matching(spec, *full, unmatched=merge.buffer_keys(model, full[0]))
    aligned = apply_permutation(spec, perms, full[1])
    merged = interpolate(full[0], aligned, merge_lambda)
    cast = lambda s: {k: v.to(states[0][k].dtype) for k, v in s.items() if k in states[0]}
    return spec, perms, info, cast(aligned), cast(merged)


def assert_same(out: dict, expected: dict):
    assert list(out) == list(expected) or set(out) == set(expected)
    for k, v in expected.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k


@pytest.fixture(autouse=True)
def meta_models(monkeypatch):
    """Every model counts as large: built on the meta device, its spec inferred there."""
    monkeypatch.setattr(merge, "VERIFY_MAX_PARAMETERS", 0)
    merge._SPEC_CACHE.clear()


def test_sharded_bf16_folders_stream_to_the_in_memory_result(tmp_path):
    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"m{seed}"
        tiny("llama", seed).to(torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")
        folders.append(folder)
    assert len(list(folders[0].glob("model-*-of-*.safetensors"))) > 1
    states, layouts = _load_inputs(folders)
    assert all(t.dtype == torch.bfloat16 for t in states[0].values())
    architecture = {"name": "hf"}
    configs = [layout.config for layout in layouts]

    outcome = merge.merge_checkpoints(states, architecture=architecture, configs=configs)
    assert isinstance(outcome.merged, merge.LazyState)
    written = merge.write_artifacts(outcome, tmp_path / "out", layout=layouts[0], folders="dir")

    spec, perms, info, aligned, merged = in_memory([load_folder(f)[0] for f in folders], architecture, configs)
    assert {k: v for k, v in outcome.permutation.items() if k != "permutations"} == spec_to_json(spec)
    assert outcome.permutation["permutations"] == {p: v.tolist() for p, v in perms.items()}
    assert outcome.report["matching"]["objective_final"] == info["objective_final"]
    assert any(v.tolist() != list(range(len(v))) for v in perms.values())  # something moved
    out_merged, out_layout = load_folder(tmp_path / "out" / "merged")
    assert out_layout.shards == layouts[0].shards  # sharded as the input, with its index
    assert (tmp_path / "out" / "merged" / "model.safetensors.index.json") in written or \
        (tmp_path / "out" / "merged" / "model.safetensors.index.json").is_file()
    assert_same(out_merged, merged)
    assert_same(load_folder(tmp_path / "out" / "aligned")[0], aligned)
    logits = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits.float()).all()


def test_plain_checkpoints_stream_and_keep_fp16(tmp_path):
    from matching.architectures import build_model

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = {k: v.half() if v.is_floating_point() else v for k, v in build_model("resnet20", width=1).state_dict().items()}
        state.pop("bn1.num_batches_tracked")  # a checkpoint may leave it out
        save_file(state, str(tmp_path / f"{seed}.safetensors"))
        paths.append(tmp_path / f"{seed}.safetensors")
    states = [load_checkpoint(p) for p in paths]
    outcome = merge.merge_checkpoints(states, architecture={"name": "resnet20"})
    merge.write_artifacts(outcome, tmp_path / "out")
    _, perms, info, aligned, merged = in_memory([load_file(str(p)) for p in paths], {"name": "resnet20"})
    assert outcome.permutation["permutations"] == {p: v.tolist() for p, v in perms.items()}
    assert outcome.report["matching"]["objective_final"] == info["objective_final"]
    assert_same(load_file(str(tmp_path / "out" / "merged.safetensors")), merged)
    assert_same(load_file(str(tmp_path / "out" / "aligned.safetensors")), aligned)
    # larger than a shard: shards as save_pretrained writes them, with their index
    merge.write_artifacts(outcome, tmp_path / "sharded", shard_bytes=20_000)
    index = json.loads((tmp_path / "sharded" / "merged.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"merged-00001-of-{len(files):05d}.safetensors"
    assert_same({k: v for f in files for k, v in load_file(str(tmp_path / "sharded" / f)).items()}, merged)


def test_memory_map_reads_nothing_into_anonymous_memory(tmp_path):
    save_file({"w": torch.arange(12.0).reshape(3, 4), "h": torch.ones(5, dtype=torch.bfloat16)}, str(tmp_path / "x.safetensors"))
    state = map_safetensors(tmp_path / "x.safetensors")
    assert torch.equal(state["w"], torch.arange(12.0).reshape(3, 4)) and state["h"].dtype == torch.bfloat16
    state["w"] += 1  # a private map: writes stay in this process
    assert torch.equal(map_safetensors(tmp_path / "x.safetensors")["w"], torch.arange(12.0).reshape(3, 4))


@pytest.mark.parametrize("budget", [0, 64 * 1024])
def test_bounded_cache_keeps_permutations_and_objective(budget):
    model, spec, _ = merge._model_and_spec({"name": "resnet20"}, {k: tuple(v.shape) for k, v in
                                                                  tiny_resnet(0).items()})
    a, b = tiny_resnet(0), tiny_resnet(1)
    unmatched = merge.buffer_keys(model, a)
    perms, info = weight_matching(spec, a, b, unmatched=unmatched)
    streamed, streamed_info = weight_matching(spec, a, b, unmatched=unmatched, cache_bytes=budget)
    assert {p: v.tolist() for p, v in streamed.items()} == {p: v.tolist() for p, v in perms.items()}
    assert streamed_info["objective_final"] == info["objective_final"]
    assert streamed_info["iterations"] == info["iterations"]


def tiny_resnet(seed):
    from matching.architectures import build_model

    torch.manual_seed(seed)
    return build_model("resnet20", width=1).state_dict()

"""Hugging Face model folders (config.json + safetensors, as save_pretrained writes them) as checkpoints: uploaded as
one archive over HTTP (real uvicorn), given as directories to the CLI, refused when unsafe, written back as folders
that ``from_pretrained`` loads; and the ``hf`` architecture built from the checkpoint's own config.json.

The jobs here send a permutation spec written for tiny GPT-2 (a folder works with a spec as with the `hf`
architecture, whose inferred specs tests/test_hf_service.py covers): the MLP units of each block (c_fc's output
columns, Conv1D layout [in, out], and c_proj's input rows), checked below by permuting a model and comparing logits."""

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel  # noqa: E402

from cli import run  # noqa: E402
from matching import hf  # noqa: E402
from matching.errors import MatchingError  # noqa: E402
from matching.evaluate import IGNORE_INDEX, evaluate  # noqa: E402
from matching.folders import ModelFolder, load_folder, write_folder  # noqa: E402
from matching.spec import apply_permutation, spec_from_json  # noqa: E402
from tests.service_helpers import run_job, submit  # noqa: E402

N_LAYER, N_EMBD, VOCAB = 2, 32, 64


def gpt2_config(**overrides) -> GPT2Config:
    fields = dict(n_layer=N_LAYER, n_embd=N_EMBD, n_head=4, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0)
    return GPT2Config(**(fields | overrides))


def save_gpt2(path: Path, seed: int, dtype=torch.float32, **save_options) -> Path:
    torch.manual_seed(seed)
    GPT2LMHeadModel(gpt2_config()).to(dtype).save_pretrained(path, **save_options)
    return path


def mlp_units_spec(state: dict) -> dict:
    """GPT-2's MLP hidden units, one permutation per block; every other axis left in place."""
    axes = {name: [None] * tensor.dim() for name, tensor in state.items()}
    for i in range(N_LAYER):
        axes[f"transformer.h.{i}.mlp.c_fc.weight"] = [None, f"P_{i}"]  # Conv1D: [in, out]
        axes[f"transformer.h.{i}.mlp.c_fc.bias"] = [f"P_{i}"]
        axes[f"transformer.h.{i}.mlp.c_proj.weight"] = [f"P_{i}", None]
    return {"axes_to_perm": axes}


def token_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).float().eval()(ids).logits


def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def folder_tar(folder: Path, top: str | None = "model", gz: bool = False) -> bytes:
    return tar_bytes([(tarfile.TarInfo(f"{top}/{f.name}" if top else f.name), f.read_bytes())
                      for f in sorted(folder.iterdir())], gz)


def folder_zip(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for f in sorted(folder.iterdir()):
            archive.write(f, f.name)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "a": save_gpt2(root / "a", 0),
        "b_sharded": save_gpt2(root / "b_sharded", 1, max_shard_size="20KB"),
        "b": save_gpt2(root / "b", 1),
        "a_bf16": save_gpt2(root / "a_bf16", 0, torch.bfloat16),
        "b_bf16": save_gpt2(root / "b_bf16", 1, torch.bfloat16),
    }


IDS = torch.randint(VOCAB, (3, 12), generator=torch.Generator().manual_seed(5))


def test_the_spec_used_here_keeps_gpt2s_function(folders):
    state, _ = load_folder(folders["b"])
    spec = spec_from_json(mlp_units_spec(state))
    perms = {f"P_{i}": torch.randperm(4 * N_EMBD) for i in range(N_LAYER)}
    model = GPT2LMHeadModel(gpt2_config()).eval()
    model.load_state_dict({**apply_permutation(spec, perms, state), "lm_head.weight": state["transformer.wte.weight"]})
    assert not torch.equal(apply_permutation(spec, perms, state)["transformer.h.0.mlp.c_fc.weight"], state["transformer.h.0.mlp.c_fc.weight"])
    assert torch.allclose(model(IDS).logits, token_logits(folders["b"], IDS), atol=1e-5)


def test_folders_are_written_back_as_they_came(folders, tmp_path):
    """Shards, their tensors, dtypes, config.json and the index; from_pretrained loads the copy."""
    for name in ("b_sharded", "a_bf16"):
        state, layout = load_folder(folders[name])
        out = write_folder(state, layout, tmp_path / name)
        source, copy = ModelFolder(folders[name]), ModelFolder(out)
        assert copy.layout.shards == source.layout.shards and copy.tensors == source.tensors
        assert (out / "config.json").read_text() == (folders[name] / "config.json").read_text()
        assert ((out / "model.safetensors.index.json").exists()) == (name == "b_sharded")
        assert torch.equal(token_logits(out, IDS), token_logits(folders[name], IDS))
    with pytest.raises(MatchingError, match="no config.json"):
        ModelFolder(tmp_path / "b_sharded" / "..")


def test_pytorch_model_bin_is_read_through_the_safe_loader(folders, tmp_path):
    state, _ = load_folder(folders["a"])
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((folders["a"] / "config.json").read_text())
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    loaded, layout = load_folder(tmp_path / "bin")
    assert list(layout.shards) == ["model.safetensors"] and all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save({"weights": state, "evil": object.__reduce__}, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(MatchingError, match="refused to load the PyTorch file safely"):
        load_folder(tmp_path / "bin")


def test_hf_architecture_builds_from_config_and_refuses_what_it_must(folders):
    config = json.loads((folders["a"] / "config.json").read_text())
    model = hf.build(config)
    assert type(model).__name__ == "GPT2LMHeadModel" and hf.tied_groups(model) == [["transformer.wte.weight", "lm_head.weight"]]
    assert set(hf.example_inputs(model)) == {"input_ids", "attention_mask"}
    no_class = {k: v for k, v in config.items() if k != "architectures"}
    assert type(hf.build(no_class)).__name__ == "GPT2Model"  # the AutoModel of its model_type
    with pytest.raises(MatchingError, match="custom code.*auto_map"):
        hf.build({**config, "auto_map": {"AutoModel": "modeling_evil.Evil"}})
    with pytest.raises(MatchingError, match="n_layer.*2.*3"):
        hf.check_configs([config, {**config, "n_layer": 3}])
    hf.check_configs([config, {**config, "resid_pdrop": 0.3, "transformers_version": "5.0.0", "dtype": "bfloat16"}])
    # save_pretrained wrote the tied lm_head once, as the embedding: the job's full state has it again.
    from matching.merge import _full_state

    state, _ = load_folder(folders["a"])
    assert "lm_head.weight" not in state and _full_state(model, state)["lm_head.weight"] is state["transformer.wte.weight"]
    # Dataset shapes are checked against the config (transformers models do not run on the meta device).
    from matching.merge import check_example_shape

    check_example_shape("hf", {"config": config}, (16,))
    for shape in ((17,), (3, 16, 16)):
        with pytest.raises(MatchingError, match=r"takes token ids \[T\] with T <= 16"):
            check_example_shape("hf", {"config": config}, shape)
    vit = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=8, num_labels=3, architectures=["ViTForImageClassification"])
    model = hf.build(vit.to_dict())
    inputs = hf.example_inputs(model)
    assert list(inputs) == ["pixel_values"] and hf.logits(model(**inputs)).shape == (2, 3)
    check_example_shape("hf", {"config": vit.to_dict()}, (3, 16, 16))
    with pytest.raises(MatchingError, match=r"takes images \[3, H, W\]"):
        check_example_shape("hf", {"config": vit.to_dict()}, (16,))


def test_evaluation_reads_hf_outputs_and_ignores_minus_100(folders):
    """Loss and accuracy over the scored positions only, from a ModelOutput's logits."""
    model = AutoModelForCausalLM.from_pretrained(folders["a"]).eval()
    targets = torch.roll(IDS, -1, 1)
    targets[:, -1] = IGNORE_INDEX
    targets[0, :4] = IGNORE_INDEX
    result = evaluate(model, IDS, targets)
    logits = model(IDS).logits
    scored = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[scored], targets[scored])
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert result["accuracy"] == pytest.approx((logits[scored].argmax(-1) == targets[scored]).float().mean().item())


def _check_outputs(out: Path, a: Path, b: Path) -> None:
    """aligned B computes B's function; merged loads; both laid out as A (shards, tensors, dtypes)."""
    for name in ("aligned", "merged"):
        written, source = ModelFolder(out / name), ModelFolder(a)
        assert written.layout.shards == source.layout.shards and written.tensors == source.tensors
    assert torch.allclose(token_logits(out / "aligned", IDS), token_logits(b, IDS), atol=1e-4)
    assert not torch.allclose(token_logits(out / "merged", IDS), token_logits(b, IDS), atol=1e-2)


def test_cli_merges_folders(folders, tmp_path, capsys):
    state, _ = load_folder(folders["a"])
    (tmp_path / "spec.json").write_text(json.dumps(mlp_units_spec(state)))
    out = tmp_path / "out"
    # A sharded: the outputs are sharded the same way, with an index.
    assert run(["merge", str(folders["b_sharded"]), str(folders["a"]), "--spec", str(tmp_path / "spec.json"), "--out", str(out)]) == 0
    assert len(ModelFolder(out / "merged").layout.shards) == 7 and (out / "merged" / "model.safetensors.index.json").is_file()
    _check_outputs(out, folders["b_sharded"], folders["a"])
    # bfloat16 stays bfloat16.
    assert run(["merge", str(folders["a_bf16"]), str(folders["b_bf16"]), "--spec", str(tmp_path / "spec.json"),
                "--out", str(tmp_path / "bf16")]) == 0
    assert ModelFolder(tmp_path / "bf16" / "merged").tensors["transformer.wte.weight"][0] == torch.bfloat16
    _check_outputs(tmp_path / "bf16", folders["a_bf16"], folders["b_bf16"])
    # MergeMany: one aligned folder per input, each computing its input's function.
    assert run(["merge", str(folders["a"]), str(folders["b"]), str(folders["b_sharded"]), "--spec", str(tmp_path / "spec.json"),
                "--out", str(tmp_path / "many"), "--max-iter", "3"]) == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir() if p.is_dir()) == ["aligned_0", "aligned_1", "aligned_2", "merged"]
    assert torch.allclose(token_logits(tmp_path / "many" / "aligned_2", IDS), token_logits(folders["b"], IDS), atol=1e-4)
    # Folders and files are not mixed.
    assert run(["merge", str(folders["a"]), str(out / "permutation.json"), "--spec", str(tmp_path / "spec.json"),
                "--out", str(tmp_path / "x")]) == 2
    assert "model folder" in capsys.readouterr().err


def test_folder_checkpoints_over_http(embedded_service, folders, tmp_path, capsys):
    """Upload archives (tar.gz of a folder in a top folder, zip of a sharded bf16... folder), merge with a spec,
    download aligned.tar and merged.tar: from_pretrained loads them, aligned B is B."""
    state, _ = load_folder(folders["a"])
    spec = mlp_units_spec(state)
    archive_a = folder_tar(folders["a"], gz=True)  # once: gzip stamps the time, so a second call may differ
    with embedded_service.client() as client:
        a = client.post("/v1/checkpoints", files={"file": ("a.tar.gz", archive_a)})
        assert a.status_code == 201, a.text
        b = client.post("/v1/checkpoints", files={"file": ("b.zip", folder_zip(folders["b_sharded"]))})
        assert b.status_code == 201, b.text
        a, b = a.json(), b.json()
        assert a["format"] == b["format"] == "hf-folder" and a["num_tensors"] == len(state)
        assert a["num_parameters"] == sum(t.numel() for t in state.values())
        import hashlib
        assert a["sha256"] == hashlib.sha256(archive_a).hexdigest()

        job = run_job(client, {"method": "weight_matching", "checkpoints": [a["id"], b["id"]],
                               "permutation_spec": spec})
        assert job["status"] == "succeeded", job
        names = {artifact["name"] for artifact in job["artifacts"]}
        assert names == {"aligned.tar", "merged.tar", "permutation.json", "report.json"}, names
        for name in ("aligned", "merged"):
            response = client.get(f"/v1/jobs/{job['id']}/artifacts/{name}.tar")
            with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
                assert all(m.isfile() and m.name.startswith(f"{name}/") for m in tar.getmembers())
                tar.extractall(tmp_path / "http", filter="data")
        _check_outputs(tmp_path / "http", folders["a"], folders["b_sharded"])  # A's layout: one file

        # hf architecture: configs must agree, custom code is refused (422 at submission).
        config = json.loads((folders["b"] / "config.json").read_text())
        other = tmp_path / "other"
        save_gpt2(other, 2)
        (other / "config.json").write_text(json.dumps({**config, "n_inner": 4 * N_EMBD}))
        c = client.post("/v1/checkpoints", files={"file": ("c.tar", folder_tar(other))}).json()
        refused = client.post("/v1/jobs", json={"method": "weight_matching", "checkpoints": [a["id"], c["id"]],
                                                "architecture": {"name": "hf"}})
        assert refused.status_code == 422 and "n_inner" in refused.json()["detail"], refused.text
        (other / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "m.Evil"}}))
        d = client.post("/v1/checkpoints", files={"file": ("d.tar", folder_tar(other))}).json()
        refused = client.post("/v1/jobs", json={"method": "weight_matching", "checkpoints": [a["id"], d["id"]],
                                                "architecture": {"name": "hf"}})
        assert refused.status_code == 422 and "trust_remote_code" in refused.json()["detail"], refused.text
        plain = client.post("/v1/checkpoints", files={"file": ("b.safetensors", (folders["b"] / "model.safetensors").read_bytes())})
        refused = client.post("/v1/jobs", json={"method": "weight_matching", "checkpoints": [a["id"], plain.json()["id"]],
                                                "architecture": {"name": "hf"}})
        assert refused.status_code == 422 and "as a model folder" in refused.json()["detail"], refused.text

    # The CLI: submit folders, download unpacks the tars into folders.
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    got = tmp_path / "got"
    assert run(["submit", str(folders["a"]), str(folders["b"]), "--spec", str(spec_path), "--out", str(got),
                "--server", embedded_service.url]) == 0
    assert not list(got.glob("*.tar")) and (got / "aligned" / "config.json").is_file()
    _check_outputs(got, folders["a"], folders["b"])


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def test_unsafe_archives_are_refused_and_leave_nothing(make_embedded_service, folders):
    service = make_embedded_service(REBASIN_ARCHIVE_MAX_MEMBERS="6", REBASIN_ARCHIVE_MAX_UNPACKED_BYTES="200000")
    config = (folders["a"] / "config.json").read_bytes()
    weights = (folders["a"] / "model.safetensors").read_bytes()
    good = [(_info("config.json"), config), (_info("model.safetensors"), weights)]
    cases = {
        "absolute path": [(_info("/etc/config.json"), config), *good[1:]],
        "'..'": [*good, (_info("../escape.json"), b"{}")],
        "is a link": [*good, (_info("tokenizer.json", tarfile.SYMTYPE, "/etc/passwd"), None)],
        "is a link:": [*good, (_info("other.json", tarfile.LNKTYPE, "config.json"), None)],
        "not a regular file": [*good, (_info("dev", tarfile.CHRTYPE), None)],
        "more than 6 members": [*good, *[(_info(f"f{i}.txt"), b"x") for i in range(5)]],
        "past the limit of 200000 bytes": [*good, (_info("big.bin"), bytes(200_000))],
        "appears twice": [*good, (_info("./config.json"), b"{}")],
        "has no name": [*good, (_info("./"), b"x")],
        "no model folder": good[1:],
        "no weights": good[:1],
    }
    with service.client() as client:
        for reason, members in cases.items():
            response = client.post("/v1/checkpoints", files={"file": ("m.tar", tar_bytes(members))})
            assert response.status_code == 422, (reason, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert reason.rstrip(":") in response.json()["detail"], (reason, response.json())
        # A dataset is one safetensors file, never a folder.
        response = client.post("/v1/datasets", files={"file": ("d.tar", tar_bytes(good))})
        assert response.status_code == 422 and "not accepted here" in response.json()["detail"]
        assert client.get("/v1/checkpoints").json()["items"] == []
        ok = client.post("/v1/checkpoints", files={"file": ("m.tar", tar_bytes(good))})
        assert ok.status_code == 201, ok.text
    data = Path(service.env["REBASIN_DATA_DIR"])
    objects = [p for p in (data / "artifacts").rglob("*") if p.is_file()]
    assert len(objects) == 1, objects  # only the accepted one; the staging area is empty
    assert not [p for p in (data / "artifacts").rglob("*") if "upload-" in str(p) and p.is_file()]


def test_masked_lm_evaluation_uses_the_attention_mask(tmp_path):
    """An encoder's MLM loss over the masked positions only, with padding masked out: what the model computes
    when it is given the mask, which differs from what it computes without it."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForMaskedLM

    from matching.evaluate import interpolation_curves, load_dataset

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                       vocab_size=VOCAB, max_position_embeddings=16, initializer_range=0.3)).eval()
    ids = torch.randint(5, VOCAB, (6, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0  # padding at the end of every other example
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, [1, 4]] = ids[:, [1, 4]]  # the masked-LM positions, scored
    ids[:, [1, 4]] = 4  # the [MASK] token
    save_file({"inputs": ids, "targets": targets, "attention_mask": mask}, tmp_path / "mlm.safetensors")
    data = load_dataset(tmp_path / "mlm.safetensors")
    assert torch.equal(data.attention_mask, mask)

    logits = model(ids, attention_mask=mask).logits
    scored = targets != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[scored], targets[scored]).item()
    unmasked = evaluate(model, ids, targets)["loss"]
    assert evaluate(model, data.inputs, data.targets, data.attention_mask)["loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(unmasked - expected) > 1e-3  # the mask matters: padding changes what BERT computes
    state = model.state_dict()
    curves = interpolation_curves(model, state, state, [0.0, 1.0], {"held_out": (ids, targets, mask)})
    assert curves["held_out"]["loss"] == pytest.approx([expected, expected], rel=1e-5)

    save_file({"inputs": ids, "targets": targets, "attention_mask": mask[:, :5].contiguous()}, tmp_path / "bad.safetensors")
    with pytest.raises(MatchingError, match="attention_mask"):
        load_dataset(tmp_path / "bad.safetensors")


def test_readme_hugging_face_section_runs_as_written(embedded_service, tmp_path):
    import re
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, process_env
    from tests.test_first_minutes import rebasin_on_path

    section = (REPO_ROOT / "README.md").read_text().split("## Hugging Face models", 1)[1]
    script = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    session = tmp_path / "session"
    session.mkdir()
    path = f"{Path(sys.executable).parent}{os.pathsep}{rebasin_on_path(tmp_path / 'bin')}"  # python: this one
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=session, capture_output=True, text=True,
                         timeout=600, env=process_env({"REBASIN_SERVER": embedded_service.url, "PATH": path,
                                                       "HF_HUB_OFFLINE": "1"}))
    assert run.returncode == 0, run.stdout + run.stderr + embedded_service.logs()
    assert json.loads(run.stdout.strip().splitlines()[-1])["format"] == "hf-folder", run.stdout
    for out in ("gpt2-merged", "gpt2-remote"):
        assert len(ModelFolder(session / out / "merged").layout.shards) > 1
        assert (session / out / "aligned" / "model.safetensors.index.json").is_file()
    ids = torch.randint(256, (2, 16))
    assert torch.allclose(token_logits(session / "gpt2-remote" / "aligned", ids), token_logits(session / "gpt2-1", ids), atol=1e-4)

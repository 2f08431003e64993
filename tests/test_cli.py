"""The command line's contract: exit status 0 success, 1 job failed or cancelled, 2 bad usage or input,
3 server unreachable, for every command; errors as one line on stderr; and the log line of a failed job."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli import run
from core import __version__
from tests.conftest import free_port, process_env, rebasin_command
from tests.data_helpers import digits, write_digits
from tests.service_helpers import make_mlp


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    sizes = [64, 32, 3]  # three classes: the digits' labels go up to 9, which fails a job when it runs
    save_file(make_mlp(1, sizes).state_dict(), str(root / "a.safetensors"))
    # As training scripts save it: wrapped, with other entries beside the weights.
    torch.save({"state_dict": make_mlp(2, sizes).state_dict(), "epoch": 3}, root / "b.pt")
    save_file(make_mlp(3, [64, 16, 3]).state_dict(), str(root / "other.safetensors"))
    write_digits(root / "digits.safetensors")
    x, y, _, _ = digits()
    save_file({"inputs": x[y < 3].contiguous(), "targets": y[y < 3].contiguous()}, str(root / "three.safetensors"))
    return root


def test_version_and_usage_errors():
    version = subprocess.run(rebasin_command("--version"), capture_output=True, text=True, env=process_env({}), timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"rebasin {__version__}"
    usage = subprocess.run(rebasin_command("merge", "a.safetensors"), capture_output=True, text=True, env=process_env({}), timeout=120)
    assert usage.returncode == 2 and len(usage.stderr.strip().splitlines()) == 1, usage.stderr
    assert "--out" in usage.stderr


def test_merge_exit_codes(files, tmp_path, capsys):
    a, b = str(files / "a.safetensors"), str(files / "b.pt")
    assert run(["merge", a, b, "--arch", "mlp", "--out", str(tmp_path / "ok"), "--lambdas", "3"]) == 0
    assert "no evaluation data" in capsys.readouterr().out
    assert load_file(tmp_path / "ok" / "merged.safetensors").keys() == load_file(a).keys()
    for bad in ([a, str(files / "missing.pt")], [a, str(files / "other.safetensors")], [a, str(files / "digits.safetensors")]):
        assert run(["merge", *bad, "--arch", "mlp", "--out", str(tmp_path / "bad")]) == 2
        lines = error_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith("rebasin: "), lines
    assert not (tmp_path / "bad").exists()


def test_client_commands_exit_3_when_the_server_is_unreachable(files, tmp_path, capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    for command in (["wait", "job_x"], ["download", "job_x", "--out", str(tmp_path)],
                    ["submit", str(files / "a.safetensors"), str(files / "b.pt"), "--arch", "mlp"]):
        assert run([*command, "--server", dead]) == 3, command
        lines = error_lines(capsys)
        assert len(lines) == 1 and lines[0].startswith(f"rebasin: cannot reach {dead}"), lines


def test_client_commands_against_a_server(embedded_service, files, tmp_path, capsys):
    server = ["--server", embedded_service.url]
    a, b, data, three = (str(files / name) for name in ("a.safetensors", "b.pt", "digits.safetensors", "three.safetensors"))
    # Input errors: a checkpoint id that does not exist, an unknown method.
    assert run(["submit", "ckpt_missing", b, "--arch", "mlp", *server]) == 2
    assert "Unknown input" in error_lines(capsys)[-1]
    with pytest.raises(SystemExit) as usage:
        run(["submit", a, b, "--arch", "mlp", "--method", "bogus", *server])
    assert usage.value.code == 2

    # Success: submit --wait prints the id, then the barrier table; wait --json the job; download the files.
    assert run(["submit", a, b, "--arch", "mlp", "--method", "weight_matching", "--eval-data", three, "--option", "lambdas=3",
                "--wait", *server]) == 0
    out = capsys.readouterr().out.splitlines()
    job_id = out[0]
    assert any(line.startswith("aligned ") for line in out) and any("loss barrier" in line for line in out), out
    assert run(["wait", job_id, "--json", *server]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "succeeded"
    assert run(["download", job_id, "--out", str(tmp_path / "got"), *server]) == 0
    assert str(tmp_path / "got" / "merged.safetensors") in capsys.readouterr().out.splitlines()

    # A job that fails when it runs (labels 0..9, three outputs): exit 1 with the reason, for wait and download.
    assert run(["submit", a, b, "--arch", "mlp", "--data", data, "--method", "activation", *server]) == 0
    failing = capsys.readouterr().out.split()[-1]
    assert run(["wait", failing, *server]) == 1
    lines = error_lines(capsys)
    assert lines[-1].startswith(f"rebasin: job {failing} failed: The inputs cannot be merged:") and "class labels" in lines[-1]
    assert run(["download", failing, "--out", str(tmp_path / "none"), *server]) == 1
    assert run(["wait", "job_missing", *server]) == 2

    # The server's log says how each job ended, with the reason, on the job's line.
    endings = [json.loads(line) for line in embedded_service.logs().splitlines()
               if line.startswith("{") and json.loads(line).get("job_id") == failing and ": failed:" in line]
    assert endings and endings[-1]["level"] == "warning" and "class labels" in endings[-1]["message"], embedded_service.logs()

"""What a newcomer meets first: the README's curl session run as written against a real ``rebasin serve``
(with ``rebasin demo``'s models and data), and what ``serve`` leaves behind in its working directory."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import httpx

from safetensors.torch import load_file

from tests.conftest import REPO_ROOT, die_with_test_run, free_port, process_env, rebasin_command


def readme_curl_session() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## A session with curl", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def rebasin_on_path(directory) -> str:
    """A ``rebasin`` command that runs this checkout (as the installed console script would)."""
    directory.mkdir()
    script = directory / "rebasin"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -m cli \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"{directory}{os.pathsep}{os.environ['PATH']}"


def test_readme_curl_session_runs_as_written(embedded_service, tmp_path):
    session = tmp_path / "session"
    session.mkdir()
    env = process_env({"REBASIN_SERVER": embedded_service.url, "PATH": rebasin_on_path(tmp_path / "bin")})
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_curl_session()], cwd=session, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr + embedded_service.logs()
    assert re.search(r"job job\S* succeeded", run.stdout), run.stdout
    barrier = json.loads(run.stdout.strip().splitlines()[-1])
    # The demo's point: alignment removes most of the naive barrier.
    assert barrier["aligned"]["loss"] < 0.5 * barrier["naive"]["loss"], barrier
    report = json.loads((session / "report.json").read_text())
    assert report["barrier"] == barrier and report["evaluation"]["split"] == "eval_dataset:eval"
    merged, a = load_file(session / "merged.safetensors"), load_file(session / "demo" / "model_a.safetensors")
    assert merged.keys() == a.keys()
    # Nothing but what the session wrote: the demo's files and the two downloads.
    assert sorted(p.name for p in session.iterdir()) == ["demo", "merged.safetensors", "report.json"]


def test_serve_leaves_its_working_directory_empty_and_refuses_a_taken_port(tmp_path):
    cwd, data = tmp_path / "cwd", tmp_path / "data"
    cwd.mkdir()
    port = free_port()
    env = process_env({"REBASIN_DATA_DIR": str(data), "REBASIN_LOG_FORMAT": "json"})
    server = subprocess.Popen(rebasin_command("serve", "--port", str(port)), cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True,
                              preexec_fn=die_with_test_run)
    try:
        deadline = time.monotonic() + 60
        while httpx_ok(f"http://127.0.0.1:{port}/healthz") is False and time.monotonic() < deadline:
            assert server.poll() is None, server.communicate()
            time.sleep(0.2)
        # A second server on the same port says so before claiming to serve, in one line, exit 2.
        second = subprocess.run(rebasin_command("serve", "--port", str(port), "--data-dir", str(tmp_path / "other")),
                                cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "serving on" not in second.stdout, second
        assert second.stderr.strip().splitlines()[-1].startswith(f"rebasin: cannot listen on 127.0.0.1:{port}")
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C
        out, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert "serving on" in out
    assert list(cwd.iterdir()) == [], "rebasin serve wrote into its working directory"
    # One log format: every stderr line is a JSON object (uvicorn's, Celery's and ours), and no banner.
    for line in filter(None, err.splitlines()):
        assert json.loads(line)["message"] is not None, line
    assert "celery@" not in err and "[config]" not in err


def httpx_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

"""Peak anonymous memory and wall time of ``rebasin merge`` (weight matching, no data) per model size.

    python -m benchmarks.bench_memory [--baseline /tmp/base36] [--skip-1b] [--with-7b] [--via-server] [--scratch DIR]

Pairs (random initialisation, generated under --scratch and deleted afterwards):
- torchvision ViT-L/16 (304 M parameters, float32 safetensors, 1.22 GB each);
- a 1 B-parameter LLaMA-shaped Hugging Face folder in bf16 (TinyLlama's shape: 22 layers, width 2048), sharded;
- with --with-7b, a 7 B one (LLaMA-2-7B's shape: 32 layers, width 4096; 2 x 13.5 GB of disk).
The LLaMA tensors are written straight to safetensors shards from the config's shapes (the model is never built).

Each merge runs as its own process; its peak is the largest sum of RssAnon over the process and its descendants,
sampled from /proc every 50 ms (file-backed pages, which memory-mapped checkpoints are, do not count: the
kernel can drop them). --baseline runs the same merge of the ViT-L pair with the code in that directory too (a
checkout of another commit, e.g. ``git worktree add /tmp/base36 36a900d``), in the same run, and checks that
the permutations and the objective are identical.

--via-server also runs each pair as a job on the embedded server, started as the README does (``rebasin serve``:
SQLite, local artifacts and filesystem queue under --scratch, a free port, its worker a child process): both
checkpoints are uploaded with the project's client, a weight-matching job without data (the streaming path) is
submitted and followed to its end. The peak is the serve process tree's RssAnon from just before the submit to
the end of the job (the idle server's figure is reported as its baseline), the wall time that of the job; the
job's own ``result.memory`` (estimate and the worker's measured peak) is printed next to it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3
LLAMA = {  # TinyLlama-1.1B's and LLaMA-2-7B's shapes
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
}
SHARD_BYTES = 2 * 10**9


def _tree_anon_bytes(pid: int) -> int:
    """RssAnon of ``pid`` and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as handle:
                total += next(int(line.split()[1]) * 1024 for line in handle if line.startswith("RssAnon:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as handle:
                    todo += [int(c) for c in handle.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def run_measured(command: list[str], env: dict, cwd: Path) -> tuple[float, int, str]:
    """(wall seconds, peak anonymous bytes of the process tree, output)."""
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_anon_bytes(proc.pid))
            time.sleep(0.05)
        wall = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{output[-3000:]}")
    return wall, peak, output


def merge(code: Path, a: Path, b: Path, arch: str, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", "import sys; from cli import main; sys.exit(main())", "merge", str(a), str(b),
               "--arch", arch, "--out", str(out), "--device", "cpu"]
    wall, peak, _ = run_measured(command, env, code)  # in code: "-c" puts the working directory first on sys.path
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "peak_anon": peak, "sweeps": report["matching"]["iterations"],
            "objective": report["matching"]["objective_final"], "seconds_matching": report["matching"]["seconds"],
            "permutations": json.loads((out / "permutation.json").read_text())["permutations"]}


def via_server(a: Path, b: Path, arch: str, scratch: Path) -> dict:
    """The same merge as a job on a fresh embedded server; the server is stopped and its data removed at the end."""
    import httpx

    from api.client import Client

    with socket.socket() as sock:  # a free port (the server binds it a moment later)
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    data_dir = scratch / "server"
    env = {key: value for key, value in os.environ.items() if not key.startswith("REBASIN_")}  # the embedded defaults
    env |= {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "REBASIN_DATA_DIR": str(data_dir)}
    server = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", url.rsplit(":", 1)[1],
                               "--log-level", "error"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    stop, peak = threading.Event(), [0]

    def sample_tree() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], _tree_anon_bytes(server.pid))

    try:
        deadline = time.monotonic() + 300  # start-up imports torch: a loaded machine takes a while
        while not _ready(httpx, url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"rebasin serve did not become ready (exit status {server.poll()})")
            time.sleep(0.5)
        with Client(url, None, timeout_s=600) as client:
            ids = [client.upload_checkpoint(path)["id"] for path in (a, b)]
            time.sleep(2)  # the idle baseline after the uploads have settled
            idle = peak[0] = _tree_anon_bytes(server.pid)
            sampler = threading.Thread(target=sample_tree, daemon=True)
            started = time.perf_counter()
            sampler.start()
            try:
                job = client.submit({"method": "weight_matching", "checkpoints": ids, "device": "cpu",
                                     "architecture": {"name": arch, "options": {}}, "options": {}})
                job = client.wait(job["id"])
            finally:
                stop.set()
                sampler.join()
            wall = time.perf_counter() - started
    finally:
        server.send_signal(signal.SIGTERM)  # serve stops its worker first
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()  # the worker follows (--exit-with-parent)
            server.wait()
        shutil.rmtree(data_dir, ignore_errors=True)
    if job["status"] != "succeeded":
        raise SystemExit(f"server job {job['id']} {job['status']}: {job.get('error')}")
    result = job["result"]
    return {"wall_s": wall, "peak_anon": peak[0], "idle_anon": idle, "sweeps": result["matching"]["iterations"],
            "objective": result["matching"]["objective_final"], "seconds_matching": result["matching"]["seconds"],
            "memory": result["memory"]}


def _ready(httpx, url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def server_row(name, params, ckpt_bytes, r) -> str:
    m = r["memory"]
    return (row(name, "server job", params, ckpt_bytes, r) + f" idle server {r['idle_anon'] / GIB:.2f} GiB; job's "
            f"result.memory: estimated {m['estimated_peak_bytes'] / GIB:.2f} GiB, measured "
            f"{m['measured_peak_bytes'] / GIB:.2f} GiB (worker baseline {m['baseline_bytes'] / GIB:.2f} GiB)")


def vit_pair(scratch: Path) -> tuple[Path, Path]:
    from safetensors.torch import save_file
    from torchvision.models import vit_l_16

    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = scratch / f"vit_l_16_{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in vit_l_16().state_dict().items()}, str(path))
        paths.append(path)
    return tuple(paths)


def llama_folder(size: str, seed: int, out: Path) -> Path:
    """A LLaMA-shaped model folder in bf16 with random weights (std 0.02; norms around 1), written shard by shard
    from the config's shapes (a meta-device model gives the names and shapes; no weights are built)."""
    import transformers as tf

    from matching.checkpoints import write_safetensors_from

    config = tf.LlamaConfig(**LLAMA[size], torch_dtype="bfloat16", max_position_embeddings=2048,
                            architectures=["LlamaForCausalLM"])  # what --arch hf builds
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in tf.LlamaForCausalLM(config).state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json_string())
    shards, current, size_now = [], [], 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        if current and size_now + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size_now = [], 0
        current.append(name)
        size_now += nbytes
    shards.append(current)
    gen = torch.Generator().manual_seed(seed)

    def tensor(name):
        if len(shapes[name]) == 1:  # RMSNorm weights
            return (1 + 0.1 * torch.randn(shapes[name], generator=gen)).bfloat16()
        return (0.02 * torch.randn(shapes[name], generator=gen)).bfloat16()

    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_from({n: (torch.bfloat16, shapes[n]) for n in names}, tensor, out / file, {"format": "pt"})
        weight_map.update({n: file for n in names})
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=2))
    return out


def check_merged_llama(folder: Path) -> float:
    """The merged folder loads (transformers, bf16) and computes: finite logits on a few tokens."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 15043, 29892, 3186]])).logits
    assert torch.isfinite(logits.float()).all(), "merged model gives non-finite logits"
    return float(logits.float().abs().mean())


def row(name, code, params, ckpt_bytes, r) -> str:
    return (f"| {name} | {code} | {params / 1e9:.2f} B | {ckpt_bytes / GIB:.2f} GiB | {r['peak_anon'] / GIB:.2f} GiB "
            f"({r['peak_anon'] / ckpt_bytes:.2f}x) | {r['wall_s']:.0f} s | {r['seconds_matching']:.0f} s | {r['sweeps']} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with on the ViT-L pair")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--skip-1b", action="store_true")
    parser.add_argument("--with-7b", action="store_true", help="also the 7 B pair (~27 GB of disk under --scratch)")
    parser.add_argument("--via-server", action="store_true",
                        help="also run each pair as a job on the embedded server (rebasin serve)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    rows = ["| pair | code | parameters | one checkpoint | peak anon (x checkpoint) | wall | matching | sweeps |",
            "|---|---|---|---|---|---|---|---|"]
    scratch = Path(tempfile.mkdtemp(prefix="bench_memory_", dir=args.scratch))
    try:
        if not args.skip_vit:
            a, b = vit_pair(scratch)
            params, ckpt = 304_326_632, a.stat().st_size
            results = {}
            for code, path in ([("baseline", args.baseline)] if args.baseline else []) + [("this", ROOT)]:
                results[code] = merge(path, a, b, "torchvision/vit_l_16", scratch / f"out_vit_{code}")
                rows.append(row("ViT-L/16 fp32", f"{code}", params, ckpt, results[code]))
                print(rows[-1], flush=True)
            if args.via_server:
                results["server"] = via_server(a, b, "torchvision/vit_l_16", scratch)
                rows.append(server_row("ViT-L/16 fp32", params, ckpt, results["server"]))
                print(rows[-1], flush=True)
            if args.baseline:
                same = results["baseline"]["permutations"] == results["this"]["permutations"]
                rows.append(f"\nViT-L/16: permutations identical to the baseline's: {same}; objective "
                            f"{results['this']['objective']!r} vs {results['baseline']['objective']!r}; wall "
                            f"{results['this']['wall_s'] / results['baseline']['wall_s']:.2f}x the baseline's; target peak "
                            f"<= {(ckpt / 2 + GIB) / GIB:.2f} GiB")
            for path in (a, b):
                path.unlink()
            shutil.rmtree(scratch / "out_vit_this", ignore_errors=True)
            shutil.rmtree(scratch / "out_vit_baseline", ignore_errors=True)
        for size in [s for s, on in (("1b", not args.skip_1b), ("7b", args.with_7b)) if on]:
            a, b = (llama_folder(size, seed, scratch / f"llama_{size}_{seed}") for seed in (0, 1))
            ckpt = sum(f.stat().st_size for f in a.glob("*.safetensors"))
            out = scratch / f"out_{size}"
            result = merge(ROOT, a, b, "hf", out)
            logit_scale = check_merged_llama(out / "merged")
            rows.append(row(f"LLaMA-{size.upper()} bf16", "this", ckpt / 2, ckpt, result)
                        + f" merged loads, mean |logit| {logit_scale:.3g}")
            print(rows[-1], flush=True)
            if args.via_server:
                rows.append(server_row(f"LLaMA-{size.upper()} bf16", ckpt / 2, ckpt, via_server(a, b, "hf", scratch)))
                print(rows[-1], flush=True)
            for path in (a, b, out):
                shutil.rmtree(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

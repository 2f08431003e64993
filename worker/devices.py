"""The worker's device: chosen once at start, checked against the machine, announced in the logs and in
the database (the ``workers`` table, which the API reads to tell whether a GPU job can run anywhere)."""

import logging
import os
import socket
from datetime import timedelta

import torch
from sqlalchemy import delete, exists, select, update

from storage.db import session_scope
from storage.models import Worker, utcnow

log = logging.getLogger("rebasin.worker")
# Ask NVML, not the CUDA runtime, whether there is a GPU: the prefork pool's children cannot use CUDA
# once their parent has initialised it.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


class DeviceUnavailable(Exception):
    pass


def resolve_worker_device(setting: str) -> str:
    """'auto' -> 'cuda:0' when there is a GPU, else 'cpu'; 'cuda' -> 'cuda:0'; checks that a CUDA device exists."""
    if setting == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if setting == "cpu":
        return "cpu"
    kind, _, index = setting.partition(":")
    if kind != "cuda" or not (index == "" or index.isdigit()):
        raise DeviceUnavailable(f"unknown device {setting!r}; use auto, cpu, cuda or cuda:N")
    index = int(index or 0)
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {setting!r} asked for, but this machine has no usable CUDA GPU "
                                "(no NVIDIA driver, or a CPU-only PyTorch build)")
    if index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"device {setting!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return f"cuda:{index}"


def job_device(requested: str, worker_device: str) -> str:
    """Where this worker runs a job: a job asking for a GPU (cuda or cuda:N) gets this worker's GPU, one
    worker per GPU; 'auto' gets the worker's device."""
    if worker_device == "auto":  # a worker not started by `rebasin worker` (tests, embedding code)
        worker_device = resolve_worker_device("auto")
    if requested in ("", "auto") or (requested.startswith("cuda") and worker_device.startswith("cuda")):
        return worker_device
    return requested


def describe(device: str) -> str:
    """The device and its memory, for the worker's start-up log line (initialises CUDA: call it in the
    process that will run jobs)."""
    if not device.startswith("cuda"):
        return f"{device} ({torch.get_num_threads()} threads)"
    free, total = torch.cuda.mem_get_info(torch.device(device))
    name = torch.cuda.get_device_name(torch.device(device))
    return f"{device} ({name}, {total / 2**30:.1f} GiB memory, {free / 2**30:.1f} GiB free)"


def release() -> None:
    """Hand the memory a finished job cached back to the GPU, so that the next job gets all of it."""
    if torch.cuda.is_initialized():
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except RuntimeError:  # a broken CUDA context: the next job reports it, this one has ended
            log.exception("could not release the GPU's cached memory")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def register(db_url: str, name: str, device: str, heartbeat_timeout_s: float) -> None:
    """Insert or refresh this worker's row (called at start and on every sweep), and forget workers that
    died without removing theirs."""
    with session_scope(db_url) as session:
        now = utcnow()
        session.execute(delete(Worker).where(Worker.heartbeat_at < now - timedelta(seconds=10 * heartbeat_timeout_s)))
        if not session.execute(update(Worker).where(Worker.name == name).values(heartbeat_at=now, device=device)).rowcount:
            session.add(Worker(name=name, device=device, started_at=now, heartbeat_at=now))
        session.commit()


def unregister(db_url: str, name: str) -> None:
    with session_scope(db_url) as session:
        session.execute(delete(Worker).where(Worker.name == name))
        session.commit()


def gpu_worker_connected(session, fresh_after) -> bool:
    """Whether a worker with a CUDA device sent a sign of life since ``fresh_after``."""
    return bool(session.scalar(select(exists().where(Worker.device.like("cuda%"), Worker.heartbeat_at >= fresh_after))))

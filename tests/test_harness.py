"""The test harness itself: a killed test run leaves no service process behind."""

import os
import signal
import subprocess
import sys
import time

from tests.conftest import REPO_ROOT

# A stand-in for a test run: starts a long-lived child the way the fixtures start services, prints its pid, waits.
RUN = """
import subprocess, sys, time
from tests.conftest import die_with_test_run
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True,
                         preexec_fn=die_with_test_run)
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited; only its parent's wait is missing
        return stat.read().split(") ")[-1][0] != "Z"


def test_service_processes_die_with_a_killed_test_run():
    run = subprocess.Popen([sys.executable, "-c", RUN], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    child = int(run.stdout.readline())
    assert alive(child)
    run.send_signal(signal.SIGKILL)  # no teardown runs: only the kernel can clean up
    run.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)

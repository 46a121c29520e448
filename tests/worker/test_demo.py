from __future__ import annotations

import signal
import subprocess
import sys

from schemas.settings import REPO_ROOT

WAIT = "from worker.demo import wait_for_stop; wait_for_stop(); print('stopped', flush=True)"


def test_kept_servers_wait_for_a_signal_when_there_is_no_terminal() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", WAIT],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None

    announced = process.stdout.readline()
    still_running = process.poll() is None
    process.send_signal(signal.SIGTERM)
    rest, _ = process.communicate(timeout=30)

    assert "kill" in announced and str(process.pid) in announced
    assert still_running
    assert process.returncode == 0
    assert rest.strip() == "stopped"

"""`strata dashboard RUN` as a user runs it: it prints the URL once the server answers, and stopping the
command stops the server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from test_dashboard_browser import free_port
from test_dashboard_support import synthetic_run

ROOT = Path(__file__).resolve().parents[1]


def test_dashboard_command_prints_url_and_stops_cleanly(tmp_path):
    run = synthetic_run(tmp_path / "run", [f"w{i}" for i in range(20)])
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "strata.cli", "dashboard", str(run), "--port", str(port),
                             "--read-only"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and "Strata dashboard" not in line:
            line = proc.stdout.readline()
        assert f"http://localhost:{port}" in line and "read-only" in line
        with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    time.sleep(1)
    try:
        urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=3)
        alive = True
    except OSError:
        alive = False
    assert not alive, "the streamlit server outlived `strata dashboard`"


def test_dashboard_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    from strata.cli import main

    assert main(["dashboard", str(tmp_path)]) == 2
    assert "not a Strata run" in capsys.readouterr().err

"""`strata dashboard RUN` as a user runs it: it prints the URL once the server answers, stopping the command
stops the server, and a port another program holds is refused rather than reported as the dashboard's."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_dashboard_support import free_port, synthetic_run

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


def test_dashboard_on_a_port_in_use_says_so(tmp_path):
    """Another server already listens on the port: the command must not print that server's URL as its own."""
    run = synthetic_run(tmp_path / "run", [f"w{i}" for i in range(20)])
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        done = subprocess.run([sys.executable, "-m", "strata.cli", "dashboard", str(run), "--port", str(port)],
                              check=False, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stdout == "" and "Strata dashboard" not in done.stderr
    assert done.stderr.splitlines() == [(f"strata: error: port {port} on localhost is already in use by another "
                                        "program; stop it or choose another port with --port")]


def test_a_server_that_stops_early_is_reported():
    """Streamlit exiting before it answers (a crash, or a port taken in the meantime) is an error, not a wait."""
    from activations.errors import StrataError
    from dashboard.serve import wait_until_up

    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait(timeout=30)
    started = time.monotonic()
    with pytest.raises(StrataError, match=r"stopped before it served .* \(exit status 3\)"):
        wait_until_up(f"http://127.0.0.1:{free_port()}", proc, timeout=30)
    assert time.monotonic() - started < 5

"""Start the Streamlit dashboard for a run: `strata dashboard RUN [--read-only] [--port P]`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from dashboard.data import check_run

ROOT = Path(__file__).resolve().parents[1]  # the folder holding the dashboard package (site-packages or checkout)
# The script Streamlit runs: it lies alone in its folder, because Streamlit puts that folder first on sys.path.
APP = ROOT / "strata" / "dashboard_script" / "strata_dashboard.py"


def dashboard_command(port: int, host: str) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
            "--server.address", host, "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none"]


def dashboard_env(run: Path, read_only: bool) -> dict[str, str]:
    """The server's environment: Strata's packages first on PYTHONPATH, and PYTHONSAFEPATH=1 so that
    `python -m streamlit` does not put the current folder (and any dashboard/ or sae/ in it) on sys.path."""
    env = dict(os.environ, STRATA_RUN=str(run), STRATA_READ_ONLY="1" if read_only else "0", PYTHONSAFEPATH="1")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def wait_until_up(url: str, timeout: float = 60.0) -> bool:
    """Poll Streamlit's health endpoint until it answers (True) or `timeout` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def serve_dashboard(run, read_only: bool = False, port: int = 8501, host: str = "localhost", block: bool = True):
    """Serve the dashboard of `run`. block=True runs until interrupted; block=False returns the Popen."""
    run = check_run(run)
    env = dashboard_env(run, read_only)
    url = f"http://{host}:{port}"
    proc = subprocess.Popen(dashboard_command(port, host), env=env, stdout=subprocess.DEVNULL if not block else None)
    if not block:
        return proc
    def stop(signum, frame):  # `kill` of this process also stops the server it started
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
    try:
        if wait_until_up(url):
            print(f"Strata dashboard for {run}: {url}" + ("  (read-only)" if read_only else ""), flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

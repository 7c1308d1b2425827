"""Start the Streamlit dashboard for a run: `strata dashboard RUN [--read-only] [--port P]`."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from activations.errors import StrataError
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


def check_port_free(host: str, port: int) -> None:
    """Refuse (StrataError) a port Streamlit could not listen on: out of range, already taken by another server
    (whose URL would otherwise be printed as this dashboard's), or a host this machine has no address for.
    Binds every address `host` resolves to, with SO_REUSEADDR as Streamlit's server does, and lets go at once."""
    if not 1 <= port <= 65535:
        raise StrataError(f"--port {port} is not a TCP port; choose one in 1-65535 (default 8501)")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StrataError(f"--host {host!r} is not an address of this machine ({e.strerror}); use localhost, "
                          "0.0.0.0 or one of its IP addresses") from None
    refused = []
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StrataError(f"port {port} on {host} is already in use by another program; stop it or choose "
                                  "another port with --port") from None
            refused.append(e.strerror or str(e))
    if len(refused) == len(addresses):
        raise StrataError(f"cannot listen on {host}:{port} ({refused[0]}); choose another --port, or --host "
                          "localhost or 0.0.0.0")


def wait_until_up(url: str, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> bool:
    """Poll Streamlit's health endpoint until it answers (True) or `timeout` seconds pass (False). With `proc`,
    a server that exits first is an error (StrataError), and so is an answer once it has exited (that answer
    came from another server)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise StrataError(f"the Streamlit server stopped before it served {url} (exit status {proc.returncode}); "
                              "its messages are above")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/_stcore/health", timeout=2) as r:
                if r.status == 200 and (proc is None or proc.poll() is None):
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def serve_dashboard(run, read_only: bool = False, port: int = 8501, host: str = "localhost", block: bool = True):
    """Serve the dashboard of `run`. block=True runs until interrupted; block=False returns the Popen."""
    run = check_run(run)
    check_port_free(host, port)
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
        if wait_until_up(url, proc):
            print(f"Strata dashboard for {run}: {url}" + ("  (read-only)" if read_only else ""), flush=True)
        else:
            print(f"Strata dashboard for {run}: starting at {url} (not answering yet)", flush=True)
        status = proc.wait()
        if status not in (0, -signal.SIGTERM, -signal.SIGINT):
            raise StrataError(f"the Streamlit server stopped with exit status {status}; its messages are above")
        return status
    except KeyboardInterrupt:
        return 0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

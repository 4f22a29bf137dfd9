"""A Streamlit server for measuring the explorer: started on a free port, waited for, always stopped.

Used by `bench --cold-start`, the synthetic study's app-RSS figure and the headless-Chromium tests.
The server is a child process (`python -m streamlit run SCRIPT`); nothing here imports Streamlit.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

CHROMIUM = Path("/usr/bin/chromium")  # Debian's Chromium, what Playwright drives in the tests and benches


class ServerDidNotStart(RuntimeError):
    """The server exited, or did not answer its health check in time."""


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    started: float  # time.perf_counter() just before the process was launched
    up: float  # time.perf_counter() when the health check first answered


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path | None) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log is not None else ""
    except OSError:
        return ""


@contextmanager
def streamlit_server(
    script: str | Path,
    *,
    cwd: Path,
    env: dict[str, str],
    python: str = sys.executable,
    log: Path | None = None,
    timeout: float = 120.0,
) -> Iterator[Server]:
    """`python -m streamlit run script` headless on 127.0.0.1 and a free port, once its health check answers.

    Output goes to `log` (else nowhere). Raises ServerDidNotStart (with the log's tail) if the server exits
    or does not answer within `timeout` seconds; the process is terminated (killed if need be) on exit.
    """
    port = free_port()
    argv = [python, "-m", "streamlit", "run", str(script), "--server.headless", "true"]
    argv += ["--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"]
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ServerDidNotStart(f"streamlit did not start (see {log or 'its output'})\n{_tail(log)}".rstrip())
            time.sleep(0.1)
        yield Server(url, proc, started, time.perf_counter())
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log is not None:
            out.close()

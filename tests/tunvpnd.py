"""Run tunvpn daemons inside lab hosts, the way an admin would: a config file and `tunvpn ROLE -c`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from netlab import Host, LabError, LabTimeout, python_env, stop_process, wait_until
from scaledclock import SCALE_VARIABLE

START_TIMEOUT = 10.0
SCALED_CLOCK = Path(__file__).resolve().parent / "scaledclock.py"


class Tunvpn:
    """One `python -m tunvpn server|client` process; its log is collected line by line."""

    def __init__(self, host: Host, role: str, config_text: str, name: str | None = None,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 python: str | None = None, time_scale: float | None = None) -> None:
        """`time_scale` runs the daemon on a clock that fast (tests/scaledclock.py)."""
        self.host = host
        self.python = python or sys.executable  # another interpreter runs it on other library versions
        self.env = env or {}
        self.role = role
        self.name = name or role
        self.extra_args = extra_args
        self.time_scale = time_scale
        self._dir = Path(tempfile.mkdtemp(prefix="tunvpn-test-"))
        host.lab.add_cleanup(self._remove_files)
        self.config_path = self._dir / f"{self.name}.conf"
        self.control_socket = self._dir / f"{self.name}.sock"
        self.state_dir = self._dir / "state"
        self.write_config(config_text)
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def write_config(self, text: str) -> None:
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(text)

    def _remove_files(self) -> None:
        """Lab cleanup: stop the daemon first, or its exit (a state save) recreates the files."""
        if self.process is not None and self.process.poll() is None:
            stop_process(self.process)
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def device(self) -> str:
        return "tv-" + self.name[:12]

    def start(self, wait: bool = True) -> Tunvpn:
        entry = ["-m", "tunvpn"] if self.time_scale is None else [str(SCALED_CLOCK)]
        cmd = [self.python, *entry, self.role, "-c", str(self.config_path),
               "--log-level", "debug", "--control-socket", str(self.control_socket), *self.extra_args]
        if self.role == "server":
            cmd += ["--state-dir", str(self.state_dir)]
        self.lines = []
        env = python_env() | self.env
        if self.time_scale is not None:
            env[SCALE_VARIABLE] = str(self.time_scale)
        self.process = self.host.popen(cmd, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._collect, args=(self.process,), daemon=True).start()
        if wait:
            self.wait_log(r" up: device ", START_TIMEOUT)
        return self

    def _collect(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float, after: int = 0) -> str:
        """Wait for a log line matching `pattern` (among lines from index `after` on)."""
        regex = re.compile(pattern)

        def found() -> str | None:
            if self.process is not None and self.process.poll() is not None:
                raise LabError(f"tunvpn {self.role} exited with {self.process.returncode}:\n{self.log()}")
            with self._lock:
                return next((line for line in self.lines[after:] if regex.search(line)), None)

        try:
            return wait_until(found, timeout, what=f"log line /{pattern}/ from tunvpn {self.role}")
        except LabTimeout as exc:
            raise LabTimeout(f"{exc}\n--- log ---\n{self.log()}") from None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def statistics(self, timeout: float = 5.0) -> list[str]:
        """Ask for the SIGUSR2 statistics dump and return its lines."""
        mark = len(self.lines)
        self.signal(signal.SIGUSR2)
        self.wait_log(r"INFO: device: dropped", timeout, after=mark)
        with self._lock:
            return [line for line in self.lines[mark:] if line.startswith(("INFO: peer", "INFO: device:"))]

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait: the exit code (the daemon must exit 0 on SIGTERM)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.process)
            raise LabTimeout(f"tunvpn {self.role} did not exit within {timeout}s of SIGTERM:\n{self.log()}")

    def show(self) -> dict:
        """`tunvpn show --json` against this daemon's control socket, run inside its host."""
        result = self.host.run([self.python, "-m", "tunvpn", "show", "--control-socket",
                                str(self.control_socket), "--json"], env=python_env())
        return json.loads(result.stdout)

    def peer(self, public_key: str) -> dict:
        return next(p for p in self.show()["peers"] if p["public_key"] == public_key)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)


def wait_for_ping(host: Host, address: str, timeout: float) -> float:
    """Ping once a second until one answer comes back; returns how long it took."""
    start = time.monotonic()

    def answered() -> bool:
        return host.ping(address, count=1, timeout=1, check=False).returncode == 0

    wait_until(answered, timeout, interval=0.0, what=f"a ping answer from {address} on {host.role}")
    return time.monotonic() - start

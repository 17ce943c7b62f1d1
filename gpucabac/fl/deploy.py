"""The Flower app as a real deployment on this machine: a SuperLink and N SuperNodes on
127.0.0.1, the app started with `flwr run`, every process stopped afterwards.

Nothing is installed at run time (no internet here): the SuperLink and SuperNodes run with
runtime dependency installation disabled, so the app runs in this environment, where gpucabac
is installed. The app itself is a generated folder holding only its pyproject.toml: its
components are gpucabac.fl.flower's `server_app` and `client_app`, its run config every FLConfig
field (docs/fl.md §3).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

from ..errors import InputError
from .config import FLConfig

APP_NAME = "gpucabac-fl"
CONNECTION = "gpucabac-local"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def app_pyproject(config: FLConfig, extras: dict[str, str] | None = None) -> str:
    """The pyproject.toml of the Flower app: its components and, as its run config, `config`."""
    values = config.to_record() | {"log-path": "none", "record-dir": "none"} | dict(extras or {})
    lines = [
        '[build-system]', 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', '',
        '[project]', f'name = "{APP_NAME}"', 'version = "1.0.0"',
        'description = "gpucabac: federated learning with coded sparse differential updates"',
        'license = "BSD-3-Clause-Clear"', 'dependencies = []', '',
        '[tool.flwr.app]', 'publisher = "gpucabac"', '',
        '[tool.flwr.app.components]', 'serverapp = "gpucabac.fl.flower:server_app"',
        'clientapp = "gpucabac.fl.flower:client_app"', '',
        '[tool.flwr.app.config]',
        *(f'{k} = {_toml_value(v)}' for k, v in values.items()),
    ]
    return "\n".join(lines) + "\n"


def _tool(name: str) -> str:
    """A Flower command of this environment (next to its Python, else on PATH)."""
    here = pathlib.Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise InputError(f"{name} not found: install the fl extra (pip install 'gpucabac[fl]')")
    return found


@contextlib.contextmanager
def _processes() -> Iterator[list[subprocess.Popen]]:
    """Every process started in the body is stopped at its end (its whole process group)."""
    started: list[subprocess.Popen] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for p in started:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, log: pathlib.Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise InputError(f"{what} exited with status {proc.returncode}; its log: {log}\n{_tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise InputError(f"{what} did not listen on port {port} within {timeout_s:.0f} s; its log: {log}")


def _tail(path: pathlib.Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def deploy(config: FLConfig, *, log_path=None, record_dir=None, workdir=None, timeout_s: float = 900,
           echo: Callable[[str], None] = print) -> list[int]:
    """Run `config` as a deployment: a SuperLink and `config.num_clients` SuperNodes on
    loopback (SuperNode i has partition-id i), `flwr run` of the app, then every process
    stopped. `log_path` / `record_dir` as for the simulation; `workdir` keeps the Flower state,
    app folder and process logs (default: a temporary folder, removed afterwards). Returns the
    process ids it started (all of them stopped and reaped by then)."""
    keep = workdir is not None
    work = pathlib.Path(workdir) if keep else pathlib.Path(tempfile.mkdtemp(prefix="gpucabac-fl-"))
    try:
        return _deploy(config, work, log_path, record_dir, timeout_s, echo)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _deploy(config, work: pathlib.Path, log_path, record_dir, timeout_s, echo) -> list[int]:
    home, app = work / "flwr-home", work / APP_NAME
    home.mkdir(parents=True, exist_ok=True)
    app.mkdir(parents=True, exist_ok=True)
    extras = {}
    if log_path is not None:
        extras["log-path"] = str(pathlib.Path(log_path).resolve())
    if record_dir is not None:
        extras["record-dir"] = str(pathlib.Path(record_dir).resolve())
    (app / "pyproject.toml").write_text(app_pyproject(config, extras))
    link_port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n')
    # the SuperLink and SuperNodes start flower-superexec from PATH: this environment's first
    bin_dir = str(pathlib.Path(_tool("flwr")).parent)
    env = os.environ | {"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    start = time.monotonic()
    with _processes() as started:
        def spawn(args, name):
            log = work / f"{name}.log"
            out = open(log, "wb")  # noqa: SIM115  (closed with the process)
            p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
            out.close()
            started.append(p)
            return p, log

        link, link_log = spawn([_tool("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
                                "--database", str(work / "state.db"), "--disable-runtime-dependency-installation"],
                               "superlink")
        _wait_for_port(link_port, link, "the SuperLink", link_log, 120)
        echo(f"gpucabac fl: SuperLink on 127.0.0.1:{link_port}")
        for i in range(config.num_clients):
            port = _free_port()
            spawn([_tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}", "--port", str(port),
                   "--node-config", f"partition-id={i} num-partitions={config.num_clients}"], f"supernode-{i}")
        echo(f"gpucabac fl: {config.num_clients} SuperNodes started; flwr run {app.name}")
        run_log = work / "flwr-run.log"
        with open(run_log, "wb") as out:
            run = subprocess.Popen([_tool("flwr"), "run", str(app), CONNECTION, "--stream"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
            started.append(run)
            for line in run.stdout:
                out.write(line)
                text = line.decode(errors="replace").rstrip()
                if "gpucabac fl:" in text:
                    echo(text[text.index("gpucabac fl:"):])
                if time.monotonic() - start > timeout_s:
                    raise InputError(f"the deployment ran past {timeout_s:.0f} s; logs in {work}")
            run.wait()
        if run.returncode != 0:
            raise InputError(f"flwr run exited with status {run.returncode}:\n{_tail(run_log)}")
        pids = [p.pid for p in started]
    return pids


__all__ = ["app_pyproject", "deploy"]

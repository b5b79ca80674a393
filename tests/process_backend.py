"""`ProcessBackend`: a launcher (tests only) that runs every task as a local process, so real traffic flows.

Select it like the other test launchers, with this directory on PYTHONPATH:

    MELANGE_SKY_BACKEND=process_backend:ProcessBackend  PYTHONPATH=<repo>/tests:<repo>  melange-sky up ... -y
    (or `--backend process_backend:ProcessBackend`)

Its "cloud" is one directory, `$PROCESS_BACKEND_DIR` (default `$MELANGE_SKY_HOME/process-backend`):

    state.json (+ .lock)   clusters and every process group ever started; read-modify-written under an exclusive
                           flock, so each CLI invocation (a new process) and the test share it. No secret value is
                           ever written there (nor into a log by this module).
    clusters/<cluster>/    the cluster's "host": its HOME, where file_mounts and workdir are copied
    logs/<cluster>-<n>.log the stdout and stderr of the cluster's n-th launch

Processes are started with `start_new_session=True`: each is the leader of its own process group and outlives the
CLI that launched it, as a VM outlives `sky launch`. A process is identified by pid *and* start time (from
/proc, so Linux only), so a recycled pid is never mistaken for a cluster.

What a launch runs, by the task's resources:

- **With `accelerators` (a GPU replica)**: `tests/fake_replica.py`, an OpenAI-compatible server on a free
  127.0.0.1 port. The task's `run` (vLLM) is not run. Each token takes `$PROCESS_BACKEND_TOKEN_DELAY_MS` ms
  (default 2), either one number or per GPU (`A10G=20,A100-80GB=5,3`: the bare number is the default), read when the
  replica is launched. Its `served_by` is the cluster name. When the task's `run` exports `VLLM_API_KEY` from a
  secret, the replica demands that secret's value as its API key, as the vLLM template makes it do. UP once its
  /health answers. The endpoint is `127.0.0.1:<its port>`, whatever port the task declares (every replica declares
  the same one; locally they cannot share it): `endpoint(cluster, port)` answers it for the task's declared port.
- **Without (a CPU task: the router)**: as SkyPilot would on a fresh host. `file_mounts` (local file or directory
  -> destination) are copied under the cluster directory; destinations `~/...` or relative land in it (it is the
  task's HOME), absolute ones are refused. `workdir` is copied to `~/sky_workdir`, where `run` then starts (else in
  HOME). `setup` is skipped (the test venv already has the dependencies). `run` goes to `bash -c` with the
  environment: this process's, minus PYTHONPATH, MELANGE_SKY_* and PROCESS_BACKEND_* (a remote host has none of
  them) and minus every secret the task names; then PATH with this Python's bin directory first (so `python` is the
  venv's), HOME = the cluster directory, the task's `envs`, and `request.secrets`. UP once
  127.0.0.1:<resources.ports[0]> accepts connections. A port already in use before the launch, a process that exits,
  or no listener within `$PROCESS_BACKEND_LAUNCH_TIMEOUT` s (default 60) is a LaunchError carrying the tail of the
  process's log (secret values masked), and its processes are killed.

Status follows SkyPilot's two views. `status(refresh=False)` answers the cached view: the state last recorded by
this backend (a launch, a down, a refresh), never looking at the process, so a replica killed out of band still
reads UP, like a preempted VM in `sky status` without `--refresh`. `status(refresh=True)` checks each process: alive
is UP, dead (or its pid recycled) is GONE and the cluster leaves the cache (its leftover processes are killed), as
SkyPilot drops a terminated cluster on refresh. A launch on a cluster whose process is alive reuses it (nothing
rerun); on one whose process died, it starts afresh (a new process, a new port, a clean directory).

`down` kills the cluster's process group (SIGTERM, SIGKILL after `$PROCESS_BACKEND_GRACE` s, default 5), waits until
no process of the group is left, removes its directory (logs stay) and returns whether the backend knew the cluster
(True even if its process had died unrecorded: SkyPilot's `down` of a preempted cluster still in its cache succeeds);
False for an unknown one. `cancel` stops in-flight launches of this object (their processes are killed and the launch
raises LaunchCancelled). `validate` checks the shape only (level SCHEMA).

For tests: `kill(cluster)` (out of band, the cache untouched: a preemption), `live_processes()` (every process still
running in any group this backend ever started, by cluster: `{}` after a clean `down`), `kill_all()` (a fixture
finalizer), `history()` (every launch, up, failure, kill, death found by a refresh and down, with the replica's
requests in flight at the moment it was killed or torn down), `stats(cluster)` (a replica's request counts now),
`control(cluster, healthy=False, token_delay_ms=...)` (a sick or slower replica; the launcher still says UP),
`kill(cluster, signal.SIGSTOP)` (a hung one), `clusters()`, `log(cluster)`, `state_text()`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from backend_doubles import CancellableLaunches, locked_json
from melange_sky.backends import ClusterInfo, ClusterStatus, LaunchRequest, Validation, ValidationLevel
from melange_sky.errors import InvalidTask, LaunchCancelled, LaunchError

DIR_ENV_VAR = "PROCESS_BACKEND_DIR"
TOKEN_DELAY_ENV_VAR = "PROCESS_BACKEND_TOKEN_DELAY_MS"
LAUNCH_TIMEOUT_ENV_VAR = "PROCESS_BACKEND_LAUNCH_TIMEOUT"
GRACE_ENV_VAR = "PROCESS_BACKEND_GRACE"
DEFAULT_TOKEN_DELAY_MS = 2.0
DEFAULT_LAUNCH_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = 5.0
REPLICA_SCRIPT = Path(__file__).resolve().with_name("fake_replica.py")
REPLICA_API_KEY_ENV = "FAKE_REPLICA_API_KEY"  # read by fake_replica.py
POLL_S = 0.05
_PAUSING = (signal.SIGSTOP, signal.SIGCONT, signal.SIGTSTP)
LOG_TAIL_CHARS = 1500
#: Not inherited by a task's process: a remote host has none of them.
STRIPPED_ENV_PREFIXES = ("MELANGE_SKY_", "PROCESS_BACKEND_")
STRIPPED_ENV = ("PYTHONPATH",)
_API_KEY_RE = re.compile(r"VLLM_API_KEY=\"?\$\{([A-Za-z_][A-Za-z0-9_]*)")
_IGNORED_IN_COPIES = shutil.ignore_patterns("__pycache__", "*.pyc", ".git", ".venv", "*.egg-info", ".pytest_cache",
                                            ".mypy_cache", ".ruff_cache")


def default_dir() -> Path:
    home = os.environ.get("MELANGE_SKY_HOME") or os.path.join(os.path.expanduser("~"), ".melange-sky")
    return Path(os.environ.get(DIR_ENV_VAR) or os.path.join(home, "process-backend"))


# -- processes, by /proc ------------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group, start time in clock ticks) of a process, None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces and parentheses
    return fields[0], int(fields[2]), int(fields[19])


def start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return stat[2] if stat else None


def is_alive(pid: int, started: int) -> bool:
    """The process `pid` that started at `started` still runs (not a zombie, not a recycled pid)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X", "x") and stat[2] == started


def process_groups() -> dict[int, list[int]]:
    """Every running process (zombies excluded) by process group, from one scan of /proc."""
    groups: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[0] not in ("Z", "X", "x"):
                groups.setdefault(stat[1], []).append(int(entry.name))
    return groups


def group_members(pgid: int, started: int, groups: Mapping[int, list[int]] | None = None) -> list[int]:
    """Running processes of the group that the leader (pid `pgid`, started at `started`) made. Empty when the leader's
    pid now names another process: then the group number was recycled and is not ours."""
    leader = _stat(pgid)
    if leader is not None and leader[2] != started:
        return []
    return sorted((groups if groups is not None else process_groups()).get(pgid, []))


def _signal_group(pgid: int, started: int, sig: signal.Signals) -> bool:
    if not group_members(pgid, started):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    return True


def stop_group(pgid: int, started: int, grace_s: float, reap: subprocess.Popen | None = None) -> None:
    """SIGTERM the group, SIGKILL what is left after `grace_s`, and return once none of it runs."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        if not _signal_group(pgid, started, sig):
            break
        if sig is signal.SIGTERM:  # a frozen (SIGSTOPped) process acts on SIGTERM only once continued
            _signal_group(pgid, started, signal.SIGCONT)
        deadline = time.monotonic() + wait_s
        while group_members(pgid, started) and time.monotonic() < deadline:
            if reap is not None:
                reap.poll()
            time.sleep(POLL_S)
    if reap is not None:
        reap.poll()


# -- tasks ----------------------------------------------------------------------------------------------------------
def is_gpu_task(task: Mapping[str, Any]) -> bool:
    resources = task.get("resources") or {}
    candidates = [resources, *(resources.get("any_of") or []), *(resources.get("ordered") or [])]
    return any(isinstance(c, Mapping) and c.get("accelerators") for c in candidates)


def declared_port(task: Mapping[str, Any]) -> int | None:
    """The first port of `resources.ports` (an int, "8000", "8000-8010", or a list of those)."""
    ports = (task.get("resources") or {}).get("ports")
    if isinstance(ports, list | tuple):
        ports = ports[0] if ports else None
    if ports is None:
        return None
    return int(str(ports).split("-")[0])


def accelerator_name(task: Mapping[str, Any]) -> str:
    resources = task.get("resources") or {}
    for candidate in [resources, *(resources.get("any_of") or []), *(resources.get("ordered") or [])]:
        accelerators = candidate.get("accelerators") if isinstance(candidate, Mapping) else None
        if isinstance(accelerators, Mapping):
            return str(next(iter(accelerators)))
        if accelerators:
            return str(accelerators).split(":")[0]
    return "GPU"


def placement(task: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The (cloud, region) the task asks for (`cloud`/`region` or `infra: cloud/region`), what status reports."""
    resources = task.get("resources") or {}
    infra = str(resources.get("infra") or "").split("/")
    cloud = resources.get("cloud") or infra[0] or None
    region = resources.get("region") or (infra[1] if len(infra) > 1 else None)
    return (str(cloud).lower() if cloud else None), (str(region) if region else None)


def token_delay_ms(gpu: str, spec: str | None) -> float:
    """The per-token delay for `gpu` from a spec like "5" or "A10G=20,A100-80GB=5,3"."""
    default = DEFAULT_TOKEN_DELAY_MS
    for part in (spec or "").split(","):
        name, sep, value = part.strip().rpartition("=")
        if not part.strip():
            continue
        if not sep:
            default = float(value)
        elif name.lower() == gpu.lower():
            return float(value)
    return default


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def health_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def replica_stats(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """A fake replica's GET /stats (requests received, finished, in flight), None for other tasks or no answer."""
    if record.get("kind") != "replica" or record.get("port") is None:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{record['port']}/stats", timeout=5) as answer:
            stats = json.loads(answer.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None
    return stats if isinstance(stats, dict) else None


def in_flight_of(stats: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a history event keeps of a replica's stats at the moment it was torn down or killed."""
    if stats is None:
        return {}
    return {"in_flight": stats.get("in_flight"), "received": stats.get("received"), "finished": stats.get("finished")}


def _mask(text: str, secrets: Mapping[str, str]) -> str:
    for value in secrets.values():
        if value:
            text = text.replace(value, "***")
    return text


class ProcessBackend(CancellableLaunches):
    """See the module docstring. Thread- and process-safe; every method follows `melange_sky.backends.Backend`."""

    name = "process"

    def __init__(self, directory: str | os.PathLike[str] | None = None):
        self.dir = Path(directory) if directory is not None else default_dir()
        self.path = self.dir / "state.json"
        self._lock = threading.Lock()
        self._cancel_events: dict[str, threading.Event] = {}
        self._children: dict[int, subprocess.Popen] = {}  # pid -> Popen, to reap the ones this process started
        with self._state() as state:
            state.setdefault("clusters", {})
            state.setdefault("spawned", [])
            state.setdefault("launches", 0)
            state.setdefault("history", [])

    # -- the shared file ------------------------------------------------------------------------------------------
    def _state(self) -> contextlib.AbstractContextManager[dict[str, Any]]:
        """Written back even when the body raises, so a process recorded before a failure is never forgotten."""
        return locked_json(self.path, indent=1)

    @staticmethod
    def _event(state: dict[str, Any], event: str, cluster: str, **extra: Any) -> None:
        state["history"].append({"at": time.time(), "event": event, "cluster": cluster, "by": os.getpid(), **extra})

    def _snapshot(self) -> dict[str, Any]:
        with self._state() as state:
            return json.loads(json.dumps(state))

    # -- inspection and out-of-band events, for tests ----------------------------------------------------------------
    def clusters(self) -> dict[str, dict[str, Any]]:
        """The cached view: cluster -> record (status, kind, pid, pgid, port, declared_port, log, ...)."""
        return self._snapshot()["clusters"]

    def history(self, event: str | None = None) -> list[dict[str, Any]]:
        """Every launch, up, failure, cancel, out-of-band kill, refresh-found death and down, oldest first:
        {"at", "event", "cluster", "pid", "by" (the pid that acted), ...}. `down` and `killed` of a replica also
        carry its `in_flight`, `received` and `finished` request counts just before its processes were signalled:
        a drained replica was torn down with in_flight 0."""
        return [e for e in self._snapshot()["history"] if event is None or e["event"] == event]

    def control(self, cluster: str, **knobs: Any) -> dict[str, Any]:
        """Turn a running replica's knobs (`healthy=False`: its /health answers 503; `token_delay_ms=50`): POST
        /control. The launcher's status does not change: SkyPilot knows hosts, not the health of what they serve."""
        record = self._snapshot()["clusters"].get(cluster)
        if record is None or record.get("kind") != "replica" or record.get("port") is None:
            raise ValueError(f"{cluster} is not a running replica of this backend")
        req = urllib.request.Request(f"http://127.0.0.1:{record['port']}/control", data=json.dumps(knobs).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as answer:
            result: dict[str, Any] = json.loads(answer.read())
        with self._state() as state:
            self._event(state, "control", cluster, **knobs)
        return result

    def stats(self, cluster: str) -> dict[str, Any] | None:
        """The replica's request counts now (GET /stats), None if it is not a running replica."""
        record = self._snapshot()["clusters"].get(cluster)
        return replica_stats(record) if record is not None else None

    def state_text(self) -> str:
        return self.path.read_text() if self.path.exists() else ""

    def log(self, cluster: str) -> str:
        """The output of the cluster's latest launch ("" if none)."""
        logs = sorted((self.dir / "logs").glob(f"{cluster}-*.log"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
        return logs[-1].read_text(errors="replace") if logs else ""

    def kill(self, cluster: str, sig: signal.Signals = signal.SIGKILL) -> bool:
        """Kill the cluster's processes out of band (a preemption, a crash): the cached status still says UP until
        a refresh. Returns once none of them runs; False if the cluster had no running process. SIGSTOP / SIGCONT
        freeze and thaw it instead (a hung replica: its port accepts, nothing answers) and return at once."""
        record = self._snapshot()["clusters"].get(cluster)
        if record is None or not group_members(record["pgid"], record["started"]):
            return False
        stats = replica_stats(record) if sig is not signal.SIGCONT else None
        _signal_group(record["pgid"], record["started"], sig)
        with self._state() as state:
            self._event(state, "killed" if sig not in _PAUSING else sig.name.lower(), cluster, pid=record["pid"],
                        signal=sig.name, **in_flight_of(stats))
        if sig in _PAUSING:
            return True
        deadline = time.monotonic() + 30.0
        while group_members(record["pgid"], record["started"]) and time.monotonic() < deadline:
            self._reap()
            time.sleep(POLL_S)
        self._reap()
        return True

    def live_processes(self) -> dict[str, list[int]]:
        """Every process still running in a group this backend ever started (any CLI process), by cluster."""
        live: dict[str, list[int]] = {}
        groups = process_groups()
        for spawned in self._snapshot()["spawned"]:
            members = group_members(spawned["pgid"], spawned["started"], groups)
            if members:
                live.setdefault(spawned["cluster"], []).extend(members)
        return live

    def kill_all(self) -> list[str]:
        """SIGKILL every group this backend ever started and wait until none runs: a test's finalizer. Returns the
        clusters that still had processes."""
        if not self.path.exists():
            return []
        killed = []
        groups = process_groups()
        for spawned in self._snapshot()["spawned"]:
            if group_members(spawned["pgid"], spawned["started"], groups):
                killed.append(spawned["cluster"])
                stop_group(spawned["pgid"], spawned["started"], 0.0, self._children.get(spawned["pid"]))
        self._reap()
        return killed

    def _reap(self) -> None:
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                self._children.pop(pid, None)

    # -- Backend interface ----------------------------------------------------------------------------------------
    def launch(self, request: LaunchRequest) -> ClusterInfo:
        cluster = request.cluster
        try:
            with self._cancellable(cluster) as cancel:
                with self._state() as state:
                    record = state["clusters"].get(cluster)
                    if record is not None and is_alive(record["pid"], record["started"]):
                        if record["status"] == ClusterStatus.UP.value:
                            return self._info(cluster, record, request.port)
                        # another process's launch of it is in flight: wait for that one below
                    else:
                        if record is not None:  # died since: leftovers go, the "host" starts clean
                            stop_group(record["pgid"], record["started"], 0.0)
                        record = self._spawn(state, request)
                self._wait_ready(request, record, cancel)
                with self._state() as state:
                    current = state["clusters"].get(cluster)
                    if current is not None and current["pid"] == record["pid"]:
                        current["status"] = ClusterStatus.UP.value
                        self._event(state, "up", cluster, pid=current["pid"], port=current["port"])
                        record = current
                    return self._info(cluster, record, request.port)
        finally:
            self._reap()

    def _spawn(self, state: dict[str, Any], request: LaunchRequest) -> dict[str, Any]:
        """Prepare the cluster's directory and start its process; record it (under the caller's lock, so no process
        is ever started unrecorded)."""
        cluster, task = request.cluster, request.task
        host = self.dir / "clusters" / cluster
        shutil.rmtree(host, ignore_errors=True)
        host.mkdir(parents=True)
        state["launches"] += 1
        log_path = self.dir / "logs" / f"{cluster}-{state['launches']}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        gpu = is_gpu_task(task)
        port = declared_port(task)
        if gpu:
            argv, cwd, env = self._replica_command(request, host)
        else:
            if port is None:
                raise LaunchError(cluster, "process backend: a CPU task needs resources.ports (the port it serves)")
            if port_accepts(port):
                raise LaunchError(cluster, f"process backend: 127.0.0.1:{port} is already in use")
            argv, cwd, env = self._task_command(request, host)
        with open(log_path, "wb") as log:
            child = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        self._children[child.pid] = child
        started = start_time(child.pid)
        if started is None:  # it died at once and was reaped already: say so with its log
            child.wait()
            raise LaunchError(cluster, f"process backend: the process exited at once ({child.returncode}): "
                                       f"{self._tail(log_path, request.secrets)}")
        record = {"status": ClusterStatus.INIT.value, "kind": "replica" if gpu else "task", "pid": child.pid,
                  "pgid": child.pid, "started": started, "port": None if gpu else port, "declared_port": port,
                  "host": str(host), "log": str(log_path), "launched_at": time.time(),
                  "cloud": placement(task)[0], "region": placement(task)[1],
                  "secret_names": sorted(request.secrets)}
        state["clusters"][cluster] = record
        state["spawned"].append({"cluster": cluster, "pid": child.pid, "pgid": child.pid, "started": started})
        self._event(state, "launched", cluster, pid=child.pid, kind=record["kind"])
        return record

    def _base_env(self, names_to_drop: Sequence[str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in STRIPPED_ENV and not k.startswith(STRIPPED_ENV_PREFIXES) and k not in names_to_drop}
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
        return env

    def _replica_command(self, request: LaunchRequest, host: Path) -> tuple[list[str], Path, dict[str, str]]:
        task = request.task
        envs = {str(k): str(v) for k, v in (task.get("envs") or {}).items()}
        gpu = envs.get("MELANGE_GPU") or accelerator_name(task)
        env = {**self._base_env(list(task.get("secrets") or {})), **envs, **request.secrets, "HOME": str(host)}
        key_secret = _API_KEY_RE.search(str(task.get("run") or ""))
        if key_secret and request.secrets.get(key_secret.group(1)):
            env[REPLICA_API_KEY_ENV] = request.secrets[key_secret.group(1)]
        delay = token_delay_ms(gpu, os.environ.get(TOKEN_DELAY_ENV_VAR))
        argv = [sys.executable, str(REPLICA_SCRIPT), "--name", request.cluster, "--gpu", gpu,
                "--model", envs.get("MODEL_NAME", "test-model"), "--port-file", str(host / "port"),
                "--token-delay-ms", str(delay)]
        return argv, host, env

    def _task_command(self, request: LaunchRequest, host: Path) -> tuple[list[str], Path, dict[str, str]]:
        task, cluster = request.task, request.cluster
        for destination, source in (task.get("file_mounts") or {}).items():
            self._copy_in(cluster, host, str(destination), source)
        cwd = host
        if task.get("workdir"):
            workdir = Path(os.path.expanduser(str(task["workdir"]))).absolute()
            if not workdir.is_dir():
                raise LaunchError(cluster, f"process backend: workdir {workdir} is not a directory")
            cwd = host / "sky_workdir"
            shutil.copytree(workdir, cwd, ignore=_IGNORED_IN_COPIES, symlinks=True)
        envs = {str(k): str(v) for k, v in (task.get("envs") or {}).items()}
        env = {**self._base_env(list(task.get("secrets") or {})), "HOME": str(host), **envs, **request.secrets}
        return ["bash", "-c", str(task.get("run") or "")], cwd, env

    @staticmethod
    def _copy_in(cluster: str, host: Path, destination: str, source: Any) -> None:
        if isinstance(source, Mapping):
            source = source.get("source")
        if not isinstance(source, str) or "://" in source:
            raise LaunchError(cluster, f"process backend: file_mounts {destination!r}: only local paths are supported, "
                                       f"got {source!r}")
        if destination.startswith("~"):
            relative = destination[1:].lstrip("/")
        elif os.path.isabs(destination):
            raise LaunchError(cluster, f"process backend: file_mounts {destination!r}: an absolute destination cannot "
                                       f"be mapped into the local cluster directory; use ~/...")
        else:
            relative = destination
        target = host / relative
        local = Path(os.path.expanduser(source)).absolute()
        target.parent.mkdir(parents=True, exist_ok=True)
        if local.is_dir():
            shutil.copytree(local, target, ignore=_IGNORED_IN_COPIES, symlinks=True, dirs_exist_ok=True)
        elif local.is_file():
            shutil.copy2(local, target)
        else:
            raise LaunchError(cluster, f"process backend: file_mounts {destination!r}: {local} does not exist")

    def _ready(self, record: Mapping[str, Any]) -> int | None:
        """The port the cluster serves on once it is ready, else None."""
        if record["kind"] == "replica":
            port_file = Path(record["host"]) / "port"
            try:
                port = int(port_file.read_text())
            except (FileNotFoundError, ValueError):
                return None
            return port if health_ok(port) else None
        return record["port"] if port_accepts(record["port"]) else None

    def _wait_ready(self, request: LaunchRequest, record: dict[str, Any], cancel: threading.Event) -> None:
        timeout = float(os.environ.get(LAUNCH_TIMEOUT_ENV_VAR) or DEFAULT_LAUNCH_TIMEOUT_S)
        deadline = time.monotonic() + timeout
        what = "its /health" if record["kind"] == "replica" else f"127.0.0.1:{record['port']}"
        while True:
            if cancel.is_set():
                self._abandon(request.cluster, record, "cancelled")
                raise LaunchCancelled(request.cluster, "launch cancelled")
            port = self._ready(record)
            if port is not None and is_alive(record["pid"], record["started"]):
                record["port"] = port
                with self._state() as state:
                    current = state["clusters"].get(request.cluster)
                    if current is not None and current["pid"] == record["pid"]:
                        current["port"] = port
                return
            if not is_alive(record["pid"], record["started"]):
                child = self._children.get(record["pid"])
                code = child.poll() if child is not None else None
                self._abandon(request.cluster, record, "failed")
                raise LaunchError(request.cluster, f"process backend: the process exited"
                                                   f"{f' ({code})' if code is not None else ''} before {what} "
                                                   f"answered: {self._tail(Path(record['log']), request.secrets)}")
            if time.monotonic() > deadline:
                self._abandon(request.cluster, record, "failed")
                raise LaunchError(request.cluster, f"process backend: {what} did not answer within {timeout:g} s: "
                                                   f"{self._tail(Path(record['log']), request.secrets)}")
            time.sleep(POLL_S)

    def _abandon(self, cluster: str, record: Mapping[str, Any], why: str) -> None:
        """A failed or cancelled launch leaves nothing: its processes stop and the cluster is forgotten."""
        stop_group(record["pgid"], record["started"], 0.0, self._children.get(record["pid"]))
        with self._state() as state:
            self._event(state, why, cluster, pid=record["pid"])
            current = state["clusters"].get(cluster)
            if current is not None and current["pid"] == record["pid"]:
                del state["clusters"][cluster]

    @staticmethod
    def _tail(path: Path, secrets: Mapping[str, str]) -> str:
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"
        tail = " | ".join(line for line in text[-LOG_TAIL_CHARS:].splitlines() if line.strip())
        return _mask(tail, secrets) or "(no output)"

    @staticmethod
    def _info(cluster: str, record: Mapping[str, Any] | None, port: int | None = None) -> ClusterInfo:
        if record is None:
            return ClusterInfo(cluster, ClusterStatus.GONE, message="not known to the process backend")
        status = ClusterStatus(record["status"])
        endpoint = None
        if status is ClusterStatus.UP and record.get("port") is not None and (
                port is None or record.get("declared_port") in (None, port)):
            endpoint = f"127.0.0.1:{record['port']}"
        return ClusterInfo(cluster, status, endpoint=endpoint, head_ip="127.0.0.1", cloud=record.get("cloud"),
                           region=record.get("region"), message=f"pid {record['pid']} on 127.0.0.1")

    def status(self, clusters: Sequence[str], refresh: bool = False) -> dict[str, ClusterInfo]:
        answer: dict[str, ClusterInfo] = {}
        leftovers: list[dict[str, Any]] = []
        with self._state() as state:
            for cluster in dict.fromkeys(clusters):
                record = state["clusters"].get(cluster)
                if refresh and record is not None and not is_alive(record["pid"], record["started"]):
                    del state["clusters"][cluster]
                    self._event(state, "gone", cluster, pid=record["pid"])
                    leftovers.append(record)
                    answer[cluster] = ClusterInfo(cluster, ClusterStatus.GONE,
                                                  message=f"process {record['pid']} is no longer running")
                    continue
                answer[cluster] = self._info(cluster, record)
        for record in leftovers:  # the leader died; whatever it left in its group goes too, as with a lost VM
            stop_group(record["pgid"], record["started"], 0.0, self._children.get(record["pid"]))
        self._reap()
        return answer

    def endpoint(self, cluster: str, port: int) -> str | None:
        record = self._snapshot()["clusters"].get(cluster)
        if record is None or not is_alive(record["pid"], record["started"]):
            return None
        return self._info(cluster, record, port).endpoint

    def down(self, cluster: str, purge: bool = False) -> bool:
        with self._state() as state:
            record = state["clusters"].pop(cluster, None)
        if record is None:
            return False
        leader = _stat(record["pid"])
        frozen = leader is None or leader[0] in ("T", "t")  # a SIGSTOPped replica would not answer /stats
        stats = replica_stats(record) if is_alive(record["pid"], record["started"]) and not frozen else None
        grace = float(os.environ.get(GRACE_ENV_VAR) or DEFAULT_GRACE_S)
        stop_group(record["pgid"], record["started"], grace, self._children.get(record["pid"]))
        with self._state() as state:  # a launch of the same name may have started meanwhile: keep its directory
            self._event(state, "down", cluster, pid=record["pid"], purge=purge, **in_flight_of(stats))
            if cluster not in state["clusters"]:
                shutil.rmtree(record["host"], ignore_errors=True)
        self._reap()
        return True

    def validate(self, task: Mapping[str, Any], secrets: Mapping[str, str] | None = None) -> Validation:
        if not isinstance(task, Mapping):
            raise InvalidTask(f"invalid task: expected a mapping, got {type(task).__name__}")
        if not isinstance(task.get("resources") or {}, Mapping):
            raise InvalidTask("invalid task: resources must be a mapping")
        if not is_gpu_task(task):
            if declared_port(task) is None:
                raise InvalidTask("invalid task: the process backend runs a CPU task on resources.ports[0]; none set")
            if not str(task.get("run") or "").strip():
                raise InvalidTask("invalid task: a CPU task needs a `run` command")
        missing = [k for k in (task.get("secrets") or {}) if k not in (secrets or {})]
        if missing:
            raise InvalidTask(f"invalid task: secrets not supplied: {', '.join(missing)}")
        return Validation(ValidationLevel.SCHEMA, "process backend: shape, ports and secrets checked; runs locally")


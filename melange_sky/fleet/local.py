"""`LocalBackend` (`--backend local`): a whole fleet on this machine, each cluster one local process group.

A launcher like SkyPilot, with this machine as the only cloud, so `up`, `status`, `watch`, `serve FLEET` and `down`
run unchanged and real requests flow through the fleet's router:

- **A GPU task** (a replica: `resources.accelerators`) runs `melange-sky emulate` for the task's model and GPU type:
  the engine model of that GPU in real time behind an OpenAI-compatible server, as vLLM would serve it. What the
  task's `vllm serve` line sets (`--max-num-seqs`, `--tensor-parallel-size`, ... the engine settings of
  `deployment`) is what the emulator models, `--data-parallel-size N` included: N engines behind the replica's one
  server, as vLLM runs them on an instance of N x TP GPUs (flags absent: TP 1 and one engine, vLLM's defaults). Its
  model is the task's `MODEL_NAME` (`deployment.model`), which the engine must know (a bundled model or its Hugging
  Face id). `deployment.local.speed` (or `$MELANGE_SKY_LOCAL_SPEED`) runs every GPU that many times faster than real.
  When the task makes vLLM demand a key (`VLLM_API_KEY` from a secret), the emulator demands the same one. An emulator
  downloads no weights, so the launcher needs none of the model's secrets (`needs_model_secrets = False`: `up` runs
  without HF_TOKEN), and passes none to a replica.
- **A CPU task** (the router) runs its own `run` script with bash, as on a fresh host: `file_mounts` land under the
  cluster's directory (its HOME: directories linked, files copied), a `workdir` is copied to `~/sky_workdir` where
  `run` starts, `setup` is skipped (this Python already has
  what `serve` needs: `python` is this interpreter), and its `melange-sky serve` listens on 127.0.0.1.

Every process listens on a port the OS picks (`--port 0`) and prints it ("Listening on URL"), so two replicas never
race for one. State lives in `$MELANGE_SKY_HOME/local/`: `state.json` (read-modify-written under an flock, so each
CLI invocation shares it), `clusters/<cluster>/` (a CPU task's HOME), and `logs/<cluster>.log` (every launch of the
cluster appended, each after a header line). No secret value is ever written there.

A launch is over once its process prints the port it listens on; one that has not after
`$MELANGE_SKY_LOCAL_LAUNCH_TIMEOUT` s (default 120: a busy machine imports slowly) fails, and leaves nothing.

Processes start in a session of their own (they outlive the `up` that started them, as a VM outlives `sky
launch`) and are known by pid *and* start time (from /proc: Linux), so a recycled pid is never taken for a replica.
A process killed from outside reads GONE at the next `status` (its leftovers are killed), so `watch` replaces it.
`down` sends the process group SIGTERM, then SIGKILL after a grace period, and returns once none of it runs.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melange_sky.errors import InvalidTask, LaunchCancelled, LaunchError, MelangeError
from melange_sky.fleet.backends import ClusterInfo, ClusterStatus, LaunchRequest, Validation, ValidationLevel
from melange_sky.fleet.ledger import Ledger, ledger_home

__all__ = ["LocalBackend", "ProcessId", "launch_speed", "parallel_sizes", "process_id", "running"]

SPEED_ENV = "MELANGE_SKY_LOCAL_SPEED"
LAUNCH_TIMEOUT_ENV = "MELANGE_SKY_LOCAL_LAUNCH_TIMEOUT"
#: How long a launch may take until its process listens (a busy machine imports slowly).
LAUNCH_TIMEOUT_S = 120.0
#: After SIGTERM, how long `down` waits before SIGKILL.
GRACE_S = 5.0
POLL_S = 0.05
#: At most how many launches `state.json` remembers (`leftovers`): those whose processes are all gone are pruned
#: anyway, at every launch, status and teardown; this only bounds a machine running that many at once.
SPAWNED_KEPT = 200
LOG_TAIL_CHARS = 800
_LISTENING = re.compile(r"Listening on (https?)://\S*?:(\d+)")
_API_KEY_SECRET = re.compile(r"VLLM_API_KEY=\"?\$\{([A-Za-z_][A-Za-z0-9_]*)")
_SERVE = re.compile(r"melange[-_]sky\s+serve\b")
_ZOMBIE = ("Z", "X", "x")
#: Not inherited by a task's process: melange-sky's own settings (the emulator would read the user's client key).
_STRIPPED_ENV_PREFIX = "MELANGE_SKY_"
#: What a launch's process runs first: it waits for a line on stdin, which the launcher writes once the process is in
#: state.json. A launcher killed (-9) in between closes the pipe, and the process exits before it runs anything:
#: no process ever runs unrecorded.
_GATE = 'read -r _ || exit 0; exec "$@"'


# -- processes, by /proc ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessId:
    """A process as this launcher knows it: its pid and when it started (clock ticks since boot), since pids are
    recycled. It leads its own process group (pgid == pid)."""

    pid: int
    started: int


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, process group, start time) of a process from /proc/<pid>/stat; None if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces and parentheses
    return fields[0], int(fields[2]), int(fields[19])


def process_id(pid: int) -> ProcessId | None:
    """The identity of the running process `pid`, None if there is none."""
    found = _stat(pid)
    return ProcessId(pid, found[2]) if found is not None and found[0] not in _ZOMBIE else None


def running(proc: ProcessId) -> bool:
    """`proc` still runs: its pid names a live process that started when it did (not a recycled pid, not a
    zombie)."""
    found = _stat(proc.pid)
    return found is not None and found[0] not in _ZOMBIE and found[2] == proc.started


def _group(leader: ProcessId) -> list[int]:
    """The live processes of the group `leader` made. Empty once its pid names another process (then the group
    number is no longer its)."""
    found = _stat(leader.pid)
    if found is not None and found[2] != leader.started:
        return []
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            member = _stat(int(entry.name))
            if member is not None and member[1] == leader.pid and member[0] not in _ZOMBIE:
                members.append(int(entry.name))
    return members


def _live_groups() -> dict[int, int]:
    """Each live process group's number and how many live processes it has, from one look at /proc."""
    groups: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            member = _stat(int(entry.name))
            if member is not None and member[0] not in _ZOMBIE:
                groups[member[1]] = groups.get(member[1], 0) + 1
    return groups


def _prune_spawned(state: dict[str, Any]) -> None:
    """Forget the launches in `state["spawned"]` none of whose processes runs any more and that are no known
    cluster's (torn down, failed, or died and were found so): they can leave nothing behind, and `leftovers` needs
    only the others. Called under the state's lock, so no concurrent launch or teardown is lost."""
    spawned = state.get("spawned")
    if not spawned:
        return
    known = {(int(r["pid"]), int(r["started"])) for r in state["clusters"].values()}
    groups = _live_groups()

    def alive(entry: Mapping[str, Any]) -> bool:
        leader = ProcessId(int(entry["pid"]), int(entry["started"]))
        if (leader.pid, leader.started) in known:
            return True
        found = _stat(leader.pid)
        if found is not None and found[2] != leader.started:  # its pid names another process: not its group now
            return False
        return groups.get(leader.pid, 0) > 0

    state["spawned"] = [entry for entry in spawned if alive(entry)]


def _stop(leader: ProcessId, grace_s: float, child: subprocess.Popen[bytes] | None = None) -> None:
    """SIGTERM the group, SIGKILL what is left after `grace_s`, and return once none of it runs."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        if not _group(leader):
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(leader.pid, sig)
            if sig is signal.SIGTERM:  # a stopped process acts on SIGTERM only once continued
                os.killpg(leader.pid, signal.SIGCONT)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if child is not None:
                child.poll()
            if not _group(leader):
                break
            time.sleep(POLL_S)
    if child is not None:
        child.poll()


# -- what a task runs ---------------------------------------------------------------------------------------------
def _resources(task: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    resources = task.get("resources") or {}
    if not isinstance(resources, Mapping):
        return []
    return [resources, *[r for r in (*(resources.get("any_of") or ()), *(resources.get("ordered") or ()))
                         if isinstance(r, Mapping)]]


def accelerator(task: Mapping[str, Any]) -> tuple[str, int] | None:
    """(GPU type, count) a task asks for ("A10G:1", {"A10G": 1}); None for a CPU task."""
    for candidate in _resources(task):
        wanted = candidate.get("accelerators")
        if isinstance(wanted, Mapping) and wanted:
            name, count = next(iter(wanted.items()))
            return str(name), int(count or 1)
        if isinstance(wanted, str) and wanted:
            name, _, count = wanted.partition(":")
            return name, int(float(count)) if count else 1
    return None


def _serve_args(run: str) -> list[str]:
    """The arguments after `vllm serve` in a task's run script (its engine flags), [] if it has none."""
    for line in run.splitlines():
        if "vllm serve" in line:
            try:
                words = shlex.split(line)
            except ValueError:
                return []
            index = words.index("serve") if "serve" in words else len(words)
            return words[index + 1:]
    return []


def engine_settings(run: str) -> dict[str, Any]:
    """The engine settings a task's `vllm serve` flags set, as `deployment` keys (the inverse of what the vllm
    template renders from them): what the emulator must model."""
    from melange_sky.engine.settings import ENGINE_SETTING_KEYS  # noqa: PLC0415 - the engine: only at launch

    args = _serve_args(run)
    found: dict[str, Any] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        name = arg[2:].replace("-", "_")
        value = args[i + 1] if i + 1 < len(args) else ""
        if name == "quantization" and value == "fp8":
            found["dtype"] = "fp8"
        elif name.startswith("no_") and ENGINE_SETTING_KEYS.get(name[3:]) is bool:
            found[name[3:]] = False
        elif ENGINE_SETTING_KEYS.get(name) is bool:
            found[name] = True
        elif name in ENGINE_SETTING_KEYS:
            kind = ENGINE_SETTING_KEYS[name]
            try:
                found[name] = kind(value)
            except ValueError:
                continue
    return found


def parallel_sizes(run: str) -> tuple[int, int]:
    """(tensor-parallel size, data-parallel engines) a task's `vllm serve` line runs, as vLLM reads its flags
    (`--tensor-parallel-size`/`-tp`, `--data-parallel-size`/`-dp`; 1 when absent): templates/vllm.j2 renders
    `--data-parallel-size gpus / TP` on an instance of several GPUs."""
    args = _serve_args(run)
    sizes = {"tp": 1, "dp": 1}
    names = {"--tensor-parallel-size": "tp", "-tp": "tp", "--data-parallel-size": "dp", "-dp": "dp"}
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if name not in names:
            continue
        if not equals:
            value = args[i + 1] if i + 1 < len(args) else ""
        try:
            sizes[names[name]] = max(1, int(value))
        except ValueError:
            continue
    return sizes["tp"], sizes["dp"]


def launch_speed(fleet: str | None, environ: Mapping[str, str] | None = None) -> float:
    """How many times faster than real the fleet's GPUs run: `$MELANGE_SKY_LOCAL_SPEED`, else the fleet's
    `deployment.local.speed` (from the config `up` stored in the ledger), else 1."""
    env = os.environ if environ is None else environ
    text = env.get(SPEED_ENV)
    if text:
        try:
            speed = float(text)
        except ValueError:
            speed = 0.0
        if not speed > 0:
            raise LaunchError(fleet or "local", f"{SPEED_ENV}={text!r}: expected a number above 0")
        return speed
    if fleet and Ledger.exists():
        with Ledger() as ledger:
            record = ledger.get_fleet(fleet)
        deployment = ((record.plan.get("config") or {}).get("deployment") or {}) if record is not None else {}
        local = deployment.get("local") if isinstance(deployment, Mapping) else None
        given = local.get("speed") if isinstance(local, Mapping) else None
        if isinstance(given, int | float) and not isinstance(given, bool) and given > 0:
            return float(given)
    return 1.0


def _launch_timeout(given: float | None) -> float:
    """The launch timeout: `given`, else `$MELANGE_SKY_LOCAL_LAUNCH_TIMEOUT`, else LAUNCH_TIMEOUT_S."""
    if given is None:
        text = os.environ.get(LAUNCH_TIMEOUT_ENV)
        if not text:
            return LAUNCH_TIMEOUT_S
        try:
            given = float(text)
        except ValueError:
            given = 0.0
        if not given > 0:
            raise LaunchError("local", f"{LAUNCH_TIMEOUT_ENV}={text!r}: expected a number of seconds above 0")
    if not given > 0:
        raise ValueError(f"launch_timeout_s must be above 0, got {given!r}")
    return float(given)


def _tail(path: Path, offset: int, secrets: Mapping[str, str]) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except FileNotFoundError:
        return "(no output)"
    lines = [line for line in text[-LOG_TAIL_CHARS:].splitlines() if line.strip()]
    tail = " | ".join(lines)
    for value in secrets.values():
        if value:
            tail = tail.replace(value, "***")
    return tail or "(no output)"


def _listening_port(path: Path, offset: int) -> int | None:
    """The port a launch's process printed it listens on ("Listening on http://host:port"), once it has."""
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            found = _LISTENING.search(log.read().decode(errors="replace"))
    except FileNotFoundError:
        return None
    return int(found.group(2)) if found else None


class LocalBackend:
    """See the module docstring. Thread- and process-safe; follows `melange_sky.fleet.backends.Backend`."""

    name = "local"
    #: Its GPU replicas are emulators: they download no model, so the deployment's model secrets (HF_TOKEN) are
    #: not required (only the replicas' API key secret is: the emulator demands it as vLLM would).
    needs_model_secrets = False

    def __init__(self, directory: str | os.PathLike[str] | None = None, speed: float | None = None,
                 launch_timeout_s: float | None = None):
        """`directory`: the launcher's state (default `$MELANGE_SKY_HOME/local`); `speed`: every GPU this object
        launches runs that many times faster than real (default: `launch_speed`'s answer for its fleet);
        `launch_timeout_s`: how long a launch may take until its process listens (default
        `$MELANGE_SKY_LOCAL_LAUNCH_TIMEOUT`, else LAUNCH_TIMEOUT_S)."""
        if speed is not None and not speed > 0:
            raise ValueError(f"speed must be above 0, got {speed!r}")
        self.dir = Path(directory) if directory is not None else ledger_home() / "local"
        self.speed = speed
        self.launch_timeout_s = _launch_timeout(launch_timeout_s)
        self._lock = threading.Lock()
        self._cancel: dict[str, threading.Event] = {}
        self._children: dict[int, subprocess.Popen[bytes]] = {}  # the processes this object started, to reap

    # -- the shared state file ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _state(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write `state.json` under an exclusive flock (threads and processes alike); written back even
        when the body raises, so a process started before a failure is never forgotten."""
        path = self.dir / "state.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "state.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            text = path.read_text() if path.exists() else ""
            state = json.loads(text) if text.strip() else {}
            state.setdefault("clusters", {})
            try:
                yield state
            finally:
                tmp = path.with_name(f"state.{os.getpid()}.{threading.get_ident()}.tmp")
                tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
                os.replace(tmp, path)

    def records(self) -> dict[str, dict[str, Any]]:
        """Each known cluster's record: status, kind, pid, started, port, log, ..."""
        with self._state() as state:
            return json.loads(json.dumps(state["clusters"]))

    def leftovers(self) -> dict[str, list[int]]:
        """Processes still running from any of the last SPAWNED_KEPT launches that are not a known cluster's, by
        cluster: `{}` after a clean `down` (and what a test or an operator checks for)."""
        with self._state() as state:
            spawned = list(state.get("spawned", []))
            known = {(int(r["pid"]), int(r["started"])) for r in state["clusters"].values()}
        found: dict[str, list[int]] = {}
        for entry in spawned:
            leader = ProcessId(int(entry["pid"]), int(entry["started"]))
            members = _group(leader) if (leader.pid, leader.started) not in known else []
            if members:
                found.setdefault(entry["cluster"], []).extend(members)
        return found

    def log_path(self, cluster: str) -> Path:
        return self.dir / "logs" / f"{cluster}.log"

    @staticmethod
    def _proc(record: Mapping[str, Any]) -> ProcessId:
        return ProcessId(int(record["pid"]), int(record["started"]))

    def _reap(self) -> None:
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                self._children.pop(pid, None)

    # -- launch -------------------------------------------------------------------------------------------------
    def launch(self, request: LaunchRequest) -> ClusterInfo:
        cluster = request.cluster
        cancel = threading.Event()
        with self._lock:
            self._cancel[cluster] = cancel
        spawned: int | None = None
        try:
            try:
                with self._state() as state:
                    record = state["clusters"].get(cluster)
                    if record is not None and running(self._proc(record)):
                        if record["status"] == ClusterStatus.UP.value:
                            return self._info(cluster, record)
                        # another process's launch of it is in flight: wait for that one below
                    else:
                        if record is not None:  # it died since: what is left of it goes
                            _stop(self._proc(record), 0.0)
                            del state["clusters"][cluster]
                        argv, cwd, env = self._command(request)
                        record = self._spawn(state, request, argv, cwd, env)
                        spawned = int(record["pid"])
            except BaseException:
                if spawned is not None:  # not recorded: it must not run
                    self._release(spawned, go=False)
                raise
            if spawned is not None:  # recorded in state.json: it may run
                self._release(spawned, go=True)
            return self._wait_ready(request, record, cancel)
        finally:
            with self._lock:
                if self._cancel.get(cluster) is cancel:
                    del self._cancel[cluster]
            self._reap()

    def _command(self, request: LaunchRequest) -> tuple[list[str], Path, dict[str, str]]:
        task = request.task
        gpu = accelerator(task)
        host = self.dir / "clusters" / request.cluster
        envs = {str(k): str(v) for k, v in (task.get("envs") or {}).items()}
        dropped = set(task.get("secrets") or {})
        env = {k: v for k, v in os.environ.items() if not k.startswith(_STRIPPED_ENV_PREFIX) and k not in dropped}
        if gpu is not None:
            if "MELANGE_SKY_HOME" in os.environ:  # an emulator reads the engine's calibrated fits from this home
                env["MELANGE_SKY_HOME"] = os.environ["MELANGE_SKY_HOME"]
            return self._replica_command(request, gpu, envs, env)
        shutil.rmtree(host, ignore_errors=True)
        host.mkdir(parents=True)
        return self._task_command(request, host, envs, env)

    def _replica_command(self, request: LaunchRequest, gpu: tuple[str, int], envs: dict[str, str],
                         env: dict[str, str]) -> tuple[list[str], Path, dict[str, str]]:
        from melange_sky.engine.errors import EngineError  # noqa: PLC0415 - the engine: only at launch
        from melange_sky.engine.hardware import gpu_spec  # noqa: PLC0415
        from melange_sky.engine.models import load_model  # noqa: PLC0415

        model = envs.get("MODEL_NAME")
        if not model:
            raise LaunchError(request.cluster, "local launcher: the GPU task sets no MODEL_NAME (deployment.model) "
                                               "to emulate")
        try:
            load_model(model)
        except EngineError as exc:
            raise LaunchError(request.cluster, f"local launcher: cannot emulate deployment.model {model!r}: {exc}; "
                                               f"set deployment.model to one of those") from None
        try:
            gpu_spec(gpu[0])
        except EngineError as exc:
            raise LaunchError(request.cluster, f"local launcher: cannot emulate GPU {gpu[0]!r}: {exc}") from None
        run = str(task_run(request.task))
        settings = engine_settings(run)
        settings.pop("tensor_parallel_size", None)
        # the replica serves as its `vllm serve` line says: DP engines of TP GPUs each behind one server
        tp, dp = parallel_sizes(run)
        if tp * dp > gpu[1]:
            raise LaunchError(request.cluster, f"local launcher: vllm serve asks for {dp} data-parallel engine(s) of "
                                               f"{tp} GPU(s), {tp * dp} GPUs; the instance has {gpu[1]} "
                                               f"({gpu[0]}:{gpu[1]})")
        speed = self.speed or launch_speed(envs.get("MELANGE_FLEET"))
        config = self.dir / "engine" / f"{request.cluster}.json"  # the engine flags, as emulate reads them
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps({"deployment": settings}))
        argv = [sys.executable, "-m", "melange_sky", "emulate", "--model", model, "--gpu", gpu[0], "--tp", str(tp),
                "--data-parallel-size", str(dp), "--speed", f"{speed:g}", "--config", str(config),
                "--host", "127.0.0.1", "--port", "0"]
        key_secret = _API_KEY_SECRET.search(run)
        if key_secret and request.secrets.get(key_secret.group(1)):
            env["MELANGE_SKY_API_KEY"] = request.secrets[key_secret.group(1)]  # emulate's --api-key, out of `ps`
        return argv, self.dir, {**env, **envs}

    def _task_command(self, request: LaunchRequest, host: Path, envs: dict[str, str],
                      env: dict[str, str]) -> tuple[list[str], Path, dict[str, str]]:
        run = task_run(request.task)
        lines = run.splitlines()
        serving = [i for i, line in enumerate(lines) if _SERVE.search(line)]
        if not serving:
            raise LaunchError(request.cluster, "local launcher: a CPU task must run `melange-sky serve` (the fleet's "
                                               "router); this one does not")
        for i in serving:  # this machine's loopback, on a port the OS picks
            line = re.sub(r"--host(\s+|=)\S+", "--host 127.0.0.1", lines[i])
            line = re.sub(r"--port(\s+|=)\S+", "--port 0", line)
            lines[i] = line if "--port 0" in line else f"{line} --port 0"
        for destination, source in (request.task.get("file_mounts") or {}).items():
            _mount(request.cluster, host, str(destination), source)
        cwd = host
        if request.task.get("workdir"):  # as SkyPilot: synced to ~/sky_workdir, where `run` starts
            _mount(request.cluster, host, "~/sky_workdir", str(request.task["workdir"]), copy_dir=True)
            cwd = host / "sky_workdir"
        bin_dir = host / ".local-launcher-bin"  # `python` on PATH is this interpreter, as setup's venv would be
        bin_dir.mkdir()
        python = bin_dir / "python"
        python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} \"$@\"\n")
        python.chmod(python.stat().st_mode | stat.S_IXUSR)
        env = {**env, "HOME": str(host), "PATH": os.pathsep.join([str(bin_dir), env.get("PATH", os.defpath)]),
               **envs, **request.secrets}
        return ["bash", "-c", "\n".join(lines)], cwd, env

    def _spawn(self, state: dict[str, Any], request: LaunchRequest, argv: list[str], cwd: Path,
               env: dict[str, str]) -> dict[str, Any]:
        """Start the cluster's process and record it (under the state lock: no process runs unrecorded)."""
        log_path = self.log_path(request.cluster)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} launch of {request.cluster}: "
                      f"{shlex.join(argv[:4] if argv[0] == 'bash' else argv)}\n".encode())
            offset = log.tell()
            log.flush()
            child = subprocess.Popen(["bash", "-c", _GATE, "melange-sky-local", *argv], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, close_fds=True)
        self._children[child.pid] = child
        proc = process_id(child.pid)
        if proc is None:  # it exited at once
            child.wait()
            raise LaunchError(request.cluster, f"local launcher: the process exited at once ({child.returncode}): "
                                               f"{_tail(log_path, offset, request.secrets)}")
        gpu = accelerator(request.task)
        record = {"status": ClusterStatus.INIT.value, "kind": "replica" if gpu else "task", "pid": proc.pid,
                  "started": proc.started, "port": None, "log": str(log_path), "offset": offset,
                  "gpu": gpu[0] if gpu else None, "launched_at": time.time()}
        state["clusters"][request.cluster] = record
        _prune_spawned(state)
        spawned = state.setdefault("spawned", [])
        spawned.append({"cluster": request.cluster, "pid": proc.pid, "started": proc.started})
        del spawned[:-SPAWNED_KEPT]
        return record

    def _release(self, pid: int, go: bool) -> None:
        """Open a spawned process's gate (`go`: it runs its command), or close it (it exits)."""
        child = self._children.get(pid)
        if child is None or child.stdin is None:
            return
        with contextlib.suppress(OSError):  # it died already: a broken pipe
            if go:
                child.stdin.write(b"go\n")
            child.stdin.close()

    def _wait_ready(self, request: LaunchRequest, record: dict[str, Any], cancel: threading.Event) -> ClusterInfo:
        cluster, proc = request.cluster, self._proc(record)
        log_path = Path(record["log"])
        deadline = time.monotonic() + self.launch_timeout_s
        while True:
            if cancel.is_set():
                self._abandon(cluster, proc)
                raise LaunchCancelled(cluster, "launch cancelled")
            port = _listening_port(log_path, record["offset"])
            if port is not None and running(proc):
                with self._state() as state:
                    current = state["clusters"].get(cluster)
                    if current is None or current["pid"] != proc.pid:
                        raise LaunchError(cluster, "local launcher: torn down while it launched")
                    current.update(status=ClusterStatus.UP.value, port=port)
                    return self._info(cluster, current)
            if not running(proc):
                child = self._children.get(proc.pid)
                code = child.poll() if child is not None else None
                self._abandon(cluster, proc)
                raise LaunchError(cluster, f"local launcher: the process exited"
                                           f"{f' ({code})' if code is not None else ''} before it listened: "
                                           f"{_tail(log_path, record['offset'], request.secrets)}")
            if time.monotonic() > deadline:
                self._abandon(cluster, proc)
                raise LaunchError(cluster, f"local launcher: not listening after {self.launch_timeout_s:g} s "
                                           f"({LAUNCH_TIMEOUT_ENV} sets the limit): "
                                           f"{_tail(log_path, record['offset'], request.secrets)}")
            time.sleep(POLL_S)

    def _abandon(self, cluster: str, proc: ProcessId) -> None:
        """A failed or cancelled launch leaves nothing: its processes stop and the cluster is forgotten."""
        _stop(proc, 0.0, self._children.get(proc.pid))
        with self._state() as state:
            current = state["clusters"].get(cluster)
            if current is not None and current["pid"] == proc.pid:
                del state["clusters"][cluster]
            _prune_spawned(state)

    # -- status, endpoint, down -----------------------------------------------------------------------------------
    @staticmethod
    def _info(cluster: str, record: Mapping[str, Any] | None) -> ClusterInfo:
        if record is None:
            return ClusterInfo(cluster, ClusterStatus.GONE, message="not running on this machine")
        status = ClusterStatus(record["status"])
        endpoint = f"127.0.0.1:{record['port']}" if status is ClusterStatus.UP and record.get("port") else None
        return ClusterInfo(cluster, status, endpoint=endpoint, head_ip="127.0.0.1", cloud="local",
                           message=f"pid {record['pid']}, log {record['log']}")

    def status(self, clusters: Sequence[str], refresh: bool = False) -> dict[str, ClusterInfo]:
        """Always the live state (a look at /proc costs nothing): a process that no longer runs is GONE, and what
        is left of its group is stopped."""
        answer: dict[str, ClusterInfo] = {}
        dead: list[ProcessId] = []
        with self._state() as state:
            for cluster in dict.fromkeys(clusters):
                record = state["clusters"].get(cluster)
                if record is not None and not running(self._proc(record)):
                    del state["clusters"][cluster]
                    dead.append(self._proc(record))
                    answer[cluster] = ClusterInfo(cluster, ClusterStatus.GONE,
                                                  message=f"process {record['pid']} is no longer running")
                    continue
                answer[cluster] = self._info(cluster, record)
        for proc in dead:
            _stop(proc, 0.0, self._children.get(proc.pid))
        if dead:
            with self._state() as state:
                _prune_spawned(state)
        self._reap()
        return answer

    def endpoint(self, cluster: str, port: int) -> str | None:
        record = self.records().get(cluster)
        if record is None or not running(self._proc(record)):
            return None
        return self._info(cluster, record).endpoint

    def down(self, cluster: str, purge: bool = False) -> bool:
        with self._state() as state:
            record = state["clusters"].pop(cluster, None)
            if record is None:  # nothing to stop: what earlier launches left in the state file may go
                _prune_spawned(state)
        if record is None:
            return False
        _stop(self._proc(record), GRACE_S, self._children.get(int(record["pid"])))
        with self._state() as state:  # a launch of the same name may have started meanwhile: keep its files
            if cluster not in state["clusters"]:
                shutil.rmtree(self.dir / "clusters" / cluster, ignore_errors=True)
                (self.dir / "engine" / f"{cluster}.json").unlink(missing_ok=True)
            _prune_spawned(state)
        self._reap()
        return True

    def validate(self, task: Mapping[str, Any], secrets: Mapping[str, str] | None = None) -> Validation:
        if not isinstance(task, Mapping):
            raise InvalidTask(f"invalid task: expected a mapping, got {type(task).__name__}")
        gpu = accelerator(task)
        if gpu is None:
            if not any(_SERVE.search(line) for line in task_run(task).splitlines()):
                raise InvalidTask("invalid task: the local launcher runs a CPU task only when it is the router "
                                  "(`melange-sky serve`)")
            return Validation(ValidationLevel.SCHEMA, "local launcher: the router, as a process on this machine")
        from melange_sky.engine.hardware import gpu_spec  # noqa: PLC0415 - the engine: only when asked
        from melange_sky.engine.models import load_model  # noqa: PLC0415

        model = str((task.get("envs") or {}).get("MODEL_NAME") or "")
        try:
            load_model(model)
            gpu_spec(gpu[0])
        except MelangeError as exc:
            raise InvalidTask(f"invalid task: the local launcher cannot emulate it: {exc}") from None
        return Validation(ValidationLevel.SCHEMA, f"local launcher: {model} emulated on {gpu[0]} on this machine")

    def cancel(self, clusters: Sequence[str] | None = None) -> list[str]:
        with self._lock:
            targets = [c for c in (self._cancel if clusters is None else clusters) if c in self._cancel]
            for cluster in targets:
                self._cancel[cluster].set()
        return targets


def task_run(task: Mapping[str, Any]) -> str:
    return str(task.get("run") or "")


#: Left out of a copied workdir (as SkyPilot's sync leaves out what .gitignore names, roughly).
_NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache",
                                     ".ruff_cache")


def _mount(cluster: str, host: Path, destination: str, source: Any, copy_dir: bool = False) -> None:
    """A file mount on this machine: a directory is linked (copied with `copy_dir`: a workdir the task may write
    in), a file copied (a task may change its copy, e.g. chmod a key)."""
    if isinstance(source, Mapping):
        source = source.get("source")
    if not isinstance(source, str) or "://" in source:
        raise LaunchError(cluster, f"local launcher: file_mounts {destination!r}: only local paths, got {source!r}")
    if not destination.startswith("~") and os.path.isabs(destination):
        raise LaunchError(cluster, f"local launcher: file_mounts {destination!r}: an absolute destination is "
                                   f"outside the cluster's directory; use ~/...")
    target = host / destination.lstrip("~").lstrip("/")
    local = Path(os.path.expanduser(source)).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    if local.is_dir() and copy_dir:
        shutil.copytree(local, target, symlinks=True, ignore=_NOT_COPIED)
    elif local.is_dir():
        target.symlink_to(local, target_is_directory=True)
    elif local.is_file():
        shutil.copy2(local, target)
    else:
        raise LaunchError(cluster, f"local launcher: file_mounts {destination!r}: {local} does not exist")

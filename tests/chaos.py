"""A randomized, seeded chaos runner over the real CLI, against `chaos_backend.ChaosBackend` or the local launcher.

    from chaos import run
    report = run(seed=7, scenarios=KINDS, runs_budget=400)
    report = run(seed=7, scenarios=LOCAL_KINDS, runs_budget=100, backend="local")   # real processes
    print(report.summary())

Each scenario gets its own temporary HOME, MELANGE_SKY_HOME and cloud (a ChaosBackend state file), runs a short
sequence of `melange-sky up/status/down` processes (`python -m melange_sky`, the installed command's module; stdin
closed, each with a timeout) while the cloud injects faults and the runner fires signals, corrupts the ledger or
preempts clusters out of band, then ends with `down --all -y`. Kinds (KINDS): plain, launch-faults, exceptions,
created-then-fail, status-race (`status --refresh` racing an `up` relaunch or a `down` + `up`), concurrent, interrupt
(SIGINT / SIGTERM / SIGKILL during `up`), startup-interrupt (Ctrl-C while the CLI loads), failing-teardown,
corrupt-ledger, preemption. After every scenario it checks:

- unknown-cluster: no cluster exists in the cloud (its real state) that the ledger does not know (no row, or `gone`);
- leak: after a final `down --all -y` that exits 0 nothing is left in the cloud; a `down` that exits non-zero must say
  why (down-unexplained), and a retried `down --all -y` with every fault off must then clean up;
- traceback: no Python traceback in any output;
- exit-code: every exit code is one the README documents (0, 1, 2, 3, 130; a process we SIGKILLed is exempt, one
  that died of our SIGINT counts as 130, as a shell reports it); and, where a scenario knows better, the one it
  expects (unexpected-exit), e.g. 130 after Ctrl-C (interrupt-exit-code) unless the command had already printed its
  outcome;
- gone-while-existed: the ledger's history (`events`) never records `gone` for a cluster at a moment it existed in the
  cloud (the backend keeps a timeline of every cluster's real state);
- internal-error: `up` never dies with "internal error" because the launcher raised an unexpected exception type;
- corrupt-ledger-accepted: a corrupted ledger file is refused with a message, never taken for an empty one;
- hang: no process outlives its timeout.

On the local launcher (`backend="local"`, melange_sky/fleet/local.py: every replica a real `melange-sky emulate`
process) the "cloud" is the machine's processes (`LocalCloud`): a cluster exists while its process runs, and a process
of a launch that is no known cluster's (`leftovers`) is a violation of its own (unknown-process) and a leak at the end.
The launcher injects no fault, so only the kinds whose faults are the runner's own run there (LOCAL_KINDS: signals,
concurrency, a corrupt ledger, processes killed from outside), without HF_TOKEN (an emulator needs none); and
gone-while-existed is not checked (there is no record of when a process ran).

A scenario is determined by its kind and sub-seed (`KIND:SUBSEED`, printed with every violation): fault draws are
keyed on them, not on timing, so `replay("status-race:123")` reruns the same commands and faults — the interleaving
of concurrent processes and the moment a signal lands still depend on the machine.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:  # bench/chaos.py imports this module from outside tests/
    sys.path.insert(0, str(TESTS))

from chaos_backend import ChaosBackend  # noqa: E402
from melange_sky.fleet.local import LocalBackend, ProcessId, running  # noqa: E402

#: The `melange-sky` command as installed (`melange_sky.__main__`, which `python -m melange_sky` runs too); a checkout
#: from before that module existed runs `python -m melange_sky.cli`.
CLI_MODULE = "melange_sky" if (REPO / "melange_sky" / "__main__.py").exists() else "melange_sky.cli"
EXAMPLE = str(REPO / "examples" / "example.json")
FLEET = "example"
DOCUMENTED_EXIT_CODES = frozenset({0, 1, 2, 3, 130})  # README: "Exit codes"
CLI_TIMEOUT_S = 120.0
#: An "early" signal waits until the child has used this much CPU: Python's own startup (≈ 20 ms of CPU on the
#: machine this was written on), before melange-sky's first line runs, is out of the product's reach. CPU time, not
#: wall time, so a busy machine does not move the moment.
EARLY_CPU_S = 0.06
RATES = ("3", "6", "10", "30")  # 2, 3, 1 and 4 replicas of examples/example.json
CAUSE_STATUS_REFRESH = "status --refresh wrote an outdated `gone` over a cluster that runs (issue 13 item 1)"
CAUSE_UP_SYNC = "up's sync recorded a fresh cluster `gone` on a lagging cached status (issue 13 item 2)"
CAUSE_EITHER = ("a `gone` over a cluster that runs, by status --refresh or by up's sync (both were running: issue 13 "
                "item 1 or 2)")
CAUSE_CORRUPT = "a corrupt ledger file was taken for a new, empty ledger (issue 13 item 3)"
CAUSE_INTERRUPT = "an interrupt did not end in exit 130 without a traceback (issue 13 item 4)"
CAUSE_EXCEPTION = "an unexpected launcher exception aborted `up` with 'internal error' (issue 13 item 5)"
KINDS = ("plain", "launch-faults", "exceptions", "created-then-fail", "status-race", "concurrent", "interrupt",
         "startup-interrupt", "failing-teardown", "corrupt-ledger", "preemption")
#: The launchers the runner drives: the fault-injecting double (every kind) and the local launcher (real processes).
BACKENDS = ("chaos", "local")
#: The kinds whose faults are the runner's own (signals, concurrency, the ledger file, processes killed out of band),
#: so they mean something on a launcher that injects none.
LOCAL_KINDS = ("plain", "concurrent", "interrupt", "startup-interrupt", "corrupt-ledger", "preemption")


# -- records ------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CliRun:
    args: list[str]
    started: float
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    ended: float = 0.0
    signal: str | None = None  # the signal the runner sent while it ran
    timed_out: bool = False

    @property
    def command(self) -> str:
        return "melange-sky " + " ".join("EXAMPLE" if a == EXAMPLE else a for a in self.args)


@dataclasses.dataclass
class Violation:
    invariant: str
    kind: str  # the scenario kind
    replay: str  # KIND:SUBSEED
    description: str
    steps: list[str]
    clusters: list[str] = dataclasses.field(default_factory=list)
    cause: str = ""  # best effort, see Scenario.attribute

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.replay}: {self.description}"


@dataclasses.dataclass
class Report:
    seed: int
    scenarios: int = 0
    cli_runs: int = 0
    violations: list[Violation] = dataclasses.field(default_factory=list)
    leaked_clusters: int = 0
    tracebacks: int = 0
    hangs: int = 0
    seconds: float = 0.0
    per_kind: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations and not self.leaked_clusters and not self.tracebacks

    def by_invariant(self) -> dict[str, list[Violation]]:
        out: dict[str, list[Violation]] = {}
        for v in self.violations:
            out.setdefault(v.invariant, []).append(v)
        return dict(sorted(out.items()))

    def by_cause(self) -> dict[str, list[Violation]]:
        out: dict[str, list[Violation]] = {}
        for v in self.violations:
            out.setdefault(v.cause or v.invariant, []).append(v)
        return dict(sorted(out.items(), key=lambda kv: -len(kv[1])))

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "scenarios": self.scenarios, "cli_runs": self.cli_runs,
                "violations": len(self.violations), "leaked_clusters": self.leaked_clusters,
                "tracebacks": self.tracebacks, "hangs": self.hangs, "seconds": round(self.seconds, 1),
                "per_kind": self.per_kind,
                "by_invariant": {k: len(v) for k, v in self.by_invariant().items()},
                "by_cause": {k: len(v) for k, v in self.by_cause().items()},
                "details": [dataclasses.asdict(v) for v in self.violations]}

    def summary(self) -> str:
        lines = [f"chaos seed {self.seed}: {self.scenarios} scenarios, {self.cli_runs} CLI runs, "
                 f"{len(self.violations)} violations, {self.leaked_clusters} leaked clusters, "
                 f"{self.tracebacks} tracebacks, {self.hangs} hangs, {self.seconds:.0f} s", ""]
        header = ("kind", "scenarios", "CLI runs", "violations", "leaked")
        rows = [(k, str(c["scenarios"]), str(c["runs"]), str(c["violations"]), str(c["leaked"]))
                for k, c in sorted(self.per_kind.items())]
        rows.append(("total", str(self.scenarios), str(self.cli_runs), str(len(self.violations)),
                     str(self.leaked_clusters)))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                           for i, (cell, w) in enumerate(zip(row, widths))))
        if self.violations:
            lines += ["", "violations by invariant:"]
            for invariant, found in self.by_invariant().items():
                lines.append(f"  {invariant}: {len(found)} (in {len({v.replay for v in found})} scenarios)")
            lines += ["", "violations by cause (best effort):"]
            for cause, found in self.by_cause().items():
                lines.append(f"  {len(found):3d} in {len({v.replay for v in found}):2d} scenarios: {cause}")
        return "\n".join(lines)


# -- the local launcher as the runner's cloud ---------------------------------------------------------------------
class LocalCloud:
    """The local launcher's processes (state in `directory`) as the runner's "cloud": what exists is what runs. It
    injects no fault: `configure` and `calm` do nothing, and it keeps no timeline."""

    def __init__(self, directory: Path):
        self.dir = directory

    def _launcher(self) -> LocalBackend:
        return LocalBackend(self.dir)

    def configure(self, **config: Any) -> None:
        pass

    def calm(self) -> None:
        pass

    def existing(self) -> dict[str, str]:
        """Clusters whose process runs, by their launcher state (init: launching; up), and "leftover" for one whose
        process runs outside its cluster (a launch no record holds)."""
        launcher = self._launcher()
        found = {cluster: str(record["status"]) for cluster, record in launcher.records().items()
                 if running(ProcessId(int(record["pid"]), int(record["started"])))}
        for cluster in launcher.leftovers():
            found.setdefault(cluster, "leftover")
        return found

    def timeline(self) -> dict[str, list[list[Any]]]:
        return {}

    def held(self, point: str | None = None) -> list[dict[str, Any]]:
        """The launches in flight (a process that runs and does not listen yet): where a signal lands mid-launch."""
        return [{"cluster": c} for c, state in self.existing().items() if state == "init"]

    def preempt(self, cluster: str, to: str = "gone") -> bool:
        """Kill the cluster's processes out of band (a process has no stopped state to fall back to: gone, whatever
        `to` says). Returns whether it ran."""
        record = self._launcher().records().get(cluster)
        if record is None:
            return False
        leader = ProcessId(int(record["pid"]), int(record["started"]))
        if not running(leader):
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(leader.pid, signal.SIGKILL)
        _wait(lambda: not running(leader), 30)
        return True

    def kill_all(self) -> None:
        """Every process of every launch still running (a scenario's cleanup, pass or fail)."""
        launcher = self._launcher()
        pids = [int(r["pid"]) for r in launcher.records().values()]
        pids += [pid for members in launcher.leftovers().values() for pid in members]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


# -- one scenario -------------------------------------------------------------------------------------------------
class Scenario:
    """A private HOME, ledger and cloud; the CLI runs and steps so far; the violations found."""

    def __init__(self, kind: str, subseed: int, root: Path, backend: str = "chaos"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        self.kind = kind
        self.subseed = subseed
        self.backend = backend
        self.replay = f"{kind}:{subseed}"
        self.rng = random.Random(self.replay)
        self.dir = Path(tempfile.mkdtemp(prefix=f"chaos-{backend}-{kind}-", dir=root))
        self.home = self.dir / "melange-home"
        self.state_path = self.dir / "cloud.json"
        self.env = {**os.environ,
                    "HOME": str(self.dir / "home"), "MELANGE_SKY_HOME": str(self.home),
                    "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)]),
                    "SKYPILOT_DISABLE_USAGE_COLLECTION": "1", "PYTHONUNBUFFERED": "1"}
        for key in ("MELANGE_SKY_DEBUG", "MELANGE_CHAOS_SEED", "MELANGE_SKY_API_KEY", "MELANGE_SKY_LOCAL_SPEED",
                    "HF_TOKEN"):
            self.env.pop(key, None)
        Path(self.env["HOME"]).mkdir()
        self.cloud: ChaosBackend | LocalCloud
        if backend == "local":  # real processes; an emulator needs no HF_TOKEN
            self.env["MELANGE_SKY_BACKEND"] = "local"
            self.cloud = LocalCloud(self.home / "local")
        else:
            self.env.update({"MELANGE_SKY_BACKEND": "chaos_backend:ChaosBackend",
                             "MELANGE_CHAOS_STATE": str(self.state_path), "HF_TOKEN": "hf_chaos_token"})
            self.cloud = ChaosBackend(self.state_path)
        self.cloud.configure(seed=self.rng.getrandbits(32))
        self.runs: list[CliRun] = []
        self.steps: list[str] = []
        self.violations: list[Violation] = []
        self.leaked = 0
        self.tracebacks = 0
        self.hangs = 0
        self._live: list[tuple[CliRun, subprocess.Popen]] = []
        self.final_allowed: set[int] | None = None  # what the final `down --all -y` must exit with
        self.gone_writers: dict[str, list[str]] = {}  # cluster -> the runs that may have recorded it gone wrongly
        self._history_checked = 0  # the last ledger event id checked

    # -- bookkeeping
    def step(self, text: str) -> None:
        self.steps.append(text)

    def violation(self, invariant: str, description: str, clusters: Sequence[str] = (), cause: str = "") -> None:
        self.violations.append(Violation(invariant, self.kind, self.replay, description, list(self.steps),
                                         list(clusters), cause))

    def attribute(self) -> None:
        """Best-effort cause of each violation, from what wrote the `gone` behind it (CAUSE_*)."""
        for v in self.violations:
            if v.cause:
                continue
            if v.invariant in ("gone-while-existed", "unknown-cluster", "leak"):
                writers = [w for c in v.clusters for w in self.gone_writers.get(c, [])]
                by_status = any("`melange-sky status --refresh" in w for w in writers)
                by_up = any("`melange-sky up " in w for w in writers)
                if by_status and by_up:
                    v.cause = CAUSE_EITHER
                elif by_status:
                    v.cause = CAUSE_STATUS_REFRESH
                elif by_up:
                    v.cause = CAUSE_UP_SYNC
                elif writers:
                    v.cause = "a `gone` recorded while the cluster existed, by " + " or ".join(writers)
                else:
                    v.cause = "a cluster the ledger never recorded (no `gone` event behind it)"
            elif v.invariant == "corrupt-ledger-accepted":
                v.cause = CAUSE_CORRUPT
            elif v.invariant == "internal-error":
                v.cause = CAUSE_EXCEPTION
            elif v.invariant in ("interrupt-exit-code", "traceback", "exit-code") and "SIG" in v.description:
                v.cause = CAUSE_INTERRUPT
            else:
                v.cause = v.invariant

    def configure(self, **config: Any) -> None:
        self.cloud.configure(**config)
        if self.backend == "chaos":  # the local launcher injects nothing
            self.step(f"cloud: configure {json.dumps(config, sort_keys=True)}")

    def rate(self) -> str:
        return self.rng.choice(RATES)

    def lag(self) -> int:
        """How far the launcher's cached status lags behind new clusters (ms): none half of the time."""
        return self.rng.choice([0, 0, 500, 2000])

    # -- CLI processes
    def start(self, *args: str) -> tuple[CliRun, subprocess.Popen]:
        if args and args[0] == "up":  # the replicas' lifecycle under faults: shrinks drain at once, no router
            args = ("up", "--no-router", "--drain-timeout", "0", *args[1:])
        run = CliRun(list(args), started=time.time())
        n = len(self.runs)
        self.runs.append(run)
        out = open(self.dir / f"run-{n}.out", "w+")
        err = open(self.dir / f"run-{n}.err", "w+")
        proc = subprocess.Popen([sys.executable, "-m", CLI_MODULE, *args], env=self.env, cwd=self.dir,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                preexec_fn=_default_sigint)
        proc._chaos_files = (out, err)  # type: ignore[attr-defined]
        self._live.append((run, proc))
        self.step(f"#{n} start: {run.command}")
        return run, proc

    def finish(self, handle: tuple[CliRun, subprocess.Popen], allowed: Iterable[int] | None = None,
               why: str = "", timeout: float = CLI_TIMEOUT_S) -> CliRun:
        run, proc = handle
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        run.ended = time.time()
        run.returncode = proc.returncode
        out, err = proc._chaos_files  # type: ignore[attr-defined]
        for f, attr in ((out, "stdout"), (err, "stderr")):
            f.seek(0)
            setattr(run, attr, f.read())
            f.close()
        self._live = [(r, p) for r, p in self._live if p is not proc]
        n = self.runs.index(run)
        self.step(f"#{n} exit {run.returncode}" + (f" (after {run.signal})" if run.signal else "")
                  + (" (timed out)" if run.timed_out else ""))
        self._check_run(run, n, set(allowed) if allowed is not None else None, why)
        return run

    def cli(self, *args: str, allowed: Iterable[int] | None = None, why: str = "") -> CliRun:
        return self.finish(self.start(*args), allowed, why)

    def send(self, handle: tuple[CliRun, subprocess.Popen], sig: signal.Signals) -> bool:
        run, proc = handle
        if proc.poll() is not None:
            self.step(f"#{self.runs.index(run)} had already exited: no {sig.name}")
            return False
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        run.signal = sig.name
        self.step(f"#{self.runs.index(run)} <- {sig.name}")
        return True

    def cleanup(self) -> None:
        """Stop every CLI process of the scenario, and on the local launcher every process of its launches."""
        self.kill_all()
        if isinstance(self.cloud, LocalCloud):
            self.cloud.kill_all()

    def kill_all(self) -> None:
        """Stop every CLI process this scenario started and still runs (by its own process group)."""
        for run, proc in list(self._live):
            if proc.poll() is None:
                self.step(f"#{self.runs.index(run)} still running at cleanup: killed")
                run.signal = "SIGKILL"
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                self.finish((run, proc), timeout=10)

    def _check_run(self, run: CliRun, n: int, allowed: set[int] | None, why: str) -> None:
        where = f"#{n} `{run.command}`"
        output = run.stdout + run.stderr
        if run.timed_out:
            self.hangs += 1
            self.violation("hang", f"{where} still ran after {CLI_TIMEOUT_S:.0f} s")
            return
        if "Traceback (most recent call last)" in output:
            self.tracebacks += 1
            last = [line for line in run.stderr.strip().splitlines() if line.strip()][-1:] or ["?"]
            self.violation("traceback", f"{where} printed a traceback ({last[0].strip()[:160]})"
                           + (f" after {run.signal}" if run.signal else ""))
        if run.signal == "SIGKILL":
            return
        code = run.returncode
        if code == -signal.SIGINT and run.signal == "SIGINT":  # died of the Ctrl-C: a shell reports 128 + 2 = 130
            code = 130
        if run.signal in ("SIGINT", "SIGTERM") and code in (0, 1) and allowed is not None and 130 in allowed \
                and _said_it_finished(run):
            allowed = allowed | {code}  # the signal landed after the work was done and reported
        if code not in DOCUMENTED_EXIT_CODES:
            self.violation("exit-code", f"{where} exited {run.returncode}, not a documented exit code"
                           + (f" (after {run.signal})" if run.signal else ""))
        elif allowed is not None and code not in allowed:
            invariant = "interrupt-exit-code" if run.signal in ("SIGINT", "SIGTERM") else "unexpected-exit"
            first = _first_line(run.stderr) or _first_line(run.stdout)
            self.violation(invariant, f"{where} exited {run.returncode}, expected {sorted(allowed)}"
                           + (f" ({why})" if why else "") + (f": {first}" if first else ""))
        if run.args and run.args[0] == "up" and "internal error" in run.stderr:
            self.violation("internal-error", f"{where}: {_first_line(run.stderr, 'internal error')}")

    # -- the ledger, read from a copy (never touching the product's files)
    def read_ledger(self) -> tuple[dict[str, str], list[dict[str, Any]]] | None:
        """(cluster -> state, events) from the ledger; ({}, []) when there is none; None when it is unreadable."""
        db = self.home / "ledger.db"
        if not db.exists():
            return {}, []
        with tempfile.TemporaryDirectory(dir=self.dir) as tmp:
            for suffix in ("", "-wal"):
                if Path(str(db) + suffix).exists():
                    shutil.copyfile(str(db) + suffix, Path(tmp, "ledger.db" + suffix))
            try:
                conn = sqlite3.connect(Path(tmp, "ledger.db"))
                try:
                    conn.row_factory = sqlite3.Row
                    rows = {r["cluster"]: r["state"] for r in conn.execute("SELECT cluster, state FROM replicas")}
                    events = [dict(r) for r in conn.execute("SELECT * FROM events WHERE cluster IS NOT NULL "
                                                            "ORDER BY id")]
                finally:
                    conn.close()
            except sqlite3.DatabaseError:
                return None
        return rows, events

    # -- invariants at the end of a scenario
    def check_ledger_knows_the_cloud(self, when: str) -> None:
        ledger = self.read_ledger()
        existing = self.cloud.existing()
        if ledger is None:
            if existing:
                self.violation("unknown-cluster", f"{when}: the ledger is unreadable while {len(existing)} "
                                                  f"cluster(s) exist: {', '.join(sorted(existing))}", existing)
            return
        rows, _ = ledger
        for cluster, real in sorted(existing.items()):
            if real == "leftover":
                self.violation("unknown-process", f"{when}: a process of a launch of {cluster} runs outside any "
                                                  f"cluster the launcher knows", [cluster])
            elif rows.get(cluster) in (None, "gone"):
                self.violation("unknown-cluster", f"{when}: {cluster} is {real} in the cloud but the ledger has "
                                                  f"{'it gone' if cluster in rows else 'no row for it'}", [cluster])

    def writers(self, at: float) -> list[str]:
        """The CLI runs that were running at time `at` (one of them wrote a ledger event then)."""
        return [f"#{i} `{r.command}`" for i, r in enumerate(self.runs)
                if r.started <= at and (r.returncode is None or at <= r.ended)]

    def check_history(self) -> None:
        """Every `gone` the ledger recorded, against the cloud's timeline; events already checked are skipped. (The
        local launcher keeps no timeline: not checked there.)"""
        ledger = self.read_ledger()
        if ledger is None or self.backend != "chaos":
            return
        timeline = self.cloud.timeline()
        for event in ledger[1]:
            if event["id"] <= self._history_checked or event["new_state"] != "gone":
                continue
            if ChaosBackend.exists_at(timeline, event["cluster"], event["at"]):
                writers = self.writers(event["at"])
                self.gone_writers[event["cluster"]] = writers
                self.violation("gone-while-existed",
                               f"the ledger recorded {event['cluster']} {event['old_state']} -> gone "
                               f"({event['message'] or 'no message'}) while the cluster existed in the cloud; "
                               f"written by {' or '.join(writers) or 'no CLI run'}", [event["cluster"]])
        self._history_checked = max([self._history_checked] + [e["id"] for e in ledger[1]])

    def final_down(self) -> None:
        self.check_history()
        self.check_ledger_knows_the_cloud("before the final down")
        run = self.cli("down", "--all", "-y", allowed=self.final_allowed, why="final down")
        left = self.cloud.existing()
        if run.returncode == 0:
            if left:
                self.leaked += len(left)
                self.violation("leak", f"`down --all -y` exited 0 but {len(left)} cluster(s) are left: "
                                       + ", ".join(f"{c} ({s})" for c, s in sorted(left.items())), left)
        else:
            output = run.stdout + run.stderr
            if not any(word in output for word in ("failed", "busy", "Error:")):
                self.violation("down-unexplained", f"`down --all -y` exited {run.returncode} without saying why")
            self.cloud.calm()
            self.step("cloud: every fault off")
            retry = self.cli("down", "--all", "-y", allowed={0}, why="retried down, faults off")
            left = self.cloud.existing()
            if left:
                self.leaked += len(left)
                self.violation("leak", f"after a retried `down --all -y` (faults off, exit {retry.returncode}) "
                                       f"{len(left)} cluster(s) are left: "
                                       + ", ".join(f"{c} ({s})" for c, s in sorted(left.items())), left)
        self.check_history()


#: `up`'s final report (text mode): once it is printed, a Ctrl-C has nothing left to stop.
_UP_REPORT = re.compile(r"^Fleet \S+: \d+/\d+ planned replicas up", re.M)


def _said_it_finished(run: CliRun) -> bool:
    """Whether the command had printed its outcome (`up` its report; `down` and `status` print only at the end)."""
    if run.args and run.args[0] == "up":
        return bool(_UP_REPORT.search(run.stdout))
    return bool(run.stdout.strip())


def _first_line(text: str, containing: str = "") -> str:
    for line in text.splitlines():
        if line.strip() and containing in line:
            return line.strip()[:200]
    return ""


def _default_sigint() -> None:
    """In the child, before exec: SIGINT as a terminal's foreground command has it, even when the runner itself was
    started as a background job (which inherits SIGINT ignored, and would pass that on to every CLI it starts)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait(predicate: Callable[[], bool], timeout: float, poll: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process `pid` has used so far (Linux /proc), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _wait_until_started(proc: subprocess.Popen) -> None:
    """Until melange-sky's own code runs in `proc` (Python's startup before it is out of its reach): SIGINT handled
    and EARLY_CPU_S of CPU used, or the process ended."""
    _wait(lambda: proc.poll() is not None or (_catches(proc.pid, signal.SIGINT)
                                              and _cpu_seconds(proc.pid) >= EARLY_CPU_S), 30)


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has a handler installed for `sig` (Linux: /proc/<pid>/status SigCgt)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (int(sig) - 1)))
    except OSError:
        pass
    return False


# -- scenario kinds -----------------------------------------------------------------------------------------------
def sc_plain(s: Scenario) -> None:
    """Nothing injected: up, status, status --refresh, down: everything exits 0."""
    s.configure(launch_delay_ms=[5, 30])
    s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0})
    if s.rng.random() < 0.5:
        s.cli("status", allowed={0})
    s.cli("status", "--refresh", "--json", allowed={0})
    s.final_allowed = {0}


def sc_launch_faults(s: Scenario) -> None:
    """Capacity errors (re-plans) and launch errors (clusters left INIT, or rolled back); up again reconciles."""
    s.configure(p={"capacity": s.rng.uniform(0.15, 0.4), "launch_error": s.rng.uniform(0.1, 0.3),
                   "launch_error_rollback": 0.5}, lag_ms=s.lag())
    s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0, 1})
    if s.rng.random() < 0.5:
        s.cli("status", "--refresh", allowed={0})
    s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0, 1})


def sc_exceptions(s: Scenario) -> None:
    """The launcher raises types it should not (RuntimeError, ValueError) from launch, status and down."""
    s.configure(p={"launch_exc": s.rng.uniform(0.1, 0.4), "status_exc": s.rng.uniform(0.1, 0.4),
                   "status_error": s.rng.uniform(0.0, 0.15), "down_exc": s.rng.uniform(0.1, 0.4)}, lag_ms=s.lag())
    s.cli("up", EXAMPLE, "-y", "--rate", s.rng.choice(("6", "30")), allowed={0, 1})
    s.cli("status", "--refresh", allowed={0, 1})
    s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0, 1})
    if s.rng.random() < 0.5:
        s.cli("down", FLEET, "-y", allowed={0, 1})


def sc_created_then_fail(s: Scenario) -> None:
    """Launches succeed, then clusters fail (the cloud says INIT; the launcher's cache still says UP)."""
    s.configure(p={"fail_after_up": s.rng.uniform(0.3, 0.8)}, fail_after_ms=[5, 80], lag_ms=s.lag())
    s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0})
    time.sleep(0.1)
    s.cli("status", "--refresh", allowed={0})
    s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0, 1})


def sc_status_race(s: Scenario) -> None:
    """`status --refresh` (slow, and the launcher's cache lagging) races an `up` that relaunches rows, or a
    `down` + `up` of the same fleet: rows leave a state and come back to it while status waits for its answer."""
    s.configure(lag_ms=s.rng.choice([300, 1000, 3000]), refresh_delay_ms=[800, 3000],
                p={"launch_error": s.rng.uniform(0.25, 0.5), "launch_error_rollback": 0.5, "capacity": 0.1})
    rate = s.rng.choice(("6", "30", "30"))
    s.cli("up", EXAMPLE, "-y", "--rate", rate, allowed={0, 1})
    for cluster in sorted(s.cloud.existing()):
        if s.rng.random() < 0.4:
            s.cloud.preempt(cluster, "gone")
            s.step(f"cloud: preempt {cluster} -> gone")
    watcher = s.start("status", "--refresh")
    time.sleep(s.rng.uniform(0.0, 0.4))
    if s.rng.random() < 0.5:
        s.cli("up", EXAMPLE, "-y", "--rate", rate, allowed={0, 1})
    else:
        s.cli("down", FLEET, "-y", allowed={0, 1})
        s.cli("up", EXAMPLE, "-y", "--rate", rate, allowed={0, 1})
    s.finish(watcher, allowed={0})
    s.cli("status", "--refresh", allowed={0})


def sc_concurrent(s: Scenario) -> None:
    """Several up / down / status processes at once, on one fleet and a second one."""
    s.configure(launch_delay_ms=[20, 200], p={"capacity": 0.1, "launch_error": 0.1}, lag_ms=s.lag())
    if s.rng.random() < 0.5:
        s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0, 1})
    menu = [("up", EXAMPLE, "-y", "--rate", s.rate()), ("up", EXAMPLE, "-y", "--rate", s.rate()),
            ("up", EXAMPLE, "-y", "--name", "other", "--rate", s.rate()), ("down", FLEET, "-y"),
            ("down", "--all", "-y"), ("status", "--refresh"), ("status",)]
    chosen = s.rng.sample(menu, s.rng.randint(3, 4))
    handles = []
    for args in chosen:
        handles.append((args, s.start(*args)))
        time.sleep(s.rng.uniform(0.0, 0.25))
    for args, handle in handles:
        s.finish(handle, allowed={0} if args[0] == "status" else {0, 1, 3})


def sc_interrupt(s: Scenario) -> None:
    """SIGINT, SIGTERM or SIGKILL at a random moment of `up` (SIGTERM only once up's handler is set), then `up`
    again or `down --all -y`."""
    sig = s.rng.choice([signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
    moment = "launch" if sig is signal.SIGTERM else s.rng.choice(["early", "early", "launch"])
    rate = s.rng.choice(("6", "30"))
    parallel = s.rng.choice(("1", "2", "8"))
    s.configure(launch_delay_ms=[20, 150], lag_ms=s.rng.choice([0, 0, 500]), p={"launch_error": 0.15})
    release = s.dir / "release-launches"
    if moment == "launch":  # the k+1-th launch blocks until the signal: up is surely still launching
        s.configure(holds={"launch": {"release": str(release), "skip": s.rng.randrange(0, 3)}})
    delay = s.rng.uniform(0.0, s.rng.choice([0.25, 0.8])) if moment == "early" else s.rng.uniform(0.0, 0.1)
    handle = s.start("up", EXAMPLE, "-y", "--rate", rate, "--parallel", parallel)
    proc = handle[1]
    if moment == "early":
        _wait_until_started(proc)
    else:
        _wait(lambda: proc.poll() is not None or bool(s.cloud.held("launch")), 60, poll=0.02)
    time.sleep(delay)
    s.step(f"({moment}: {delay * 1000:.0f} ms after "
           f"{f'{EARLY_CPU_S * 1000:.0f} ms of CPU' if moment == 'early' else 'a launch was held'})")
    sent = s.send(handle, sig)
    if moment == "launch":
        _wait(lambda: proc.poll() is not None, 10)  # let Ctrl-C cancel the held launches first
        release.touch()
        s.configure(holds={})
    s.finish(handle, allowed={130} if sent else {0, 1}, why=f"interrupted by {sig.name}" if sent else "")
    if s.rng.random() < 0.5:
        s.cli("up", EXAMPLE, "-y", "--rate", rate, allowed={0, 1})
    else:
        s.cli("down", "--all", "-y", allowed={0, 1})


def sc_startup_interrupt(s: Scenario) -> None:
    """Ctrl-C while `up` or `down` loads, plans and opens the ledger (the first few hundred ms), a few times in a row:
    each must end in exit 130 (or, if it landed after `up` printed its report, the report's own code), with no
    traceback."""
    s.configure(launch_delay_ms=[20, 80], p={"launch_error": 0.1})
    for _ in range(3):
        args = s.rng.choice([("up", EXAMPLE, "-y", "--rate", s.rate()), ("up", EXAMPLE, "-y", "--rate", s.rate()),
                             ("down", "--all", "-y")])
        handle = s.start(*args)
        proc = handle[1]
        _wait_until_started(proc)
        delay = s.rng.uniform(0.0, 0.2)  # imports, planning, opening the ledger
        time.sleep(delay)
        s.step(f"(early: {delay * 1000:.0f} ms after {EARLY_CPU_S * 1000:.0f} ms of CPU)")
        sent = s.send(handle, signal.SIGINT)
        s.finish(handle, allowed={130} if sent else {0, 1}, why="interrupted by SIGINT" if sent else "")


def sc_failing_teardown(s: Scenario) -> None:
    """Teardowns fail (BackendError or RuntimeError; the cluster stays); `down` says so, a retried down finishes."""
    s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0})
    s.configure(p={"down_error": s.rng.uniform(0.2, 0.5), "down_exc": s.rng.uniform(0.0, 0.3)})
    first = s.cli("down", FLEET, "-y", allowed={0, 1})
    if first.returncode == 1 and "failed" not in first.stdout + first.stderr:
        s.violation("down-unexplained", "`down` exited 1 without naming the failed teardown")
    s.cli("down", "--all", "-y", allowed={0, 1})


CORRUPTIONS = ("empty", "truncated", "header-garbage", "garbage", "text")


def _corrupt(db: Path, how: str, rng: random.Random) -> None:
    size = db.stat().st_size
    if how == "empty":
        db.write_bytes(b"")
    elif how == "truncated":
        os.truncate(db, rng.randrange(1, size))
    elif how == "header-garbage":
        with open(db, "r+b") as f:
            f.write(bytes(rng.randrange(256) for _ in range(100)))
    elif how == "garbage":
        db.write_bytes(bytes(rng.randrange(256) for _ in range(size)))
    elif how == "text":
        db.write_text("this is not a ledger\n")
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(db) + suffix)


def sc_corrupt_ledger(s: Scenario) -> None:
    """The ledger file is corrupted (emptied, truncated, overwritten): status and down must refuse it with a
    message, never take it for an empty ledger. The runner then restores it (the user's repair) for the final down."""
    how = s.rng.choice(CORRUPTIONS)
    s.configure(p={"launch_error": 0.1})
    s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0, 1})
    if s.rng.random() < 0.3:
        s.cli("up", EXAMPLE, "-y", "--name", "other", "--rate", s.rate(), allowed={0, 1})
    db = s.home / "ledger.db"
    backup = s.dir / "ledger.db.backup"
    shutil.copyfile(db, backup)
    _corrupt(db, how, s.rng)
    s.step(f"ledger: corrupted ({how})")
    for args in (("status",), ("status", "--refresh"), ("down", "--all", "-y")):
        run = s.cli(*args)
        if run.returncode == 0:
            s.violation("corrupt-ledger-accepted", f"`{run.command}` exited 0 on a corrupted ({how}) ledger: "
                                                   f"{_first_line(run.stdout)}")
            left = s.cloud.existing()
            if args[0] == "down" and left:
                s.leaked += len(left)
                s.violation("leak", f"`down --all -y` exited 0 on a corrupted ({how}) ledger while {len(left)} "
                                    f"cluster(s) run: {', '.join(sorted(left))}", left, cause=CAUSE_CORRUPT)
        elif "ledger" not in run.stderr:
            s.violation("corrupt-ledger-accepted", f"`{run.command}` exited {run.returncode} on a corrupted "
                                                   f"({how}) ledger without saying the ledger is the problem")
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(db) + suffix)
    shutil.copyfile(backup, db)
    s.step("ledger: restored from the backup")


def sc_preemption(s: Scenario) -> None:
    """Clusters are preempted, autostopped or fail out of band (the launcher's cache still says UP), then `up`."""
    s.cli("up", EXAMPLE, "-y", "--rate", s.rng.choice(("3", "6", "30")), allowed={0})
    existing = sorted(s.cloud.existing())
    for cluster in s.rng.sample(existing, min(len(existing), s.rng.randint(1, 2))):
        to = s.rng.choice(["gone", "stopped", "init"])
        s.cloud.preempt(cluster, to)
        s.step(f"cloud: preempt {cluster} -> {to if s.backend == 'chaos' else 'killed'}")
    if s.rng.random() < 0.5:
        s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0, 1})
    s.cli("status", "--refresh", allowed={0})
    s.cli("up", EXAMPLE, "-y", "--rate", s.rate(), allowed={0, 1})


#: Spot capacity scenarios (issue 20), run by name like any kind (`run(seed, SPOT_KINDS)`, `replay("spot-outage:1")`,
#: tests/test_spot_fallback.py). Kept out of KINDS so the quick run's seeded draws over KINDS stay as they are.
SPOT_KINDS = ("spot-outage", "spot-outage-pinned")
SPOT_HOLD_MIN = 0.03  # `watch --spot-hold`: 1.8 s, so a scenario sees the pool come back
SPOT_FLEET = "spotty"


def _spot_config(pinned: bool) -> dict[str, Any]:
    """Spot A10G (any AWS region, or only us-east-2 when `pinned`) and at least one on-demand L4: the floor."""
    a10g: dict[str, Any] = {"tputs": [[2, 1], [5, 2]], "use_spot": True, **({"region": "us-east-2"} if pinned else {})}
    return {"name": SPOT_FLEET, "gpu_info": {"A10G": a10g, "L4": {"tputs": [[2, 1], [5, 2]], "min_count": 1}},
            "workload_distribution": [[0.2, 0.1], [0.5, 0.2]], "total_request_rate": 6, "slice_factor": 1,
            "input_buckets": [1, 25, 100], "output_buckets": [1, 25, 100], "clouds": ["aws"]}


def _up_in(s: Scenario, spot: bool, region: str | None = None) -> list[str]:
    """Clusters up in the cloud that are (not) spot, in `region` if given."""
    where = s.cloud.placements()
    return sorted(c for c, real in s.cloud.existing().items() if real == "up" and c in where
                  and where[c]["spot"] == spot and (region is None or where[c]["region"] == region))


def _lowest_reliable(s: Scenario, since: float) -> int:
    """The fewest on-demand clusters up in the cloud at any moment since `since` (by the cloud's timeline)."""
    timeline, where = s.cloud.timeline(), s.cloud.placements()
    reliable = [c for c, p in where.items() if not p["spot"]]
    moments = sorted({since} | {e[0] for c in reliable for e in timeline.get(c, []) if e[0] >= since})

    def up_at(cluster: str, at: float) -> bool:
        state = "gone"
        for t, real, *_ in sorted(timeline.get(cluster, []), key=lambda e: e[0]):
            if t > at:
                break
            state = real
        return state == "up"

    return min(sum(up_at(c, t) for c in reliable) for t in moments)


def _sc_spot_outage(s: Scenario, pinned: bool) -> None:
    """Every spot replica of one region preempted at once, then no spot capacity there: `watch --once` restores the
    full fleet (spot in another region, or the on-demand type when the spot entry is pinned to that region) without
    the reliable capacity ever falling below its floor; once the region has capacity again and the hold is over,
    the next pass moves the load back to spot there."""
    config = s.dir / "spot.json"
    config.write_text(json.dumps(_spot_config(pinned)))
    s.cli("up", str(config), "-y", "--per-offer", allowed={0})
    started = time.time()
    spot = _up_in(s, spot=True)
    floor = len(_up_in(s, spot=False))
    region = s.cloud.placements()[spot[0]]["region"] if spot else None
    if region is None or floor < 1:
        s.violation("spot-setup", f"the spot fleet came up with {len(spot)} spot and {floor} on-demand replica(s)")
        return
    s.configure(spot_outage=[region])
    for cluster in _up_in(s, spot=True, region=region):
        s.cloud.preempt(cluster, "gone")
    s.step(f"cloud: every spot replica in {region} preempted; no spot capacity there")
    watch = ("watch", SPOT_FLEET, "--once", "--no-health-check", "--drain-timeout", "0", "--spot-hold",
             str(SPOT_HOLD_MIN))
    s.cli(*watch, allowed={0}, why="the fleet restored on other offers")
    if _up_in(s, spot=True, region=region):
        s.violation("spot-fallback", f"spot replicas up in {region} during its outage")
    if not _up_in(s, spot=True) and not pinned:
        s.violation("spot-fallback", "the load left spot although other regions had spot capacity")
    s.configure(spot_outage=[])
    time.sleep(SPOT_HOLD_MIN * 60 + 0.5)  # the hold itself, not a synchronisation: the pool comes back after it
    s.cli(*watch, allowed={0}, why="the load moved back to spot")
    if not _up_in(s, spot=True, region=region):
        s.violation("spot-return", f"no spot replica back in {region} once its hold was over")
    lowest = _lowest_reliable(s, started)
    if lowest < floor:
        s.violation("spot-floor", f"on-demand replicas up fell to {lowest}, below the floor of {floor}")


def sc_spot_outage(s: Scenario) -> None:
    _sc_spot_outage(s, pinned=False)


def sc_spot_outage_pinned(s: Scenario) -> None:
    _sc_spot_outage(s, pinned=True)


SCENARIOS: dict[str, Callable[[Scenario], None]] = {
    "plain": sc_plain, "launch-faults": sc_launch_faults, "exceptions": sc_exceptions,
    "created-then-fail": sc_created_then_fail, "status-race": sc_status_race, "concurrent": sc_concurrent,
    "interrupt": sc_interrupt, "startup-interrupt": sc_startup_interrupt, "failing-teardown": sc_failing_teardown,
    "corrupt-ledger": sc_corrupt_ledger, "preemption": sc_preemption,
    "spot-outage": sc_spot_outage, "spot-outage-pinned": sc_spot_outage_pinned,
}
assert tuple(SCENARIOS) == KINDS + SPOT_KINDS


def run_scenario(kind: str, subseed: int, root: Path, keep: bool = False, backend: str = "chaos") -> Scenario:
    """Run one scenario and its end-of-scenario checks; every process it started is stopped before it returns."""
    if backend == "local" and kind not in LOCAL_KINDS:
        raise ValueError(f"scenario kind {kind!r} needs the fault-injecting launcher; on the local launcher: "
                         f"{', '.join(LOCAL_KINDS)}")
    s = Scenario(kind, subseed, root, backend)
    try:
        SCENARIOS[kind](s)
        s.kill_all()
        s.final_down()
        s.attribute()
    except Exception as exc:  # a runner bug must not hide what was found so far, nor leave processes behind
        s.violation("runner-error", f"the chaos runner failed: {type(exc).__name__}: {exc}")
    finally:
        s.cleanup()
        if not keep and not s.violations:
            shutil.rmtree(s.dir, ignore_errors=True)
    return s


def draws(seed: int, scenarios: Sequence[str] = KINDS) -> Iterator[tuple[str, int]]:
    """The scenarios `seed` draws from `scenarios`, (kind, subseed), endlessly: rounds of every kind once, each round
    in a seeded order (so the kinds stay balanced)."""
    master = random.Random(seed)
    while True:
        order = list(scenarios)
        master.shuffle(order)
        for kind in order:
            yield kind, master.getrandbits(31)


def run(seed: int, scenarios: Sequence[str] = KINDS, runs_budget: int = 400, *,
        on_scenario: Callable[[Scenario], None] | None = None, keep: bool = False,
        workdir: str | os.PathLike[str] | None = None, backend: str = "chaos") -> Report:
    """Scenarios drawn with `seed` from `scenarios`, in rounds of every kind once (a seeded order each round), until
    `runs_budget` CLI runs are spent and the round is complete (so every kind runs as often as the others), on
    `backend` (BACKENDS; "local": LOCAL_KINDS only). Scenario directories are removed unless they found something
    (or `keep`)."""
    unknown = set(scenarios) - set(SCENARIOS if backend == "chaos" else LOCAL_KINDS)
    if unknown:
        raise ValueError(f"unknown scenario kinds: {sorted(unknown)}; known: "
                         f"{', '.join(KINDS if backend == 'chaos' else LOCAL_KINDS)}")
    drawn = draws(seed, scenarios)
    report = Report(seed=seed, per_kind={k: {"scenarios": 0, "runs": 0, "violations": 0, "leaked": 0}
                                         for k in scenarios})
    started = time.monotonic()
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="melange-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        while not report.scenarios or report.scenarios % len(scenarios) or report.cli_runs < runs_budget:
            kind, subseed = next(drawn)  # until the budget is spent and the round is complete
            s = run_scenario(kind, subseed, root, keep, backend)
            report.scenarios += 1
            report.cli_runs += len(s.runs)
            report.violations += s.violations
            report.leaked_clusters += s.leaked
            report.tracebacks += s.tracebacks
            report.hangs += s.hangs
            counts = report.per_kind[kind]
            counts["scenarios"] += 1
            counts["runs"] += len(s.runs)
            counts["violations"] += len(s.violations)
            counts["leaked"] += s.leaked
            if on_scenario is not None:
                on_scenario(s)
    finally:
        if workdir is None and not keep and not report.violations:
            shutil.rmtree(root, ignore_errors=True)
    report.seconds = time.monotonic() - started
    return report


def replay(spec: str, keep: bool = True, workdir: str | os.PathLike[str] | None = None,
           backend: str = "chaos") -> Scenario:
    """Rerun one scenario from its `KIND:SUBSEED`; its directory (CLI outputs, cloud state, ledger) is kept."""
    kind, _, subseed = spec.rpartition(":")
    root = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="melange-chaos-replay-"))
    root.mkdir(parents=True, exist_ok=True)
    return run_scenario(kind, int(subseed), root, keep=keep, backend=backend)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Replay one chaos scenario (KIND:SUBSEED) and print its steps.")
    parser.add_argument("spec", help="KIND:SUBSEED, as printed with a violation")
    parser.add_argument("--backend", choices=BACKENDS, default="chaos", help="the launcher it ran on")
    args = parser.parse_args(argv)
    s = replay(args.spec, backend=args.backend)
    print("\n".join(s.steps))
    print(f"\n{len(s.violations)} violation(s); files in {s.dir}")
    for v in s.violations:
        print(f"  {v}")
    return 1 if s.violations else 0


if __name__ == "__main__":
    sys.exit(main())

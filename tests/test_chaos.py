"""The real CLI against a fault-injecting launcher (tests/chaos_backend.py), driven by the runner in tests/chaos.py.

- `test_a_quick_chaos_scenario_finds_no_violation`: one scenario of every kind no targeted test below forces, drawn
  with a fixed seed (about 25 CLI runs in all, one test per kind so they spread over the workers), asserting no
  invariant violation, no leaked cluster and no traceback; `test_ctrl_c_while_the_cli_starts_exits_130` does the
  same for Ctrl-C while the CLI starts. bench/chaos.py is the long run, every kind.
- One targeted test per bug of issue 13 that the chaos run found, each forcing its interleaving deterministically
  with the backend's scripts and holds (a call blocks until the test releases it), so it fails the same way every
  time the bug is there: items 1 (status --refresh), 2 (a lagging cached status), 3 (an empty ledger file) and 5
  (unexpected launcher exceptions inside `up`). Each failed on 4400da3 and 00c69b2 and passes since 67b70e6.
- A few tests of the test double and the runner themselves, so a green chaos run means what it says.
- The runner on the local launcher (real emulator processes, no fault injection): `up` SIGKILLed while its launches
  are in flight, then `up` again and `down --all`: no process left (`python bench/chaos.py --backend local` runs
  every kind that means something there).

Nothing here asserts on durations.
"""
from __future__ import annotations

import itertools
import os
import signal
from pathlib import Path

import pytest

from chaos import EXAMPLE, KINDS, LOCAL_KINDS, Scenario, _wait, draws, run_scenario
from chaos_backend import ChaosBackend
from melange_sky.backends import LaunchRequest

#: Its first round sends SIGINT while launches are in flight (interrupt), and empties the ledger file (corrupt-ledger)
#: and lags the cached status 3 s (status-race), which the tests below force deterministically.
QUICK_SEED = 68
#: The kinds whose faults no deterministic test below forces, so the suite runs one random scenario of each: Ctrl-C
#: while the CLI starts has its own test (test_ctrl_c_while_the_cli_starts_exits_130, with more landings), and the
#: status races, the corrupt ledger and the unexpected exceptions have the targeted tests of issue 13 (with the same
#: invariant checks after them). bench/chaos.py runs every kind, a few hundred CLI runs.
TARGETED_KINDS = ("startup-interrupt", "status-race", "corrupt-ledger", "exceptions")
QUICK_KINDS = tuple(k for k in KINDS if k not in TARGETED_KINDS)
#: The first round QUICK_SEED draws over every kind but startup-interrupt (as `run(QUICK_SEED, ...)` starts, the
#: scenarios the whole quick run had before the targeted kinds left it), kind -> subseed.
QUICK = {kind: subseed for kind, subseed in itertools.islice(
    draws(QUICK_SEED, tuple(k for k in KINDS if k != "startup-interrupt")), len(KINDS) - 1) if kind in QUICK_KINDS}
#: Four startup-interrupt scenarios (3 Ctrl-Cs each), as `run(QUICK_SEED, ["startup-interrupt"], runs_budget=16)`.
STARTUP = [subseed for _, subseed in itertools.islice(draws(QUICK_SEED, ["startup-interrupt"]), 4)]


@pytest.fixture
def scenario(tmp_path):
    """A private ledger, HOME and chaos cloud; every process it starts is stopped at the end."""
    s = Scenario("targeted", 0, tmp_path)
    s.configure(launch_delay_ms=[0, 0], down_delay_ms=[0, 0])
    yield s
    s.kill_all()


def _violations(s: Scenario) -> str:
    return "\n".join(str(v) for v in s.violations) + "\n\nsteps:\n" + "\n".join(s.steps)


def _found(s: Scenario) -> str:
    """What a scenario of the quick run found, with the line to replay it."""
    return (f"{s.replay} (python bench/chaos.py --replay {s.replay}): {len(s.violations)} violation(s), "
            f"{s.leaked} leaked, {s.tracebacks} traceback(s), {s.hangs} hang(s)\n" + _violations(s))


def _hold(s: Scenario, point: str) -> Path:
    release = s.dir / f"release-{point}"
    s.configure(holds={point: {"release": str(release), "once": True}})
    return release


# -- the quick run ------------------------------------------------------------------------------------------------
def test_the_quick_run_has_one_scenario_of_every_kind_no_targeted_test_covers():
    assert sorted(QUICK) == sorted(QUICK_KINDS) and len(set(STARTUP)) == 4
    assert set(QUICK_KINDS) | set(TARGETED_KINDS) == set(KINDS)


@pytest.mark.parametrize("kind", QUICK_KINDS)
def test_a_quick_chaos_scenario_finds_no_violation(kind, tmp_path):
    """One scenario of each kind no targeted test covers (see QUICK_KINDS); bench/chaos.py runs longer."""
    s = run_scenario(kind, QUICK[kind], tmp_path)
    assert s.runs, "the scenario ran no command"
    assert not s.violations and not s.leaked and not s.tracebacks and not s.hangs, _found(s)


@pytest.mark.parametrize("subseed", STARTUP, ids=[f"scenario-{n}" for n in range(len(STARTUP))])
def test_ctrl_c_while_the_cli_starts_exits_130(subseed, tmp_path):
    """Issue 13 item 4 ("interrupted is exit 130, wherever it lands"): 12 Ctrl-Cs at random moments (3 in each of
    4 scenarios) while `up` and `down` load, plan and open the ledger. Before 8852dc2 a few percent of them crashed
    (-11, in orjson's extension import), said 'needs highspy' (exit 2) or 'cannot create the ledger ... cannot
    rollback' (exit 1)."""
    s = run_scenario("startup-interrupt", subseed, tmp_path)
    assert len(s.runs) >= 3
    assert not s.violations and not s.leaked and not s.tracebacks and not s.hangs, _found(s)


# -- the local launcher -------------------------------------------------------------------------------------------
#: The third interrupt scenario QUICK_SEED draws over LOCAL_KINDS: `up --rate 30` (4 replicas, 2 launches at a time)
#: SIGKILLed once a launch is in flight.
LOCAL_QUICK = ("interrupt", 1783122058)


def test_on_the_local_launcher_an_up_killed_mid_launch_leaves_no_process_after_down(tmp_path):
    kind, subseed = LOCAL_QUICK
    assert kind in LOCAL_KINDS
    s = run_scenario(kind, subseed, tmp_path, backend="local")
    assert s.runs[0].signal == "SIGKILL" and s.runs[0].returncode == -signal.SIGKILL, _found(s)
    assert any("after a launch was held" in step for step in s.steps), _found(s)  # landed mid-launch
    assert s.runs[-1].args[:2] == ["down", "--all"] and s.runs[-1].returncode == 0, _found(s)
    assert not s.violations and not s.leaked and not s.tracebacks and not s.hangs, _found(s)


def test_the_local_launcher_runs_only_the_kinds_whose_faults_are_the_runners_own(tmp_path):
    with pytest.raises(ValueError, match="fault-injecting launcher"):
        run_scenario("launch-faults", 1, tmp_path, backend="local")
    assert set(LOCAL_KINDS) < set(KINDS)


# -- issue 13, item 1 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interleaving", ["down-and-up-again", "failed-relaunch-failed-again"])
def test_status_refresh_never_records_gone_over_a_running_cluster(scenario, interleaving):
    """Issue 13 item 1: status --refresh has its answer (gone) and waits; meanwhile the row leaves its state and comes
    back to it over a cluster that now runs. Writing the outdated answer would make `down` skip, and leak, it."""
    s = scenario
    target = "example-a10g-0"
    if interleaving == "down-and-up-again":  # up -> terminating -> gone -> (removed) -> pending -> launching -> up
        assert s.cli("up", EXAMPLE, "-y", "--rate", "6").returncode == 0
        assert s.cloud.preempt(target, "gone")  # the refresh will answer: gone
    else:  # failed -> (gone) -> pending -> launching -> failed; the second failure leaves the cluster INIT
        s.configure(script={f"launch:{target}": ["launch_error_rollback", "launch_error"]})
        assert s.cli("up", EXAMPLE, "-y", "--rate", "6").returncode == 1
        assert target not in s.cloud.existing()
    release = _hold(s, "status.refresh")  # status has its (correct, now outdated) answer and waits
    watcher = s.start("status", "--refresh")
    assert _wait(lambda: bool(s.cloud.held("status.refresh")) or watcher[1].poll() is not None, 120)
    if interleaving == "down-and-up-again":
        assert s.cli("down", "example", "-y").returncode == 0
        assert s.cli("up", EXAMPLE, "-y", "--rate", "6").returncode == 0
    else:
        assert s.cli("up", EXAMPLE, "-y", "--rate", "6").returncode == 1
    assert target in s.cloud.existing()
    release.touch()
    assert s.finish(watcher).returncode == 0
    rows, _ = s.read_ledger()
    assert rows[target] != "gone", f"{target} runs ({s.cloud.existing()[target]}) but the ledger says gone"
    s.final_down()
    assert not s.violations, _violations(s)


# -- issue 13, item 2 ---------------------------------------------------------------------------------------------
def test_a_lagging_cached_status_never_marks_a_fresh_cluster_gone(scenario):
    """Issue 13 item 2: up's own sync asks a cached status that does not list a cluster created moments ago; taking
    that for `gone` on a failed row would leave its INIT cluster out of the ledger (a smaller plan never removes it)."""
    s = scenario
    target = "example-a10g-2"
    s.configure(lag_ms=600_000, script={f"launch:{target}": ["launch_error"]})  # the cache never catches up here
    assert s.cli("up", EXAMPLE, "-y", "--rate", "6").returncode == 1  # a10g-2 failed, its cluster left INIT
    assert s.cloud.existing()[target] == "init"
    s.cli("up", EXAMPLE, "-y", "--rate", "3")  # a10g-2 is not in this plan: a failed leftover to tear down
    rows, _ = s.read_ledger()
    if target in s.cloud.existing():
        assert rows.get(target) not in (None, "gone"), f"{target} is INIT in the cloud, the ledger says gone"
    s.final_down()
    assert not s.violations, _violations(s)


# -- issue 13, item 3 ---------------------------------------------------------------------------------------------
def test_an_empty_ledger_file_is_reported_corrupt(scenario):
    """Issue 13 item 3: SQLite opens a 0-byte file as an empty database; the ledger must call it corrupt, not report
    "no fleets" and have `down --all` tear nothing down while the clusters run."""
    s = scenario
    assert s.cli("up", EXAMPLE, "-y", "--rate", "6").returncode == 0
    running = s.cloud.existing()
    assert len(running) == 3
    db = s.home / "ledger.db"
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(db) + suffix):
            os.unlink(str(db) + suffix)
    db.write_bytes(b"")
    for args in (("status",), ("down", "--all", "-y")):
        result = s.cli(*args)
        assert result.returncode != 0 and "ledger" in result.stderr, \
            f"`{result.command}` exited {result.returncode} on an empty ledger file: {result.stdout.strip()}"
    assert s.cloud.existing() == running


# -- issue 13, item 5 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["down-of-a-leftover", "status-after-ctrl-c", "status-before-planning"])
def test_unexpected_backend_exceptions_in_up_are_recorded_per_replica(scenario, where):
    """Issue 13 item 5: a launcher raising RuntimeError from status() or down() inside `up` is handled like a
    BackendError for that replica (recorded, reported, up goes on), never an 'internal error' that ends `up`."""
    s = scenario
    if where == "down-of-a-leftover":  # fleet.py, _tear_down_leftovers
        s.configure(script={"launch:example-a10g-2": ["launch_error"]})
        assert s.cli("up", EXAMPLE, "-y", "--rate", "6").returncode == 1
        s.configure(script={"down:example-a10g-2": ["runtime_error"]})
        result = s.cli("up", EXAMPLE, "-y", "--rate", "3")  # a10g-2 is a failed leftover: torn down, which raises
        assert result.returncode == 1, result.stderr
        assert "example-a10g-2" in result.stdout and "chaos RuntimeError" in result.stdout + result.stderr
        assert s.read_ledger()[0]["example-a10g-2"] != "gone"
    elif where == "status-after-ctrl-c":  # fleet.py, _record_true_states
        release = s.dir / "release-launches"
        s.configure(holds={"launch": {"release": str(release)}}, script={"status.cached": ["runtime_error"]})
        handle = s.start("up", EXAMPLE, "-y", "--rate", "6")
        assert _wait(lambda: bool(s.cloud.held("launch")) or handle[1].poll() is not None, 120)
        s.send(handle, signal.SIGINT)
        _wait(lambda: handle[1].poll() is not None, 60)
        release.touch()
        result = s.finish(handle)
        assert result.returncode == 130, result.stderr
        rows, _ = s.read_ledger()
        assert sorted(rows) == ["example-a10g-0", "example-a10g-1", "example-a10g-2"]
    else:  # fleet.py, _sync at the start of up
        assert s.cli("up", EXAMPLE, "-y", "--rate", "6").returncode == 0
        s.configure(script={"status.cached": ["runtime_error"]})
        result = s.cli("up", EXAMPLE, "-y", "--rate", "6")
        assert result.returncode in (0, 1)
    assert "internal error" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    s.final_down()
    assert not s.violations, _violations(s)


# -- the double itself --------------------------------------------------------------------------------------------
def test_the_chaos_cloud_models_a_lagging_cache_and_out_of_band_preemption(scenario):
    s = scenario
    s.configure(lag_ms=600_000)
    assert s.cli("up", EXAMPLE, "-y", "--rate", "10").returncode == 0
    [cluster] = s.cloud.existing()
    backend = ChaosBackend(s.state_path)
    assert backend.status([cluster])[cluster].status.value == "gone"  # too new for the cache
    assert backend.status([cluster], refresh=True)[cluster].status.value == "up"
    assert backend.status([cluster])[cluster].status.value == "up"  # the refresh updated the cache
    assert s.cloud.preempt(cluster, "stopped")
    assert backend.status([cluster])[cluster].status.value == "up"  # the cache misses it
    assert backend.status([cluster], refresh=True)[cluster].status.value == "stopped"
    assert s.cloud.preempt(cluster, "gone") and not s.cloud.existing()
    timeline = s.cloud.timeline()[cluster]
    assert [state for _, state, *_ in timeline] == ["init", "up", "stopped", "gone"]
    assert ChaosBackend.exists_at(s.cloud.timeline(), cluster, timeline[1][0])
    assert not ChaosBackend.exists_at(s.cloud.timeline(), cluster, timeline[-1][0] + 1)


def test_a_cluster_exists_from_the_moment_its_launch_starts_and_teardowns_can_fail(scenario):
    s = scenario
    release = _hold(s, "launch")
    s.configure(script={"down:example-a100-80gb-0": ["backend_error"]})
    handle = s.start("up", EXAMPLE, "-y", "--rate", "10")
    assert _wait(lambda: bool(s.cloud.held("launch")) or handle[1].poll() is not None, 120)
    assert s.cloud.existing() == {"example-a100-80gb-0": "init"}
    release.touch()
    assert s.finish(handle).returncode == 0
    down = s.cli("down", "--all", "-y")
    assert down.returncode == 1 and "teardown failed" in down.stdout
    assert s.cloud.existing() == {"example-a100-80gb-0": "up"}
    assert s.cli("down", "--all", "-y").returncode == 0 and not s.cloud.existing()
    assert not s.violations, _violations(s)


def test_the_runner_flags_a_leaked_cluster(scenario):
    s = scenario
    assert s.cli("up", EXAMPLE, "-y", "--rate", "10").returncode == 0
    s.cloud.configure(script={"launch:stray": ["ok"]})
    ChaosBackend(s.state_path).launch(LaunchRequest("stray", {"name": "stray"}))  # a cluster no ledger knows
    s.final_down()
    found = {v.invariant for v in s.violations}
    assert found == {"unknown-cluster", "leak"} and s.leaked == 1

"""The ledger records intent before acting, keeps every transition, refuses unsafe removals and never resets itself."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

import melange_sky.fleet.ledger as ledger_mod
from melange_sky.errors import FleetBusy, LedgerError
from melange_sky.fleet.ledger import Ledger, NewReplica, ReplicaState, Role

PLAN = {"A10G": 2, "cost": 2.02}


def replica(cluster: str, gpu: str = "A10G", **kwargs) -> NewReplica:
    fields = {"offer": "aws/us-east-1/g5.xlarge", "price_per_hour": 1.01, "cloud": "aws", "region": "us-east-1",
              "instance_type": "g5.xlarge", "task": {"resources": {"accelerators": "A10G:1"},
                                                     "secrets": {"HF_TOKEN": None}}}
    fields.update(kwargs)
    return NewReplica(cluster=cluster, gpu=gpu, **fields)


@pytest.fixture
def ledger(tmp_path):
    with Ledger(tmp_path / "home") as db:
        yield db


def test_default_location_follows_melange_sky_home(tmp_path, monkeypatch):
    monkeypatch.setenv("MELANGE_SKY_HOME", str(tmp_path / "elsewhere"))
    with Ledger() as db:
        assert db.path == tmp_path / "elsewhere" / "ledger.db"
        assert db.path.exists()


def test_replica_is_recorded_pending_before_launch_with_everything_a_resolve_needs(ledger):
    ledger.save_fleet("demo", "hash1", PLAN)
    record = ledger.add_replica("demo", replica("demo-a10g-0"))
    assert record.state is ReplicaState.PENDING
    again = ledger.get_replica("demo-a10g-0")
    assert again == record
    assert (again.offer, again.cloud, again.instance_type, again.price_per_hour) == \
        ("aws/us-east-1/g5.xlarge", "aws", "g5.xlarge", 1.01)
    assert again.task == {"resources": {"accelerators": "A10G:1"}, "secrets": {"HF_TOKEN": None}}
    assert ledger.get_fleet("demo").plan == PLAN


def test_every_transition_is_recorded_in_history(ledger):
    ledger.save_fleet("demo", "hash1", PLAN)
    ledger.add_replica("demo", replica("demo-a10g-0"))
    ledger.transition("demo-a10g-0", ReplicaState.LAUNCHING)
    ledger.transition("demo-a10g-0", ReplicaState.UP, endpoint="10.0.0.1:8000")
    ledger.transition("demo-a10g-0", ReplicaState.TERMINATING)
    ledger.transition("demo-a10g-0", ReplicaState.GONE, endpoint=None)
    steps = [(e.old_state, e.new_state) for e in ledger.history(cluster="demo-a10g-0")]
    assert steps == [(None, "pending"), (ReplicaState.PENDING, "launching"), (ReplicaState.LAUNCHING, "up"),
                     (ReplicaState.UP, "terminating"), (ReplicaState.TERMINATING, "gone")]
    assert ledger.get_replica("demo-a10g-0").endpoint is None


def test_failure_reason_is_kept_as_last_error_and_in_history(ledger):
    ledger.save_fleet("demo", "h", PLAN)
    ledger.add_replica("demo", replica("demo-a10g-0"))
    record = ledger.transition("demo-a10g-0", ReplicaState.UNAVAILABLE, error="no capacity in us-east-1")
    assert record.last_error == "no capacity in us-east-1"
    assert ledger.history(cluster="demo-a10g-0")[-1].message == "no capacity in us-east-1"


def test_update_of_unknown_replica_raises(ledger):
    with pytest.raises(LedgerError, match="demo-x-0 is not in the ledger"):
        ledger.transition("demo-x-0", ReplicaState.UP)


def test_duplicate_replica_is_refused_but_a_gone_one_can_be_relaunched(ledger):
    ledger.save_fleet("demo", "h", PLAN)
    ledger.add_replica("demo", replica("demo-a10g-0"))
    with pytest.raises(LedgerError, match="already in the ledger"):
        ledger.add_replica("demo", replica("demo-a10g-0"))
    ledger.transition("demo-a10g-0", ReplicaState.GONE)
    assert ledger.add_replica("demo", replica("demo-a10g-0")).state is ReplicaState.PENDING
    assert len(ledger.replicas("demo")) == 1


def test_secret_values_are_never_written(ledger):
    ledger.save_fleet("demo", "h", PLAN)
    with pytest.raises(LedgerError, match="secret values"):
        ledger.add_replica("demo", replica("demo-a10g-0", task={"secrets": {"HF_TOKEN": "hf_abc"}}))
    assert "hf_abc" not in ledger.path.read_bytes().decode(errors="replace")


def test_fleet_removal_is_refused_while_replicas_remain(ledger):
    ledger.save_fleet("demo", "h", PLAN)
    ledger.add_replica("demo", replica("demo-a10g-0"))
    ledger.add_replica("demo", replica("demo-a10g-1"))
    ledger.transition("demo-a10g-0", ReplicaState.GONE)
    ledger.transition("demo-a10g-1", ReplicaState.FAILED, error="boom")
    with pytest.raises(LedgerError, match=r"demo-a10g-1.*melange-sky down demo"):
        ledger.remove_fleet("demo")
    ledger.transition("demo-a10g-1", ReplicaState.GONE)
    ledger.remove_fleet("demo")
    assert ledger.get_fleet("demo") is None and ledger.replicas("demo") == []
    assert ledger.history(fleet="demo")[-1].new_state == "fleet-removed"


def test_replicas_filter_by_fleet_and_state(ledger):
    ledger.save_fleet("a", "h", PLAN)
    ledger.save_fleet("b", "h", PLAN)
    ledger.add_replica("a", replica("a-a10g-0"))
    ledger.add_replica("a", replica("a-a10g-1"))
    ledger.add_replica("b", replica("b-a10g-0"))
    ledger.transition("a-a10g-1", ReplicaState.UP)
    assert [r.cluster for r in ledger.replicas("a", states=[ReplicaState.UP])] == ["a-a10g-1"]
    assert [r.cluster for r in ledger.replicas()] == ["a-a10g-0", "a-a10g-1", "b-a10g-0"]
    assert ledger.replicas(states=[]) == []
    assert [f.name for f in ledger.fleets()] == ["a", "b"]


def test_concurrent_writers_from_threads_lose_nothing(ledger):
    ledger.save_fleet("demo", "h", PLAN)
    names = [f"demo-a10g-{i}" for i in range(16)]

    def work(name: str) -> None:
        ledger.add_replica("demo", replica(name))
        for state in (ReplicaState.LAUNCHING, ReplicaState.UP):
            ledger.transition(name, state)

    threads = [threading.Thread(target=work, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {r.cluster: r.state for r in ledger.replicas("demo")} == {n: ReplicaState.UP for n in names}
    assert len([e for e in ledger.history(fleet="demo") if e.cluster]) == 3 * len(names)


def test_fleet_lock_refuses_a_second_holder_in_another_process_naming_its_pid(tmp_path):
    home = tmp_path / "home"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from melange_sky.fleet.ledger import Ledger
        with Ledger({str(home)!r}).lock("demo"):
            print("locked", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with Ledger(home) as db:
            with pytest.raises(FleetBusy) as busy:
                db.lock("demo").acquire()
            assert busy.value.pid == holder.pid and str(holder.pid) in str(busy.value)
            with db.lock("other"):  # other fleets are not blocked
                pass
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.wait(timeout=30) == 0
            with db.lock("demo"):  # released when the holder is done
                pass
    finally:
        holder.kill()
        holder.wait()


def test_fleet_lock_is_exclusive_within_one_process_too(ledger):
    with ledger.lock("demo"):
        with pytest.raises(FleetBusy):
            ledger.lock("demo").acquire()
    with ledger.lock("demo"):
        pass


def test_corrupt_database_gives_a_clear_error_and_is_left_alone(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    garbage = b"this is not sqlite at all\n" * 200
    (home / "ledger.db").write_bytes(garbage)
    with pytest.raises(LedgerError, match=r"not a readable SQLite database.*mv .*ledger.db"):
        Ledger(home)
    assert (home / "ledger.db").read_bytes() == garbage


def test_newer_schema_version_is_refused_not_downgraded(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    conn = sqlite3.connect(home / "ledger.db")
    conn.execute("CREATE TABLE future (x)")
    conn.execute(f"PRAGMA user_version = {len(ledger_mod.MIGRATIONS) + 5}")
    conn.commit()
    conn.close()
    with pytest.raises(LedgerError, match="newer than this melange-sky understands.*upgrade"):
        Ledger(home)
    conn = sqlite3.connect(home / "ledger.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(ledger_mod.MIGRATIONS) + 5
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("future",)]


def test_a_version_0_database_is_migrated_to_the_latest_schema_in_wal_mode(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    conn = sqlite3.connect(home / "ledger.db")  # an existing version-0 database: a header, no tables
    conn.execute("VACUUM")
    conn.close()
    with Ledger(home) as db:
        assert db.schema_version == len(ledger_mod.MIGRATIONS)
        db.save_fleet("demo", "h", PLAN)
    conn = sqlite3.connect(home / "ledger.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"fleets", "replicas", "events"} <= tables


def test_an_empty_ledger_file_is_reported_corrupt_not_taken_for_a_new_ledger(tmp_path):
    # SQLite opens a 0-byte file as a new, empty database: that would forget every fleet it listed (and so every
    # cluster still billing). A ledger is made whole before it appears, so an empty one is a lost one.
    home = tmp_path / "home"
    home.mkdir()
    (home / "ledger.db").write_bytes(b"")
    with pytest.raises(LedgerError, match="not a readable SQLite database .*the file is empty"):
        Ledger(home)
    assert (home / "ledger.db").read_bytes() == b""  # left alone


def test_a_new_ledger_appears_whole_even_when_two_processes_make_it_at_once(tmp_path):
    home = tmp_path / "home"
    code = ("import sys; from melange_sky.fleet.ledger import Ledger\n"
            "with Ledger(sys.argv[1]) as db: db.save_fleet(sys.argv[2], 'h', {})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(home), f"f{k}"]) for k in range(4)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    with Ledger(home) as db:
        assert sorted(f.name for f in db.fleets()) == ["f0", "f1", "f2", "f3"]
    assert not list(home.glob(".ledger.db.*"))  # no temporary file left


def test_migrations_are_applied_in_order_on_an_existing_ledger_keeping_its_data(tmp_path, monkeypatch):
    home = tmp_path / "home"
    with Ledger(home) as db:
        db.save_fleet("demo", "h", PLAN)
        db.add_replica("demo", replica("demo-a10g-0"))
    latest = len(ledger_mod.MIGRATIONS)
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [*ledger_mod.MIGRATIONS,
                                                    ("ALTER TABLE replicas ADD COLUMN zone TEXT",),
                                                    ("UPDATE replicas SET zone = 'us-east-1a'",)])
    with Ledger(home) as db:
        assert db.schema_version == latest + 2
        assert db.get_replica("demo-a10g-0").state is ReplicaState.PENDING
    conn = sqlite3.connect(home / "ledger.db")
    assert conn.execute("SELECT zone FROM replicas").fetchall() == [("us-east-1a",)]


def test_a_failing_migration_leaves_the_previous_version_intact(tmp_path, monkeypatch):
    home = tmp_path / "home"
    Ledger(home).close()
    latest = len(ledger_mod.MIGRATIONS)
    monkeypatch.setattr(ledger_mod, "MIGRATIONS", [*ledger_mod.MIGRATIONS,
                                                    ("CREATE TABLE extra (x)", "THIS IS NOT SQL")])
    with pytest.raises(LedgerError, match=f"to schema version {latest + 1} failed.*left at version {latest}"):
        Ledger(home)
    conn = sqlite3.connect(home / "ledger.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == latest
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'extra'").fetchone()[0] == 0


def test_a_compare_and_set_fails_on_a_row_that_left_its_state_and_came_back(ledger):
    # `status --refresh` reads a row, waits on the launcher, then writes its answer. Meanwhile `up` may relaunch
    # the replica (failed -> pending -> launching -> failed): same state, but a cluster now exists.
    ledger.save_fleet("demo", "h", PLAN)
    ledger.add_replica("demo", replica("demo-a10g-0"))
    ledger.transition("demo-a10g-0", ReplicaState.FAILED, error="boom")
    seen = ledger.get_replica("demo-a10g-0")
    for state in (ReplicaState.PENDING, ReplicaState.LAUNCHING, ReplicaState.FAILED):
        ledger.transition("demo-a10g-0", state)
    assert ledger.get_replica("demo-a10g-0").state is seen.state
    assert ledger.transition("demo-a10g-0", ReplicaState.GONE, expect=seen) is None
    assert ledger.get_replica("demo-a10g-0").state is ReplicaState.FAILED
    current = ledger.get_replica("demo-a10g-0")
    assert ledger.transition("demo-a10g-0", ReplicaState.GONE, expect=current).state is ReplicaState.GONE


def test_row_versions_never_repeat_even_when_a_gone_row_is_replaced(ledger):
    ledger.save_fleet("demo", "h", PLAN)
    ledger.add_replica("demo", replica("demo-a10g-0"))
    ledger.transition("demo-a10g-0", ReplicaState.GONE)
    before = ledger.get_replica("demo-a10g-0").version
    ledger.add_replica("demo", replica("demo-a10g-0"))  # the GONE row is replaced by a new one
    assert ledger.get_replica("demo-a10g-0").version > before


def test_a_version_1_ledger_keeps_its_rows_as_replicas_after_the_router_migration(tmp_path):
    conn = sqlite3.connect(tmp_path / "ledger.db")
    for statement in ledger_mod.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO fleets VALUES ('f', 'h', '{}', 0, 0)")
    conn.execute("INSERT INTO replicas (cluster, fleet, gpu, offer, price_per_hour, state, created, updated) "
                 "VALUES ('f-a10g-0', 'f', 'A10G', 'aws', 1.0, 'up', 0, 0)")
    conn.commit()
    conn.close()
    with Ledger(tmp_path) as db:
        assert db.schema_version == len(ledger_mod.MIGRATIONS)
        [row] = db.replicas("f")
        assert (row.cluster, row.role) == ("f-a10g-0", Role.REPLICA)
        assert db.router("f") is None


def test_the_router_is_a_cluster_of_the_fleet_but_never_one_of_its_replicas(ledger):
    ledger.save_fleet("f", "h", {})
    ledger.add_replica("f", NewReplica("f-a10g-0", "A10G", "aws", 1.0))
    ledger.add_replica("f", NewReplica("f-router", "router", "aws:us-east-1:m6i.large", 0.096, role=Role.ROUTER))
    assert [r.cluster for r in ledger.replicas("f")] == ["f-a10g-0"]
    assert [r.cluster for r in ledger.replicas("f", roles=None)] == ["f-a10g-0", "f-router"]
    router = ledger.router("f")
    assert router is not None and router.role is Role.ROUTER and router.state is ReplicaState.PENDING
    with pytest.raises(LedgerError, match="not gone"):  # `down` must remove the router too
        ledger.transition("f-a10g-0", ReplicaState.GONE)
        ledger.remove_fleet("f")


def test_fleet_wide_events_are_kept_in_the_fleets_history_in_order(ledger):
    ledger.save_fleet("f", "h", {})
    first = ledger.record_event("f", "scale-up", "p95 rate 40 req/s needs $12.00/h")
    second = ledger.record_event("f", "drain", "f-a10g-3 left the router")
    kinds = [(e.cluster, e.new_state, e.message) for e in ledger.history(fleet="f") if e.id >= first.id]
    assert kinds == [(None, "scale-up", "p95 rate 40 req/s needs $12.00/h"),
                     (None, "drain", "f-a10g-3 left the router")]
    assert second.id > first.id


def test_a_fleet_events_data_is_kept_as_values_and_read_back_by_kind(ledger):
    ledger.save_fleet("f", "h", {})
    ledger.record_event("f", "need", "12.3457 req/s (p95)", {"rate": 12.345678901, "source": "p95"})
    ledger.record_event("f", "drain", "f-a10g-3 left the router")
    [need] = ledger.history(fleet="f", kind="need")
    assert need.data == {"rate": 12.345678901, "source": "p95"}  # not the message's rounded prose
    assert [e.data for e in ledger.history(fleet="f", kind="drain")] == [None]


def test_need_events_of_a_version_2_ledger_keep_their_rates_as_data_after_the_migration(tmp_path):
    conn = sqlite3.connect(tmp_path / "ledger.db")
    for statement in [*ledger_mod.MIGRATIONS[0], *ledger_mod.MIGRATIONS[1]]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO fleets VALUES ('f', 'h', '{}', 0, 0)")
    rows = [("need", "12.5 req/s (p95 of 3 complete minute(s)): need 12.5 req/s < plan 30 req/s", 1.0),
            ("need", "1e-05 req/s (mean over 40 s (no complete minute yet)): hold", 2.0),
            ("need", "no number here", 3.0),
            ("scale-up", "30 -> 60 req/s: 4 replica(s)", 4.0)]
    conn.executemany("INSERT INTO events (fleet, cluster, old_state, new_state, message, at) "
                     "VALUES ('f', NULL, NULL, ?, ?, ?)", rows)
    conn.commit()
    conn.close()
    with Ledger(tmp_path) as db:
        assert db.schema_version == len(ledger_mod.MIGRATIONS)
        assert [(e.at, e.data) for e in db.history(fleet="f", kind="need")] == [
            (1.0, {"rate": 12.5}), (2.0, {"rate": 1e-05}), (3.0, None)]
        assert [e.data for e in db.history(fleet="f", kind="scale-up")] == [None]


def test_a_version_3_ledger_keeps_its_fleets_without_a_launcher_and_new_ones_record_theirs(tmp_path):
    conn = sqlite3.connect(tmp_path / "ledger.db")
    for statement in [s for migration in ledger_mod.MIGRATIONS[:3] for s in migration]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 3")
    conn.execute("INSERT INTO fleets VALUES ('old', 'h', '{}', 0, 0)")
    conn.commit()
    conn.close()
    with Ledger(tmp_path) as db:
        assert db.schema_version == len(ledger_mod.MIGRATIONS)
        assert db.get_fleet("old").launcher is None  # its commands use the launcher they are given, as before
        db.save_fleet("new", "h", PLAN, launcher={"name": "local", "class": "m:C", "dir": "/x"})
        db.save_fleet("new", "h2", PLAN)  # a re-plan (or an adopted snapshot) keeps the launcher recorded
        assert db.get_fleet("new").launcher == {"name": "local", "class": "m:C", "dir": "/x"}
        assert db.get_fleet("new").config_hash == "h2"

"""The ledger: what melange-sky launched, in SQLite under `$MELANGE_SKY_HOME` (default `~/.melange-sky`).

It owns every SQL statement. A replica is written (PENDING) before its launch is requested and every state change
is appended to `events`, so an interrupted `up` never loses track of a cluster. The schema version lives in
`PRAGMA user_version` and ordered migrations are applied under a file lock; a corrupt file or one written by a newer
melange-sky raises `LedgerError` and is never reset silently. Plans and tasks are JSON text, never pickles.
"""
from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melange_sky.errors import FleetBusy, LedgerError

HOME_ENV_VAR = "MELANGE_SKY_HOME"
DB_NAME = "ledger.db"
BUSY_TIMEOUT_MS = 10_000

__all__ = [
    "Event", "FleetLock", "FleetRecord", "Ledger", "NewReplica", "ReplicaRecord", "ReplicaState", "Role",
    "ledger_home", "running_cost", "safe_name",
]


class ReplicaState(str, enum.Enum):  # noqa: UP042 - members' str() kept as released
    """A replica's life: PENDING (recorded, launch not yet requested) → LAUNCHING → UP, or FAILED (hard error) /
    UNAVAILABLE (no capacity on its offer); STOPPED after autostop (disks kept; `up` restarts it); `down` moves any
    of them through TERMINATING to GONE."""

    PENDING = "pending"
    LAUNCHING = "launching"
    UP = "up"
    STOPPED = "stopped"
    FAILED = "failed"
    UNAVAILABLE = "unavailable"
    TERMINATING = "terminating"
    GONE = "gone"

    @property
    def may_have_cluster(self) -> bool:
        """Whether a cloud cluster may exist for this state (so `down` must tear it down)."""
        return self is not ReplicaState.GONE

    @property
    def billing(self) -> bool:
        """Whether its instance may be billing (a stopped one costs disks only; pending and gone ones nothing)."""
        return self in (ReplicaState.UP, ReplicaState.LAUNCHING, ReplicaState.TERMINATING, ReplicaState.FAILED)

    @property
    def in_flight(self) -> bool:
        """Whether a launch or teardown may be running in the process holding the fleet's lock: only that process
        records what becomes of it."""
        return self in (ReplicaState.PENDING, ReplicaState.LAUNCHING, ReplicaState.TERMINATING)

    @property
    def not_serving(self) -> bool:
        """Whether it may bill without serving: torn down when a re-plan leaves it out. (Stopped replicas are not:
        they cost disks only, and the user may want them back.)"""
        return self in (ReplicaState.PENDING, ReplicaState.LAUNCHING, ReplicaState.FAILED, ReplicaState.UNAVAILABLE)

    @property
    def cluster_uncertain(self) -> bool:
        """Whether a launch was requested and did not come up, so only the launcher knows if a cluster exists (what
        an interrupted `up` asks it before recording)."""
        return self in (ReplicaState.LAUNCHING, ReplicaState.FAILED)


class Role(enum.StrEnum):
    """What a cluster of the fleet does: a REPLICA serves the model on GPUs; the ROUTER (one per fleet, a small CPU
    instance) is the fleet's endpoint. Both bill and both are torn down by `down`; only replicas are routed to."""

    REPLICA = "replica"
    ROUTER = "router"


# Ordered migrations: MIGRATIONS[i] takes the schema from version i to i + 1. Append only; never edit a shipped one.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        """CREATE TABLE fleets (
            name TEXT PRIMARY KEY,
            config_hash TEXT NOT NULL,
            plan TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL)""",
        """CREATE TABLE replicas (
            cluster TEXT PRIMARY KEY,
            fleet TEXT NOT NULL REFERENCES fleets(name),
            gpu TEXT NOT NULL,
            offer TEXT NOT NULL,
            cloud TEXT,
            region TEXT,
            instance_type TEXT,
            use_spot INTEGER NOT NULL DEFAULT 0,
            price_per_hour REAL NOT NULL,
            round INTEGER NOT NULL DEFAULT 0,
            task TEXT,
            state TEXT NOT NULL,
            endpoint TEXT,
            last_error TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL)""",
        "CREATE INDEX replicas_by_fleet ON replicas(fleet)",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            fleet TEXT NOT NULL,
            cluster TEXT,
            old_state TEXT,
            new_state TEXT NOT NULL,
            message TEXT NOT NULL DEFAULT '',
            at REAL NOT NULL)""",
        "CREATE INDEX events_by_cluster ON events(cluster)",
    ),
    # 2: the fleet's router is a cluster of its own, recorded like a replica (written before its launch, every
    # change in history) but never routed to.
    ("ALTER TABLE replicas ADD COLUMN role TEXT NOT NULL DEFAULT 'replica'",),
    # 3: a fleet event may carry data (a JSON object) beside its message, for what a later reader needs as values: a
    # controller's need observations keep their rate as a number (the scale-down hold), not as prose to parse. Need
    # events recorded before keep theirs: the rate their message starts with ("12.5 req/s (p95 of ...)").
    ("ALTER TABLE events ADD COLUMN data TEXT",
     "UPDATE events SET data = '{\"rate\": ' || CAST(substr(message, 1, instr(message, ' req/s') - 1) AS REAL) || '}' "
     "WHERE cluster IS NULL AND new_state = 'need' AND message GLOB '[0-9]*' AND instr(message, ' req/s') > 1"),
    # 4: the launcher a fleet was brought up with (a JSON object: its name, its class, what reaches it again, e.g. the
    # local launcher's state directory), so `status`, `down` and `watch` ask that launcher, never another that would
    # take its clusters for gone. Fleets recorded before keep NULL: the launcher the command is given, as before.
    ("ALTER TABLE fleets ADD COLUMN launcher TEXT",),
]


def ledger_home() -> Path:
    """`$MELANGE_SKY_HOME`, else `~/.melange-sky` (read at call time, so tests and users can redirect it)."""
    return Path(os.environ.get(HOME_ENV_VAR) or Path.home() / ".melange-sky").expanduser()


@dataclass(frozen=True)
class FleetRecord:
    """A fleet's ledger row: the digest of the config it was planned from and its last plan (JSON)."""

    name: str
    config_hash: str
    plan: dict[str, Any]
    created: float
    updated: float
    #: The launcher it was brought up with (`fleet.launchers.launcher_record`); None for a fleet recorded before
    #: launchers were (schema 3 and older).
    launcher: dict[str, Any] | None = None


@dataclass(frozen=True)
class NewReplica:
    """What the fleet knows about a replica before launching it. `offer` labels the catalog offer (for re-solving
    without it); `task` is the rendered SkyPilot task with secret *names* only (values are refused).

    Kept apart from `deploy.plan.ReplicaPlan` so the ledger writes rows without depending on the planner (no YAML,
    file name or solver column), and from `ReplicaRecord` because a launch has not given it a state yet."""

    cluster: str
    gpu: str
    offer: str
    price_per_hour: float
    cloud: str | None = None
    region: str | None = None
    instance_type: str | None = None
    use_spot: bool = False
    round: int = 0
    task: Mapping[str, Any] | None = None
    role: Role = Role.REPLICA


@dataclass(frozen=True)
class ReplicaRecord:
    """A replica's ledger row: what was planned (`NewReplica`'s fields) plus what its launch made of it."""

    cluster: str
    fleet: str
    gpu: str
    offer: str
    cloud: str | None
    region: str | None
    instance_type: str | None
    use_spot: bool
    price_per_hour: float
    round: int
    task: dict[str, Any] | None
    state: ReplicaState
    endpoint: str | None
    last_error: str | None
    created: float
    updated: float
    #: The id of the row's latest history event: it grows with every write, and never repeats (not even when a
    #: GONE row is replaced), so a writer that does not hold the fleet's lock can compare-and-set on it.
    version: int = 0
    role: Role = Role.REPLICA

    @property
    def url(self) -> str | None:
        """The base URL to reach it while it is up at a known endpoint (a backend's "host:port", or a URL)."""
        if self.state is not ReplicaState.UP or not self.endpoint:
            return None
        return self.endpoint if "://" in self.endpoint else f"http://{self.endpoint}"

    def to_dict(self) -> dict[str, Any]:
        """The row as `--json` prints it (no task: it is in the plan)."""
        return {"cluster": self.cluster, "fleet": self.fleet, "gpu": self.gpu, "offer": self.offer,
                "cloud": self.cloud, "region": self.region, "instance_type": self.instance_type,
                "use_spot": self.use_spot, "price_per_hour": self.price_per_hour, "state": self.state.value,
                "endpoint": self.endpoint, "last_error": self.last_error, "round": self.round,
                "created": self.created, "updated": self.updated, "role": self.role.value}


def running_cost(replicas: Iterable[ReplicaRecord]) -> float:
    """$/h of the replicas that may be billing for instances (disks of stopped ones aside)."""
    return sum(r.price_per_hour for r in replicas if r.state.billing)


@dataclass(frozen=True)
class Event:
    """One recorded transition; old_state is None when the replica (or fleet, cluster None) was created."""

    id: int
    fleet: str
    cluster: str | None
    old_state: ReplicaState | None
    new_state: str
    message: str
    at: float
    data: Mapping[str, Any] | None = None  # what a fleet event records as values (`Ledger.record_event`)


class _Unset:
    pass


_UNSET: Any = _Unset()


def safe_name(name: str) -> str:
    """`name` as a file name (a fleet's lock or key file): anything but letters, digits, `.`, `_`, `-` is `_`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


class FleetLock:
    """An exclusive, process-wide lock on one fleet (`fcntl.flock` on `locks/<fleet>.lock`, which holds the pid).
    The kernel drops it when the holder exits, so a crashed `up` never leaves the fleet locked."""

    def __init__(self, path: Path, fleet: str):
        self.path = path
        self.fleet = fleet
        self._fd: int | None = None

    def acquire(self) -> FleetLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FleetBusy(self.fleet, int(holder) if holder.isdigit() else None) from None
            raise LedgerError(f"cannot lock fleet {self.fleet!r} ({self.path}): {exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FleetLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Ledger:
    """The ledger database. One connection shared by all threads behind a lock: writes are tiny and serialised
    anyway, and SQLite's busy timeout covers other processes (e.g. `status` while `up` runs)."""

    def __init__(self, home: str | os.PathLike[str] | None = None):
        self.home = Path(home) if home is not None else ledger_home()
        self.path = self.home / DB_NAME
        self._lock = threading.RLock()
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LedgerError(f"cannot create the ledger directory {self.home}: {exc.strerror}; set "
                              f"{HOME_ENV_VAR} to a writable directory") from exc
        self._conn = self._open()

    # -- opening, checking and migrating ------------------------------------------------------------------------
    def _corrupt(self, exc: BaseException) -> LedgerError:
        return LedgerError(f"the ledger {self.path} is not a readable SQLite database ({exc}); move it aside "
                           f"(mv {self.path} {self.path}.bad) and rerun: melange-sky starts an empty ledger, and "
                           f"clusters it had launched are still listed by `sky status`")

    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():
            self._create()
        elif self.path.stat().st_size == 0:  # SQLite would take it for a new database: it never is one (`_create`)
            raise self._corrupt(sqlite3.DatabaseError("the file is empty"))
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise self._corrupt(exc) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            check = conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check[0] if check else 'no answer'}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._corrupt(exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _create(self) -> None:
        """Make a new ledger in a temporary file and link it into place once it is whole, so a ledger file that
        exists is never legitimately empty or half made (an empty one is a lost ledger, not a new one)."""
        tmp = self.home / f".{DB_NAME}.{os.getpid()}.{threading.get_ident()}.new"
        tmp.unlink(missing_ok=True)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                self._migrate(conn)
            finally:
                conn.close()
            try:
                os.link(tmp, self.path)
            except FileExistsError:  # another process made it first: use theirs
                pass
        except (OSError, sqlite3.Error) as exc:
            raise LedgerError(f"cannot create the ledger {self.path}: {exc}; set {HOME_ENV_VAR} to a writable "
                              f"directory") from exc
        finally:
            tmp.unlink(missing_ok=True)

    def _check_version(self, version: int) -> None:
        if version > len(MIGRATIONS):
            raise LedgerError(f"the ledger {self.path} has schema version {version}, newer than this melange-sky "
                              f"understands ({len(MIGRATIONS)}); upgrade melange-sky (pip install -U melange-sky) "
                              f"or point {HOME_ENV_VAR} elsewhere")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Apply the missing migrations in order, each in its own transaction, under an inter-process file lock."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        self._check_version(version)
        if version == len(MIGRATIONS):
            return
        with open(self.home / ".ledger-migrate.lock", "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have migrated
            self._check_version(version)
            for target in range(version + 1, len(MIGRATIONS) + 1):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[target - 1]:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {target}")
                    conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    conn.execute("ROLLBACK")
                    raise LedgerError(f"upgrading the ledger {self.path} to schema version {target} failed "
                                      f"({exc}); it was left at version {target - 1}. Please report this") from exc
                except BaseException:  # a Ctrl-C may land before BEGIN took effect or after COMMIT did
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn.in_transaction:  # left open by a Ctrl-C that landed between an earlier BEGIN and its try
                self._conn.execute("ROLLBACK")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cursor = self._conn.execute(sql, params)
            cursor.row_factory = sqlite3.Row
            return cursor.fetchall()

    # -- fleets -------------------------------------------------------------------------------------------------
    def lock(self, fleet: str) -> FleetLock:
        """The fleet's exclusive lock, to use as `with ledger.lock(name):`; entering raises FleetBusy if another
        process (or another lock object) holds it."""
        return FleetLock(self.home / "locks" / f"{safe_name(fleet)}.lock", fleet)

    def save_fleet(self, name: str, config_hash: str, plan: Mapping[str, Any],
                   launcher: Mapping[str, Any] | None = None) -> FleetRecord:
        """Create the fleet, or update its config hash and plan (a re-run `up` may re-plan). `launcher`: the launcher
        it is brought up with (None keeps the one recorded)."""
        now = time.time()
        plan_json = json.dumps(plan, sort_keys=True)
        launcher_json = json.dumps(dict(launcher), sort_keys=True) if launcher is not None else None
        with self._tx() as conn:
            existed = conn.execute("SELECT 1 FROM fleets WHERE name = ?", (name,)).fetchone() is not None
            conn.execute("INSERT INTO fleets (name, config_hash, plan, created, updated, launcher) "
                         "VALUES (?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET config_hash = excluded.config_hash, plan = excluded.plan, "
                         "updated = excluded.updated, launcher = COALESCE(excluded.launcher, fleets.launcher)",
                         (name, config_hash, plan_json, now, now, launcher_json))
            conn.execute("INSERT INTO events (fleet, cluster, old_state, new_state, message, at) "
                         "VALUES (?, NULL, NULL, ?, ?, ?)",
                         (name, "fleet-updated" if existed else "fleet-created", f"config {config_hash}", now))
        record = self.get_fleet(name)
        assert record is not None
        return record

    def get_fleet(self, name: str) -> FleetRecord | None:
        rows = self._query("SELECT * FROM fleets WHERE name = ?", (name,))
        return _fleet(rows[0]) if rows else None

    def fleets(self) -> list[FleetRecord]:
        return [_fleet(row) for row in self._query("SELECT * FROM fleets ORDER BY name")]

    def remove_fleet(self, name: str) -> None:
        """Forget a fleet and its replica rows (history stays). Refused while any replica is not GONE."""
        now = time.time()
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM fleets WHERE name = ?", (name,)).fetchone() is None:
                raise LedgerError(f"no fleet {name!r} in the ledger {self.path}")
            left = [row[0] for row in conn.execute(
                "SELECT cluster FROM replicas WHERE fleet = ? AND state != ? ORDER BY cluster",
                (name, ReplicaState.GONE.value))]
            if left:
                raise LedgerError(f"fleet {name!r} still has {len(left)} replica(s) not gone ({', '.join(left)}); "
                                  f"run `melange-sky down {name}` first")
            conn.execute("DELETE FROM replicas WHERE fleet = ?", (name,))
            conn.execute("DELETE FROM fleets WHERE name = ?", (name,))
            conn.execute("INSERT INTO events (fleet, cluster, old_state, new_state, message, at) "
                         "VALUES (?, NULL, NULL, 'fleet-removed', '', ?)", (name, now))

    # -- replicas -----------------------------------------------------------------------------------------------
    def add_replica(self, fleet: str, replica: NewReplica, message: str = "") -> ReplicaRecord:
        """Record a replica as PENDING — call this before requesting its launch. A GONE row of the same cluster
        name is replaced; any other existing row raises LedgerError (never a duplicate)."""
        now = time.time()
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM fleets WHERE name = ?", (fleet,)).fetchone() is None:
                raise LedgerError(f"no fleet {fleet!r} in the ledger; save_fleet() it first")
            row = conn.execute("SELECT state FROM replicas WHERE cluster = ?", (replica.cluster,)).fetchone()
            old = None
            if row is not None:
                if row[0] != ReplicaState.GONE.value:
                    raise LedgerError(f"replica {replica.cluster} is already in the ledger (state {row[0]})")
                old = row[0]
                conn.execute("DELETE FROM replicas WHERE cluster = ?", (replica.cluster,))
            _insert_replica(conn, fleet, replica, _task_json(replica), ReplicaState.PENDING, None, None, now)
            self._event(conn, fleet, replica.cluster, old, ReplicaState.PENDING.value, message, now)
        return self._replica_or_raise(replica.cluster)

    def transition(self, cluster: str, state: ReplicaState, *, message: str = "", endpoint: Any = _UNSET,
                   error: Any = _UNSET, expect: ReplicaRecord | None = None) -> ReplicaRecord | None:
        """Move a replica to `state`, recording the change in history. `endpoint` / `error` are updated when given
        (None clears them). Raises LedgerError if the replica is not in the ledger. With `expect`, the row as the
        caller read it (a compare-and-set for writers that do not hold the fleet's lock), nothing is written and
        None is returned unless the row is still that version: not merely in the same state, which a row can leave
        and come back to (failed -> pending -> launching -> failed) while the caller waited on the launcher."""
        state = ReplicaState(state)
        now = time.time()
        with self._tx() as conn:
            row = conn.execute(f"SELECT fleet, state, {_VERSION} FROM replicas WHERE cluster = ?",
                               (cluster,)).fetchone()
            if expect is not None and (row is None or row[2] != expect.version):
                return None
            if row is None:
                raise LedgerError(f"replica {cluster} is not in the ledger {self.path}")
            sets, params = ["state = ?", "updated = ?"], [state.value, now]
            if endpoint is not _UNSET:
                sets.append("endpoint = ?")
                params.append(endpoint)
            if error is not _UNSET:
                sets.append("last_error = ?")
                params.append(error)
            cursor = conn.execute(f"UPDATE replicas SET {', '.join(sets)} WHERE cluster = ?", (*params, cluster))
            if cursor.rowcount != 1:  # pragma: no cover - guarded by the SELECT in the same transaction
                raise LedgerError(f"replica {cluster}: update matched {cursor.rowcount} rows")
            self._event(conn, row[0], cluster, row[1], state.value, message or (error if isinstance(error, str)
                                                                                 else ""), now)
        return self._replica_or_raise(cluster)

    def replan_replica(self, fleet: str, replica: NewReplica, message: str = "") -> ReplicaRecord:
        """Reuse an existing, not-up row of `fleet` for a new launch attempt: back to PENDING with the new plan's
        offer, price, round and task (a re-plan may move it to another offer). Raises LedgerError if the row is
        missing, belongs to another fleet, or is UP."""
        now = time.time()
        with self._tx() as conn:
            row = conn.execute("SELECT fleet, state FROM replicas WHERE cluster = ?", (replica.cluster,)).fetchone()
            if row is None:
                raise LedgerError(f"replica {replica.cluster} is not in the ledger {self.path}")
            if row[0] != fleet:
                raise LedgerError(f"cluster {replica.cluster} belongs to fleet {row[0]!r}, not {fleet!r}")
            if row[1] == ReplicaState.UP.value:
                raise LedgerError(f"replica {replica.cluster} is up; refusing to re-plan it")
            conn.execute(
                "UPDATE replicas SET gpu = ?, offer = ?, cloud = ?, region = ?, instance_type = ?, use_spot = ?, "
                "price_per_hour = ?, round = ?, task = ?, state = ?, endpoint = NULL, last_error = NULL, updated = ? "
                "WHERE cluster = ?",
                (replica.gpu, replica.offer, replica.cloud, replica.region, replica.instance_type,
                 int(replica.use_spot), float(replica.price_per_hour), replica.round, _task_json(replica),
                 ReplicaState.PENDING.value, now, replica.cluster))
            self._event(conn, fleet, replica.cluster, row[1], ReplicaState.PENDING.value,
                        message or f"re-planned on {replica.offer}", now)
        return self._replica_or_raise(replica.cluster)

    def adopt_replica(self, fleet: str, replica: NewReplica, state: ReplicaState, *, endpoint: str | None = None,
                      error: str | None = None, message: str = "", as_of: float | None = None) -> ReplicaRecord | None:
        """Write a row as another ledger has it (the fleet's hosted controller's, or the user's for the controller):
        created, or overwritten with the other's offer, task, state and endpoint, one history event. None when the
        row already says the same, or (`as_of`: when the other ledger last knew the row to be so) when this
        ledger's row was written later: an older view never overwrites a newer one (a replica this machine saw die
        is not brought back "up" by a snapshot taken before). The row written is dated `as_of` (never later than
        now), the time of what it says. Refused for a cluster of another fleet."""
        task_json = _task_json(replica)
        now = time.time()
        state = ReplicaState(state)
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM fleets WHERE name = ?", (fleet,)).fetchone() is None:
                raise LedgerError(f"no fleet {fleet!r} in the ledger; save_fleet() it first")
            row = conn.execute("SELECT fleet, state, endpoint, offer, task, last_error, updated FROM replicas "
                               "WHERE cluster = ?", (replica.cluster,)).fetchone()
            if row is not None and row[0] != fleet:
                raise LedgerError(f"cluster {replica.cluster} belongs to fleet {row[0]!r}, not {fleet!r}")
            if row is not None and tuple(row[1:6]) == (state.value, endpoint, replica.offer, task_json, error):
                return None
            if row is not None and as_of is not None and row[6] > as_of:
                return None
            conn.execute("DELETE FROM replicas WHERE cluster = ?", (replica.cluster,))
            _insert_replica(conn, fleet, replica, task_json, state, endpoint, error, now,
                            updated=min(now, as_of) if as_of is not None else None)
            self._event(conn, fleet, replica.cluster, row[1] if row is not None else None, state.value, message, now)
        return self._replica_or_raise(replica.cluster)

    @staticmethod
    def exists(home: str | os.PathLike[str] | None = None) -> bool:
        """Whether a ledger database is there (so read-only commands can avoid creating one)."""
        return (Path(home) if home is not None else ledger_home()).joinpath(DB_NAME).exists()

    def get_replica(self, cluster: str) -> ReplicaRecord | None:
        rows = self._query(f"{_REPLICAS} WHERE cluster = ?", (cluster,))
        return _replica(rows[0]) if rows else None

    def replicas(self, fleet: str | None = None, states: Iterable[ReplicaState] | None = None,
                 roles: Iterable[Role] | None = (Role.REPLICA,)) -> list[ReplicaRecord]:
        """Clusters of one fleet (or all), ordered by fleet then name: by default its replicas only (`roles=None`:
        its router too), optionally only in the given states."""
        sql, params = f"{_REPLICAS} WHERE 1 = 1", []
        if roles is not None:
            wanted_roles = [Role(r).value for r in roles]
            sql += f" AND role IN ({', '.join('?' for _ in wanted_roles)})" if wanted_roles else " AND 0"
            params.extend(wanted_roles)
        if fleet is not None:
            sql += " AND fleet = ?"
            params.append(fleet)
        if states is not None:
            wanted = [ReplicaState(s).value for s in states]
            sql += f" AND state IN ({', '.join('?' for _ in wanted)})" if wanted else " AND 0"
            params.extend(wanted)
        return [_replica(row) for row in self._query(sql + " ORDER BY fleet, cluster", params)]

    def router(self, fleet: str) -> ReplicaRecord | None:
        """The fleet's router cluster, if it has one in the ledger (gone ones included)."""
        rows = self.replicas(fleet, roles=(Role.ROUTER,))
        return rows[0] if rows else None

    def record_event(self, fleet: str, kind: str, message: str, data: Mapping[str, Any] | None = None) -> Event:
        """A fleet-wide action (a scale-up, a drain, a push of routes, a refused plan) in the fleet's history, with
        no cluster: what a controller did and why, for `status`; `data` (JSON-able values) is what the next pass
        reads back (a need's rate, for the scale-down hold): read as data, never parsed out of `message`."""
        now = time.time()
        stored = dict(data) if data is not None else None
        with self._tx() as conn:
            cursor = conn.execute("INSERT INTO events (fleet, cluster, old_state, new_state, message, at, data) "
                                  "VALUES (?, NULL, NULL, ?, ?, ?, ?)",
                                  (fleet, kind, message, now,
                                   json.dumps(stored, sort_keys=True) if stored is not None else None))
            event_id = int(cursor.lastrowid or 0)
        return Event(event_id, fleet, None, None, kind, message, now, stored)

    def history(self, *, fleet: str | None = None, cluster: str | None = None,
                kind: str | None = None) -> list[Event]:
        """Recorded transitions, oldest first; with `kind`, only the fleet events of that kind (`record_event`)."""
        sql, params = "SELECT * FROM events WHERE 1 = 1", []
        if fleet is not None:
            sql += " AND fleet = ?"
            params.append(fleet)
        if cluster is not None:
            sql += " AND cluster = ?"
            params.append(cluster)
        if kind is not None:
            sql += " AND cluster IS NULL AND new_state = ?"
            params.append(kind)
        return [Event(row["id"], row["fleet"], row["cluster"],
                      ReplicaState(row["old_state"]) if row["old_state"] else None, row["new_state"],
                      row["message"], row["at"], _event_data(row["data"]))
                for row in self._query(sql + " ORDER BY id", params)]

    # -- helpers ------------------------------------------------------------------------------------------------
    @staticmethod
    def _event(conn: sqlite3.Connection, fleet: str, cluster: str, old: str | None, new: str, message: str,
               at: float) -> None:
        conn.execute("INSERT INTO events (fleet, cluster, old_state, new_state, message, at) VALUES (?, ?, ?, ?, ?, ?)",
                     (fleet, cluster, old, new, message, at))

    def _replica_or_raise(self, cluster: str) -> ReplicaRecord:
        record = self.get_replica(cluster)
        if record is None:  # pragma: no cover - written in the same call
            raise LedgerError(f"replica {cluster} vanished from the ledger")
        return record



def _task_json(replica: NewReplica) -> str | None:
    task = _storable_task(replica)
    return json.dumps(task, sort_keys=True) if task is not None else None


def _insert_replica(conn: sqlite3.Connection, fleet: str, replica: NewReplica, task_json: str | None,
                    state: ReplicaState, endpoint: str | None, error: str | None, now: float,
                    updated: float | None = None) -> None:
    """One replica row, every column (add_replica's PENDING row, adopt_replica's copy of another ledger's, dated
    `updated` when given)."""
    conn.execute(
        "INSERT INTO replicas (cluster, fleet, gpu, offer, cloud, region, instance_type, use_spot, "
        "price_per_hour, round, task, state, endpoint, last_error, created, updated, role) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (replica.cluster, fleet, replica.gpu, replica.offer, replica.cloud, replica.region, replica.instance_type,
         int(replica.use_spot), float(replica.price_per_hour), replica.round, task_json, state.value, endpoint,
         error, now, now if updated is None else updated, Role(replica.role).value))

def _storable_task(replica: NewReplica) -> dict[str, Any] | None:
    """The replica's task as the ledger keeps it; one carrying secret values is refused (they stay in memory)."""
    task = dict(replica.task) if replica.task is not None else None
    secrets = (task or {}).get("secrets") or {}
    if isinstance(secrets, Mapping) and any(value is not None for value in secrets.values()):
        raise LedgerError(f"{replica.cluster}: refusing to store a task with secret values in the ledger; "
                          f"render `secrets:` with null values and pass the values at launch")
    return task


def _event_data(text: str | None) -> dict[str, Any] | None:
    """An event's data column as written by `record_event` (a JSON object), else None."""
    if text is None:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _fleet(row: sqlite3.Row) -> FleetRecord:
    launcher = _event_data(row["launcher"])  # a JSON object, else None (as an event's data)
    return FleetRecord(row["name"], row["config_hash"], json.loads(row["plan"]), row["created"], row["updated"],
                       launcher)


#: A replica's version: its latest history event's id (events are never deleted while a row exists).
_VERSION = "(SELECT COALESCE(MAX(id), 0) FROM events WHERE events.cluster = replicas.cluster) AS version"
_REPLICAS = f"SELECT *, {_VERSION} FROM replicas"


def _replica(row: sqlite3.Row) -> ReplicaRecord:
    return ReplicaRecord(
        cluster=row["cluster"], fleet=row["fleet"], gpu=row["gpu"], offer=row["offer"], cloud=row["cloud"],
        region=row["region"], instance_type=row["instance_type"], use_spot=bool(row["use_spot"]),
        price_per_hour=row["price_per_hour"], round=row["round"],
        task=json.loads(row["task"]) if row["task"] is not None else None, state=ReplicaState(row["state"]),
        endpoint=row["endpoint"], last_error=row["last_error"], created=row["created"], updated=row["updated"],
        version=row["version"], role=Role(row["role"]))

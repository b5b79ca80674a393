"""One root error class and a few specific ones, so the CLI can map each to an exit code and a one-line message."""
from __future__ import annotations


class MelangeError(Exception):
    """Root of every error melange-sky raises on purpose; its message is meant for the user as is."""

    exit_code = 1


class ConfigError(MelangeError):
    """The config (or a command-line override of it) is wrong; the message names the file and the field."""

    exit_code = 2

    def __init__(self, source: str, field: str | None, message: str):
        self.source = source
        self.field = field
        self.message = message
        where = f"{source}: {field}: " if field else f"{source}: "
        super().__init__(where + message)


class InfeasibleAllocation(MelangeError):
    """No GPU fleet satisfies the constraints (e.g. `max_count` limits leave too little capacity)."""

    exit_code = 2


class SolverError(MelangeError):
    """The MILP solver could not be run or gave no usable answer (missing binary, time limit without a solution)."""

    exit_code = 2


class AllocationCheckError(MelangeError):
    """A solved allocation failed its own post-solve check: a bug in melange-sky, never a user error."""

    exit_code = 1


class OutputError(MelangeError):
    """A result could not be written where the user asked (missing directory, no permission)."""

    exit_code = 2


class BackendError(MelangeError):
    """A launch backend failed to answer (status, endpoint, teardown) in a way we cannot use."""

    exit_code = 1


class UnknownBackend(BackendError):
    """`--backend`/`MELANGE_SKY_BACKEND` names no installed backend, or one that cannot be loaded."""

    exit_code = 2


class InvalidTask(MelangeError):
    """A rendered SkyPilot task failed validation; the message says which check and what SkyPilot said."""

    exit_code = 2


class LaunchError(MelangeError):
    """A replica's launch failed (no enabled cloud, bad credentials, provisioning error); `cluster` names it."""

    exit_code = 1

    def __init__(self, cluster: str, reason: str):
        self.cluster = cluster
        self.reason = reason
        super().__init__(f"{cluster}: {reason}")


class CapacityError(LaunchError):
    """The offer had no capacity (SkyPilot's ResourcesUnavailableError): re-solve without it rather than give up."""


class LaunchCancelled(LaunchError):
    """The launch was cancelled (Ctrl-C) before it finished; the cluster may exist half-provisioned."""


class LedgerError(MelangeError):
    """The ledger database is unusable (corrupt, written by a newer melange-sky) or an update found no row."""

    exit_code = 1


class FleetBusy(MelangeError):
    """Another melange-sky process holds this fleet's lock (a concurrent `up` or `down`); `pid` names it."""

    exit_code = 3

    def __init__(self, fleet: str, pid: int | None):
        self.fleet = fleet
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"fleet {fleet!r} is busy: {holder} is running `up` or `down` on it; wait for it to "
                         f"finish or stop it, then retry")


class TemplateError(MelangeError):
    """A task template cannot be found, has a syntax error, uses an undefined variable or renders invalid YAML."""

    exit_code = 2


class TraceError(MelangeError):
    """A request trace cannot be read, or one of its rows is broken; the message names the file and line."""

    exit_code = 2


class BucketEdgesError(MelangeError):
    """Bucket edges given on the command line are not at least 2 increasing token counts."""

    exit_code = 2


class ProfileError(MelangeError):
    """Profiling an endpoint cannot start (bad endpoint URL, unknown model, config/bucket mismatch)."""

    exit_code = 2


class EndpointUnreachable(ProfileError):
    """Nothing answers at the endpoint URL given to `profile` (refused, unknown host, timed out)."""

    exit_code = 2


class CatalogError(MelangeError):
    """A GPU, cloud or instance type the price catalog does not know, or a catalog file that cannot be read."""

    exit_code = 2


class MissingSecret(MelangeError):
    """A secret the replicas need (deployment.secrets, e.g. HF_TOKEN) is not set in the environment."""

    exit_code = 2


class UnknownFleet(MelangeError):
    """A command named a fleet the ledger does not have."""

    exit_code = 2


class ProfileFailed(ProfileError):
    """No bucket could be measured: nothing worth writing into a config."""

    exit_code = 1


class ServeError(MelangeError):
    """The router cannot start as asked: a config without usable bucket edges, a bad --replica, a fleet without a
    plan, a public --host without an API key, a routes document that does not validate."""

    exit_code = 2


class RouterError(MelangeError):
    """A running router refused an admin call (a routes push, a routes read) or could not be reached; the message
    names the router and the reason, never the admin token."""

    exit_code = 1


class CallFailed(MelangeError):
    """An HTTP call (`inputs.http.Client`) got no answer, or an error status: `status` (None without an answer) and
    a one-line `reason`. Callers that know what the endpoint is turn it into their own error saying what to do."""

    exit_code = 1

    def __init__(self, target: str, reason: str, status: int | None = None):
        self.target = target  # "GET https://host/workload": what was called, never with credentials
        self.reason = reason
        self.status = status
        super().__init__(f"{target}: {reason}")


class ControllerError(MelangeError):
    """`watch` cannot run as asked: another controller holds the fleet, autoscaling without a router to read the
    workload from."""

    exit_code = 2


class LauncherMismatch(MelangeError):
    """`--backend`/`MELANGE_SKY_BACKEND` names another launcher than the one a fleet was brought up with: that one
    would not know its clusters (and would take them for gone while they run and bill)."""

    exit_code = 2

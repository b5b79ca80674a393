"""Options shared by several commands, and the small helpers their callbacks share (warnings, confirmation)."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import click

from melange_sky.cli.main import warn
from melange_sky.core.config import load_config, with_overrides
from melange_sky.deploy.offers import catalog_pricer
from melange_sky.deploy.plan import DEFAULT_MAX_REPLICAS, PlanSettings, deployment_from_config
from melange_sky.solver.model import SolverOptions


@dataclass(frozen=True)
class SolveArgs:
    """The options every command that solves shares (solve, plan, up)."""

    formulation: str
    solver_name: str
    solver_path: str | None
    time_limit: float
    headroom: float | None
    rate: float | None
    max_replicas: int = DEFAULT_MAX_REPLICAS

    def load(self, path: str, name: str | None = None):
        """The config at `path` with the command's overrides; its `deployment` block checked too (a misspelt key
        there is an error for `solve` as for `up`)."""
        config = with_overrides(load_config(path, price=catalog_pricer()), rate=self.rate, headroom=self.headroom)
        deployment_from_config(config)
        if name:
            config = dataclasses.replace(config, name=name)
        warn(config.warnings)
        return config

    @property
    def solver(self):
        return SolverOptions(name="cbc" if self.solver_path else self.solver_name, path=self.solver_path,
                             time_limit=self.time_limit)


def solve_options(command):
    """Add the solve options to a command; it receives them as one `solve_args: SolveArgs`."""
    options = [
        click.option("--formulation", type=click.Choice(["auto", "slices", "paper", "split"]), default="auto",
                     show_default=True, help="slices: the paper's optimum at the config's slice_factor (fast form); "
                     "paper: the paper's literal ILP, for cross-checking; split: buckets divided among GPU types in "
                     "any proportion (never dearer); auto: slices, or split under a `spot` block (where markets make "
                     "slices slow to prove)."),
        click.option("--solver", "solver_name", type=click.Choice(["highs", "cbc"]), default="highs",
                     show_default=True, help="MILP solver: HiGHS, or CBC (PuLP's bundled binary, or --solver-path)."),
        click.option("--solver-path", type=click.Path(dir_okay=False, path_type=str),
                     help="A CBC binary to use (implies --solver cbc), e.g. /opt/homebrew/opt/cbc/bin/cbc."),
        click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
                     help="Seconds the solver may search; if it stops early it reports the best fleet and the "
                          "proven gap."),
        click.option("--headroom", type=float, help="Highest planned utilisation of any GPU, in (0, 1] (overrides "
                                                    "the config's `headroom`; default 1)."),
        click.option("--rate", type=float, help="Total request rate in req/s (overrides `total_request_rate`)."),
        click.option("--max-replicas", type=click.IntRange(min=1), default=DEFAULT_MAX_REPLICAS, show_default=True,
                     help="Most replicas (instances) the fleet may have: a larger one is an error before anything "
                          "is written or launched."),
    ]

    @functools.wraps(command)
    def wrapper(*args, formulation, solver_name, solver_path, time_limit, headroom, rate, max_replicas, **kwargs):
        if solver_path and solver_name != "cbc" and _given("solver_name"):
            raise click.UsageError(f"--solver-path names a CBC binary, and --solver {solver_name} runs HiGHS "
                                   f"through highspy (no binary): drop --solver-path, or use --solver cbc")
        solve_args = SolveArgs(formulation, solver_name, solver_path, time_limit, headroom, rate, max_replicas)
        return command(*args, solve_args=solve_args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def _given(param: str) -> bool:
    """Whether the user set `param` (on the command line or by its environment variable), not Click's default."""
    source = click.get_current_context().get_parameter_source(param)
    return source not in (None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)


def warn_time_limit(result, solve_args: SolveArgs) -> None:
    if result.status != "optimal":
        warn([f"the solver hit --time-limit {solve_args.time_limit:g} s before proving this fleet optimal"])


def bucket_edge_options(config_default: str | None):
    """--input-buckets / --output-buckets, shared by `workload`, `profile` and `replay`. `config_default` names the
    option whose config's edges a command takes when none are given ("--into"); None where it takes none."""
    def default(edges: str) -> str:
        melange = f"Mélange's {edges}"
        return f"default: those of the config ({config_default}), else {melange}" if config_default \
            else f"default: {melange}"

    def decorate(command):
        command = click.option("--output-buckets", metavar="EDGES", help=f"Output-length bucket edges in tokens "
                               f"({default('1,25,100,250,500,1000,2000')}).")(command)
        return click.option("--input-buckets", metavar="EDGES", help=f"Input-length bucket edges in tokens, "
                            f"comma-separated ({default('1,25,100,250,500,1000,2000,4000,8000')}).")(command)

    return decorate


def per_offer_option(command):
    """--per-offer, shared by `solve`, `plan` and `up` (so `solve` shows the fleet `plan` makes)."""
    return click.option("--per-offer", is_flag=True, help="Make every (GPU, offer) pair its own column in the solve, "
                        "so quotas (gpu_info.<GPU>.quotas) spread the fleet across clouds and regions.")(command)


def plan_options(command):
    """Options shared by `plan` and `up`: how a config becomes replicas."""
    options = [
        per_offer_option,
        click.option("--template", metavar="NAME|PATH", help="Task template: vllm (default), sglang, or a Jinja "
                     "file of your own (overrides deployment.template)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def plan_settings(solve_args: SolveArgs, per_offer: bool, template: str | None, compare: bool = True):
    return PlanSettings(formulation=solve_args.formulation, solver=solve_args.solver, per_offer=per_offer,
                        template=template, compare=compare, max_replicas=solve_args.max_replicas)


def backend_option(command):
    return click.option("--backend", metavar="NAME|MODULE:CLASS", help="Launcher to use (default: skypilot, or "
                        "$MELANGE_SKY_BACKEND): a `melange_sky.backends` entry point or a module:Class path.")(command)

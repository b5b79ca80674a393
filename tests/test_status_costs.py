"""`status` says which $/h is which (the replicas running, the plan at its offers, the router apart), and who
relaunches a missing replica: `up`/`watch`, or a hosted controller at its next pass (QA2 6, 8)."""
from __future__ import annotations

import dataclasses

from test_fleet_cli import EXAMPLE, UP, fleet_env  # noqa: F401 - the fixture

from melange_sky.cli.text import format_status
from melange_sky.fleet.fleet import Fleet
from melange_sky.fleet.ledger import Ledger
from melange_sky.fleet.reports import ControllerView


def _status_after_a_replica_died(cli, fake, env):
    assert cli(*UP, EXAMPLE, "-y").exit_code == 0
    fake.remove_cluster("example-a10g-1")
    assert cli("status", "example", "--refresh").exit_code == 0  # records it gone
    with Ledger(env["MELANGE_SKY_HOME"]) as ledger:
        return Fleet(None, ledger).status_report("example")


def test_status_labels_the_replicas_running_cost_and_the_plans(cli, fleet_env):  # noqa: F811
    fake, env = fleet_env
    text = format_status(_status_after_a_replica_died(cli, fake, env))
    first = text.splitlines()[0]
    assert first.startswith("Fleet example: 3/4 up, $5.69/h serving ($4,154/month; replicas $5.69/h running, "
                            "plan $6.70/h at its offers), $")  # no router: nothing said about one
    assert "not yet replaced: example-a10g-1; `melange-sky up` (or `watch`) relaunches them" in text


def test_a_hosted_controllers_fleet_says_the_controller_relaunches_at_its_next_pass_not_watch(cli, fleet_env):  # noqa: F811
    fake, env = fleet_env
    report = _status_after_a_replica_died(cli, fake, env)
    healthy = ControllerView(mode="hosted", host="example-router", interval=60.0, last_pass_at=1.0, healthy=True,
                             age=20.0)
    text = format_status(dataclasses.replace(report, controllers={"example": healthy}))
    assert "not yet replaced: example-a10g-1; the hosted controller relaunches them (its next pass in about 40 s)" \
        in text and "watch" not in text
    stale = dataclasses.replace(healthy, healthy=False, reason="no pass for 400 s (every 60 s expected)")
    text = format_status(dataclasses.replace(report, controllers={"example": stale}))
    assert ("the hosted controller relaunches them, but it is unhealthy: no pass for 400 s (every 60 s expected); "
            "`melange-sky up` does it too") in text

"""A router that one bad client cannot take down (issue 21): requests that fail on every replica ("queries of death")
eject no one and are tried at most twice; ejections are capped per GPU type; retries draw on a budget."""
from __future__ import annotations

import asyncio
import copy
import json
import random
from collections import Counter

import aiohttp
from fake_openai_upstream import Fleet
from test_serve_e2e import post, run
from test_serve_policy import DOC, body

from melange_sky.serve.outliers import OutlierDetector, OutlierSettings, RetryBudget
from melange_sky.serve.policy import Replica, Rotation, SizeAwarePolicy
from melange_sky.serve.routes import parse_routes
from melange_sky.serve.tokens import Kind, Sizer

#: The issue's fleet: two A10G and one A100-80GB replica.
THREE = {"a10g-0": "A10G", "a10g-1": "A10G", "a100-0": "A100-80GB"}


def poison(row: int = 0) -> dict:
    """A request every replica answers with a plain-text 500 (the fake server fails on a max_tokens that is no
    integer, as the server of the issue did)."""
    return {**body(Kind.CHAT, row, None), "max_tokens": "abc"}


def poison_tries(fleet: Fleet) -> int:
    return sum(1 for u in fleet.upstreams.values() for r in u.requests if r.get("max_tokens") == "abc")


def ejected(fleet: Fleet) -> list[str]:
    return sorted(name for name, r in fleet.router.replicas.items() if r.ejected)


def test_four_bad_requests_in_a_row_eject_no_one_and_the_valid_ones_after_them_are_all_served():
    async def scenario():
        async with Fleet(DOC, THREE) as fleet, aiohttp.ClientSession() as session:
            for _ in range(4):
                status, _, raw = await post(session, fleet.url, Kind.CHAT, poison())
                error = json.loads(raw)["error"]
                assert status == 502, raw
                assert "HTTP 500" in error["message"] and "Server got itself in trouble" in error["message"]
            assert poison_tries(fleet) <= 2 * 4
            assert ejected(fleet) == []
            for i in range(20):
                status, _, raw = await post(session, fleet.url, Kind.CHAT, body(Kind.CHAT, i % 3, i % 2))
                assert status == 200, raw

    run(scenario)


def test_bad_requests_mixed_with_valid_traffic_fail_no_valid_request_and_are_tried_at_most_twice():
    async def scenario():
        async with Fleet(DOC, THREE) as fleet, aiohttp.ClientSession() as session:
            limit = asyncio.Semaphore(12)
            outcomes: list[tuple[bool, int]] = []

            async def one(i: int) -> None:
                bad = i % 5 == 0
                data = poison(i % 3) if bad else body(Kind.CHAT, i % 3, i % 2)
                async with limit:
                    status, _, _ = await post(session, fleet.url, Kind.CHAT, data)
                outcomes.append((bad, status))

            await asyncio.gather(*(one(i) for i in range(150)))
            bad = [s for b, s in outcomes if b]
            valid = [s for b, s in outcomes if not b]
            assert len(bad) == 30 and set(bad) == {502}
            assert len(valid) == 120 and valid.count(200) == 120
            assert poison_tries(fleet) <= 2 * 30
            assert ejected(fleet) == []

    run(scenario)


def test_a_burst_of_failing_requests_gets_only_the_retries_the_budget_allows():
    async def scenario():
        async with Fleet(DOC, THREE) as fleet, aiohttp.ClientSession() as session:
            first, second = asyncio.Event(), asyncio.Event()
            for upstream in fleet.upstreams.values():
                upstream.status, upstream.hold = 500, first
            burst = [asyncio.create_task(post(session, fleet.url, Kind.CHAT, body(Kind.CHAT, 0, 0)))
                     for _ in range(10)]
            await until(lambda: sum(u.held for u in fleet.upstreams.values()) == 10, "ten first tries held")
            for upstream in fleet.upstreams.values():
                upstream.hold = second
            first.set()  # ten 500s at once: 10 in flight, 20% of them is 2, the floor 3: three retries
            await until(lambda: sum(u.held for u in fleet.upstreams.values()) == 3, "three retries held")
            assert fleet.router.budget.active == 3
            second.set()
            answers = await asyncio.gather(*burst)
            assert [status for status, _, _ in answers] == [502] * 10
            messages = [json.loads(raw)["error"]["message"] for _, _, raw in answers]
            assert sum("retry budget is spent" in m for m in messages) == 7
            assert sum("two replicas answered it with a 5xx" in m for m in messages) == 3
            assert sum(len(u.requests) for u in fleet.upstreams.values()) == 13
            assert fleet.router.budget.active == 0 and ejected(fleet) == []
            metrics = await (await session.get(fleet.url + "/metrics")).text()
            assert "melange_retry_budget_exhausted_total 7.0" in metrics
            assert 'melange_poison_requests_total{bucket="0:0"} 3.0' in metrics

    run(scenario)


def test_a_dead_replica_is_taken_out_at_once_even_the_only_one_of_its_type_and_gets_nothing_more():
    async def scenario():
        async with Fleet(DOC, THREE, dead=("a100-0",), eject_base_s=60) as fleet, \
                aiohttp.ClientSession() as session:
            for _ in range(20):  # bucket 1:1 is planned on A100-80GB alone; A10G can serve it
                status, headers, _ = await post(session, fleet.url, Kind.CHAT, body(Kind.CHAT, 1, 1))
                assert status == 200 and headers["X-Melange-Gpu"] == "A10G"
            health = await (await session.get(fleet.url + "/health")).json()
            assert health["gpus"]["A100-80GB"] == {"planned": 1, "replicas": 1, "available": 0, "down": 1}
            dead = fleet.router.replicas["a100-0"]
            assert dead.down and dead.ejected and dead.served == 1
            assert fleet.router.outliers.allowed("A100-80GB") == 1
            metrics = await (await session.get(fleet.url + "/metrics")).text()
            assert 'melange_ejections_total{gpu="A100-80GB",reason="unreachable"} 1.0' in metrics
            assert 'melange_ejected_replicas{gpu="A100-80GB",reason="unreachable"} 1.0' in metrics

    run(scenario)


def test_replicas_that_fail_every_request_are_ejected_no_more_than_the_cap_and_the_rest_still_serve():
    async def scenario():
        replicas = {f"a10g-{i}": "A10G" for i in range(3)} | {"l4-0": "L4"}
        async with Fleet(DOC, replicas, eject_base_s=60) as fleet, aiohttp.ClientSession() as session:
            for name in ("a10g-0", "a10g-1", "a10g-2"):
                fleet.upstreams[name].status = 500
            statuses = [(await post(session, fleet.url, Kind.CHAT, body(Kind.CHAT, 0, 0)))[0] for _ in range(40)]
            # bucket 0:0 is A10G .5, L4 .5: every request an A10G fails is served by the L4 replica
            assert statuses == [200] * 40
            out = ejected(fleet)
            assert len([n for n in out if n.startswith("a10g")]) == fleet.router.outliers.allowed("A10G") == 1
            capped = sum(r.capped for r in fleet.router.replicas.values())
            metrics = await (await session.get(fleet.url + "/metrics")).text()
            assert capped > 0
            assert f'melange_ejections_capped_total{{gpu="A10G",reason="consecutive_5xx"}} {capped}.0' in metrics
            assert 'melange_ejected_replicas{gpu="A10G",reason="outlier"} 1.0' in metrics

    run(scenario)


async def until(condition, what: str) -> None:
    """Poll a condition; the hang guard of `run` ends a wait that never comes true."""
    while not condition():
        await asyncio.sleep(0.005)


# ---- the pure parts: the detector, the budget, the panic threshold ---------------------------------------------------
def detector(gpus: dict[str, int], **settings) -> tuple[OutlierDetector, dict[str, list[Replica]]]:
    replicas = {g: [Replica(f"{g}-{i}", g, f"http://{g}-{i}") for i in range(n)] for g, n in gpus.items()}
    found = OutlierDetector(OutlierSettings(**{"base_s": 1, "max_s": 8, **settings}))
    found.track([r for rs in replicas.values() for r in rs])
    return found, replicas


def test_the_cap_is_a_share_of_the_type_and_never_below_one():
    found, _ = detector({"A10G": 1, "L4": 2, "T4": 10, "A100": 25})
    assert [found.allowed(g) for g in ("A10G", "L4", "T4", "A100")] == [1, 1, 1, 2]
    found, _ = detector({"L4": 3}, max_ejection_percent=50)
    assert found.allowed("L4") == 1


def test_gateway_failures_eject_after_two_in_a_row_within_the_cap_and_unreachable_ones_always():
    found, replicas = detector({"L4": 3})
    a, b, c = replicas["L4"]
    assert found.gateway_failure(a, "the server closed the connection", 0.0) is None
    found.answered(a)  # a run ends with an answer
    assert found.gateway_failure(a, "reset", 0.0) is None
    ejection = found.gateway_failure(a, "reset", 0.0)
    assert ejection is not None and ejection.reason == "consecutive_gateway_failure" and a.ejected and not a.down
    assert found.gateway_failure(b, "timed out", 0.0) is None
    for _ in range(4):  # the cap (1 of 3) is reached: b keeps serving, its ejections counted as capped
        assert found.gateway_failure(b, "timed out", 0.0).capped  # type: ignore[union-attr]
    assert not b.ejected and b.capped == 4
    ejection = found.unreachable(c, "cannot connect: Connection refused", 0.0)  # a fact: no cap
    assert ejection is not None and ejection.reason == "unreachable" and c.down and c.ejected
    assert found.rotation.out == 2 and found.ejected("L4") == 1


def test_a_5xx_counts_only_when_confirmed_and_three_in_a_row_eject():
    found, replicas = detector({"A10G": 2})
    a = replicas["A10G"][0]
    assert found.confirmed_5xx(a, "HTTP 500", 0.0) is None
    assert found.confirmed_5xx(a, "HTTP 500", 0.0) is None
    found.answered(a)
    assert found.confirmed_5xx(a, "HTTP 500", 0.0) is None
    assert found.confirmed_5xx(a, "HTTP 500", 0.0) is None
    ejection = found.confirmed_5xx(a, "HTTP 500", 0.0)
    assert ejection is not None and ejection.reason == "consecutive_5xx" and a.ejected


def test_probes_back_off_per_ejection_and_the_count_is_forgiven_after_a_quiet_spell():
    found, replicas = detector({"A10G": 2})
    a = replicas["A10G"][0]
    assert found.unreachable(a, "refused", 100.0).probe_in_s == 1  # type: ignore[union-attr]
    assert not found.probed(a, False, "GET /health: HTTP 503", 101.0)
    assert a.retry_at == 103.0 and a.last_error == "GET /health: HTTP 503"
    assert not found.probed(a, False, None, 103.0)
    assert a.retry_at == 107.0
    assert not found.probed(a, False, None, 107.0)
    assert a.retry_at == 115.0  # capped at max_s 8
    assert found.probed(a, True, None, 115.0) and not a.ejected and not a.down and found.rotation.out == 0
    # ejected again soon after: the wait keeps growing (a flapping replica stays out longer each time)
    assert found.unreachable(a, "refused", 116.0).probe_in_s == 8  # type: ignore[union-attr]
    assert found.probed(a, True, None, 124.0)
    # after max_s of service without an ejection, it starts afresh
    assert found.unreachable(a, "refused", 200.0).probe_in_s == 1  # type: ignore[union-attr]


def test_the_retry_budget_is_a_share_of_the_requests_in_flight_with_a_floor():
    budget = RetryBudget(percent=20, min_concurrent=3)
    assert [budget.acquire(in_flight=5) for _ in range(4)] == [True, True, True, False]
    assert budget.acquire(in_flight=20)  # 20% of 20 is 4
    assert not budget.acquire(in_flight=20)
    budget.release()
    assert budget.acquire(in_flight=20) and budget.active == 4


def panic_policy(replicas: dict[str, str]) -> SizeAwarePolicy:
    doc = copy.deepcopy(DOC)
    doc["replicas"] = [{"name": n, "gpu": g, "url": f"http://{n}"} for n, g in replicas.items()]
    routes = parse_routes(doc)
    return SizeAwarePolicy(routes, [Replica(r.name, r.gpu, r.url) for r in routes.replicas], Sizer(),
                           random.Random(0), panic_percent=50, rotation=Rotation(1))


def test_below_the_panic_threshold_ejections_are_ignored_but_down_replicas_never_get_traffic():
    # bucket 2:1 is served by A100-80GB alone (A10G and L4 cannot): a lane of three replicas
    policy = panic_policy({"a100-0": "A100-80GB", "a100-1": "A100-80GB", "a100-2": "A100-80GB"})
    target = policy.target(body(Kind.COMPLETIONS, 2, 1), Kind.COMPLETIONS)
    a, b, c = policy.replicas
    a.ejected = True  # 2 of 3 healthy: ejections trusted
    picks = [policy.choose(target) for _ in range(30)]
    assert {p.replica.name for p in picks} == {"a100-1", "a100-2"} and not any(p.panic for p in picks)
    b.ejected = True  # 1 of 3 healthy (33% < 50%): panic, every replica takes its part again
    picks = [policy.choose(target) for _ in range(30)]
    assert all(p.panic for p in picks)
    assert set(Counter(p.replica.name for p in picks)) == {"a100-0", "a100-1", "a100-2"}  # random ties
    a.down = True  # down: out of the count and of the traffic; 1 of 2 reachable healthy is 50%: no panic
    picks = [policy.choose(target) for _ in range(10)]
    assert {p.replica.name for p in picks} == {"a100-2"} and not any(p.panic for p in picks)


def test_when_too_few_replicas_are_healthy_the_router_ignores_ejections_and_still_serves():
    async def scenario():
        a100s = {f"a100-{i}": "A100-80GB" for i in range(3)}  # bucket 2:1 is served by A100-80GB alone
        async with Fleet(DOC, a100s, max_ejection_percent=100, eject_base_s=60) as fleet, \
                aiohttp.ClientSession() as session:
            async def complete() -> int:
                return (await post(session, fleet.url, Kind.COMPLETIONS, body(Kind.COMPLETIONS, 2, 1)))[0]

            for name in ("a100-0", "a100-1"):  # one broken replica after the other: each failed try is retried
                fleet.upstreams[name].status = 500  # on a healthy one, which confirms it, until it is ejected
                for _ in range(40):
                    assert await complete() == 200
                    if fleet.router.replicas[name].ejected:
                        break
            assert ejected(fleet) == ["a100-0", "a100-1"]  # 1 of 3 healthy: below the panic threshold (50%)
            health = await (await session.get(fleet.url + "/health")).json()
            assert (health["status"], health["available"], health["ejected"], health["down"]) == ("ok", 1, 2, 0)
            for upstream in fleet.upstreams.values():
                upstream.status = None  # they recover; their next probe is a minute away
            before = {n: len(u.requests) for n, u in fleet.upstreams.items()}
            assert [await complete() for _ in range(12)] == [200] * 12
            # in panic the ejected replicas take their part of the traffic again, rather than a100-2 taking it all
            assert all(len(u.requests) > before[n] for n, u in fleet.upstreams.items())
            metrics = await (await session.get(fleet.url + "/metrics")).text()
            assert 'melange_panic_routed_total{bucket="2:1"} 12.0' in metrics

    run(scenario)

"""The router end to end, in one event loop: a real aiohttp router in front of fake OpenAI servers on 127.0.0.1.

Nothing here waits on a clock to decide an outcome: streams are held and released with events, and the few polls
(for a probe to re-admit a replica) only guard against a hang."""
from __future__ import annotations

import asyncio
import json
import random
from collections import Counter

import aiohttp
import pytest
from fake_openai_upstream import Fleet, FakeUpstream
from prometheus_client.parser import text_string_to_metric_families
from test_serve_policy import DOC, body

from melange_sky.serve.tokens import Kind

REPLICAS = {"a10g-0": "A10G", "a10g-1": "A10G", "l4-0": "L4", "l4-1": "L4", "a100-0": "A100-80GB"}
HANG_GUARD_S = 60


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_S))


async def post(session: aiohttp.ClientSession, url: str, kind: Kind, data: dict, **kwargs):
    path = "/v1/completions" if kind is Kind.COMPLETIONS else "/v1/chat/completions"
    async with session.post(url + path, json=data, **kwargs) as response:
        return response.status, dict(response.headers), await response.read()


async def until(condition, what: str) -> None:
    """Poll a condition; the hang guard of the test ends a wait that never comes true."""
    while not condition():
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("kind", list(Kind))
def test_completions_and_chat_follow_the_plan_shares_within_5_percent_over_2000_requests(kind):
    async def scenario():
        async with Fleet(DOC, REPLICAS) as fleet, aiohttp.ClientSession() as session:
            cells = [(i, j) for i in range(3) for j in range(2)]
            weights = [DOC["workload_distribution"][i][j] for i, j in cells]
            rng = random.Random(3)
            plan = [rng.choices(cells, weights)[0] for _ in range(2000)]
            limit = asyncio.Semaphore(32)
            served: dict[str, Counter] = {f"{i}:{j}": Counter() for i, j in cells}

            async def one(cell):
                async with limit:
                    status, headers, raw = await post(session, fleet.url, kind, body(kind, *cell))
                assert status == 200, raw
                assert headers["X-Melange-Bucket"] == f"{cell[0]}:{cell[1]}"
                answer = json.loads(raw)
                assert answer["gpu"] == headers["X-Melange-Gpu"]
                served[headers["X-Melange-Bucket"]][answer["gpu"]] += 1

            await asyncio.gather(*(one(cell) for cell in plan))
            for route in DOC["routing"]:
                label = f"{route['bucket'][0]}:{route['bucket'][1]}"
                total = sum(served[label].values())
                for gpu in DOC["gpus"]:
                    share = served[label][gpu] / total
                    assert abs(share - route["shares"].get(gpu, 0.0)) <= 0.05, (label, served[label])
            received = Counter()
            for name, upstream in fleet.upstreams.items():
                received[REPLICAS[name]] += len(upstream.requests)
            assert sum(received.values()) == 2000
            assert len(fleet.upstreams["a10g-0"].requests) > 0 and len(fleet.upstreams["a10g-1"].requests) > 0

    run(scenario)


def test_a_stream_reaches_the_client_event_by_event_before_the_upstream_finishes():
    async def scenario():
        async with Fleet(DOC, {"a100-0": "A100-80GB"}) as fleet, aiohttp.ClientSession() as session:
            upstream = fleet.upstreams["a100-0"]
            upstream.gate = asyncio.Event()
            data = {**body(Kind.CHAT, 1, 1), "stream": True, "max_tokens": 3}
            async with session.post(fleet.url + "/v1/chat/completions", json=data) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/event-stream")
                first = await response.content.readuntil(b"\n\n")
                # the first event is here while the upstream is still held before its second one
                assert json.loads(first[len(b"data: "):])["choices"][0]["delta"] == {"content": "tok "}
                assert upstream.streams_finished == 0 and not upstream.gate.is_set()
                upstream.gate.set()
                rest = await response.read()
            assert rest.count(b"data: ") == 3 and rest.endswith(b"data: [DONE]\n\n")
            assert upstream.streams_finished == 1

    run(scenario)


def test_a_stream_cut_after_it_began_ends_with_an_error_event_and_is_not_generated_twice():
    async def scenario():
        async with Fleet(DOC, {"a100-0": "A100-80GB", "a100-1": "A100-80GB"}) as fleet, \
                aiohttp.ClientSession() as session:
            for upstream in fleet.upstreams.values():
                upstream.cut = True
            data = {**body(Kind.COMPLETIONS, 1, 1), "stream": True}
            status, _, raw = await post(session, fleet.url, Kind.COMPLETIONS, data)
            assert status == 200
            events = [e for e in raw.split(b"\n\n") if e]
            assert json.loads(events[0][6:])["choices"][0]["text"] == "tok "
            error = json.loads(events[-2][6:])["error"]
            assert error["type"] == "server_error" and "failed" in error["message"]
            assert events[-1] == b"data: [DONE]"
            assert sum(len(u.requests) for u in fleet.upstreams.values()) == 1  # no second generation

    run(scenario)


def test_a_failure_before_any_byte_is_retried_on_another_replica_and_three_in_a_row_eject_it():
    async def scenario():
        # ejected for a minute: its /health answers 200, and a probe must not re-admit it before the end
        async with Fleet(DOC, {"a100-0": "A100-80GB", "a100-1": "A100-80GB"}, eject_base_s=60) as fleet, \
                aiohttp.ClientSession() as session:
            broken = fleet.upstreams["a100-0"]
            broken.status = 500
            for stream in (False, True) * 10:
                status, headers, raw = await post(session, fleet.url, Kind.COMPLETIONS,
                                                  {**body(Kind.COMPLETIONS, 1, 1), "stream": stream})
                assert status == 200, raw
            # three 500s in a row, each to a request the other replica then served, eject it
            assert len(broken.requests) == 3
            assert fleet.router.replicas["a100-0"].ejected
            assert any("ejected a100-0 (A100-80GB" in line and "HTTP 500" in line and "consecutive_5xx" in line
                       for line in fleet.logs)
            metrics = await (await session.get(fleet.url + "/metrics")).text()
            assert 'melange_retries_total{gpu="A100-80GB"} 3.0' in metrics
            assert 'melange_upstream_errors_total{gpu="A100-80GB",kind="status_5xx",replica="a100-0"} 3.0' in metrics
            assert 'melange_ejections_total{gpu="A100-80GB",reason="consecutive_5xx"} 1.0' in metrics
            assert 'melange_ejected_replicas{gpu="A100-80GB",reason="outlier"} 1.0' in metrics

    run(scenario)


def test_a_type_with_no_healthy_replica_spills_to_types_that_can_serve_the_bucket():
    async def scenario():
        replicas = {"a10g-0": "A10G", "l4-0": "L4", "a100-0": "A100-80GB"}
        async with Fleet(DOC, replicas, dead=("a100-0",)) as fleet, aiohttp.ClientSession() as session:
            gpus = Counter()
            for _ in range(20):  # bucket 1:1 is planned on A100-80GB alone
                status, headers, _ = await post(session, fleet.url, Kind.CHAT, body(Kind.CHAT, 1, 1))
                assert status == 200
                gpus[headers["X-Melange-Gpu"]] += 1
            assert gpus == {"A10G": 10, "L4": 10}
            routes = await (await session.get(fleet.url + "/routes")).json()
            state = {r["name"]: r for r in routes["replicas"]}
            assert state["a100-0"]["state"] == "down" and "Connection refused" in state["a100-0"]["last_error"]
            metrics = await (await session.get(fleet.url + "/metrics")).text()
            assert 'melange_spills_total{bucket="1:1",gpu="A10G"} 10.0' in metrics

    run(scenario)


def test_no_replica_able_to_serve_the_bucket_gives_503_with_the_reason():
    async def scenario():
        async with Fleet(DOC, {"a10g-0": "A10G", "a100-0": "A100-80GB"}, dead=("a100-0",)) as fleet, \
                aiohttp.ClientSession() as session:
            status, _, raw = await post(session, fleet.url, Kind.COMPLETIONS, body(Kind.COMPLETIONS, 2, 1))
            # the first attempt found the refused connection: its 502 is the answer (nothing else can serve 2:1)
            assert status == 502 and "cannot connect" in json.loads(raw)["error"]["message"]
            status, _, raw = await post(session, fleet.url, Kind.COMPLETIONS, body(Kind.COMPLETIONS, 2, 1))
            error = json.loads(raw)["error"]
            assert status == 503 and error["type"] == "service_unavailable"
            assert "bucket 2:1" in error["message"] and "A10G cannot serve it (tputs 0)" in error["message"]
            assert "L4 has no replica" not in error["message"]  # L4 cannot serve 2:1: named as such
            assert "L4 cannot serve it" in error["message"]

    run(scenario)


def test_clients_without_the_right_key_get_401_and_replicas_get_the_upstream_key():
    async def scenario():
        async with Fleet(DOC, {"a100-0": "A100-80GB"}, api_key="client-key",
                         upstream_api_key="replica-key") as fleet, aiohttp.ClientSession() as session:
            data = body(Kind.COMPLETIONS, 1, 1)
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "client-key"},
                            {"Authorization": "Basic client-key"}):
                status, _, raw = await post(session, fleet.url, Kind.COMPLETIONS, data, headers=headers)
                assert status == 401
                assert json.loads(raw)["error"]["code"] == "invalid_api_key"
            for path in ("/metrics", "/routes", "/workload", "/v1/models"):
                assert (await session.get(fleet.url + path)).status == 401
            assert (await session.get(fleet.url + "/health")).status == 200
            status, _, _ = await post(session, fleet.url, Kind.COMPLETIONS, data,
                                      headers={"Authorization": "Bearer client-key"})
            assert status == 200  # the fake replica requires "Bearer replica-key": the router sent that
            assert not any("client-key" in line or "replica-key" in line for line in fleet.logs)

    run(scenario)


def test_metrics_parse_as_prometheus_text():
    async def scenario():
        async with Fleet(DOC, {"a10g-0": "A10G", "a100-0": "A100-80GB"}, dead=("a10g-0",)) as fleet, \
                aiohttp.ClientSession() as session:
            for kind in Kind:
                for stream in (False, True):
                    status, _, _ = await post(session, fleet.url, kind, {**body(kind, 0, 0), "stream": stream})
                    assert status == 200
            response = await session.get(fleet.url + "/metrics")
            assert response.headers["Content-Type"].startswith("text/plain")
            families = {f.name: f for f in text_string_to_metric_families(await response.text())}
            for name in ("melange_requests", "melange_in_flight", "melange_replica_up", "melange_upstream_errors",
                         "melange_retries", "melange_spills", "melange_added_latency_seconds",
                         "melange_prompt_tokens_estimated", "melange_prompt_tokens_reported",
                         "melange_prompt_token_correction"):
                assert name in families, name
            requests = {tuple(sorted(s.labels.items())): s.value for s in families["melange_requests"].samples
                        if s.name == "melange_requests_total"}
            assert requests == {(("bucket", "0:0"), ("gpu", "A100-80GB"), ("status", "200")): 4.0}
            up = {s.labels["replica"]: s.value for s in families["melange_replica_up"].samples}
            assert up == {"a10g-0": 0.0, "a100-0": 1.0}

    run(scenario)


def test_models_health_routes_and_the_observed_workload():
    async def scenario():
        async with Fleet(DOC, {"a10g-0": "A10G", "a100-0": "A100-80GB"}) as fleet, \
                aiohttp.ClientSession() as session:
            fleet.upstreams["a100-0"].model = "other-model"
            models = await (await session.get(fleet.url + "/v1/models")).json()
            assert sorted(m["id"] for m in models["data"]) == ["other-model", "test-model"]
            health = await (await session.get(fleet.url + "/health")).json()
            assert health["status"] == "ok" and health["available"] == 2
            assert health["gpus"]["L4"] == {"planned": 2, "replicas": 0, "available": 0, "down": 0}
            # reported usage: non-streaming, and a stream that asked for usage; a stream without usage is estimated
            await post(session, fleet.url, Kind.COMPLETIONS, body(Kind.COMPLETIONS, 0, 0))
            await post(session, fleet.url, Kind.COMPLETIONS, {**body(Kind.COMPLETIONS, 1, 1), "stream": True,
                                                              "stream_options": {"include_usage": True}})
            await post(session, fleet.url, Kind.CHAT, {**body(Kind.CHAT, 2, 0), "stream": True})
            workload = await (await session.get(fleet.url + "/workload")).json()
            assert workload["counts"] == [[1, 0], [0, 1], [1, 0]]
            assert workload["usage_source"] == {"reported": 2, "estimated": 1}
            assert workload["input_buckets"] == DOC["input_buckets"] and workload["arrivals"] == 3
            routes = await (await session.get(fleet.url + "/routes")).json()
            assert routes["routing"] == DOC["routing"]
            assert {r["name"]: r["served"] for r in routes["replicas"]} == {"a10g-0": 1, "a100-0": 2}

    run(scenario)


def test_a_client_that_disconnects_cancels_its_upstream_request():
    async def scenario():
        async with Fleet(DOC, {"a100-0": "A100-80GB"}) as fleet:
            upstream = fleet.upstreams["a100-0"]
            upstream.gate = asyncio.Event()  # never set: the stream hangs after its first event
            session = aiohttp.ClientSession()
            response = await session.post(fleet.url + "/v1/completions",
                                          json={**body(Kind.COMPLETIONS, 1, 1), "stream": True})
            await response.content.readuntil(b"\n\n")
            response.close()  # drop the connection mid-stream
            await session.close()
            await upstream.disconnected.wait()  # the router closed the upstream connection in turn
            await until(lambda: fleet.router.in_flight == 0, "router idle")
            assert fleet.router.replicas["a100-0"].in_flight == 0 and upstream.streams_finished == 0

    run(scenario)


def test_an_ejected_replica_is_probed_at_health_and_readmitted():
    async def scenario():
        async with Fleet(DOC, {"a10g-0": "A10G", "a100-0": "A100-80GB"}) as fleet, \
                aiohttp.ClientSession() as session:
            a100 = fleet.upstreams["a100-0"]
            port = int(a100.url.rsplit(":", 1)[1])
            await a100.stop()
            status, headers, _ = await post(session, fleet.url, Kind.COMPLETIONS, body(Kind.COMPLETIONS, 1, 1))
            assert status == 200 and headers["X-Melange-Gpu"] == "A10G"  # retried on the other type
            replica = fleet.router.replicas["a100-0"]
            assert replica.ejected
            revived = FakeUpstream("A100-80GB", "a100-0")
            fleet.upstreams["a100-0"] = revived
            await revived.start(port)
            await until(lambda: not replica.ejected, "re-admitted")
            assert revived.health_checks >= 1
            assert any("re-admitted a100-0" in line for line in fleet.logs)
            status, headers, _ = await post(session, fleet.url, Kind.COMPLETIONS, body(Kind.COMPLETIONS, 1, 1))
            assert headers["X-Melange-Gpu"] == "A100-80GB"

    run(scenario)


def test_swapping_the_routes_keeps_requests_in_flight_on_a_removed_replica():
    async def scenario():
        async with Fleet(DOC, {"a100-0": "A100-80GB", "a100-1": "A100-80GB"}) as fleet, \
                aiohttp.ClientSession() as session:
            held = fleet.upstreams["a100-0"]
            held.gate = asyncio.Event()
            fleet.router.replicas["a100-1"].in_flight = 1  # so the first stream goes to a100-0
            stream = asyncio.create_task(post(session, fleet.url, Kind.COMPLETIONS,
                                              {**body(Kind.COMPLETIONS, 1, 1), "stream": True}))
            await held.first_event.wait()
            fleet.router.replicas["a100-1"].in_flight = 0
            routes = fleet.router.routes
            changes = fleet.router.swap(routes.with_replicas(r for r in routes.replicas if r.name != "a100-0"))
            assert changes == [f"- a100-0 (A100-80GB) {held.url}, draining 1 request(s) in flight"]
            for _ in range(5):
                status, headers, raw = await post(session, fleet.url, Kind.COMPLETIONS, body(Kind.COMPLETIONS, 1, 1))
                assert json.loads(raw)["served_by"] == "a100-1"
            held.gate.set()
            status, _, raw = await stream
            assert status == 200 and raw.endswith(b"data: [DONE]\n\n") and held.streams_finished == 1

    run(scenario)


def test_bad_requests_get_openai_shaped_errors():
    async def scenario():
        async with Fleet(DOC, {"a100-0": "A100-80GB"}) as fleet, aiohttp.ClientSession() as session:
            for data in (b"{not json", b"[1, 2]"):
                async with session.post(fleet.url + "/v1/completions", data=data) as response:
                    assert response.status == 400
                    assert (await response.json())["error"]["type"] == "invalid_request_error"
            async with session.get(fleet.url + "/v1/completions") as response:
                assert response.status == 405 and response.headers["Allow"] == "POST"
                assert "GET is not allowed on /v1/completions" in (await response.json())["error"]["message"]
            async with session.get(fleet.url + "/v1/nothing") as response:
                assert response.status == 404 and "no route GET /v1/nothing" in (await response.text())

    run(scenario)

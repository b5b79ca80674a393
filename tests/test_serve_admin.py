"""The router's admin API and pushed membership: who may call it, what a push swaps and what it refuses, a replica
removed under continuous load (no request fails, its streams finish, nothing new goes to it), `serve --pushed` as a
process, the fleet's side of the calls (`deploy.membership`), and the per-minute arrivals `/workload` reports.

Outcomes never wait on a clock: streams are held and released with events, the minute clock is injected, and the
few polls only guard against a hang (each scenario has a hang guard)."""
from __future__ import annotations

import asyncio
import copy
import json
import os
import signal
import subprocess
import sys

import aiohttp
import pytest
from fake_openai_upstream import FakeUpstream, Fleet
from test_serve_cli import HANG_GUARD_S, LoopThread, start_cli, stop
from test_serve_policy import DOC, PER_OFFER_PLAN, body

from melange_sky.deploy.membership import (ADMIN_ROUTES_PATH, ADMIN_TOKEN_ENV, get_admin_routes, push_routes,
                                           routes_document)
from melange_sky.errors import RouterError, ServeError
from melange_sky.fleet.ledger import Ledger
from melange_sky.serve.observed import ObservedWorkload, rate_percentiles
from melange_sky.serve.routes import parse_routes, routes_from_plan
from melange_sky.serve.server import Router, RouterServer
from melange_sky.serve.settings import ServeSettings, admin_token_from_env
from melange_sky.serve.tokens import Kind

ADMIN = "admin-token-3f9a1c"
CLIENT = "client-key-77b2e0"


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_S))


async def until(condition) -> None:
    """Poll a condition; the scenario's hang guard ends a wait that never comes true."""
    while not condition():
        await asyncio.sleep(0.01)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def routes_with(fleet: Fleet, names: list[str], extra: dict[str, tuple[str, str]] | None = None) -> dict:
    """DOC with the fleet's replicas `names` (and `extra` name -> (gpu, url)), as the fleet would push it."""
    replicas = [{"name": n, "gpu": fleet.replica_gpus[n], "url": fleet.upstreams[n].url} for n in names]
    replicas += [{"name": n, "gpu": gpu, "url": url} for n, (gpu, url) in (extra or {}).items()]
    return {**copy.deepcopy(DOC), "replicas": replicas}


async def put(session: aiohttp.ClientSession, url: str, doc, token: str = ADMIN) -> tuple[int, dict]:
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    async with session.put(url + ADMIN_ROUTES_PATH, data=data, headers=bearer(token)) as response:
        return response.status, await response.json(content_type=None)


async def get_admin(session: aiohttp.ClientSession, url: str, token: str = ADMIN) -> tuple[int, dict]:
    async with session.get(url + ADMIN_ROUTES_PATH, headers=bearer(token)) as response:
        return response.status, await response.json(content_type=None)


async def complete(session: aiohttp.ClientSession, url: str, stream: bool = False, token: str | None = None,
                   bucket: tuple[int, int] = (1, 1)) -> tuple[int, bytes, str | None]:
    """A completion: (status, body, the replica that served it)."""
    data = {**body(Kind.COMPLETIONS, *bucket), "stream": stream}
    async with session.post(url + "/v1/completions", json=data, headers=bearer(token) if token else None) as answer:
        raw = await answer.read()
    served = None
    if answer.status == 200:
        first = raw.split(b"\n\n")[0][len(b"data: "):] if stream else raw
        served = json.loads(first)["served_by"]
    return answer.status, raw, served


# ---- who may call it -------------------------------------------------------------------------------------------------
def test_the_admin_api_takes_the_admin_token_only_never_the_client_key():
    async def scenario():
        logs: list[str] = []
        async with Fleet(DOC, {"a100-0": "A100-80GB"}, log=logs, api_key=CLIENT, admin_token=ADMIN) as fleet, \
                aiohttp.ClientSession() as session:
            doc = routes_with(fleet, ["a100-0"])
            async with session.get(fleet.url + ADMIN_ROUTES_PATH) as answer:
                assert answer.status == 401
            for token in ("wrong-token", CLIENT, ADMIN + "x", ADMIN[:-1]):
                assert (await get_admin(session, fleet.url, token))[0] == 401
                status, answer = await put(session, fleet.url, doc, token)
                assert status == 401 and answer["error"]["code"] == "invalid_admin_token"
            async with session.put(fleet.url + ADMIN_ROUTES_PATH, data=json.dumps(doc),
                                   headers={"Authorization": f"Basic {ADMIN}"}) as answer:
                assert answer.status == 401
            assert fleet.router.generation == 1  # nothing was swapped by a refused call
            status, answer = await get_admin(session, fleet.url)
            assert status == 200 and answer["generation"] == 1
            # the admin token reads what the fleet's controller needs, but never generates
            for path in ("/workload", "/routes", "/metrics"):
                async with session.get(fleet.url + path, headers=bearer(ADMIN)) as answer:
                    assert answer.status == 200, path
            assert (await complete(session, fleet.url, token=ADMIN))[0] == 401
            assert (await complete(session, fleet.url, token=CLIENT))[0] == 200
            async with session.get(fleet.url + "/metrics", headers=bearer(CLIENT)) as answer:
                metrics = await answer.text()
            assert "melange_routes_generation 1.0" in metrics
            assert ADMIN not in metrics and CLIENT not in metrics
            assert not any(ADMIN in line or CLIENT in line for line in logs)

    run(scenario)


def test_without_an_admin_token_the_admin_api_is_off():
    async def scenario():
        async with Fleet(DOC, {"a100-0": "A100-80GB"}) as fleet, aiohttp.ClientSession() as session:
            status, answer = await put(session, fleet.url, routes_with(fleet, []), "anything")
            assert status == 404 and ADMIN_TOKEN_ENV in answer["error"]["message"]
            assert len(fleet.router.replicas) == 1

    run(scenario)


def test_the_admin_token_comes_from_the_environment_and_must_differ_from_the_client_key():
    assert admin_token_from_env({ADMIN_TOKEN_ENV: f"  {ADMIN}\n"}) == ADMIN
    assert admin_token_from_env({ADMIN_TOKEN_ENV: " "}) is None
    assert admin_token_from_env({}) is None
    with pytest.raises(ServeError, match="is the same as the API key"):
        ServeSettings(api_key=CLIENT, admin_token=CLIENT)
    assert ADMIN not in repr(ServeSettings(admin_token=ADMIN))


# ---- what a push swaps, and what it refuses --------------------------------------------------------------------------
@pytest.mark.parametrize(("payload", "reason"), [
    (b"{not json", "is not valid JSON"),
    (b"[1, 2]", "a routes document must be a JSON object"),
    ({"gpus": {}}, "input_buckets"),
    ("unknown gpu", "replicas[1].gpu: 'T4' is not in gpus"),
    ("bad share", "routing[0].shares.A10G: must be a number in [0, 1]"),
    (b"{" + b" " * (9 * 1024 * 1024) + b"}", "is larger than"),
])
def test_an_invalid_routes_document_is_refused_in_one_line_and_the_old_routes_keep_serving(payload, reason):
    async def scenario():
        logs: list[str] = []
        async with Fleet(DOC, {"a100-0": "A100-80GB"}, log=logs, admin_token=ADMIN) as fleet, \
                aiohttp.ClientSession() as session:
            doc = payload
            if payload == "unknown gpu":
                doc = routes_with(fleet, ["a100-0"], {"t4-0": ("T4", "http://127.0.0.1:9")})
            elif payload == "bad share":
                doc = routes_with(fleet, ["a100-0"])
                doc["routing"][0]["shares"]["A10G"] = 7
            before = fleet.router.routes
            status, answer = await put(session, fleet.url, doc)
            assert status == 400, answer
            message = answer["error"]["message"]
            assert reason in message and "\n" not in message
            assert fleet.router.routes is before and fleet.router.generation == 1
            assert (await complete(session, fleet.url))[2] == "a100-0"
            assert any("refused a routes push" in line for line in logs)

    run(scenario)


def test_a_push_swaps_the_replicas_at_once_and_a_removed_replica_can_come_back():
    async def scenario():
        replicas = {"a100-0": "A100-80GB", "a100-1": "A100-80GB"}
        async with Fleet(DOC, replicas, admin_token=ADMIN) as fleet, aiohttp.ClientSession() as session:
            status, answer = await put(session, fleet.url, routes_with(fleet, ["a100-1"]))
            assert status == 200
            assert answer == {"accepted": True, "replicas": 1, "generation": 2, "draining": {},
                              "changes": [f"- a100-0 (A100-80GB) {fleet.upstreams['a100-0'].url}"]}
            for _ in range(10):
                assert (await complete(session, fleet.url))[2] == "a100-1"
            status, answer = await put(session, fleet.url, routes_with(fleet, ["a100-0", "a100-1"]))
            assert answer["generation"] == 3 and answer["replicas"] == 2
            served = {(await complete(session, fleet.url))[2] for _ in range(40)}
            assert served == {"a100-0", "a100-1"}
            _, shown = await get_admin(session, fleet.url)
            assert shown["routes"] == parse_routes(routes_with(fleet, ["a100-0", "a100-1"])).to_dict()
            assert shown["generation"] == 3 and shown["inflight"] == {} and shown["draining"] == {}

    run(scenario)


def test_removing_a_replica_under_continuous_load_fails_no_request_and_its_streams_finish():
    async def scenario():
        replicas = {"a100-0": "A100-80GB", "a100-1": "A100-80GB"}
        async with Fleet(DOC, replicas, admin_token=ADMIN) as fleet, aiohttp.ClientSession() as session:
            old, new = fleet.upstreams["a100-0"], fleet.upstreams["a100-1"]
            status, _ = await put(session, fleet.url, routes_with(fleet, ["a100-0"]))  # everything to a100-0 first
            assert status == 200
            old.gate = asyncio.Event()  # a100-0's streams stay in flight after their first event
            results: list[tuple[bool, int, bytes, str | None]] = []  # (started after the removal, status, ...)
            removed = asyncio.Event()
            stop_load = asyncio.Event()

            async def client(stream: bool) -> None:
                while not stop_load.is_set():
                    after = removed.is_set()
                    status, raw, served = await complete(session, fleet.url, stream=stream)
                    results.append((after, status, raw, served))

            # 3 streaming clients (their streams on a100-0 stay held), 3 non-streaming ones that never stop
            load = [asyncio.create_task(client(stream=k < 3)) for k in range(6)]
            await until(lambda: fleet.router.replicas["a100-0"].in_flight >= 3 and len(results) >= 20)
            retired = fleet.router.replicas["a100-0"]
            status, answer = await put(session, fleet.url, routes_with(fleet, ["a100-1"]))
            removed.set()
            load += [asyncio.create_task(client(stream=True)) for _ in range(2)]  # streams go on, to a100-1
            assert status == 200 and answer["draining"][old.url] >= 3  # the held streams, maybe answers too
            chosen_at_removal = retired.served
            await until(lambda: retired.in_flight == 3)  # its non-streaming answers went out: the streams are left
            _, shown = await get_admin(session, fleet.url)
            assert shown["draining"] == {old.url: 3} and shown["inflight"][old.url] == 3
            await until(lambda: sum(after for after, *_ in results) >= 60)  # new requests flow meanwhile
            assert sum(after and raw.startswith(b"data: ") for after, _, raw, _ in results) >= 1
            assert retired.served == chosen_at_removal  # nothing new went to the removed replica
            assert retired.in_flight == 3  # and its streams are still going
            old.gate.set()
            await until(lambda: retired.in_flight == 0)
            stop_load.set()
            await asyncio.gather(*load)
            failed = [(status, raw[:200]) for _, status, raw, _ in results if status != 200]
            assert failed == []
            streams = [raw for _, _, raw, _ in results if raw.startswith(b"data: ")]
            assert streams and all(raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw for raw in streams)
            assert {served for after, _, _, served in results if after} == {"a100-1"}
            assert old.streams_finished >= 3 and len(new.requests) >= 60
            _, shown = await get_admin(session, fleet.url)
            assert shown["draining"] == {} and old.url not in shown["inflight"]

    run(scenario)


def test_a_retry_after_a_push_goes_along_the_new_routes_never_to_a_removed_replica():
    async def scenario():
        # bucket (1, 1) is A100-80GB's alone; an A10G replica takes it only as a spill (a retry elsewhere)
        replicas = {"a100-0": "A100-80GB", "a10g-1": "A10G", "a10g-2": "A10G"}
        async with Fleet(DOC, replicas, admin_token=ADMIN) as fleet, aiohttp.ClientSession() as session:
            failing = fleet.upstreams["a100-0"]
            failing.status, failing.hold = 500, asyncio.Event()
            assert (await put(session, fleet.url, routes_with(fleet, ["a100-0", "a10g-1"])))[0] == 200
            request = asyncio.create_task(complete(session, fleet.url))
            await until(lambda: failing.held == 1)
            assert (await put(session, fleet.url, routes_with(fleet, ["a100-0", "a10g-2"])))[0] == 200
            failing.hold.set()
            status, _, served = await request
            assert (status, served) == (200, "a10g-2")
            assert fleet.upstreams["a10g-1"].requests == []

    run(scenario)


# ---- the fleet's side: deploy.membership -----------------------------------------------------------------------------
def test_push_and_read_from_a_worker_thread_and_errors_never_name_the_token():
    async def scenario():
        async with Fleet(DOC, {"a100-0": "A100-80GB", "a100-1": "A100-80GB"}, admin_token=ADMIN) as fleet:
            doc = routes_with(fleet, ["a100-1"])
            answer = await asyncio.to_thread(push_routes, fleet.url, doc, ADMIN)
            assert answer["accepted"] is True and answer["generation"] == 2
            shown = await asyncio.to_thread(get_admin_routes, fleet.url, ADMIN, 5.0)
            assert [r["name"] for r in shown["routes"]["replicas"]] == ["a100-1"]
            with pytest.raises(RouterError) as refused:
                await asyncio.to_thread(push_routes, fleet.url, doc, "not-" + ADMIN)
            assert "HTTP 401" in str(refused.value) and ADMIN not in str(refused.value)
            bad = {**doc, "gpus": "nope"}
            with pytest.raises(RouterError, match=r"HTTP 400.*gpus: must be an object") as invalid:
                await asyncio.to_thread(push_routes, fleet.url, bad, ADMIN)
            assert "\n" not in str(invalid.value) and ADMIN not in str(invalid.value)
            assert fleet.router.generation == 2

    run(scenario)
    holder_port = _closed_port()
    with pytest.raises(RouterError, match="unreachable") as unreachable:
        get_admin_routes(f"http://127.0.0.1:{holder_port}", ADMIN, 5.0)
    assert ADMIN not in str(unreachable.value)


def _closed_port() -> int:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        return holder.getsockname()[1]


def test_the_routes_document_of_a_stored_plan_is_what_serve_fleet_routes_by():
    plan = copy.deepcopy(PER_OFFER_PLAN)
    replicas = [("f-a10g-0", "A10G", "10.0.0.5:8000"), ("f-t4-0", "T4", "http://10.0.0.6:8000")]
    doc, warnings = routes_document(plan, replicas, "fleet f")
    assert doc["replicas"] == [{"name": "f-a10g-0", "gpu": "A10G", "url": "http://10.0.0.5:8000"}]
    assert doc["gpus"] == {"A10G": {"planned": 2, "tputs": [[2]]}, "A100-80GB": {"planned": 1, "tputs": [[20]]}}
    assert warnings == ["f-t4-0 (T4) is not a GPU type of the plan: not routed to"]
    routes = parse_routes(json.loads(json.dumps(doc)), "pushed")  # what the router gets over the wire
    assert routes == routes_from_plan(plan, parse_routes(doc).replicas, "fleet f")
    assert routes.shares[(0, 0)] == {"A10G": 0.5, "A100-80GB": 0.5}
    with pytest.raises(ServeError, match="has a path"):
        routes_document(plan, [("f-a10g-0", "A10G", "http://10.0.0.5:8000/v1")], "fleet f")


# ---- serve --pushed, as a process ------------------------------------------------------------------------------------
def test_serve_pushed_answers_503_until_the_first_push_then_serves_and_never_prints_a_key(tmp_path):
    loop = LoopThread()
    upstream = FakeUpstream("A100-80GB", "a100-0", api_key=CLIENT)  # replicas take the client key by default
    proc = None
    try:
        loop.run(upstream.start())
        home = tmp_path / "home"  # its own: other tests (in this worker) make the session's ledger
        env = {ADMIN_TOKEN_ENV: ADMIN, "MELANGE_SKY_API_KEY": CLIENT, "MELANGE_SKY_HOME": str(home)}
        proc, url, banner = start_cli("serve", "--pushed", "--port", "0", env=env)
        assert "No routes yet" in banner

        async def before_push() -> None:
            async with aiohttp.ClientSession() as session:
                status, raw, _ = await complete(session, url, token=CLIENT)
                assert status == 503 and b"no routes yet" in raw
                async with session.get(url + "/health") as answer:
                    assert answer.status == 503 and (await answer.json())["status"] == "no_routes"
                status, shown = await get_admin(session, url)
                assert status == 200 and shown == {"routes": None, "generation": 0, "inflight": {}, "draining": {}}

        loop.run(before_push())
        doc = {**copy.deepcopy(DOC), "replicas": [{"name": "a100-0", "gpu": "A100-80GB", "url": upstream.url}]}
        with pytest.raises(RouterError, match="HTTP 400"):
            push_routes(url, {**doc, "version": 9}, ADMIN)
        assert push_routes(url, doc, ADMIN)["generation"] == 1

        async def after_push() -> None:
            async with aiohttp.ClientSession() as session:
                for stream in (False, True):
                    status, _, served = await complete(session, url, stream=stream, token=CLIENT)
                    assert (status, served) == (200, "a100-0")
                async with session.get(url + "/health") as answer:
                    assert answer.status == 200

        loop.run(after_push())
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=HANG_GUARD_S)
        assert proc.returncode == 0, err
        printed = banner + out + err
        assert "routes pushed (generation 1): + a100-0" in printed and "refused a routes push" in printed
        assert ADMIN not in printed and CLIENT not in printed
        assert not Ledger.exists(home)  # no ledger is read, or made, in this mode
    finally:
        if proc is not None:
            stop(proc)
        loop.run(upstream.stop())
        loop.close()


def test_serve_pushed_needs_the_admin_token_and_takes_a_starting_routes_file(cli, tmp_path, monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    result = cli("serve", "--pushed")
    assert result.exit_code == 2 and f"--pushed needs {ADMIN_TOKEN_ENV}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for args, message in ((("--pushed", "some-fleet"), "no FLEET, --config or --replica"),
                          (("--routes", "r.json"), "--routes FILE goes with --pushed")):
        result = cli("serve", *args)
        assert result.exit_code == 2 and message in result.stderr
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({**DOC, "replicas": []}))
    env = {**os.environ, ADMIN_TOKEN_ENV: ADMIN}
    proc = subprocess.Popen([sys.executable, "-m", "melange_sky", "serve", "--pushed", "--routes", str(path),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        banner = proc.stdout.readline() + proc.stdout.readline()
        assert banner.startswith("Routing test plan: 3x2 buckets"), banner + proc.stderr.read()
    finally:
        stop(proc)
    path.write_text("{not json")
    monkeypatch.setenv(ADMIN_TOKEN_ENV, ADMIN)
    result = cli("serve", "--pushed", "--routes", str(path))
    assert result.exit_code == 2 and "not a JSON routes document" in result.stderr


# ---- per-minute arrivals ---------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_minute_arrivals_count_each_complete_minute_of_the_window_idle_ones_as_zero():
    clock = Clock()
    observed = ObservedWorkload((1, 100), (1, 50), window_s=300, clock=clock)
    assert observed.to_dict()["minute_arrivals"] == [] and observed.to_dict()["rate_percentiles"] == {}
    for minute, arrivals in enumerate([60, 120, 0, 0, 30, 600, 6]):
        for k in range(arrivals):
            clock.now = 1000.0 + 60 * minute + 59.9 * k / arrivals
            observed.arrival()
    clock.now = 1000.0 + 60 * 6 + 59.0  # inside minute 6: its 6 arrivals are not a complete minute yet
    doc = observed.to_dict()
    assert doc["minute_arrivals"] == [120, 0, 0, 30, 600]  # a 300 s window: its last 5 complete minutes
    clock.now = 1000.0 + 60 * 7
    doc = observed.to_dict()
    assert doc["minute_arrivals"] == [0, 0, 30, 600, 6]
    assert doc["rate_percentiles"] == {"p50": 0.1, "p95": 10.0, "p99": 10.0, "max": 10.0}
    clock.now += 60 * 100  # a long idle spell: only zeros, and never more than the window's minutes
    assert observed.to_dict()["minute_arrivals"] == [0] * 5


def test_rate_percentiles_are_nearest_rank_rates_some_minute_had():
    rates = [float(r) for r in range(1, 21)]  # 1..20 req/s
    assert rate_percentiles(rates) == {"p50": 10.0, "p95": 19.0, "p99": 20.0, "max": 20.0}
    assert rate_percentiles([3.0]) == {"p50": 3.0, "p95": 3.0, "p99": 3.0, "max": 3.0}
    assert rate_percentiles([]) == {}


def test_workload_reports_minute_arrivals_with_the_routers_clock():
    async def scenario():
        clock = Clock()
        async with Fleet(DOC, {"a100-0": "A100-80GB"}, clock=clock) as fleet, aiohttp.ClientSession() as session:
            for minute, arrivals in enumerate([3, 6]):
                clock.now = 1000.0 + 60 * minute + 1
                for _ in range(arrivals):
                    assert (await complete(session, fleet.url))[0] == 200
            clock.now = 1000.0 + 60 * 2 + 1
            await asyncio.sleep(0)  # arrivals are counted on the loop's next pass
            async with session.get(fleet.url + "/workload") as answer:
                doc = await answer.json()
            assert doc["minute_arrivals"] == [3, 6]
            assert doc["rate_percentiles"] == {"p50": 0.05, "p95": 0.1, "p99": 0.1, "max": 0.1}

    run(scenario)


def test_a_router_without_routes_refuses_requests_until_a_push_and_then_serves():
    async def scenario():
        upstream = FakeUpstream("A100-80GB", "a100-0")
        await upstream.start()
        router = Router(None, ServeSettings(port=0, admin_token=ADMIN), log=lambda line: None)
        server = RouterServer(router, "127.0.0.1", 0)
        url = await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                for path in ("/workload", "/routes"):
                    async with session.get(url + path) as answer:
                        assert answer.status == 503 and "no routes yet" in await answer.text()
                assert (await complete(session, url, stream=True))[0] == 503
                doc = {**copy.deepcopy(DOC), "replicas": [{"name": "a100-0", "gpu": "A100-80GB",
                                                           "url": upstream.url}]}
                assert (await put(session, url, doc))[1]["generation"] == 1
                assert (await complete(session, url, stream=True))[2] == "a100-0"
        finally:
            await server.stop()
            await upstream.stop()

    run(scenario)


class Source:
    """A routes source that changes only when the test says (a ledger, for `serve FLEET`)."""

    refreshing = True
    description = "fleet test"

    def __init__(self, routes) -> None:
        self.routes = routes

    def load(self):
        return self.routes


def test_in_fleet_mode_a_push_holds_until_the_ledger_itself_changes():
    def doc(*names: str) -> dict:
        return {**copy.deepcopy(DOC), "replicas": [{"name": n, "gpu": "A100-80GB", "url": f"http://127.0.0.1:{k + 1}"}
                                                   for k, n in enumerate(names)]}

    async def scenario():
        source = Source(parse_routes(doc("a100-0", "a100-1")))
        router = Router(source.routes, ServeSettings(admin_token=ADMIN), source=source, log=lambda line: None)
        router.swap(parse_routes(doc("a100-0")))  # what a push does
        assert await router.refresh() == [] and list(router.replicas) == ["a100-0"]  # the ledger did not change
        source.routes = parse_routes(doc("a100-0", "a100-1", "a100-2"))
        assert await router.refresh() != []
        assert list(router.replicas) == ["a100-0", "a100-1", "a100-2"] and router.generation == 3

    run(scenario)

"""`melange-sky serve` as a user runs it: its checks at start, FLEET mode from a ledger written here, a replica
killed mid-run (a real process, SIGKILL), and SIGTERM draining the requests in flight.

Processes are synchronised by what they print and by events in the fake upstreams, never by sleeping; every
process and server started here is stopped here."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import aiohttp
import pytest
from conftest import REPO
from fake_openai_upstream import FakeUpstream
from test_serve_policy import DOC, body

from melange_sky.core.config import load_config
from melange_sky.deploy.plan import make_plan
from melange_sky.fleet.ledger import Ledger, ReplicaState
from melange_sky.fleet.reconcile import new_replica
from melange_sky.serve.routes import FleetSource, parse_routes
from melange_sky.serve.server import Router, RouterServer
from melange_sky.serve.settings import ServeSettings
from melange_sky.serve.tokens import Kind
from melange_sky.solver.result import solve

HANG_GUARD_S = 60
UPSTREAM = str(REPO / "tests" / "fake_openai_upstream.py")
MIX = {"name": "mix", "gpu_info": {"A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2]]},
                                   "A100-80GB": {"cost": 3.67, "tputs": [[20, 20], [40, 20]]}},
       "workload_distribution": [[0.2, 0.1], [0.5, 0.2]], "total_request_rate": 30,
       "input_buckets": [1, 100, 1000], "output_buckets": [1, 50, 500]}


@pytest.fixture(autouse=True)
def no_keys(monkeypatch):
    for name in ("MELANGE_SKY_API_KEY", "MELANGE_SKY_UPSTREAM_API_KEY"):
        monkeypatch.delenv(name, raising=False)


class LoopThread:
    """An event loop in a thread, for fake upstreams (and clients) while the test drives a router process."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = HANG_GUARD_S):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(HANG_GUARD_S)
        self.loop.close()


def start_cli(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str, str]:
    """Start `melange-sky ARGS` and wait for its "Listening on URL" line: (the process, the URL, stdout so far)."""
    proc = subprocess.Popen([sys.executable, "-m", "melange_sky", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines = []
    for line in proc.stdout:  # ends if the process exits
        lines.append(line)
        if line.startswith("Listening on "):
            return proc, line.split()[2], "".join(lines)
    proc.wait(HANG_GUARD_S)
    raise AssertionError(f"serve did not start: {''.join(lines)}{proc.stderr.read()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(HANG_GUARD_S)


# ---- checks at start -------------------------------------------------------------------------------------------------
def test_serve_help_loads_no_server_package():
    code = ("import sys; from melange_sky.cli import main\n"
            "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('aiohttp', 'prometheus_client', 'sky', 'pulp', 'tokenizers') "
            "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--replica GPU=URL" in done.stdout and "--upstream-api-key" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_public_host_without_a_key_is_refused(cli, write_config):
    result = cli("serve", "--config", write_config(MIX), "--replica", "A10G=http://127.0.0.1:1", "--host", "0.0.0.0")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: refusing to serve on 0.0.0.0 without an API key")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("args", "message"), [
    ((), "give a FLEET from the ledger, or --config CONFIG"),
    (("mix", "--replica", "A10G=http://h:1"), "--replica goes with --config"),
    (("--config", "CONFIG"), "--config needs the servers to route to"),
    (("--config", "CONFIG", "--replica", "T4=http://h:1"), "'T4' is not a GPU type of the config"),
    (("--config", "CONFIG", "--replica", "A10G=http://h:1/v1"), "give the server's base URL"),
    (("--config", "CONFIG", "--replica", "A10G=http://h:1", "--tokenizer", "/no/such/tokenizer.json"),
     "no such file"),
    (("no-such-fleet",), "no fleet named 'no-such-fleet'"),
])
def test_bad_invocations_are_one_line_errors(cli, write_config, args, message):
    path = write_config(MIX)
    result = cli("serve", *[path if a == "CONFIG" else a for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_config_without_bucket_edges_that_is_not_8x6_is_refused(cli, write_config, example):
    result = cli("serve", "--config", write_config(example), "--replica", "A10G=http://127.0.0.1:1")
    assert result.exit_code == 2
    assert "no input_buckets and its workload_distribution is 2x2, not Mélange's default 8x6" in result.stderr


# ---- a replica killed during a run -----------------------------------------------------------------------------------
def test_a_replica_killed_during_a_run_fails_no_request_but_streams_it_had_begun():
    procs: dict[str, subprocess.Popen] = {}
    replicas = {"a10g-0": "A10G", "a10g-1": "A10G", "l4-0": "L4", "a100-0": "A100-80GB"}

    async def scenario():
        urls = {}
        for name, gpu in replicas.items():
            proc = procs[name] = subprocess.Popen([sys.executable, UPSTREAM, "--gpu", gpu, "--name", name,
                                                   "--delay-ms", "2"], stdout=subprocess.PIPE, text=True)
            urls[name] = f"http://127.0.0.1:{proc.stdout.readline().split()[1]}"
        doc = {**DOC, "replicas": [{"name": n, "gpu": g, "url": urls[n]} for n, g in replicas.items()]}
        # Every request in flight (16 at most) may retry at once: the retry budget (its own test in
        # test_serve_outliers) must not be what fails a request here. With the default (3 at once) a loaded machine
        # had 4+ requests fail on the dead replica together, and the 4th got "the retry budget is spent" (1 in ~60).
        settings = ServeSettings(port=0, seed=1, retry_budget_min=16)
        router = Router(parse_routes(doc), settings, log=lambda line: None)
        server = RouterServer(router, "127.0.0.1", 0)
        url = await server.start()
        outcomes: Counter = Counter()
        done = 0
        killed = asyncio.Event()
        try:
            async with aiohttp.ClientSession() as session:
                limit = asyncio.Semaphore(16)

                async def one(k: int):
                    nonlocal done
                    kind = list(Kind)[k % 2]
                    stream = k % 3 == 0
                    data = {**body(kind, (k // 2) % 3, k % 2), "stream": stream, "max_tokens": 8}
                    path = "/v1/completions" if kind is Kind.COMPLETIONS else "/v1/chat/completions"
                    async with limit, session.post(url + path, json=data) as response:
                        raw = await response.read()
                    done += 1
                    if done == 200:
                        procs["a10g-0"].send_signal(signal.SIGKILL)
                        killed.set()
                    if response.status != 200:
                        outcomes["failed"] += 1
                    elif stream and b'"error"' in raw:
                        # cut mid-stream: allowed only after data had begun to flow
                        assert raw.startswith(b"data: {") and raw.count(b"data: ") >= 3, raw
                        outcomes["stream cut"] += 1
                    else:
                        outcomes["ok"] += 1

                await asyncio.gather(*(one(k) for k in range(600)))
            assert killed.is_set()
            assert outcomes["failed"] == 0, outcomes
            assert outcomes["ok"] + outcomes["stream cut"] == 600
            assert router.replicas["a10g-0"].ejected
        finally:
            await server.stop()

    try:
        asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_S))
    finally:
        for proc in procs.values():
            stop(proc)


# ---- FLEET mode: the ledger ------------------------------------------------------------------------------------------
def write_fleet(ledger: Ledger, write_config, config=MIX, name="mix", formulation="slices"):
    """A fleet as `up` leaves it in the ledger: its plan saved, its replicas recorded (pending)."""
    cfg = load_config(write_config(config, f"{name}.json"))
    plan = make_plan(cfg, solve(cfg, formulation, compare=False))
    ledger.save_fleet(name, "digest", plan.to_dict())
    for replica in plan.replicas:
        ledger.add_replica(name, new_replica(replica, 0))
    return plan


def test_fleet_mode_routes_to_the_ledgers_up_replicas_and_follows_membership(tmp_path, write_config):
    ledger = Ledger(tmp_path / "home")
    plan = write_fleet(ledger, write_config)  # slices: A10G x3 (bucket 0:1), A100-80GB x1 (the rest)
    clusters = {r.gpu: [p.cluster for p in plan.replicas if p.gpu == r.gpu] for r in plan.replicas}

    async def scenario():
        upstreams = {c: FakeUpstream(gpu, c) for gpu, names in clusters.items() for c in names}
        for cluster, upstream in upstreams.items():
            await upstream.start()
            ledger.transition(cluster, ReplicaState.LAUNCHING)
        first = clusters["A10G"][0]
        a100 = clusters["A100-80GB"][0]
        for cluster in (first, a100):
            ledger.transition(cluster, ReplicaState.UP, endpoint=upstreams[cluster].url.removeprefix("http://"))
        source = FleetSource("mix", ledger)
        router = Router(source.load(), ServeSettings(port=0, refresh_s=0.02, seed=1), source=source,
                        log=lambda line: None)
        server = RouterServer(router, "127.0.0.1", 0)
        url = await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                async def gpu_of(kind, row, col):
                    async with session.post(url + ("/v1/completions" if kind is Kind.COMPLETIONS
                                                   else "/v1/chat/completions"), json=body(kind, row, col)) as r:
                        assert r.status == 200
                        return (await r.json())["served_by"]

                assert await gpu_of(Kind.COMPLETIONS, 0, 1) == first  # bucket 0:1 is the A10Gs'
                assert await gpu_of(Kind.CHAT, 1, 0) == a100
                # a second A10G comes up: the next refresh adds it, and it takes its share of 0:1
                second = clusters["A10G"][1]
                ledger.transition(second, ReplicaState.UP, endpoint=upstreams[second].url)
                while second not in router.replicas:
                    await asyncio.sleep(0.01)
                assert {await gpu_of(Kind.COMPLETIONS, 0, 1) for _ in range(6)} == {first, second}
                # the first goes away with a stream in flight on it: the stream still completes
                upstreams[first].gate = asyncio.Event()
                router.replicas[second].in_flight = 1
                stream = asyncio.create_task(session.post(url + "/v1/completions", json={
                    **body(Kind.COMPLETIONS, 0, 1), "stream": True}))
                await upstreams[first].first_event.wait()
                router.replicas[second].in_flight = 0
                ledger.transition(first, ReplicaState.TERMINATING)
                while first in router.replicas:
                    await asyncio.sleep(0.01)
                assert {await gpu_of(Kind.COMPLETIONS, 0, 1) for _ in range(4)} == {second}
                upstreams[first].gate.set()
                response = await stream
                assert response.status == 200 and (await response.read()).endswith(b"data: [DONE]\n\n")
                routes = await (await session.get(url + "/routes")).json()
                assert routes["source"] == "fleet mix" and routes["gpus"]["A10G"]["planned"] == 3
                assert list(routes["gpus"]) == ["A10G", "A100-80GB"]  # the config's order
                assert sorted(r["name"] for r in routes["replicas"]) == sorted([second, a100])
        finally:
            await server.stop()
            for upstream in upstreams.values():
                await upstream.stop()

    try:
        asyncio.run(asyncio.wait_for(scenario(), HANG_GUARD_S))
    finally:
        ledger.close()


def test_sigterm_drains_requests_in_flight_then_exits(write_config):
    """`serve FLEET` as a process: its start-up summary and warnings, then SIGTERM with a stream in flight."""
    ledger = Ledger()  # the session's MELANGE_SKY_HOME, which the child process inherits
    plan = write_fleet(ledger, write_config, name="drain")
    a100 = next(p.cluster for p in plan.replicas if p.gpu == "A100-80GB")
    loop = LoopThread()
    upstream = FakeUpstream("A100-80GB", a100)
    proc = None
    try:
        loop.run(upstream.start())
        upstream.gate = asyncio.Event()
        ledger.transition(a100, ReplicaState.UP, endpoint=upstream.url)
        proc, url, _ = start_cli("serve", "drain", "--port", "0", "--drain-s", "60")

        async def stream():
            async with aiohttp.ClientSession() as session, session.post(url + "/v1/chat/completions", json={
                    **body(Kind.CHAT, 1, 1), "stream": True}) as response:
                return response.status, await response.read()

        pending = loop.submit(stream())
        loop.run(upstream.first_event.wait())
        proc.send_signal(signal.SIGTERM)
        port = int(url.rsplit(":", 1)[1])

        async def refused() -> None:  # the router stops accepting new connections
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except ConnectionRefusedError:
                    return
                writer.close()
                await asyncio.sleep(0.01)

        loop.run(refused())
        assert proc.poll() is None  # still draining the held stream
        loop.loop.call_soon_threadsafe(upstream.gate.set)
        status, raw = pending.result(HANG_GUARD_S)
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n")
        assert proc.wait(HANG_GUARD_S) == 0
        err = proc.stderr.read()
        assert "A10G has 0 live replica(s), the plan counts 3" in err
        assert "SIGTERM: draining 1 request(s) in flight" in err and "stopped" in err
        assert upstream.streams_finished == 1 and upstream.disconnects == 0
    finally:
        if proc is not None:
            stop(proc)
        loop.run(upstream.stop())
        loop.close()
        ledger.close()


def test_the_startup_summary_names_the_replicas_per_gpu_type(write_config):
    loop = LoopThread()
    upstreams = [FakeUpstream("A10G"), FakeUpstream("A100-80GB")]
    proc = None
    try:
        urls = [loop.run(u.start()) for u in upstreams]
        proc, _, head = start_cli("serve", "--config", write_config(MIX), "--formulation", "split", "--port", "0",
                              "--replica", f"a10g={urls[0]}", "--replica", f"A100-80GB={urls[1]}",
                              env={"MELANGE_SKY_API_KEY": "k-123"})
        proc.send_signal(signal.SIGINT)
        assert proc.wait(HANG_GUARD_S) == 130
        out = head + proc.stdout.read() + proc.stderr.read()
        assert "k-123" not in out
        assert f"A10G             1         1  {urls[0]}" in out
        assert "Clients must send the API key (Authorization: Bearer). Replicas get a Bearer key." in out
    finally:
        if proc is not None:
            stop(proc)
        for upstream in upstreams:
            loop.run(upstream.stop())
        loop.close()


def test_the_stored_plan_holds_what_the_router_needs(write_config):
    cfg = load_config(write_config(MIX))
    record = make_plan(cfg, solve(cfg, compare=False)).to_dict()
    assert record["router"]["input_buckets"] == [1, 100, 1000]
    assert record["router"]["entries"] == {"A10G": "A10G", "A100-80GB": "A100-80GB"}
    assert json.loads(json.dumps(record))["router"]["tputs"]["A10G"] == [[2, 1], [5, 2]]



def test_a_sigterm_right_after_the_listening_line_drains_instead_of_killing(tmp_path):
    """A launcher (or a test backend) may stop the router the moment it says it listens: its handlers are in place
    by then, so it drains and exits 0 instead of dying of the signal."""
    env = {"MELANGE_SKY_ADMIN_TOKEN": "admin-token-for-this-test-0123456789"}
    for _ in range(5):
        proc, _url, _ = start_cli("serve", "--pushed", "--port", "0", env=env)
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(HANG_GUARD_S) == 0, proc.stderr.read()
        finally:
            stop(proc)

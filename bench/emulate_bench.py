"""How closely `melange-sky emulate` keeps the engine model's step times with hundreds of streams on one core.

    python bench/emulate_bench.py [--streams 256] [--seconds 30] [--model llama-3.1-8b] [--gpu H100] [--write]

The emulator runs in its own process pinned to core 0 (`taskset -c 0`) and logs its step schedule (each step's
scheduled end and the model's duration); this process, pinned to core 1, keeps --streams streamed completions in
flight (closed loop: a finished one is replaced at once; output lengths drawn from 64..512 so requests join and
leave at every step, with prefill chunks in the batch) and stamps every token with the time the kernel received it
(SO_TIMESTAMPNS, so this process's own delay in reading hundreds of sockets does not count), on the clock the
emulator schedules with (time.monotonic).

Each token is matched to the step whose end it follows (the last scheduled end before it arrived). Reported:
* gap error: a stream's inter-token gap minus the model's time between the two steps' ends (what a client sees of
  the step times), p50 / p99 / max of its absolute value;
* lateness: arrival minus the step's scheduled end (the emulator's and the network's delay), p50 / p99;
* the server process's CPU share over the run (one core = 100%).
--write appends the result to bench/results/emulate.md.
"""
from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "emulate.md"


# ---- the server process --------------------------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> None:
    """Run the emulator; on SIGTERM write its step log (JSON rows [end, duration_s, emitters]) to --step-log."""
    from melange_sky.engine import emulator  # noqa: PLC0415

    ready = emulator.prepare(args.model, args.gpu, speed=args.speed, port=0, record_steps=True)
    emulator.run(ready.emulator, ready.settings, on_listening=lambda url: print(f"URL {url}", flush=True))
    steps = ready.emulator.steps or []
    Path(args.step_log).write_text(json.dumps([[s.end, s.duration_s, s.emitters] for s in steps]))


# ---- the load ------------------------------------------------------------------------------------------------------
_CMSG_SPACE = socket.CMSG_SPACE(struct.calcsize("ll"))
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python does not export the name


class _Conn:
    """One streamed completion on a non-blocking socket; each read's kernel receive time and token count."""

    __slots__ = ("sock", "times", "tail", "done")

    def __init__(self, sock: socket.socket):
        self.sock, self.times, self.tail, self.done = sock, [], b"", False


def _load(host: str, port: int, streams: int, seconds: float, model: str, prompt_tokens: int,
          seed: int) -> tuple[list[list[tuple[float, int]]], int, float]:
    """Keep `streams` completions in flight for `seconds` (closed loop). Each read is stamped with the time the
    kernel received its bytes (SO_TIMESTAMPNS, wall clock, turned into time.monotonic), so the client's own delays
    in reading 256 sockets do not count against the emulator."""
    rng = random.Random(seed)
    words = " ".join(["the"] * prompt_tokens)
    wall_to_mono = time.monotonic() - time.time()
    ep = select.epoll()
    conns: dict[int, _Conn] = {}
    records: list[list[tuple[float, int]]] = []

    def open_one() -> None:
        body = json.dumps({"model": model, "prompt": words, "max_tokens": rng.randint(64, 512), "stream": True,
                           "ignore_eos": True}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.sendall(head + body)
        sock.setblocking(False)
        conns[sock.fileno()] = _Conn(sock)
        ep.register(sock.fileno(), select.EPOLLIN)

    def close(conn: _Conn) -> None:
        ep.unregister(conn.sock.fileno())
        del conns[conn.sock.fileno()]
        conn.sock.close()
        records.append(conn.times)

    started = time.monotonic()
    stop_at = started + seconds
    for _ in range(streams):
        open_one()
    peak = len(conns)
    while conns:
        for fd, _ in ep.poll(1.0):
            conn = conns.get(fd)
            if conn is None:
                continue
            try:
                data, ancillary, _, _ = conn.sock.recvmsg(65536, _CMSG_SPACE)
            except BlockingIOError:
                continue
            stamp = time.monotonic()
            for level, kind, raw in ancillary:
                if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("ll", raw[:struct.calcsize("ll")])
                    stamp = sec + nsec * 1e-9 + wall_to_mono
            tokens = data.count(b'"text":"')
            if tokens:
                conn.times.append((stamp, tokens))
            if not data or b"[DONE]" in conn.tail + data:
                close(conn)
                if time.monotonic() < stop_at:
                    open_one()
                    peak = max(peak, len(conns))
                continue
            conn.tail = data[-8:]
    ep.close()
    return records, peak, time.monotonic() - started


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def analyse(records: list[list[tuple[float, int]]], steps: list[list[float]], warmup_s: float) -> dict:
    """Gap errors and lateness of every token against the step schedule (see the module docstring)."""
    ends = [s[0] for s in steps]
    first = ends[0] + warmup_s if ends else 0.0
    gap_errors, lateness, coalesced, tokens = [], [], 0, 0
    for times in records:
        previous: tuple[float, int] | None = None
        for t, n in times:
            tokens += n
            j = bisect.bisect_right(ends, t) - 1
            if j < 0:
                previous = None
                continue
            if n > 1:  # several tokens in one read: the client fell behind; no gap to judge here
                coalesced += n
                previous = None
                continue
            if t >= first:
                lateness.append(t - ends[j])
                if previous is not None:
                    gap_errors.append(abs((t - previous[0]) - (ends[j] - ends[previous[1]])))
            previous = (t, j)
    ms = 1000.0
    durations = [s[1] for s in steps]
    return {
        "tokens": tokens, "gaps": len(gap_errors), "coalesced_tokens": coalesced,
        "gap_error_ms": {"p50": _percentile(gap_errors, 0.5) * ms, "p99": _percentile(gap_errors, 0.99) * ms,
                         "max": max(gap_errors) * ms},
        "lateness_ms": {"p50": _percentile(lateness, 0.5) * ms, "p99": _percentile(lateness, 0.99) * ms},
        "steps": len(steps), "step_ms": {"mean": statistics.fmean(durations) * ms,
                                         "p50": _percentile(durations, 0.5) * ms,
                                         "min": min(durations) * ms, "max": max(durations) * ms},
        "batch": {"mean": statistics.fmean(s[2] for s in steps), "max": max(s[2] for s in steps)},
    }


def engine_version() -> str:
    """The engine's last commit ("+changes" when its files differ from it) and HEAD when that is later (HEAD moves
    with every commit in the shared tree), for the results table."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    engine = git("log", "-1", "--format=%h", "--", "melange_sky/engine") or head
    changes = "+changes" if git("status", "--porcelain", "melange_sky/engine") else ""
    return engine + changes + (f" at HEAD {head}" if engine != head else "")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of the run not judged")
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--gpu", default="H100")
    parser.add_argument("--speed", type=float, default=1.0)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--group-nice", type=int, default=0,
                        help="niceness of the emulator's autogroup (its own session; e.g. -10, needs CAP_SYS_NICE)")
    parser.add_argument("--rt", action="store_true",
                        help="run the emulator under SCHED_FIFO (chrt -f 10): on a machine shared with other work, "
                             "the nearest thing to a core of its own (nice does not help across autogroups)")
    parser.add_argument("--write", action="store_true", help="append the result to bench/results/emulate.md")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step-log", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args)
        return
    step_log = Path(tempfile.mkdtemp(prefix="emulate-bench-")) / "steps.json"
    cmd = ["setsid", "taskset", "-c", "0", *(["chrt", "-f", "10"] if args.rt else []), sys.executable, __file__,
           "--serve", "--step-log", str(step_log), "--model", args.model, "--gpu", args.gpu, "--speed", str(args.speed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("URL "):
            raise SystemExit(f"the emulator did not start: {line!r}")
        host, port = line.split()[1].removeprefix("http://").rsplit(":", 1)
        if args.group_nice:  # listening, so in its own session (setsid) and autogroup: weigh that group
            if os.getsid(proc.pid) != proc.pid:
                raise SystemExit("the emulator is not in a session of its own: not renicing someone else's group")
            Path(f"/proc/{proc.pid}/autogroup").write_text(str(args.group_nice))
        os.sched_setaffinity(0, {1})
        cpu0 = _cpu_seconds(proc.pid)
        records, peak, elapsed = _load(host, int(port), args.streams, args.seconds, args.model, args.prompt_tokens,
                                       args.seed)
        cpu = (_cpu_seconds(proc.pid) - cpu0) / elapsed
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    steps = json.loads(step_log.read_text())
    result = analyse(records, steps, args.warmup)
    priority = ("SCHED_FIFO" if args.rt else f"own session, autogroup nice {args.group_nice}" if args.group_nice
                else "own session")
    result.update(streams=args.streams, peak_in_flight=peak, server_cpu=cpu, seconds=round(elapsed, 1),
                  priority=priority, engine=engine_version(),
                  load=os.getloadavg()[0],
                  model=args.model, gpu=args.gpu, speed=args.speed, prompt_tokens=args.prompt_tokens)
    print(json.dumps(result, indent=2))
    if args.write:
        _write(result)


def _write(r: dict) -> None:
    g, late, st = r["gap_error_ms"], r["lateness_ms"], r["step_ms"]
    row = (f"| {time.strftime('%Y-%m-%d')} | {r['model']} on {r['gpu']}, speed {r['speed']:g} ({r['engine']}) | "
           f"{r['priority']} | {r['load']:.1f} | {r['streams']} "
           f"(peak {r['peak_in_flight']}) | {r['seconds']:g} | {st['mean']:.1f} ({st['min']:.1f}-{st['max']:.1f}) | "
           f"{r['batch']['mean']:.0f} | {r['gaps']} | {g['p50']:.3f} / {g['p99']:.3f} / {g['max']:.2f} | "
           f"{late['p50']:.3f} / {late['p99']:.3f} | {100 * r['server_cpu']:.0f}% | {r['coalesced_tokens']} |\n")
    text = RESULTS.read_text() if RESULTS.exists() else ""
    marker = "<!-- timing rows -->\n"
    if marker not in text:
        raise SystemExit(f"{RESULTS} has no '{marker.strip()}' line to append under")
    RESULTS.write_text(text.replace(marker, marker + row, 1))


if __name__ == "__main__":
    main()

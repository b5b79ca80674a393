"""One vLLM V1 engine, step by step: its scheduler, its KV cache and the time of each step.

The scheduler mirrors vllm/v1/core/sched/scheduler.py `Scheduler.schedule()` (FCFS policy):
  1. RUNNING requests first, in the order they were admitted: a decoding request takes 1 token of the step's budget
     (`max_num_batched_tokens`), a request still prefilling takes min(what is left of its prompt, the budget left)
     (chunked prefill). Each needs KV slots for the tokens it adds; when a request cannot get its next block, the
     NEWEST running request is preempted (recompute: its blocks are freed, it goes back to the front of WAITING, and
     later re-prefills its prompt and the tokens it had generated), until the request fits or is itself the one
     preempted.
  2. Then, only if nothing was preempted this step, WAITING requests FCFS while budget is left and fewer than
     `max_num_seqs` are running: each takes min(its tokens, the budget left) if the KV blocks for that chunk are free
     (else the step stops admitting).
  3. The step runs: every decoding request emits one token; a request whose prefill completes emits its first token
     (or, after a preemption, its next one). A request that has emitted `max_tokens` finishes and frees its blocks.
Prefix caching (on by default in V1) matters here only for preempted requests: random prompts share no prefix, but
a preempted request's blocks stay cached until evicted, so its recompute skips what is left (`_cache_hits`).

In front of the engine sits vLLM's API server, modelled as one server on one core (engine time): a request added is
parsed and tokenized there (`frontend_request_ms`, by endpoint) before it joins WAITING, and every token emitted is
detokenized and streamed there (`frontend_token_us`): the share of its time the last step's tokens take is lost to
new requests, so a server streaming many tokens admits them more slowly (1 / (request cost + output tokens x token
cost) requests per second at most). The server is one asyncio event loop, whose ready queue is first in, first out
(Python's asyncio runs callbacks in the order they were scheduled), and a handler holds it until its first `await`
that suspends: in vLLM's handlers that is the tokenizer (`OpenAIServing._tokenize_prompt_input_async`, a
single-thread executor). A chat request renders its chat template before it (`OpenAIServing._preprocess_chat`:
`apply_hf_chat_template(...)`, then the tokenizer's `await`): that stage is most of what a chat request costs the
server (the chat cost above the completions one is all chat-only work), so each request of a burst takes its turn
through it before any of them, tokenized, is handed to the engine: requests that are in the server together leave it
together, which is processor sharing (round-robin service, Kleinrock, "Time-shared systems: a theoretical
treatment", JACM 1967), and a burst of N chat requests reaches the engine after N request costs, its prefills queued
there at once. GPUStack's bursts of 1000 chat requests on H100 (vLLM 0.11) show it: a mean TTFT of 18.3 s (median
18.1 s) in a 22.7 s run of 128/4-token requests, and a TPOT of 597 ms: each of their three decode steps ran beside a
full 8192-token prefill chunk. A completions request has no template to render before its tokenizer `await`, so
completions pass in the order they came (first come, first served): kvcached's burst of 500 completions on H100 (vLLM
0.19) decoded at 5.45 ms per token, which 500 requests decoding side by side cannot (33 GB of KV cache to read each
step): they reached the engine one after another. Requests that arrive one at a time at a rate the server keeps up
with see the same delay either way. (A server taking both endpoints at once is modelled as if each had it to
itself.) When only the API server has work, `step()` returns an idle step (no tokens) lasting until its next
request is through.

The work per step does not grow with the batch: decoding requests are counters (how many, the sum of their contexts,
and how many sit at each position mod block_size, since those at a block boundary are the ones needing a new block),
and a request is touched only when it joins, finishes, is preempted or prefills. Facts this relies on (true in vLLM
V1 too): at most one request is part-way through its prefill at a step's start, and it is the newest running one;
max_num_batched_tokens >= max_num_seqs, so every decode fits the budget.
"""
from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from melange_sky.engine.calibration import load_fit
from melange_sky.engine.errors import EngineError
from melange_sky.engine.hardware import GpuSpec, gpu_spec
from melange_sky.engine.memory import MemoryPlan, memory_plan
from melange_sky.engine.models import ModelSpec, normalise_dtype
from melange_sky.engine.settings import EngineSettings
from melange_sky.engine.step_time import Coefficients, StepCost


#: The API server never spends more than this share of its time streaming: requests still get through, slowly.
STREAMING_MAX = 0.95


@dataclass(frozen=True)
class Step:
    """What one engine step did. Emitters at its end: (decoding before - preempted) | first_token | resumed; each
    emits exactly one token; `finished` emitted their last."""

    duration_s: float  # model step time (already divided by `speed`)
    first_token: tuple[Hashable, ...]  # requests whose FIRST output token comes out at this step's end
    resumed: tuple[Hashable, ...]  # preempted requests whose recompute completed here: they emit again
    finished: tuple[Hashable, ...]  # requests that emitted their LAST token at this step's end
    preempted: tuple[Hashable, ...]  # requests evicted while scheduling this step (emit nothing this step)
    batch_tokens: int  # tokens processed this step (prefill chunk tokens + decodes)
    decodes: int  # decode requests in the batch


@dataclass(eq=False)
class _Request:
    id: Hashable
    prompt: int
    max_tokens: int
    generated: int = 0  # output tokens emitted so far (kept current while not decoding)
    computed: int = 0  # tokens in the KV cache (while prefilling)
    blocks: int = 0  # KV blocks held (while prefilling)
    decoding: bool = False
    offset: int = 0  # while decoding: tokens in the KV cache = offset + the engine's tick
    epoch: int = 0  # bumped at each preemption: stale finish entries are skipped
    started: bool = False  # has emitted a first token (a later prefill completion is a resume)
    cached_blocks: int = 0  # after a preemption: its full blocks, left in the prefix cache
    partial_block: bool = False  # ... and whether a partly filled block was freed with them (evicted first)
    evicted_after: int = 0  # ... the allocation count past which the prefix cache starts evicting them

    @property
    def target(self) -> int:
        """Tokens to prefill: the prompt, plus what it had generated when it was preempted."""
        return self.prompt + self.generated


class Engine:
    """A vLLM V1 engine on one GPU type (a TP group): `add` requests, `step` until `has_work` is false.

    Raises DoesNotFit when the weights leave no room for a KV cache (an answer: that GPU cannot serve the model).
    A calibration fit saved for the GPU (`estimate --calibrate`) replaces the default coefficients; `fit_source`
    says which file, or is None.
    """

    def __init__(self, model: ModelSpec, gpu: GpuSpec | str, *, tp: int = 1, dtype: str = "bf16",
                 settings: EngineSettings = EngineSettings(), speed: float = 1.0,
                 coefficients: Coefficients | None = None):
        if tp < 1:
            raise EngineError(f"--tp must be at least 1, got {tp}")
        if speed <= 0:
            raise EngineError(f"--speed must be positive, got {speed}")
        self.model = model
        self.gpu = gpu_spec(gpu)
        self.tp = settings.tensor_parallel_size or tp
        self.dtype = normalise_dtype(settings.dtype or dtype)
        self.speed = speed
        self.fit_source: str | None = None
        if coefficients is None:
            fit = load_fit(self.gpu.name)
            coefficients = fit.coefficients if fit else Coefficients()
            self.fit_source = fit.path if fit else None
        self.coefficients = coefficients
        self.memory: MemoryPlan = memory_plan(model, self.gpu, self.tp, self.dtype, settings)
        resolved = settings.resolve(self.gpu, model)
        self.settings = resolved
        self.block_size = resolved.block_size
        self.kv_blocks = self.memory.blocks
        self.notes: list[str] = []
        self.max_model_len = resolved.max_model_len or model.max_position_embeddings
        if self.max_model_len > self.memory.kv_tokens:
            if settings.max_model_len is not None:
                raise EngineError(
                    f"max_model_len {settings.max_model_len} needs {settings.max_model_len} tokens of KV cache but "
                    f"{self.gpu.name} (TP {self.tp}) holds {self.memory.kv_tokens}: lower max_model_len or raise "
                    f"gpu_memory_utilization (vLLM refuses to start here too)")
            self.notes.append(f"max_model_len {self.max_model_len} does not fit the KV cache "
                              f"({self.memory.kv_tokens} tokens): modelled as {self.memory.kv_tokens}; deploy with "
                              f"max_model_len <= {self.memory.kv_tokens}")
            self.max_model_len = self.memory.kv_tokens
        self.max_num_seqs = resolved.max_num_seqs or 256
        self.max_num_batched_tokens = resolved.max_num_batched_tokens or 2048
        self.chunked_prefill = resolved.enable_chunked_prefill
        self.cost = StepCost(model, self.gpu, self.tp, self.dtype, resolved.kv_dtype_bytes or 2, coefficients)
        self._free = self.kv_blocks
        self._waiting: deque[_Request] = deque()
        self._running: dict[Hashable, _Request] = {}  # admission order; the last is the newest
        self._requests: dict[Hashable, _Request] = {}
        self._prefilling: _Request | None = None  # the (at most one) running request part-way through its prefill
        # decoding requests as counters
        self._tick = 0
        self._decoders = 0
        self._offset_sum = 0
        self._residues = [0] * self.block_size  # decoders by (offset mod block_size)
        self._finish_at: dict[int, list[tuple[_Request, int]]] = {}
        self._finish_ticks: list[int] = []  # heap of the keys of _finish_at
        self.peak_blocks_used = 0
        self.preemptions = 0
        self.prefix_caching = resolved.enable_prefix_caching
        # the API server, a processor-sharing server (module docstring): the requests in it by the virtual time at
        # which their work is done (`_frontend_v` advances by the service each request in it gets), the first
        # `_frontend_done` of them through (they join WAITING at the next step boundary)
        self.clock = 0.0  # engine time: the sum of step durations and idle gaps (`idle`)
        self._frontend: list[tuple[float, int, _Request]] = []
        self._frontend_v = 0.0
        self._frontend_done = 0
        self._frontend_seq = 0
        # completions requests pass it first come first served (module docstring): (when through, request), and when
        # it is next free for them
        self._fifo: deque[tuple[float, _Request]] = deque()
        self._fifo_free_at = 0.0
        self._frontend_streaming = 0.0  # share of the API server's time the tokens of the last step take
        self._frontend_request_s = coefficients.frontend_request_ms * 1e-3 / speed
        # the API server's per-request cost by the endpoint a request came to (`add(..., endpoint=)`): a chat request
        # costs it more than a plain completion (step_time.Coefficients.for_endpoint); None: the cost above
        self._frontend_endpoint_s = {
            endpoint: coefficients.for_endpoint(endpoint).frontend_request_ms * 1e-3 / speed
            for endpoint in ("chat", "completions")}
        self._frontend_token_s = coefficients.frontend_token_us * 1e-6 / speed
        self._allocated = 0  # blocks taken from the free queue for new content, ever (drives prefix-cache eviction)

    # ---- public state ----------------------------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def decoding(self) -> int:
        """Requests decoding (each emits one token per step)."""
        return self._decoders

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._running or self._waiting or self._frontend or self._fifo)

    @property
    def kv_cache_usage(self) -> float:
        """Share of KV blocks in use (vLLM's vllm:kv_cache_usage_perc / gpu_cache_usage_perc)."""
        return (self.kv_blocks - self._free) / self.kv_blocks

    @property
    def description(self) -> str:
        """One line: the engine as modelled (for `estimate` and `emulate` to print)."""
        fit = f"; calibrated ({self.fit_source})" if self.fit_source else ""
        return (f"{self.model.name} on {self.gpu.name}" + (f" x{self.tp}" if self.tp > 1 else "") +
                f", {self.dtype}: {self.kv_blocks} KV blocks of {self.block_size} tokens "
                f"({self.memory.kv_tokens} tokens), max_num_seqs {self.max_num_seqs}, max_num_batched_tokens "
                f"{self.max_num_batched_tokens}{fit}")

    # ---- requests --------------------------------------------------------------------------------------------------
    def add(self, request_id: Hashable, prompt_tokens: int, max_tokens: int, *, at: float | None = None,
            endpoint: str | None = None) -> None:
        """A request enters the API server, then WAITING (FCFS). `at`: when it arrived on the engine clock
        (`clock`; default now), for a driver that adds arrivals at step boundaries but knows they came mid-step.
        `endpoint` ("chat" or "completions"): the OpenAI endpoint it came to, which sets what it costs the API
        server (default: the engine's coefficients as given). EngineError if it is longer than max_model_len (vLLM
        answers 400)."""
        if request_id in self._requests:
            raise EngineError(f"request {request_id!r} is already in the engine")
        if prompt_tokens < 1 or max_tokens < 1:
            raise EngineError("a request needs at least 1 prompt token and max_tokens >= 1")
        if prompt_tokens + max_tokens > self.max_model_len:
            raise EngineError(f"this model's maximum context length is {self.max_model_len} tokens; the request "
                              f"asks for {prompt_tokens} prompt + {max_tokens} output tokens")
        cost_s = self._request_cost_s(endpoint)
        request = _Request(request_id, prompt_tokens, max_tokens)
        self._requests[request_id] = request
        arrived = self.clock if at is None else min(at, self.clock)
        if endpoint == "completions":  # first come first served
            ready = max(arrived, self._fifo_free_at) + cost_s / (1 - self._frontend_streaming)
            self._fifo_free_at = ready
            if ready <= self.clock:
                self._waiting.append(request)  # no API server cost modelled
            else:
                self._fifo.append((ready, request))
            return
        # a chat request shares the server with the others in it; one that came mid-step has shared it since it
        # came (the others' loss is not charged back)
        sharing = len(self._frontend) - self._frontend_done + 1
        done_at = self._frontend_v + cost_s - (self.clock - arrived) * (1 - self._frontend_streaming) / sharing
        if done_at <= self._frontend_v:
            self._waiting.append(request)  # through already (or no API server cost modelled)
        else:
            self._frontend_seq += 1
            bisect.insort(self._frontend, (done_at, self._frontend_seq, request))

    def frontend_capacity(self, output_tokens: int, endpoint: str | None = None) -> float:
        """Requests per second the API server sustains when each streams `output_tokens` tokens and came to
        `endpoint` (as `add`; None: the engine's coefficients as given); inf without an API server."""
        busy = self._request_cost_s(endpoint) + output_tokens * self._frontend_token_s
        return 1 / busy if busy > 0 else math.inf

    def _request_cost_s(self, endpoint: str | None) -> float:
        """The API server's time for one request that came to `endpoint` (None: the coefficients as given)."""
        cost_s = self._frontend_request_s if endpoint is None else self._frontend_endpoint_s.get(endpoint)
        if cost_s is None:
            raise EngineError(f"unknown endpoint {endpoint!r} (chat or completions)")
        return cost_s

    def without_frontend(self) -> Engine:
        """This engine with no API server in front (for measuring what the GPU alone sustains); returns itself."""
        self._frontend_request_s = self._frontend_token_s = 0.0
        self._frontend_endpoint_s = dict.fromkeys(self._frontend_endpoint_s, 0.0)
        return self

    def idle(self, seconds: float) -> None:
        """Time passed with the engine idle (a driver waiting for the next arrival): the engine clock moves on."""
        if seconds > 0:
            self._serve_frontend(seconds)
            self.clock += seconds

    def abort(self, request_id: Hashable) -> None:
        """A client went away: its blocks are freed and it never emits again (unknown ids are ignored)."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return
        if request_id in self._running:
            del self._running[request_id]
            self._release(request)
        elif request in self._waiting:
            self._waiting.remove(request)
        elif any(entry[1] is request for entry in self._fifo):
            self._fifo = deque(entry for entry in self._fifo if entry[1] is not request)
        else:
            at = next(k for k, entry in enumerate(self._frontend) if entry[2] is request)
            del self._frontend[at]
            if at < self._frontend_done:
                self._frontend_done -= 1

    # ---- the step --------------------------------------------------------------------------------------------------
    def step(self) -> Step | None:
        """Schedule and run one step; None when nothing is running, waiting or in the API server. With only the API
        server busy, an idle step (no tokens) until its next request is through."""
        if self._frontend_done:  # through the API server during the last step (in the order they got through)
            self._waiting.extend(entry[2] for entry in self._frontend[:self._frontend_done])
            del self._frontend[:self._frontend_done]
            self._frontend_done = 0
        while self._fifo and self._fifo[0][0] <= self.clock + 1e-12:
            self._waiting.append(self._fifo.popleft()[1])
        if not self._running and not self._waiting:
            if not self._frontend and not self._fifo:
                return None
            shared = self._frontend_next_s()
            gap = min(shared, self._fifo[0][0] - self.clock if self._fifo else math.inf)
            self._serve_frontend(gap)
            if gap == shared and not self._frontend_done:  # float rounding: the next is through by definition
                self._frontend_v, self._frontend_done = self._frontend[0][0], 1
            self.clock += gap
            self._frontend_streaming = 0.0  # nothing was streamed meanwhile
            return Step(duration_s=gap, first_token=(), resumed=(), finished=(), preempted=(), batch_tokens=0,
                        decodes=0)
        bs = self.block_size
        budget = self.max_num_batched_tokens
        preempted: list[Hashable] = []
        # 1. running decodes: those at a block boundary need a block; preempt the newest until they fit
        need = self._residues[(-self._tick) % bs]
        while need > self._free:
            preempted.append(self._preempt_newest().id)
            need = self._residues[(-self._tick) % bs]
        self._free -= need
        self._allocated += need
        budget -= self._decoders
        # the running request still prefilling (the newest), its next chunk
        chunks: list[tuple[_Request, int]] = []
        p = self._prefilling
        if p is not None and budget > 0:
            chunk = min(p.target - p.computed, budget)
            extra = self._blocks_for(p.computed + chunk) - p.blocks
            if extra > self._free:
                self._preempt(p)  # it is the newest: vLLM preempts it, and it is the one that cannot run
                self._running.pop(p.id)
                preempted.append(p.id)
            else:
                self._free -= extra
                self._allocated += extra
                p.blocks += extra
                chunks.append((p, chunk))
                budget -= chunk
        # 2. waiting requests, FCFS, only when nothing was preempted
        if not preempted:
            while self._waiting and budget > 0 and len(self._running) < self.max_num_seqs:
                request = self._waiting[0]
                hits = self._cache_hits(request)
                wanted = request.target - hits * self.block_size
                if not self.chunked_prefill and wanted > budget:
                    break
                chunk = min(wanted, budget)
                blocks = self._blocks_for(hits * self.block_size + chunk)
                if blocks > self._free:
                    break
                self._waiting.popleft()
                self._free -= blocks
                self._allocated += blocks - hits
                request.computed = hits * self.block_size
                request.blocks = blocks
                request.cached_blocks = 0
                self._running[request.id] = request
                chunks.append((request, chunk))
                budget -= chunk
        # 3. run it
        decodes = self._decoders
        prefill_tokens = context = completing = 0
        attention = 0.0
        for r, c in chunks:
            prefill_tokens += c
            context += r.computed
            attention += c * (r.computed + c / 2)
            if r.computed + c == r.target:
                completing += 1
        decode_context = self._offset_sum + decodes * (self._tick + 1)
        if decodes + prefill_tokens == 0:
            raise AssertionError("an engine step scheduled nothing")  # a scheduler bug, never a user error
        seconds = self.cost.seconds(prefill_tokens=prefill_tokens, prefill_attention=attention,
                                    prefill_context=context, decodes=decodes, decode_context=decode_context,
                                    sampled=decodes + completing, requests=decodes + len(chunks))
        used = self.kv_blocks - self._free
        if used > self.peak_blocks_used:
            self.peak_blocks_used = used
        # decoders advance one token; those at their last token finish
        self._tick += 1
        finished: list[Hashable] = []
        for request, epoch in self._finish_at.pop(self._tick, ()):
            if request.epoch == epoch and request.decoding and request.id in self._running:
                del self._running[request.id]
                request.generated = request.max_tokens
                self._release(request)
                del self._requests[request.id]
                finished.append(request.id)
        # prefill chunks advance; completed prefills emit
        first: list[Hashable] = []
        resumed: list[Hashable] = []
        self._prefilling = None
        for request, chunk in chunks:
            request.computed += chunk
            if request.computed < request.target:
                self._prefilling = request
                continue
            request.generated += 1
            (resumed if request.started else first).append(request.id)
            request.started = True
            if request.generated >= request.max_tokens:
                del self._running[request.id]
                self._free += request.blocks
                request.blocks = 0
                del self._requests[request.id]
                finished.append(request.id)
            else:
                self._start_decoding(request)
        duration = seconds / self.speed
        self._serve_frontend(duration)
        self.clock += duration
        emitted = decodes + len(first) + len(resumed)
        self._frontend_streaming = min(STREAMING_MAX, emitted * self._frontend_token_s / duration) if duration else 0.0
        return Step(duration_s=duration, first_token=tuple(first), resumed=tuple(resumed),
                    finished=tuple(finished), preempted=tuple(preempted), batch_tokens=decodes + prefill_tokens,
                    decodes=decodes)

    def skip_decodes(self, limit_s: float) -> tuple[int, float]:
        """Run, at once, the pure-decode steps that come before anything changes: no prefill, no admission, no
        finish, no preemption, and ending within `limit_s` seconds (model time, after `speed`). Returns (steps,
        seconds). Each of those steps would have emitted one token per decoding request and nothing else, so a
        caller that only needs events (the estimator) loses nothing; `step()` then runs the next eventful step.
        This is what keeps a long decode phase from costing one Python step per token."""
        d = self._decoders
        if self._frontend_done:
            return 0, 0.0  # a request is through the API server: the next step admits it
        if self._frontend:  # stop before the API server lets its next request through
            limit_s = min(limit_s, self._frontend_next_s())
        if self._fifo:
            limit_s = min(limit_s, self._fifo[0][0] - self.clock)
        if d == 0 or self._prefilling is not None or limit_s <= 0:
            return 0, 0.0
        if self._waiting and len(self._running) < self.max_num_seqs:
            head = self._waiting[0]
            cached = self._cache_hits(head) * self.block_size
            chunk = min(head.target - cached, self.max_num_batched_tokens - d)
            if chunk > 0 and (self.chunked_prefill or chunk == head.target - cached) and \
                    self._blocks_for(cached + chunk) <= self._free:
                return 0, 0.0  # the next step admits it
        while self._finish_ticks and self._finish_ticks[0] not in self._finish_at:
            heapq.heappop(self._finish_ticks)
        tau = self._tick
        k = (self._finish_ticks[0] - 1 - tau) if self._finish_ticks else 1 << 30
        if k <= 0:
            return 0, 0.0
        # blocks: over any block_size consecutive steps every decoder needs exactly one new block
        bs = self.block_size
        cycles = self._free // d
        k_blocks = base = cycles * bs
        spare = self._free - cycles * d
        for j in range(bs):
            r = self._residues[(-(tau + base + j)) % bs]
            if r > spare:
                break
            spare -= r
            k_blocks = base + j + 1
        k = min(k, k_blocks)
        # time: step j takes a + b (c0 + d j)
        a, b = self.cost.decode_line(d)
        a /= self.speed
        b /= self.speed
        c0 = self._offset_sum + d * (tau + 1)
        half = b * d / 2
        lin = a + b * c0 - half
        if math.isinf(limit_s):
            k_time = k
        elif half > 0:
            k_time = int((-lin + math.sqrt(lin * lin + 4 * half * limit_s)) / (2 * half))
        else:
            k_time = int(limit_s / lin) if lin > 0 else k
        k = min(k, k_time)
        while k > 0 and k * lin + half * k * k > limit_s:  # float rounding
            k -= 1
        if k <= 0:
            return 0, 0.0
        seconds = k * lin + half * k * k
        need = (k // bs) * d + sum(self._residues[(-(tau + j)) % bs] for j in range((k // bs) * bs, k))
        self._free -= need
        self._allocated += need
        self._tick += k
        used = self.kv_blocks - self._free
        if used > self.peak_blocks_used:
            self.peak_blocks_used = used
        self._serve_frontend(seconds)
        self.clock += seconds
        self._frontend_streaming = min(STREAMING_MAX, k * d * self._frontend_token_s / seconds)
        return k, seconds

    # ---- bookkeeping -----------------------------------------------------------------------------------------------
    def _frontend_next_s(self) -> float:
        """Seconds (engine time) until the API server's next request is through, at its present share of time for
        requests; inf when it holds none that is not through."""
        sharing = len(self._frontend) - self._frontend_done
        if sharing <= 0:
            return math.inf
        work = self._frontend[self._frontend_done][0] - self._frontend_v
        return max(0.0, work) * sharing / (1 - self._frontend_streaming)

    def _serve_frontend(self, seconds: float) -> None:
        """The API server works `seconds` (engine time) for the requests in it, shared equally (the share of its time
        the last step's tokens take aside); those whose work is done are through. Moves numbers only (no container
        changes: the simulator runs `skip_decodes` on a shallow copy of an engine)."""
        entries, done = self._frontend, self._frontend_done
        sharing = len(entries) - done
        if sharing <= 0 or seconds <= 0:
            return
        rate = 1 - self._frontend_streaming
        v = self._frontend_v
        while sharing > 0:
            need = max(0.0, entries[done][0] - v) * sharing / rate
            if need > seconds:
                v += seconds * rate / sharing
                break
            seconds -= need
            v = max(v, entries[done][0])
            done += 1
            sharing -= 1
        self._frontend_v, self._frontend_done = v, done

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _start_decoding(self, request: _Request) -> None:
        """A request whose prefill completed (and emitted) joins the decode counters."""
        # tokens in the cache now: its prompt and every generated token but the last (fed at the next step)
        request.decoding = True
        request.offset = request.prompt + request.generated - 1 - self._tick
        self._decoders += 1
        self._offset_sum += request.offset
        self._residues[request.offset % self.block_size] += 1
        remaining = request.max_tokens - request.generated
        tick = self._tick + remaining
        entries = self._finish_at.get(tick)
        if entries is None:
            entries = self._finish_at[tick] = []
            heapq.heappush(self._finish_ticks, tick)
        entries.append((request, request.epoch))

    def _stop_decoding(self, request: _Request) -> int:
        """Remove a decoding request from the counters; the tokens it has in the KV cache."""
        request.decoding = False
        self._decoders -= 1
        self._offset_sum -= request.offset
        self._residues[request.offset % self.block_size] -= 1
        return request.offset + self._tick

    def _release(self, request: _Request) -> int:
        """Free a request's blocks (it leaves RUNNING: finished, aborted or preempted); the tokens it had cached."""
        if request.decoding:
            tokens = self._stop_decoding(request)
            request.generated = tokens - request.prompt + 1
            self._free += self._blocks_for(tokens)
        else:
            tokens = request.computed
            self._free += request.blocks
            if self._prefilling is request:
                self._prefilling = None
        request.blocks = 0
        return tokens

    def _cache_hits(self, request: _Request) -> int:
        """Full blocks of a preempted request still in the prefix cache (vLLM V1, prefix caching on by default:
        vllm/v1/core/block_pool.py). Freed blocks join the free queue's tail, a request's last block first, and new
        allocations take blocks from its head; so once the blocks that were free before it are used up, each new
        allocation evicts one of its blocks, the partly filled one first, then its full blocks from the end. At
        least one token is always recomputed, as vLLM does (its logits are needed)."""
        if not request.cached_blocks or not self.prefix_caching:
            return 0
        evicted = max(0, self._allocated - request.evicted_after)
        lost = max(0, evicted - (1 if request.partial_block else 0))
        hits = max(0, request.cached_blocks - lost)
        return min(hits, (request.target - 1) // self.block_size)

    def _preempt(self, request: _Request) -> None:
        """Recompute preemption: blocks freed, back to the front of WAITING, its progress forgotten (but its full
        blocks stay in the prefix cache until evicted: see `_cache_hits`)."""
        free_before = self._free
        tokens = self._release(request)
        request.cached_blocks = tokens // self.block_size
        request.partial_block = tokens % self.block_size != 0
        request.evicted_after = self._allocated + free_before
        request.computed = 0
        request.epoch += 1
        self._waiting.appendleft(request)
        self.preemptions += 1

    def _preempt_newest(self) -> _Request:
        _id, victim = self._running.popitem()
        self._preempt(victim)
        return victim


__all__ = ["Engine", "Step"]

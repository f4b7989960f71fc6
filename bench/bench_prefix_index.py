"""PrefixIndex.longest: lookup time by number of rows and prompt length.

Workloads (one namespace; tokens drawn from a 50k vocabulary):

- ``mixed``: 64 conversations of 32k tokens sharing a 1k-token system prompt; rows are
  prefixes of random conversations at random lengths (a cache after many turns). The prompt
  is one conversation's first N tokens.
- ``nested``: every row is a prefix of the prompt's conversation (worst case: the lookup must
  return them all).

Tokens are passed as bytes (``encode_tokens``, what the manager already has for the key);
the ``list`` column adds encoding a list of ints to the lookup.

Run: ``.venv/bin/python bench/bench_prefix_index.py``
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from erllama.cache.index import PrefixIndex
from erllama.cache.key import encode_tokens

ROWS = (10, 100, 1000, 10_000)
PROMPTS = (1024, 8192, 32_768)
NS = b"ns"


def best_us(fn: Callable[[], object], budget_s: float = 0.2) -> float:
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    runs = 0
    while runs < 5 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best * 1e6


def conversations(rng: random.Random) -> list[list[int]]:
    system = [rng.randrange(50_000) for _ in range(1024)]
    return [system + [rng.randrange(50_000) for _ in range(32_768 - 1024)] for _ in range(64)]


def build(n_rows: int, nested: bool, convs: list[list[int]], rng: random.Random) -> PrefixIndex:
    conv_bytes = [encode_tokens(c) for c in convs]
    index = PrefixIndex()
    while len(index) < n_rows:
        c = 0 if nested else rng.randrange(len(convs))
        n = rng.randrange(1, 32_769)
        index.insert(NS, conv_bytes[c][: 4 * n], (c * 100_000 + n).to_bytes(32, "little"))
    return index


def main() -> None:
    rng = random.Random(0)
    convs = conversations(rng)
    print(
        f"{'workload':8s} {'rows':>6s} {'prompt':>7s} {'hits':>6s} {'bytes µs':>9s} {'list µs':>9s}"
    )
    for nested in (False, True):
        for n_rows in ROWS:
            index = build(n_rows, nested, convs, rng)
            for n in PROMPTS:
                prompt = [*convs[0][:n], 7]  # the prompt continues past the saved prefix
                as_bytes = encode_tokens(prompt)
                hits = len(index.longest(NS, as_bytes))
                t_bytes = best_us(lambda ix=index, b=as_bytes: ix.longest(NS, b))
                t_list = best_us(lambda ix=index, p=prompt: ix.longest(NS, p))
                name = "nested" if nested else "mixed"
                print(f"{name:8s} {n_rows:6d} {n:7d} {hits:6d} {t_bytes:9.1f} {t_list:9.1f}")


if __name__ == "__main__":
    main()

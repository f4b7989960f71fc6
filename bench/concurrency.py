"""The concurrent phases of the ``http_servers`` scenario (issue 22): many clients at once.

Both phases run each server with 4 slots (``erllama serve --parallel 4``, ``llama-server -np
4`` with 4 x 4096 context so each slot has 4096 as erllama's sequences do), one server at a
time (the other is idle), alternating which goes first, through the ``openai`` client,
streamed, greedy, ``MAX_TOKENS`` per reply.

- **cold fan-out**: nothing cached; N clients send at the same moment one shared system
  prompt (~950 tokens) with N different questions, the fan-out of parallel sub-agents. Beside
  it, one request alone with another system prompt of the same length, on a fresh prompt
  too. Then, one at a time, N - 1 more questions on the shared prompt (cached now): each one's
  TTFT is what its suffix costs. Reported: each TTFT, the phase's wall time (first send to
  last reply), that wall time over the lone request's, and over the issue's reference, the
  lone request plus the N - 1 suffixes (goal: at most 1.3).
- **concurrent conversations**: N conversations of R turns over one shared system prompt;
  every round the N clients send their next turn at once (each history grows with that
  server's own replies). Reported: median TTFT of first and of later turns, and the phase's
  wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
from common import median, prose_of_tokens
from common import question as make_question

import erllama

CLIENTS = 4
SYSTEM_TOKENS = 950


async def system_prompts(model_path: Any, threads: int, n: int) -> list[str]:
    """``n`` distinct system prompts of about ``SYSTEM_TOKENS`` tokens (a fresh one per use:
    nothing a server cached from another phase can serve it)."""
    from common import cache_config, model_config

    config = erllama.EngineConfig(cache=cache_config(None))
    async with erllama.open_engine(config) as engine:
        mid = await engine.load_model("m", model_config(model_path, threads=threads))
        out = []
        for i in range(n):
            notes = await prose_of_tokens(engine, mid, SYSTEM_TOKENS - 40, seed=f"fanout-{i}")
            out.append(
                f"You are the assistant of county records office {i + 1}. Answer briefly, "
                f"from these notes only.\n\n{notes}"
            )
        return out


async def _at_once(
    turn: Callable[[Any, list[dict[str, str]]], Any], client: Any, batch: list[list[dict[str, str]]]
) -> tuple[list[dict[str, Any]], float]:
    """Send every message list at the same moment; the rows and the wall time."""
    rows: list[dict[str, Any] | None] = [None] * len(batch)

    async def one(i: int) -> None:
        rows[i] = await turn(client, batch[i])

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(len(batch)):
            tg.start_soon(one, i)
    wall = time.perf_counter() - t0
    return [r for r in rows if r is not None], wall


def _ask(system: str, seed: str) -> list[dict[str, str]]:
    """A system prompt and one question (``seed`` picks it)."""
    return [{"role": "system", "content": system}, {"role": "user", "content": make_question(seed)}]


async def fanout(
    turn: Callable[[Any, list[dict[str, str]]], Any],
    client: Any,
    shared: str,
    alone: str,
    seed: str,
) -> dict[str, Any]:
    """One server's cold fan-out (``shared``) and its lone reference request (``alone``)."""
    t0 = time.perf_counter()
    single = await turn(client, _ask(alone, seed))
    single_wall = time.perf_counter() - t0
    batch = [_ask(shared, f"{seed}-{i}") for i in range(CLIENTS)]
    rows, wall = await _at_once(turn, client, batch)
    suffixes = [await turn(client, _ask(shared, f"{seed}-suffix-{i}")) for i in range(CLIENTS - 1)]
    reference = single_wall + sum(r["ttft_s"] for r in suffixes)
    return {
        "ttft_s": [r["ttft_s"] for r in rows],
        "cached_tokens": [r["cached_tokens"] for r in rows],
        "prompt_tokens": [r["prompt_tokens"] for r in rows],
        "wall_s": wall,
        "alone_wall_s": single_wall,
        "alone_ttft_s": single["ttft_s"],
        "wall_over_alone": wall / single_wall,
        "suffix_ttft_s": [r["ttft_s"] for r in suffixes],
        "reference_s": reference,
        "wall_over_reference": wall / reference,
        "ttft_median_s": median([r["ttft_s"] for r in rows]),
    }


class Conversations:
    """One server's N concurrent conversations, advanced a round at a time (so that two
    servers' rounds can alternate)."""

    def __init__(self, turn: Callable[[Any, list[dict[str, str]]], Any], client: Any,
                 system: str, seed: str) -> None:  # fmt: skip
        self.turn, self.client, self.seed = turn, client, seed
        self.history = [[{"role": "system", "content": system}] for _ in range(CLIENTS)]
        self.first: list[float] = []
        self.later: list[float] = []
        self.cached: list[int | None] = []
        self.wall_s = 0.0
        self.rounds = 0

    async def round(self) -> None:
        rnd = self.rounds
        for c, h in enumerate(self.history):
            h.append({"role": "user", "content": make_question(f"{self.seed}-{c}-{rnd}")})
        rows, wall = await _at_once(self.turn, self.client, [list(h) for h in self.history])
        self.wall_s += wall
        for h, r in zip(self.history, rows, strict=True):
            h.append({"role": "assistant", "content": r["text"]})
            (self.first if rnd == 0 else self.later).append(r["ttft_s"])
            self.cached.append(r["cached_tokens"])
        self.rounds += 1

    def summary(self) -> dict[str, Any]:
        return {
            "rounds": self.rounds,
            "ttft_median_first_s": median(self.first),
            "ttft_median_later_s": median(self.later) if self.later else None,
            "ttft_later_s": self.later,
            "cached_tokens": self.cached,
            "wall_s": self.wall_s,
        }

"""Scenario: the cache-aware router simulated at fleet size (no Ray, no model).

A discrete-event simulation of R replicas (100 and 1,000) serving the multi-tenant workload
of ``workload.py`` (conversations over shared system prompts, histories resent every turn;
the fleet's conversations scale with R). A replica serves one request at a time: prefill
of the tokens it does not hold at ``PREFILL_TOK_S``, then the reply at ``DECODE_TOK_S``
(SmolLM2's measured rates on this machine), and afterwards holds the conversation's
context (an LRU of chain blocks per replica). Requests arrive open-loop (Poisson), each
conversation's turns one after another.

Three routers place the same requests:

* ``round_robin``;
* ``char_prefix``: what a prefix tree over prompt text does (Ray's
  ``PrefixCacheAffinityRouter``): the replica it last sent the longest matching prefix to,
  if the match covers enough of the prompt, else the least loaded; it assumes where it sent
  a prompt is where that prompt is cached;
* ``erllama``: :class:`erllama.cluster.Router` on the replicas' exact block summaries (held
  blocks and loads refreshed every ``REFRESH_S``; between refreshes it counts what it sent
  itself, as Ray's router counts queue lengths).

Reported per router and fleet size: cache-hit rate (prompt tokens a replica held), mean and
p95 time to first token, and the router's own time per request.
"""

from __future__ import annotations

import heapq
import random
import statistics
import time
from collections import OrderedDict
from typing import Any

from workload import Turn, Workload

from erllama.cluster import BLOCK, CostModel, Router, chain_hashes

NAME = "router_sim"
TITLE = "Router simulation at 100 and 1,000 replicas (no Ray)"
PREFILL_TOK_S = 400.0
DECODE_TOK_S = 130.0
REFRESH_S = 1.0
CACHE_BLOCKS = 4096  # per replica: 262,144 tokens of KV
ROUTERS = ("round_robin", "char_prefix", "erllama")


def _plan(ctx: Any) -> dict[str, Any]:
    if ctx.quick:
        return {"fleets": (100,), "per_replica": 2, "turns": 4}
    return {"fleets": (100, 1000), "per_replica": 3, "turns": 5}


def steps(ctx: Any) -> int:
    return len(_plan(ctx)["fleets"]) * len(ROUTERS)


class _Replica:
    def __init__(self) -> None:
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.busy_until = 0.0
        self.queue = 0

    def held(self, chain: list[int]) -> int:
        n = 0
        for h in chain:
            if h not in self.blocks:
                break
            n += 1
        return n

    def keep(self, chain: list[int]) -> None:
        for h in chain:
            self.blocks.pop(h, None)
            self.blocks[h] = None
        while len(self.blocks) > CACHE_BLOCKS:
            self.blocks.popitem(last=False)


class _CharPrefix:
    """A prefix tree of token strings, one replica per node: where each prompt was sent."""

    def __init__(self, threshold: float = 0.1) -> None:
        self.root: dict[str, Any] = {}
        self.threshold = threshold

    def route(self, prompt: tuple[int, ...], loads: list[int]) -> int:
        node, best, depth = self.root, None, 0
        for t in prompt:
            nxt = node.get(t)
            if nxt is None:
                break
            node = nxt
            depth += 1
            best = node.get("@", best)
        if best is not None and depth >= self.threshold * len(prompt):
            return int(best)
        return min(range(len(loads)), key=loads.__getitem__)

    def record(self, prompt: tuple[int, ...], replica: int) -> None:
        node = self.root
        for t in prompt:
            node = node.setdefault(t, {})
            node["@"] = replica


def _simulate(
    policy: str, n_replicas: int, turns: list[Turn], rate: float, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    replicas = [_Replica() for _ in range(n_replicas)]
    router = Router(CostModel(prefill_tok_per_s=PREFILL_TOK_S, request_s=1.0), BLOCK)
    for i in range(n_replicas):
        router.update(str(i), held={}, load=0, capacity=4)
    dirty: set[int] = set()  # replicas whose blocks changed since the last refresh
    tree = _CharPrefix()
    rr = 0
    next_refresh = 0.0
    ready: dict[int, float] = {}  # conversation -> when its previous turn ended
    t_arrive = 0.0
    ttfts: list[float] = []
    hit_tokens = prompt_tokens = 0
    route_s = 0.0
    durations: list[float] = []
    done_heap: list[tuple[float, int]] = []  # (time a replica's request ends, replica)
    for turn in turns:
        t_arrive += rng.expovariate(rate)
        now = max(t_arrive, ready.get(turn.conversation, 0.0))
        while done_heap and done_heap[0][0] <= now:
            _, r = heapq.heappop(done_heap)
            replicas[r].queue -= 1
        if policy == "erllama" and now >= next_refresh:
            for i, rep in enumerate(replicas):
                held = dict.fromkeys(rep.blocks, 0) if i in dirty else None
                router.update(str(i), held=held, load=rep.queue)
            dirty.clear()
            next_refresh = now + REFRESH_S
        chain = chain_hashes(turn.prompt)
        t0 = time.perf_counter()
        if policy == "round_robin":
            r = rr % n_replicas
            rr += 1
        elif policy == "char_prefix":
            r = tree.route(turn.prompt, [rep.queue for rep in replicas])
            tree.record(turn.prompt, r)
        else:
            r = int(router.rank(chain, len(turn.prompt))[0].replica.id)
            router.sent(str(r), chain)
        route_s += time.perf_counter() - t0
        rep = replicas[r]
        held = min(rep.held(chain) * BLOCK, len(turn.prompt) - 1)
        hit_tokens += held
        prompt_tokens += len(turn.prompt)
        start = max(now, rep.busy_until)
        first = start + (len(turn.prompt) - held) / PREFILL_TOK_S
        end = first + len(turn.reply) / DECODE_TOK_S
        rep.busy_until = end
        rep.queue += 1
        heapq.heappush(done_heap, (end, r))
        rep.keep(chain_hashes((*turn.prompt, *turn.reply)))
        dirty.add(r)
        ttfts.append(first - now)
        durations.append(end - now)
        ready[turn.conversation] = end
    ttfts.sort()
    return {
        "router": policy,
        "replicas": n_replicas,
        "requests": len(turns),
        "hit_rate": hit_tokens / prompt_tokens,
        "mean_ttft_s": statistics.fmean(ttfts),
        "p95_ttft_s": ttfts[int(0.95 * (len(ttfts) - 1))],
        "route_us_per_request": route_s / len(turns) * 1e6,
    }


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    rows = []
    for n in plan["fleets"]:
        wl = Workload(
            conversations=plan["per_replica"] * n,
            turns=plan["turns"],
            systems=max(4, n // 10),
            seed=n,
        )
        turns = list(wl.interleaved(seed=n))
        # Arrivals at ~60% of what the fleet could serve were every prompt prefilled whole.
        mean_cold_s = statistics.fmean(
            len(t.prompt) / PREFILL_TOK_S + len(t.reply) / DECODE_TOK_S for t in turns
        )
        rate = 0.6 * n / mean_cold_s
        for policy in ROUTERS:
            rows.append(_simulate(policy, n, turns, rate, seed=n))
            ctx.step(f"{policy} x{n}")
    return {
        "rows": rows,
        "model": {
            "prefill_tok_per_s": PREFILL_TOK_S,
            "decode_tok_per_s": DECODE_TOK_S,
            "refresh_s": REFRESH_S,
            "cache_blocks_per_replica": CACHE_BLOCKS,
            "block_tokens": BLOCK,
        },
    }


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for n in sorted({r["replicas"] for r in result["rows"]}):
        rows = {r["router"]: r for r in result["rows"] if r["replicas"] == n}
        e, rr = rows["erllama"], rows["round_robin"]
        out.append(
            {
                "figure": f"router simulation, {n} replicas: erllama routing time, hit rate, "
                "mean TTFT vs round-robin",
                "value": e["route_us_per_request"],
                "display": f"{e['route_us_per_request']:.0f} µs/request; hits {e['hit_rate']:.0%} "
                f"(round-robin {rr['hit_rate']:.0%}, char-prefix "
                f"{rows['char_prefix']['hit_rate']:.0%}); mean TTFT {e['mean_ttft_s'] * 1e3:.0f} ms "
                f"vs {rr['mean_ttft_s'] * 1e3:.0f} ms",
                "target": None,
                "met": None,
            }
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["model"]
    lines = [
        f"Simulated replicas: prefill {m['prefill_tok_per_s']:.0f} tok/s, decode "
        f"{m['decode_tok_per_s']:.0f} tok/s, one request at a time, an LRU of "
        f"{m['cache_blocks_per_replica']} blocks of {m['block_tokens']} tokens each; the "
        f"erllama router sees summaries refreshed every {m['refresh_s']} s.",
        "",
        "| replicas | router | requests | prompt tokens from cache | mean TTFT | p95 TTFT | routing µs/request |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['replicas']} | {r['router']} | {r['requests']} | {r['hit_rate']:.1%} | "
            f"{r['mean_ttft_s'] * 1e3:.0f} ms | {r['p95_ttft_s'] * 1e3:.0f} ms | "
            f"{r['route_us_per_request']:.1f} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    return {}

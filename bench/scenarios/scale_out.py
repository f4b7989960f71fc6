"""Scenario: three erllama replicas on Ray Serve under three routers, same workload, same run.

The multi-tenant workload of ``workload.py`` (conversations over a few shared system
prompts, every turn resending the whole history) runs against three replicas on a local
Ray instance, once per router:

* ``round_robin``: Ray's ``RoundRobinRouter``;
* ``prefix_affinity``: Ray's ``PrefixCacheAffinityRouter`` (a character prefix tree of
  the prompts it routed; given the token ids as text, so its prefixes are token prefixes);
* ``erllama``: :class:`erllama.ray.CacheAwareRouter` (exact block summaries the replicas
  report, weighed against load; rows fetched between replicas when that is faster).

Replicas are the stub backend calibrated to SmolLM2-135M on this machine (the figures
``router_sim.py`` uses): a step sleeps 1/130 s (decode: 130 tok/s) and prefills at most 3
tokens (prefill: 390 tok/s), so three replicas fit on 2 cores. A replica serves one request
at a time; its cache is the RAM tier. Each router gets fresh replicas.

Clients are closed-loop (``CLIENTS`` at a time), each conversation's turns in order; a turn
resends the history with the model's actual replies (so a replica's finish row is a prefix
of the next turn). Requests go through a Serve handle from this process, where the router
runs (as it runs in the HTTP ingress). TTFT is client-side: from the call to the first
token received. Reported per router: prompt tokens served from cache (restored or live),
mean and p95 TTFT, throughput (generated tokens per second of the run) and transfers.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

from workload import Workload

NAME = "scale_out"
TITLE = "Scale-out on Ray Serve: 3 replicas, round-robin vs character-prefix vs erllama router"
ROUTERS = ("round_robin", "prefix_affinity", "erllama")
#: SmolLM2-135M on this machine (router_sim.py's figures): decode and prefill rates.
DECODE_TOK_S = 130.0
PREFILL_CHUNK = 3  # tokens per step: 3 x 130 = 390 tok/s
REPLICAS = 3
CLIENTS = 6
#: A real SmolLM2-135M row: 30 layers x (K and V) x 3 KV heads x 64 x 2 bytes (f16) per
#: token, moved at 200 MB/s (a conservative same-node object-store rate).
ROW_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2
ERLLAMA_ROUTER = {
    # The replicas' rates, and the typical time a queued request holds a replica when the
    # router did not send it (a 40-token reply at 130 tok/s plus a cached prompt's tail).
    "prefill_tok_per_s": DECODE_TOK_S * PREFILL_CHUNK,
    "decode_tok_per_s": DECODE_TOK_S,
    "request_s": 0.5,
    # What moving a real SmolLM2 row would cost (the stub's rows are far smaller).
    "fetch_s_per_token": ROW_BYTES_PER_TOKEN / 200e6,
}
#: The replicas' transfer policies start from the same figures as the router's fetch cost
#: (a real SmolLM2 row at 200 MB/s), not the generic default (256 KiB a token at 50 MB/s,
#: 45 times dearer), so that before they have measured anything they agree with the
#: router on what a fetch costs; they learn from their own rows and transfers from then on.
REPLICA_POLICY = {"bytes_per_token": ROW_BYTES_PER_TOKEN, "bandwidth_bytes_per_s": 200e6}


def _plan(ctx: Any) -> dict[str, Any]:
    if ctx.quick:
        return {"conversations": 9, "turns": 3, "systems": 3}
    return {"conversations": 24, "turns": 5, "systems": 4}


def steps(ctx: Any) -> int:
    return len(ROUTERS) + 1


def _config() -> Any:
    import erllama
    from erllama.server import ServeConfig

    model = erllama.ModelConfig(
        backend="stub",
        n_ctx=4096,
        n_seq_max=1,
        prefill_chunk=PREFILL_CHUNK,
        options={"step_delay_s": 1.0 / DECODE_TOK_S, "n_vocab": 50_000, "eog_every": 0},
    )
    return ServeConfig(
        cache=erllama.CacheConfig(ram_bytes=256 * 2**20, ram_file_dir=None, disk_dir=None),
        models={"sim": model},
    )


def _conversations(plan: dict[str, Any]) -> tuple[list[Any], list[list[tuple[int, ...]]]]:
    """The interleaved turn order, and per conversation each turn's new tokens (the system
    prompt with the first question, then each question) and reply lengths."""
    wl = Workload(conversations=plan["conversations"], turns=plan["turns"], systems=plan["systems"])
    order = list(wl.interleaved())
    news: list[list[tuple[int, ...]]] = []
    for conv in wl.build():
        parts, prev = [], None
        for turn in conv.turns:
            start = 0 if prev is None else len(prev.prompt) + len(prev.reply)
            parts.append(turn.prompt[start:])
            prev = turn
        news.append(parts)
    return order, news


async def _drive(
    handle: Any, order: list[Any], news: list[list[tuple[int, ...]]]
) -> dict[str, Any]:
    from erllama.cluster import chain_hashes
    from erllama.events import Done, Token
    from erllama.ray.wire import Accepted, Failed, GenerateRequest

    history: dict[int, list[int]] = {}
    finished: dict[tuple[int, int], asyncio.Event] = {}
    for turn in order:
        finished[(turn.conversation, turn.index)] = asyncio.Event()
    slots = asyncio.Semaphore(CLIENTS)
    rows: list[dict[str, Any]] = []

    async def one(turn: Any) -> None:
        try:
            if turn.index > 0:
                await finished[(turn.conversation, turn.index - 1)].wait()
            prompt = history.get(turn.conversation, []) + list(news[turn.conversation][turn.index])
            request = GenerateRequest(
                model="sim",
                tokens=tuple(prompt),
                options={"max_tokens": len(turn.reply), "temperature": 0.0},
                chain=tuple(chain_hashes(prompt)),
            )
            t0 = time.perf_counter()
            ttft = None
            done = None
            replica = ""
            fetched = 0
            stream = handle.options(stream=True, method_name="generate").remote(request)
            async for item in stream:
                if isinstance(item, Failed):
                    raise item.error()
                if isinstance(item, Accepted):
                    replica, fetched = item.replica, item.fetched_tokens
                elif isinstance(item, Token) and ttft is None:
                    ttft = time.perf_counter() - t0
                elif isinstance(item, Done):
                    done = item
            assert done is not None and ttft is not None
            history[turn.conversation] = prompt + list(done.token_ids)
            rows.append(
                {
                    "conversation": turn.conversation,
                    "turn": turn.index,
                    "replica": replica,
                    "fetched_tokens": fetched,
                    "prompt_tokens": len(prompt),
                    "cached_tokens": done.stats.cache_delta.read,
                    "completion_tokens": done.stats.completion_tokens,
                    "ttft_s": ttft,
                    # The replica's view: waiting in its queue, then admission to token 1.
                    "queued_s": done.stats.queued_s,
                    "engine_ttft_s": done.stats.time_to_first_token_s,
                    "prefill_s": done.stats.prefill_s,
                    "decode_tok_per_s": done.stats.tokens_per_s,
                    "total_s": time.perf_counter() - t0,
                }
            )
        finally:
            finished[(turn.conversation, turn.index)].set()
            slots.release()

    t0 = time.perf_counter()
    tasks = []
    for turn in order:  # a turn takes a client slot in workload order (no deadlock: see README)
        await slots.acquire()
        tasks.append(asyncio.create_task(one(turn)))
    await asyncio.gather(*tasks)
    return {"rows": rows, "wall_s": time.perf_counter() - t0}


def _summary(router: str, driven: dict[str, Any], transfers: int) -> dict[str, Any]:
    rows = driven["rows"]
    ttfts = sorted(r["ttft_s"] for r in rows)
    prompt = sum(r["prompt_tokens"] for r in rows)
    cached = sum(r["cached_tokens"] for r in rows)
    generated = sum(r["completion_tokens"] for r in rows)
    per_replica: dict[str, int] = {}
    for r in rows:
        per_replica[r["replica"]] = per_replica.get(r["replica"], 0) + 1
    decode = [r["decode_tok_per_s"] for r in rows if r["decode_tok_per_s"]]
    prefilled = [
        (r["prompt_tokens"] - r["cached_tokens"]) / r["prefill_s"]
        for r in rows
        if r["prompt_tokens"] - r["cached_tokens"] >= 256 and r["prefill_s"] > 0
    ]
    return {
        "router": router,
        "n_requests": len(rows),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "mean_ttft_s": statistics.fmean(ttfts),
        "p95_ttft_s": ttfts[int(0.95 * (len(ttfts) - 1))],
        "throughput_tok_s": generated / driven["wall_s"],
        "requests_per_s": len(rows) / driven["wall_s"],
        "wall_s": driven["wall_s"],
        "requests_per_replica": sorted(per_replica.values(), reverse=True),
        "transfers": transfers,
        "fetched_tokens": sum(r["fetched_tokens"] for r in rows),
        # The calibration as the replicas measured it (Stats.tokens_per_s; prefill rate of
        # requests that prefilled at least 256 tokens).
        "replica_decode_tok_s": statistics.fmean(decode) if decode else None,
        "replica_prefill_tok_s": statistics.fmean(prefilled) if prefilled else None,
        "mean_queued_s": statistics.fmean(r["queued_s"] for r in rows),
        "requests": rows,
    }


def run(ctx: Any) -> dict[str, Any]:
    import ray
    from ray import serve

    from erllama.ray import ScaleOut, TransferPolicy, build_replicas

    plan = _plan(ctx)
    order, news = _conversations(plan)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 2**20,
        log_to_driver=False,
        configure_logging=False,
    )
    rows = []
    try:
        serve.start(proxy_location="Disabled")
        ctx.step("ray up")
        for router in ROUTERS:
            kwargs: dict[str, Any] = {}
            if router == "erllama":
                kwargs = ERLLAMA_ROUTER
            scale = ScaleOut(
                replicas=REPLICAS,
                router=router,
                router_kwargs=kwargs,
                max_ongoing_requests=8,
                policy=TransferPolicy(**REPLICA_POLICY),
            )
            name = f"bench-{router}"
            handle = serve.run(
                build_replicas(_config(), scale), name=name, route_prefix=None, blocking=False
            )
            try:
                _wait_ready(handle)
                driven = asyncio.run(_drive(handle, order, news))
                transfers = sum(
                    int(s["transfers"])
                    for s in handle.broadcast("transfer_stats").results(timeout_s=60)
                )
            finally:
                serve.delete(name)
            rows.append(_summary(router, driven, transfers))
            ctx.step(router)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {
        "rows": rows,
        "workload": {**plan, "clients": CLIENTS, "requests": len(order)},
        "replica": {
            "backend": "stub calibrated to SmolLM2-135M on this machine",
            "decode_tok_per_s": DECODE_TOK_S,
            "prefill_tok_per_s": DECODE_TOK_S * PREFILL_CHUNK,
            "sequences": 1,
            "cache": "RAM tier, 256 MiB",
        },
        "erllama_router_kwargs": ERLLAMA_ROUTER,
        "replica_transfer_policy": REPLICA_POLICY,
    }


def _wait_ready(handle: Any, timeout_s: float = 120.0) -> None:
    """Until every replica answers (serve.run with blocking=False returns at once)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stats = handle.broadcast("record_routing_stats").results(timeout_s=10)
        except Exception:
            stats = []
        if len(stats) >= REPLICAS:
            return
        time.sleep(0.5)
    raise RuntimeError("the replicas did not start")


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {r["router"]: r for r in result["rows"]}
    e, rr, ch = rows["erllama"], rows["round_robin"], rows["prefix_affinity"]
    met = e["mean_ttft_s"] <= 0.5 * rr["mean_ttft_s"] and e["mean_ttft_s"] < ch["mean_ttft_s"]
    return [
        {
            "figure": "3 replicas on Ray Serve: erllama router's mean TTFT vs round-robin and "
            "character-prefix",
            "value": e["mean_ttft_s"],
            "display": f"{e['mean_ttft_s'] * 1e3:.0f} ms vs {rr['mean_ttft_s'] * 1e3:.0f} ms "
            f"(round-robin) and {ch['mean_ttft_s'] * 1e3:.0f} ms (prefix affinity); cache hits "
            f"{e['hit_rate']:.0%} vs {rr['hit_rate']:.0%} and {ch['hit_rate']:.0%}",
            "target": "at most half of round-robin's, below prefix affinity's",
            "met": met,
        }
    ]


def markdown(result: dict[str, Any]) -> str:
    w, rep = result["workload"], result["replica"]
    lines = [
        f"{w['conversations']} conversations x {w['turns']} turns over {w['systems']} shared "
        f"system prompts ({w['requests']} requests), {w['clients']} closed-loop clients, "
        f"{len(result['rows'])} routers in turn on fresh replicas. Replicas: {rep['backend']} "
        f"(prefill {rep['prefill_tok_per_s']:.0f} tok/s, decode {rep['decode_tok_per_s']:.0f} "
        f"tok/s, one sequence, {rep['cache']}).",
        "",
        "| router | requests | prompt tokens from cache | mean TTFT | p95 TTFT | throughput | "
        "requests per replica | rows fetched |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['router']} | {r['n_requests']} | {r['hit_rate']:.1%} | "
            f"{r['mean_ttft_s'] * 1e3:.0f} ms | {r['p95_ttft_s'] * 1e3:.0f} ms | "
            f"{r['throughput_tok_s']:.0f} tok/s | "
            f"{'/'.join(map(str, r['requests_per_replica']))} | {r['transfers']} |"
        )
    measured = [r for r in result["rows"] if r.get("replica_decode_tok_s")]
    if measured:
        decode = statistics.fmean(r["replica_decode_tok_s"] for r in measured)
        prefill = [r["replica_prefill_tok_s"] for r in measured if r["replica_prefill_tok_s"]]
        lines += [
            "",
            f"Replicas measured {decode:.0f} tok/s decoding"
            + (f" and {statistics.fmean(prefill):.0f} tok/s prefilling" if prefill else "")
            + " (engine overhead included). erllama's router: "
            + ", ".join(f"`{k}={v:g}`" for k, v in result["erllama_router_kwargs"].items())
            + ".",
        ]
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    return {}

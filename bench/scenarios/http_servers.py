"""Scenario: `erllama serve` against llama.cpp's own `llama-server`, through the `openai` client.

Interleaved multi-turn conversations (A, B, C, D, A, B, ...) as an OpenAI-style chat client
sends them: every turn resends the whole history (a system prompt, earlier exchanges of
about 700 tokens, each earlier reply as the text it came back as, and a new question),
streamed, greedy, ``MAX_TOKENS`` per reply. Both servers run as separate processes on the
same model and machine, one slot each, 2 llama.cpp threads, ``n_ctx`` 4096, batch 512, flash
attention; erllama with a disk cache folder (``--cache-dir``), llama-server with its own
defaults for reusing prompts.

Turn by turn, erllama gets the turn first and the exact same messages then go to
llama-server (the history carries erllama's replies, so both see the same prompts under
the same machine conditions). Then both servers are stopped and started again (erllama on
the same cache folder) and the same turns are replayed in the same order.

TTFT is client side: from ``chat.completions.create(stream=True)`` to the first chunk that
carries text. Reported: the median TTFT of later turns (round 2 on, where a prompt cache
matters), of all turns, and the sums, before and after the restart.

``llama-server`` comes from ``bench/llama_server.py`` (built once from the llama.cpp tree in
the llama-cpp-python source distribution erllama runs on); without it the scenario runs
erllama alone and says so.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
from common import (
    FLASH_ATTN,
    N_BATCH,
    N_CTX,
    cache_config,
    median,
    model_config,
    prose_of_tokens,
)
from common import question as make_question

import erllama

NAME = "http_servers"
TITLE = "HTTP servers: erllama serve vs llama-server, interleaved conversations, openai client"
MAX_TOKENS = 24
SERVERS = ("erllama", "erllama_q8", "llama_server")
LABELS = {
    "erllama": "erllama serve (--cache-dir)",
    "erllama_q8": "erllama serve, q8_0 KV cache (batch-invariant: replies reused)",
    "llama_server": "llama.cpp llama-server",
}
#: Seconds between two requests: the other server's OpenMP threads stop spinning first.
GAP_S = 0.2
READY_TIMEOUT_S = 180.0


def _plan(ctx: Any) -> dict[str, Any]:
    if ctx.quick:
        return {
            "conversations": 2, "rounds": 2, "history_tokens": 150, "fanouts": 1,
            "together_rounds": 2,
        }  # fmt: skip
    return {
        "conversations": 4, "rounds": 3, "history_tokens": 700, "fanouts": 2,
        "together_rounds": 4,
    }  # fmt: skip


def steps(ctx: Any) -> int:
    plan = _plan(ctx)
    return 3 * plan["conversations"] * plan["rounds"] + plan["fanouts"] + plan["together_rounds"]


def _binary() -> Path | None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from llama_server import built

    return built()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """One server process on a loopback port: started, waited for, stopped (SIGTERM, then
    SIGKILL after 30 s). Its output goes to a log file in the scratch folder."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log: Path) -> None:
        self.name, self.argv, self.port, self.log = name, list(argv), port, log

    @contextlib.contextmanager
    def running(self) -> Iterator[Server]:
        import httpx

        with open(self.log, "ab") as out:
            proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {proc.returncode}; see {self.log}")
                with contextlib.suppress(httpx.HTTPError):
                    r = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2)
                    if r.status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready in {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.2)
            yield self
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _erllama_server(
    ctx: Any, cache_dir: Path, log: Path, slots: int = 1, q8: bool = False
) -> Server:
    port = _free_port()
    argv = [
        sys.executable, "-m", "erllama.cli", "serve", "--model", str(ctx.model_path),
        "--model-id", "smollm2", "--port", str(port), "--n-ctx", str(N_CTX),
        "--threads", str(ctx.threads), "--cache-dir", str(cache_dir),
        "--parallel", str(slots),
    ]  # fmt: skip
    if q8:
        # The same server with a q8_0 KV cache: every cell is computed alike however it is
        # batched (docs/caching.md), so replies' cells are reused too.
        argv += ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"]
    return Server("erllama_q8" if q8 else "erllama", argv, port, log)


def _llama_server(ctx: Any, binary: Path, log: Path, slots: int = 1) -> Server:
    # llama-server splits -c between its slots: each gets N_CTX, as each erllama sequence.
    port = _free_port()
    argv = [
        str(binary), "-m", str(ctx.model_path), "--host", "127.0.0.1", "--port", str(port),
        "-c", str(N_CTX * slots), "-np", str(slots), "-t", str(ctx.threads),
        "-tb", str(ctx.threads),
        "-b", str(N_BATCH), "-ub", str(N_BATCH), "-fa", "on" if FLASH_ATTN else "off",
        "--no-webui",
    ]  # fmt: skip
    return Server("llama_server", argv, port, log)


async def _openings(ctx: Any, plan: dict[str, Any]) -> list[list[dict[str, str]]]:
    """Each conversation's messages before its first question (sized with the model's
    tokenizer, in an engine closed before the servers start)."""
    config = erllama.EngineConfig(cache=cache_config(None))
    out: list[list[dict[str, str]]] = []
    async with erllama.open_engine(config) as engine:
        mid = await engine.load_model("m", model_config(ctx.model_path, threads=ctx.threads))
        for c in range(plan["conversations"]):
            system = f"You are archivist number {c + 1} of a county records office. Answer briefly."
            messages = [{"role": "system", "content": system}]
            k = 0
            while len(await engine.apply_chat_template(mid, messages)) < plan["history_tokens"]:
                notes = await prose_of_tokens(engine, mid, 70, seed=f"http-{c}-u{k}")
                reply = await prose_of_tokens(engine, mid, 40, seed=f"http-{c}-a{k}")
                messages.append(
                    {"role": "user", "content": f"Here are some notes:\n{notes}\nKeep them."}
                )
                messages.append({"role": "assistant", "content": f"Noted. {reply}"})
                k += 1
            out.append(messages)
    return out


async def _turn(client: Any, messages: list[dict[str, str]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    usage: Any = None
    stream = await client.chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    cached = None
    if usage is not None and usage.prompt_tokens_details is not None:
        cached = usage.prompt_tokens_details.cached_tokens
    return {
        "ttft_s": (first if first is not None else end) - t0,
        "total_s": end - t0,
        "text": "".join(parts),
        "prompt_tokens": usage.prompt_tokens if usage is not None else None,
        "cached_tokens": cached,
    }


def _client(server: Server) -> Any:
    import openai

    # Two retries: llama-server closes a keep-alive connection after 5 idle seconds, and a
    # request sent on it as it closes fails before it reaches the server ("Server
    # disconnected without sending a response", seen once in the fan-out phase).
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.port}/v1", api_key="bench", max_retries=2, timeout=300
    )


Script = dict[str, list[tuple[int, int, list[dict[str, str]]]]]


async def _pass(
    ctx: Any,
    servers: dict[str, Server],
    script: Script | None,
    plan: dict[str, Any],
    openings: list[list[dict[str, str]]],
    label: str,
    send_back: Callable[[str], str] = str,
) -> tuple[dict[str, list[dict[str, Any]]], Script]:
    """One pass over the conversations. Without ``script`` the turns are made here, each
    server's history growing with its own replies (as ``send_back`` makes them: a client
    talks to one server), and returned; with one, each server's is replayed."""
    clients = {name: _client(s) for name, s in servers.items()}
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
    made: Script = {name: [] for name in servers}
    history = {name: [list(m) for m in openings] for name in servers}
    order = [(c, r) for r in range(plan["rounds"]) for c in range(plan["conversations"])]
    try:
        for k, (c, rnd) in enumerate(order):
            for name in SERVERS:
                if name not in clients:
                    continue
                if script is None:
                    question = make_question(f"http-{c}-{rnd}")
                    history[name][c].append({"role": "user", "content": question})
                    messages = list(history[name][c])
                else:
                    messages = script[name][k][2]
                r = await _turn(clients[name], messages)
                r.update(conversation="ABCDEFGH"[c], round=rnd + 1)
                rows[name].append(r)
                if script is None:
                    history[name][c].append({"role": "assistant", "content": send_back(r["text"])})
                made[name].append((c, rnd, messages))
                await anyio.sleep(GAP_S)
            ctx.step(f"{label} {'ABCDEFGH'[c]}{rnd + 1}")
    finally:
        for cl in clients.values():
            await cl.close()
    return rows, made


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    later = [r["ttft_s"] for r in rows if r["round"] > 1]
    counted = [r for r in rows if r["round"] > 1 and r["cached_tokens"] is not None]
    prompt = sum(r["prompt_tokens"] or 0 for r in counted)
    return {
        "ttft_median_round2plus_s": median(later) if later else None,
        # Prompt tokens of later turns the server reported as cached.
        "hit_rate_round2plus": sum(r["cached_tokens"] for r in counted) / prompt
        if prompt
        else None,
        "ttft_median_s": median([r["ttft_s"] for r in rows]),
        "ttft_sum_s": sum(r["ttft_s"] for r in rows),
        "turns": [{k: v for k, v in r.items() if k != "text"} for r in rows],
    }


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    binary = _binary()
    if binary is None:
        ctx.notes.append(
            "http_servers: llama-server is not built (python bench/llama_server.py builds it, "
            "about 18 minutes on 2 cores): erllama ran alone."
        )
    openings = anyio.run(_openings, ctx, plan)
    cache_dir = ctx.fresh_dir("disk")
    logs = ctx.fresh_dir("disk")

    def servers(folder: Path = cache_dir) -> dict[str, Server]:
        out = {
            "erllama": _erllama_server(ctx, folder, logs / "erllama.log"),
            # A cache folder of its own (the restarted pass finds its rows there again).
            "erllama_q8": _erllama_server(
                ctx, folder.with_name(folder.name + "-q8"), logs / "erllama-q8.log", q8=True
            ),
        }
        if binary is not None:
            out["llama_server"] = _llama_server(ctx, binary, logs / "llama-server.log")
        return out

    phases: dict[str, dict[str, list[dict[str, Any]]]] = {}
    script: Script | None = None
    for phase in ("first", "restarted"):
        procs = servers()
        with contextlib.ExitStack() as stack:
            for s in procs.values():
                stack.enter_context(s.running())
            rows, made = anyio.run(_pass, ctx, procs, script, plan, openings, phase)
        phases[phase] = rows
        script = script or made
    # A client that re-serializes what it got back (here: trims the whitespace around each
    # reply, as many chat UIs and agent frameworks do): fresh servers, a fresh cache folder.
    procs = servers(ctx.fresh_dir("disk"))
    with contextlib.ExitStack() as stack:
        for s in procs.values():
            stack.enter_context(s.running())
        rows, _ = anyio.run(_pass, ctx, procs, None, plan, openings, "trimmed", str.strip)
    phases["trimming client"] = rows
    together = _together(ctx, binary, logs, plan)
    result: dict[str, Any] = {
        "conversations": plan["conversations"],
        "rounds": plan["rounds"],
        "max_tokens": MAX_TOKENS,
        "llama_server": str(binary) if binary is not None else None,
        "llama_server_version": _version(binary),
        "phases": {
            phase: {name: _summary(rows) for name, rows in by_server.items()}
            for phase, by_server in phases.items()
        },
        **together,
        "method": {
            "ttft": "client side: create(stream=True) -> first chunk with text (openai client)",
            "order": "turn by turn, each server in turn on the same questions, each history "
            "growing with that server's own replies; then all restarted and each server's "
            "turns replayed in the same order; then fresh servers and a client that sends "
            "each reply back stripped of surrounding whitespace",
            "servers": {
                "erllama": "erllama serve --cache-dir DIR --threads T --n-ctx 4096 "
                "--parallel 1 (one sequence, RAM + disk tiers, live KV reuse); --parallel 4 "
                "in the concurrent phases",
                "erllama_q8": "the same with --cache-type-k q8_0 --cache-type-v q8_0",
                "llama_server": "llama-server -np 1 -c 4096 -b 512 -ub 512 -fa on, "
                "its defaults for prompt reuse; -np 4 -c 16384 in the concurrent phases",
            },
        },
    }
    for phase in result["phases"].values():
        e = phase["erllama"].get("ttft_median_round2plus_s")
        if "llama_server" in phase and e:
            ls = phase["llama_server"]["ttft_median_round2plus_s"]
            phase["llama_server"]["round2plus_vs_erllama"] = ls / e if ls else None
    return result


def _together(ctx: Any, binary: Path | None, logs: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """The concurrent phases (bench/concurrency.py): fresh servers with 4 slots each."""
    import concurrency

    n_prompts = 2 * plan["fanouts"] + 1
    prompts = anyio.run(concurrency.system_prompts, ctx.model_path, ctx.threads, n_prompts)
    procs = {
        "erllama": _erllama_server(
            ctx, ctx.fresh_dir("disk"), logs / "erllama-4.log", concurrency.CLIENTS
        ),
        "erllama_q8": _erllama_server(
            ctx, ctx.fresh_dir("disk"), logs / "erllama-q8-4.log", concurrency.CLIENTS, True
        ),
    }
    if binary is not None:
        procs["llama_server"] = _llama_server(
            ctx, binary, logs / "llama-server-4.log", concurrency.CLIENTS
        )
    names = list(procs)

    async def phases() -> dict[str, Any]:
        clients = {name: _client(s) for name, s in procs.items()}
        fanouts: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        try:
            for k in range(plan["fanouts"]):
                order = names if k % 2 == 0 else names[::-1]
                for name in order:
                    fanouts[name].append(
                        await concurrency.fanout(
                            _turn, clients[name], prompts[2 * k], prompts[2 * k + 1], f"f{k}"
                        )
                    )
                    await anyio.sleep(GAP_S)
                ctx.step(f"fan-out {k + 1}")
            talks = {
                name: concurrency.Conversations(_turn, clients[name], prompts[-1], "together")
                for name in names
            }
            for rnd in range(plan["together_rounds"]):
                for name in names if rnd % 2 == 0 else names[::-1]:
                    await talks[name].round()
                    await anyio.sleep(GAP_S)
                ctx.step(f"together round {rnd + 1}")
        finally:
            for cl in clients.values():
                await cl.close()
        return {
            "fanout": {
                name: {
                    "runs": runs,
                    "wall_over_alone_median": median([r["wall_over_alone"] for r in runs]),
                    "wall_over_reference_median": median([r["wall_over_reference"] for r in runs]),
                    "ttft_median_s": median([r["ttft_median_s"] for r in runs]),
                    "wall_median_s": median([r["wall_s"] for r in runs]),
                }
                for name, runs in fanouts.items()
            },
            "concurrent": {name: t.summary() for name, t in talks.items()},
        }

    with contextlib.ExitStack() as stack:
        for s in procs.values():
            stack.enter_context(s.running())
        return anyio.run(phases)


def _version(binary: Path | None) -> str | None:
    if binary is None:
        return None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30,
            stdin=subprocess.DEVNULL, env={**os.environ},
        )  # fmt: skip
        text = (out.stdout + out.stderr).strip().splitlines()
        return next((line for line in text if "version" in line), text[0] if text else None)
    return None


def _round1_median(server: dict[str, Any]) -> float:
    """Median TTFT of each conversation's first turn: after a restart, what a cache that
    survives it (or not) shows."""
    return statistics.median([t["ttft_s"] for t in server["turns"] if t["round"] == 1])


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    phases = result["phases"]
    first, restarted = phases["first"], phases["restarted"]
    e_later = first["erllama"]["ttft_median_round2plus_s"]
    e_back = _round1_median(restarted["erllama"])
    e_sum = restarted["erllama"]["ttft_sum_s"]
    if "llama_server" in first:
        ls_later = first["llama_server"]["ttft_median_round2plus_s"]
        ls_back = _round1_median(restarted["llama_server"])
        ls_sum = restarted["llama_server"]["ttft_sum_s"]
        later = f"erllama {e_later * 1e3:.0f} ms, llama-server {ls_later * 1e3:.0f} ms"
        later += f" ({ls_later / e_later:.2f}x)"
        back = (
            f"first turns: erllama {e_back * 1e3:.0f} ms, llama-server {ls_back * 1e3:.0f} ms"
            f" ({ls_back / e_back:.1f}x); sum of TTFT {e_sum:.2f} s vs {ls_sum:.2f} s"
        )
    else:
        later = f"erllama {e_later * 1e3:.0f} ms; llama-server not built"
        back = f"first turns: erllama {e_back * 1e3:.0f} ms; llama-server not built"
    if "erllama_q8" in first:
        q8_later = first["erllama_q8"]["ttft_median_round2plus_s"]
        later += f"; erllama with a q8_0 KV cache {q8_later * 1e3:.0f} ms"
        back += f"; q8_0 {_round1_median(restarted['erllama_q8']) * 1e3:.0f} ms"
    rows = _together_headline(result)
    trimmed = phases.get("trimming client")
    if trimmed is not None:
        e = trimmed["erllama"]
        show = (
            f"erllama {_share(e['hit_rate_round2plus'])} cached, "
            f"{e['ttft_median_round2plus_s'] * 1e3:.0f} ms"
        )
        if "llama_server" in trimmed:
            ls = trimmed["llama_server"]
            show += (
                f"; llama-server {_share(ls['hit_rate_round2plus'])} cached, "
                f"{ls['ttft_median_round2plus_s'] * 1e3:.0f} ms"
            )
        rows.append(
            {
                "figure": "HTTP interleaved, a client trimming replies: cached share and median "
                "TTFT of later turns",
                "value": e["hit_rate_round2plus"],
                "display": show,
                "target": None,
                "met": None,
            }
        )
    return [
        *rows,
        {
            "figure": "HTTP interleaved conversations, median TTFT, later turns",
            "value": e_later,
            "display": later,
            "target": None,
            "met": None,
        },
        {
            "figure": "HTTP interleaved conversations after both servers restart, median TTFT",
            "value": e_back,
            "display": back,
            "target": None,
            "met": None,
        },
    ]


def _fan_text(f: dict[str, Any]) -> str:
    return (
        f"wall {f['wall_median_s']:.2f} s ({f['wall_over_reference_median']:.2f}x one request "
        f"plus the suffixes, {f['wall_over_alone_median']:.2f}x one request alone), median TTFT "
        f"{f['ttft_median_s'] * 1e3:.0f} ms"
    )


def _together_headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    if "fanout" not in result:
        return []
    fan, conv = result["fanout"], result["concurrent"]
    e, e_c = fan["erllama"], conv["erllama"]
    fan_text = "erllama " + _fan_text(e)
    conv_text = f"erllama {e_c['ttft_median_later_s'] * 1e3:.0f} ms"
    ratio_conv = None
    ls_c = conv.get("llama_server")
    if "llama_server" in fan:
        ls = fan["llama_server"]
        ratio_fan = e["wall_median_s"] / ls["wall_median_s"]
        ratio_conv = e_c["ttft_median_later_s"] / ls_c["ttft_median_later_s"]
        fan_text += (
            f"; llama-server wall {ls['wall_median_s']:.2f} s ({ls['wall_over_reference_median']:.2f}x"
            f", {ls['wall_over_alone_median']:.2f}x), TTFT {ls['ttft_median_s'] * 1e3:.0f} ms "
            f"(erllama/llama-server wall {ratio_fan:.2f})"
        )
        conv_text += (
            f", llama-server {ls_c['ttft_median_later_s'] * 1e3:.0f} ms "
            f"(erllama/llama-server {ratio_conv:.2f})"
        )
    q8 = []
    if "erllama_q8" in fan:
        g, g_c = fan["erllama_q8"], conv["erllama_q8"]
        ratio = g_c["ttft_median_later_s"] / ls_c["ttft_median_later_s"] if ls_c else None
        q8 = [
            {
                "figure": "HTTP cold fan-out, q8_0 KV cache",
                "value": g["wall_over_reference_median"],
                "display": _fan_text(g),
                "target": None,
                "met": None,
            },
            {
                "figure": "HTTP concurrent conversations, q8_0 KV cache, median TTFT, later turns",
                "value": g_c["ttft_median_later_s"],
                "display": f"{g_c['ttft_median_later_s'] * 1e3:.0f} ms"
                + ("" if ratio is None else f" (erllama q8_0/llama-server {ratio:.2f})"),
                "target": None,
                "met": None,
            },
        ]
    return [
        {
            "figure": f"HTTP cold fan-out: {len(e['runs'][0]['ttft_s'])} clients at once, one "
            "shared ~950-token system prompt",
            "value": e["wall_over_reference_median"],
            "display": fan_text,
            "target": "<= 1.3x one request plus the suffixes",
            "met": e["wall_over_reference_median"] <= 1.3,
        },
        {
            "figure": "HTTP concurrent conversations (4 clients at once), median TTFT, later turns",
            "value": e_c["ttft_median_later_s"],
            "display": conv_text,
            "target": "<= llama-server",
            "met": None if ratio_conv is None else ratio_conv <= 1.0,
        },
        *q8,
    ]


def _share(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.0%}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"{result['conversations']} conversations x {result['rounds']} rounds, interleaved, "
        f"{result['max_tokens']} tokens per reply, through the `openai` client; llama-server: "
        f"{result['llama_server_version'] or 'not built (erllama alone)'}.",
        "",
        "| phase | server | median TTFT, round 1 | median TTFT, round 2+ | median TTFT, all "
        "| sum of TTFT | cached share of prompts, round 2+ |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for phase, by_server in result["phases"].items():
        for name, s in by_server.items():
            later = s["ttft_median_round2plus_s"]
            lines.append(
                f"| {phase} | {LABELS[name]} | {_round1_median(s) * 1e3:.0f} ms | "
                f"{'-' if later is None else f'{later * 1e3:.0f} ms'} | "
                f"{s['ttft_median_s'] * 1e3:.0f} ms | {s['ttft_sum_s']:.2f} s | "
                f"{_share(s.get('hit_rate_round2plus'))} |"
            )
    if "fanout" in result:
        lines += [
            "",
            "Concurrent phases (4 slots each, one server at a time, alternating): a cold "
            "fan-out (4 clients at once, one shared ~950-token system prompt, nothing cached; "
            "beside it one request alone on another prompt of that length, and after it 3 more "
            "questions on the shared prompt, one at a time: their TTFTs are the suffixes) and 4 "
            "conversations whose turns are sent 4 at once.",
            "",
            "| server | fan-out wall | x one plus the suffixes | x one alone | fan-out median "
            "TTFT | conversations: median TTFT first turns | later turns | wall |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, f in result["fanout"].items():
            c = result["concurrent"][name]
            later = c["ttft_median_later_s"]
            lines.append(
                f"| {LABELS[name]} | {f['wall_median_s']:.2f} s | "
                f"{f['wall_over_reference_median']:.2f} | "
                f"{f['wall_over_alone_median']:.2f} | {f['ttft_median_s'] * 1e3:.0f} ms | "
                f"{c['ttft_median_first_s'] * 1e3:.0f} ms | "
                f"{'-' if later is None else f'{later * 1e3:.0f} ms'} | {c['wall_s']:.2f} s |"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    fig, axes = plt.subplots(1, len(result["phases"]), figsize=(11, 3.8), sharey=True)
    for ax, (phase, by_server) in zip(axes, result["phases"].items(), strict=True):
        for name, s in by_server.items():
            ys = [t["ttft_s"] * 1e3 for t in s["turns"]]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=LABELS[name])
        ax.set_title(f"{phase} pass")
        ax.set_xlabel("turn (interleaved)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("TTFT, ms")
    axes[0].legend()
    fig.tight_layout()
    return {"http_servers": fig}

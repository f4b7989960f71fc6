"""Scenario: speculative decoding, erllama's n-gram drafter beside llama-server's drafters.

Two prompt sets, greedy, ``MAX_TOKENS`` tokens each: an "edit" set (copy a passage with one
word changed, rename a variable in a function, fill a JSON object from a document), where
most of the answer is already in the prompt, and a free-chat set, where little is. The
prompts are token ids rendered once with the model's chat template; both systems get the
same ids.

- erllama (this process, one engine per setting): ``plain`` (no speculative config) and
  ``ngram`` (``ModelConfig.speculative``, draft_max 16). Both with flash attention on, one
  decode thread and two prefill threads: what ``speculative`` requires for exactness, so
  the ratio is speculation's alone. ``plain-drawn`` and ``ngram-drawn``: the same, for
  requests that draw (``DRAWN``, a seed per prompt); ``ngram-drawn`` must give
  ``plain-drawn``'s tokens (same seed, same draws).
- llama-server (its own process, restarted per setting): ``--spec-type none``,
  ``ngram-simple``, ``ngram-map-k`` and ``ngram-mod`` with their defaults, ``-t 1 -tb 2
  -fa on -np 1``, the same prompt ids through ``/completion``.

Decode speed is each server's own figure for the generated tokens (erllama
``Stats.tokens_per_s``, llama-server ``timings.predicted_per_second``), so prefill is out of
it; reported as the median per set and as the ratio to the same system's plain decoding, in
one run, settings alternating over rounds. Every erllama ``ngram`` answer must equal its
``plain`` answer token for token (the scenario fails otherwise); llama-server's answers are
compared with its own ``none`` and the result is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import attrs
from common import median
from scenarios.http_servers import Server, _binary, _free_port

import erllama

NAME = "speculative"
TITLE = "Speculative decoding: n-gram drafting on edits and free chat, erllama vs llama-server"
MAX_TOKENS = 256
N_CTX = 4096
DRAFT_MAX = 16
ERLLAMA = ("plain", "ngram", "plain-drawn", "ngram-drawn")
#: The drawn settings' sampling (seed: SEED + the prompt's index).
DRAWN = {"temperature": 0.7, "top_k": 40, "top_p": 0.95}
SEED = 1234
LLAMA_SERVER = ("none", "ngram-simple", "ngram-map-k", "ngram-mod")

PASSAGE = (
    "The harbour office opens at half past six in the morning and closes after the last "
    "ferry has left. Ferries leave at seven, ten, one and four, and the crossing takes "
    "forty minutes in calm weather. Tickets cost twelve euros for adults; children under "
    "twelve travel free, and bicycles cost three euros each. Dogs are welcome on the outer "
    "deck but must stay on a lead. Lost property is kept at the office for one month, after "
    "which it is given to the town's charity shop. In winter the four o'clock ferry does not "
    "run on Sundays, and in a storm every crossing may be cancelled at short notice."
)
CODE = """def summarize(orders):
    totals = {}
    for order in orders:
        customer = order["customer"]
        amount = order["price"] * order["count"]
        if customer not in totals:
            totals[customer] = 0
        totals[customer] += amount
    ranked = sorted(totals.items(), key=lambda item: item[1], reverse=True)
    lines = []
    for customer, amount in ranked:
        lines.append(f"{customer}: {amount:.2f}")
    return "\\n".join(lines)
"""
DOC = (
    "Order 1182 was placed on 3 May by Mira Jensen, who lives at Strandvej 14 in Aarhus. "
    "She bought four reading lamps at 39 euros each and two spare bulbs at 4 euros each, "
    "paid by card, and asked for delivery to her office at Havnegade 2 on a weekday."
)
EDITS = [
    f"Copy this text exactly, but write 'eight' instead of 'seven':\n\n{PASSAGE}",
    f"Rewrite this function with the variable totals renamed to per_customer:\n\n{CODE}",
    'Fill in this JSON object from the text below, keeping every key: {"order": null, '
    '"date": null, "name": null, "street": null, "city": null, "items": [{"what": null, '
    '"count": null, "unit_price": null}], "payment": null, "delivery_address": null}\n\n'
    f"{DOC}",
]
CHAT = [
    "Tell me a story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while it is moving.",
]
SETS = {"edit": EDITS, "chat": CHAT}


def _plan(ctx: Any) -> dict[str, int]:
    return {"rounds": 1 if ctx.quick else 2}


def steps(ctx: Any) -> int:
    binary = 1 if _binary() is not None else 0
    return _plan(ctx)["rounds"] * (len(ERLLAMA) + binary * len(LLAMA_SERVER))


def _config(path: Path, setting: str) -> erllama.ModelConfig:
    return erllama.ModelConfig(
        model_path=path,
        n_ctx=N_CTX,
        n_batch=512,
        n_threads=1,
        n_threads_batch=2,
        flash_attn=True,
        speculative=(
            erllama.SpeculativeConfig(draft_max=DRAFT_MAX) if setting.startswith("ngram") else None
        ),
    )


async def _prompts(path: Path) -> dict[str, list[list[int]]]:
    config = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    async with erllama.open_engine(config) as engine:
        mid = await engine.load_model("m", _config(path, "plain"))
        return {
            name: [
                await engine.apply_chat_template(mid, [{"role": "user", "content": t}])
                for t in texts
            ]
            for name, texts in SETS.items()
        }


async def _erllama(path: Path, setting: str, prompts: dict[str, list[list[int]]]) -> list[dict]:
    config = erllama.EngineConfig(cache=erllama.CacheConfig(enabled=False, ram_file_dir=None))
    rows = []
    async with erllama.open_engine(config) as engine:
        # No live KV: every prompt is prefilled (prefill is not in the decode figure).
        mid = await engine.load_model("m", attrs.evolve(_config(path, setting), keep_live_kv=False))
        for name, items in prompts.items():
            for i, prompt in enumerate(items):
                sampling: dict[str, Any] = {"temperature": 0.0}
                if setting.endswith("-drawn"):
                    sampling = {**DRAWN, "seed": SEED + i}
                done = await engine.complete(mid, prompt, max_tokens=MAX_TOKENS, **sampling)
                st = done.stats
                rows.append(
                    {
                        "set": name,
                        "prompt": i,
                        "tok_per_s": st.tokens_per_s,
                        "tokens": list(done.token_ids),
                        "drafted": st.draft_tokens,
                        "accepted": st.draft_accepted,
                    }
                )
    return rows


def _llama_server_rows(
    binary: Path, path: Path, setting: str, prompts: dict[str, list[list[int]]], log: Path
) -> list[dict]:
    import httpx

    port = _free_port()
    argv = [
        str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port),
        "-c", str(N_CTX), "-np", "1", "-t", "1", "-tb", "2", "-b", "512", "-ub", "512",
        "-fa", "on", "--no-webui", "--spec-type", setting,
    ]  # fmt: skip
    rows = []
    server = Server(f"llama-server {setting}", argv, port, log)
    with server.running(), httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        for name, items in prompts.items():
            for i, prompt in enumerate(items):
                r = client.post(
                    "/completion",
                    json={
                        "prompt": prompt,
                        "n_predict": MAX_TOKENS,
                        "temperature": 0.0,
                        "cache_prompt": False,
                        "return_tokens": True,
                    },
                )
                r.raise_for_status()
                body = r.json()
                timings = body.get("timings", {})
                rows.append(
                    {
                        "set": name,
                        "prompt": i,
                        "tok_per_s": timings.get("predicted_per_second"),
                        "tokens": list(body.get("tokens") or []),
                        "drafted": timings.get("draft_n", 0),
                        "accepted": timings.get("draft_n_accepted", 0),
                    }
                )
    return rows


def run(ctx: Any) -> dict[str, Any]:
    plan = _plan(ctx)
    path = Path(ctx.model_path)
    prompts = anyio.run(_prompts, path)
    binary = _binary()
    runs: dict[str, dict[str, list[list[dict]]]] = {"erllama": {}, "llama_server": {}}
    logs = ctx.fresh_dir("disk")
    for r in range(plan["rounds"]):
        order = [("erllama", s) for s in ERLLAMA]
        if binary is not None:
            order += [("llama_server", s) for s in LLAMA_SERVER]
        if r % 2:
            order.reverse()
        for system, setting in order:
            if system == "erllama":
                rows = anyio.run(_erllama, path, setting, prompts)
            else:
                assert binary is not None
                rows = _llama_server_rows(
                    binary, path, setting, prompts, logs / f"llama-server-{setting}.log"
                )
            runs[system].setdefault(setting, []).append(rows)
            ctx.step(f"{system} {setting}, round {r + 1}")
    if binary is None:
        ctx.notes.append("speculative: llama-server is not built (python bench/llama_server.py)")
    out: dict[str, Any] = {
        "rounds": plan["rounds"],
        "max_tokens": MAX_TOKENS,
        "draft_max": DRAFT_MAX,
        "prompt_tokens": {k: [len(p) for p in v] for k, v in prompts.items()},
        "systems": {},
    }
    for system, settings in runs.items():
        if not settings:
            continue
        table: dict[str, Any] = {}
        for setting, rounds in settings.items():
            plain = _plain_of(system, setting)
            reference = {(row["set"], row["prompt"]): row["tokens"] for row in settings[plain][0]}
            rows = [row for rnd in rounds for row in rnd]
            same = all(reference[(row["set"], row["prompt"])] == row["tokens"] for row in rows)
            if system == "erllama" and not same:
                raise RuntimeError(f"erllama {setting}: tokens differ from {plain} decoding")
            entry: dict[str, Any] = {"identical_to_plain": same}
            for name in SETS:
                mine = [row for row in rows if row["set"] == name]
                drafted = sum(row["drafted"] or 0 for row in mine)
                accepted = sum(row["accepted"] or 0 for row in mine)
                entry[name] = {
                    "tok_per_s": median([row["tok_per_s"] or 0.0 for row in mine]),
                    "drafted": drafted,
                    "accepted": accepted,
                    "acceptance": accepted / drafted if drafted else None,
                    "generated": sum(len(row["tokens"]) for row in mine),
                }
            table[setting] = entry
        for setting, entry in table.items():
            for name in SETS:
                base = table[_plain_of(system, setting)][name]["tok_per_s"]
                entry[name]["vs_plain"] = entry[name]["tok_per_s"] / base if base else None
        out["systems"][system] = table
    return out


def _plain_of(system: str, setting: str) -> str:
    """The setting a row is compared with: the same system's plain decoding, drawing the
    same way."""
    if system != "erllama":
        return "none"
    return "plain-drawn" if setting.endswith("-drawn") else "plain"


def _best_llama_server(result: dict[str, Any], name: str) -> tuple[str, float] | None:
    table = result["systems"].get("llama_server")
    if not table:
        return None
    best = max(
        ((s, e[name]["vs_plain"] or 0.0) for s, e in table.items() if s != "none"),
        key=lambda x: x[1],
    )
    return best


def headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    ours = result["systems"]["erllama"]["ngram"]
    best = _best_llama_server(result, "edit")
    vs = f"; llama-server's best ({best[0]}) {best[1]:.2f}x" if best else ""
    return [
        {
            "figure": "speculative decoding (n-gram), edit prompts: decode tok/s vs plain",
            "value": ours["edit"]["vs_plain"],
            "display": f"{ours['edit']['vs_plain']:.2f}x ({ours['edit']['tok_per_s']:.0f} tok/s, "
            f"{ours['edit']['acceptance'] or 0:.0%} of drafts accepted){vs}",
            "target": ">= 1.5x and >= llama-server's best",
            "met": ours["edit"]["vs_plain"] >= 1.5
            and (best is None or ours["edit"]["vs_plain"] >= best[1]),
        },
        {
            "figure": "speculative decoding (n-gram), free chat: decode tok/s vs plain",
            "value": ours["chat"]["vs_plain"],
            "display": f"{ours['chat']['vs_plain']:.2f}x; identical greedy tokens in every row",
            "target": ">= 0.97x",
            "met": ours["chat"]["vs_plain"] >= 0.97,
        },
        *_drawn_headline(result),
    ]


def _drawn_headline(result: dict[str, Any]) -> list[dict[str, Any]]:
    drawn = result["systems"]["erllama"].get("ngram-drawn")
    if drawn is None:  # a result from before the drawn settings
        return []
    edit, chat = drawn["edit"], drawn["chat"]
    return [
        {
            "figure": f"speculative decoding (n-gram), requests that draw (temperature "
            f"{DRAWN['temperature']}, seeded): decode tok/s vs plain drawing",
            "value": edit["vs_plain"],
            "display": f"edits {edit['vs_plain']:.2f}x ({edit['acceptance'] or 0:.0%} of drafts "
            f"accepted), chat {chat['vs_plain']:.2f}x; the same tokens as plain drawing with "
            "the same seed in every row",
            "target": "the plain draws' tokens; chat >= 0.97x",
            "met": drawn["identical_to_plain"] and chat["vs_plain"] >= 0.97,
        }
    ]


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"Greedy (the -drawn settings: {DRAWN}, seeded), {result['max_tokens']} tokens a "
        f"prompt, {result['rounds']} rounds alternating; "
        f"prompt tokens {result['prompt_tokens']}. Decode tok/s is each server's own figure "
        "(median per set); ratios are to the same system's plain decoding.",
        "",
        "| system | setting | edit tok/s | edit vs plain | edit acceptance | chat tok/s | "
        "chat vs plain | chat acceptance | tokens = plain |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for system, table in result["systems"].items():
        for setting, e in table.items():
            cells = []
            for name in SETS:
                s = e[name]
                acc = f"{s['acceptance']:.0%}" if s["acceptance"] is not None else "-"
                cells += [f"{s['tok_per_s']:.1f}", f"{s['vs_plain']:.2f}x", acc]
            lines.append(
                f"| {system} | {setting} | " + " | ".join(cells) + f" | "
                f"{'yes' if e['identical_to_plain'] else 'no'} |"
            )
    return "\n".join(lines)


def plot(result: dict[str, Any], plt: Any) -> dict[str, Any]:
    return {}

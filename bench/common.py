"""What every scenario shares: model settings, prompt text of a measured token length,
client-side timing of a request, and the probes that make "warm" provably warm.

All times are ``time.perf_counter`` seconds, measured by the client (the caller of
``engine.infer``), so erllama and the llama-cpp-python peers are timed the same way.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import erllama

#: One setting for every system measured (erllama, the raw loop, llama_cpp.Llama).
N_CTX = 4096
N_BATCH = 512
N_THREADS = 2
FLASH_ATTN = True
GIB = 1 << 30


def model_config(
    path: Path, *, threads: int = N_THREADS, live: bool = True, n_ctx: int = N_CTX, **kw: Any
) -> erllama.ModelConfig:
    """``live=False`` turns off reuse of a sequence's own KV between requests: for cold
    baselines and for measuring a cache tier (otherwise the live cells would serve it).
    ``n_ctx`` is per sequence."""
    return erllama.ModelConfig(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=N_BATCH,
        n_threads=threads,
        flash_attn=FLASH_ATTN,
        keep_live_kv=live,
        **kw,
    )


def cache_config(tier: str | None, scratch: Path | None = None, **kw: Any) -> erllama.CacheConfig:
    """A cache with exactly one tier on (``None``: the cache switched off).

    ``ram`` keeps rows in process memory; ``ram_file`` writes them under ``scratch`` (a
    /dev/shm folder); ``disk`` under ``scratch`` on a real filesystem. Turning the other
    tiers off makes every saved row land in the tier being measured.
    """
    if tier is None:
        return erllama.CacheConfig(enabled=False, ram_file_dir=None)
    if tier == "ram":
        return erllama.CacheConfig(ram_bytes=GIB, ram_file_dir=None, disk_dir=None, **kw)
    assert scratch is not None
    if tier == "ram_file":
        return erllama.CacheConfig(
            ram_bytes=0, ram_file_dir=scratch, ram_file_bytes=4 * GIB, disk_dir=None, **kw
        )
    if tier == "disk":
        return erllama.CacheConfig(
            ram_bytes=0, ram_file_dir=None, disk_dir=scratch, disk_bytes=16 * GIB, **kw
        )
    raise ValueError(tier)


def on_own_thread(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run ``fn`` on a fresh thread and return its result (or raise its exception).

    Every peer that computes in this process (the plain loop, ``llama_cpp.Llama``) does so
    through this. llama.cpp is built with OpenMP here, and libgomp keeps one thread team per
    thread that ever ran a parallel region; once the teams' threads outnumber the cores, it
    throttles every team's spin-waits to a few hundred iterations, so each barrier of a
    decode sleeps and wakes. A peer computing on the main thread would leave its team behind
    and slow whatever runs next (measured: erllama at ~60% of its own speed). A team dies
    with its thread, so each system is measured with no other team alive.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args, **kw)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, name="bench-peer")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return a / b


# ---- text of a measured length ---------------------------------------------------------------

_PLACES = [
    "Harwick", "Ostbury", "Kelmscot", "Danemoor", "Pellingford", "Ashcombe", "Wrexley",
    "Marlow Fen", "Tressick", "Belhaven", "Corrieford", "Stanmere", "Lowther", "Greywater",
]  # fmt: skip
_PEOPLE = [
    "the harbour master", "a young surveyor", "the town council", "the railway company",
    "an elderly weaver", "the schoolteacher", "a travelling merchant", "the mill owner",
    "the parish clerk", "a visiting engineer", "the ferryman", "the doctor's widow",
    "the county archivist", "a botanist from the university", "the stationmaster",
]  # fmt: skip
_VERBS = [
    "argued that", "wrote to the governor that", "noticed that", "recorded in the ledger that",
    "promised the villagers that", "complained at length that", "was the first to observe that",
    "told the newspaper that", "could not accept that", "reminded everyone that",
]  # fmt: skip
_FACTS = [
    "the river had risen two feet overnight", "the old bridge would need new timber before winter",
    "the price of wheat had doubled since the spring", "the lighthouse lamp burned whale oil",
    "the northern road was impassable after heavy rain", "the school had forty-two pupils",
    "the orchards produced more pears than apples", "the mill wheel turned eleven times a minute",
    "the tide tables printed in the almanac were wrong", "a second well had been dug by the church",
    "the telegraph line reached the coast in less than a year", "the harbour silted up each decade",
    "the market moved from Tuesday to Thursday", "the copper mine employed three hundred men",
    "the winter fair drew visitors from four counties", "the canal froze solid for six weeks",
]  # fmt: skip
_OPENERS = [
    "In {year},", "By the autumn of {year},", "Later that week,", "Some years afterwards,",
    "On a cold morning in {month},", "During the long summer of {year},", "At the meeting in {month},",
    "Much to everyone's surprise,", "According to the parish records,", "Before the war,",
]  # fmt: skip
_MONTHS = ["January", "March", "April", "June", "August", "October", "November", "December"]
_NOUNS = [
    "wool", "salt", "slate", "cider", "lace", "clocks", "boats", "cheese", "ropes", "glass",
    "printing presses", "bells", "maps",
]  # fmt: skip


def sentence(rng: random.Random) -> str:
    opener = rng.choice(_OPENERS).format(year=rng.randrange(1780, 1930), month=rng.choice(_MONTHS))
    if rng.random() < 0.3:
        place = rng.choice(_PLACES)
        return (
            f"{place} was known for its {rng.choice(_NOUNS)}, and {rng.choice(_PEOPLE)} often "
            f"said that {rng.choice(_FACTS)}."
        )
    return (
        f"{opener} {rng.choice(_PEOPLE)} of {rng.choice(_PLACES)} {rng.choice(_VERBS)} "
        f"{rng.choice(_FACTS)}."
    )


def prose(seed: int | str, n_sentences: int) -> str:
    """Deterministic, realistic-looking English (local history notes); distinct per seed."""
    rng = random.Random(seed)
    sentences = [sentence(rng) for _ in range(n_sentences)]
    paragraphs = [" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5)]
    return "\n\n".join(paragraphs)


def question(seed: int | str) -> str:
    rng = random.Random(f"q{seed}")
    return rng.choice(
        [
            f"What did {rng.choice(_PEOPLE)} of {rng.choice(_PLACES)} say about {rng.choice(_NOUNS)}?",
            f"Summarise in one sentence what happened in {rng.choice(_PLACES)}.",
            f"Why might {rng.choice(_PEOPLE)} have worried that {rng.choice(_FACTS)}?",
            f"Which town was known for its {rng.choice(_NOUNS)}, and why does it matter?",
            f"List two facts about {rng.choice(_PLACES)} from the notes above.",
        ]
    )


async def prompt_of_length(
    engine: erllama.Engine, mid: str, n_tokens: int, seed: int | str
) -> list[int]:
    """Exactly ``n_tokens`` token ids (BOS + prose), counted with the model's tokenizer."""
    n_sentences = max(4, n_tokens // 20)
    while True:
        tokens = await engine.tokenize(mid, prose(seed, n_sentences))
        if len(tokens) >= n_tokens:
            return tokens[:n_tokens]
        n_sentences = n_sentences * 3 // 2 + 1


async def prose_of_tokens(engine: erllama.Engine, mid: str, n_tokens: int, seed: int | str) -> str:
    """Prose of whole sentences, about ``n_tokens`` tokens long (at most one sentence over)."""
    rng = random.Random(seed)
    parts: list[str] = []
    while True:
        parts.append(sentence(rng))
        text = " ".join(parts)
        if len(await engine.tokenize(mid, text, add_special=False)) >= n_tokens:
            return text


# ---- timing one request -------------------------------------------------------------------------


@dataclass
class Timed:
    """One request as its client saw it."""

    #: infer() called -> first Token event.
    ttft_s: float
    #: infer() called -> Done event.
    total_s: float
    #: (tokens - 1) / (last token - first token): the steady decode rate.
    decode_tok_per_s: float | None
    token_ids: list[int]
    text: str
    stats: erllama.Stats
    hit: erllama.CacheHit | None
    restore: dict[str, float] = field(default_factory=dict)
    #: ``Done.reply_text``: what to send back as the assistant's message for exact replay.
    reply_text: str | None = None

    @property
    def hit_kind(self) -> str:
        return self.stats.cache_hit_kind


async def timed(engine: erllama.Engine, mid: str, prompt: Sequence[int] | str, **kw: Any) -> Timed:
    kw.setdefault("temperature", 0.0)
    t0 = time.perf_counter()
    stream = await engine.infer(mid, list(prompt) if not isinstance(prompt, str) else prompt, **kw)
    first = last = None
    ids: list[int] = []
    parts: list[str] = []
    done: erllama.Done | None = None
    async with stream:
        async for ev in stream:
            now = time.perf_counter()
            if isinstance(ev, erllama.Token):
                if first is None:
                    first = now
                last = now
                ids.append(ev.token_id)
                parts.append(ev.text)
            else:
                done = ev
    end = time.perf_counter()
    assert done is not None and first is not None and last is not None
    rate = (len(ids) - 1) / (last - first) if len(ids) > 1 and last > first else None
    return Timed(
        ttft_s=first - t0,
        total_s=end - t0,
        decode_tok_per_s=rate,
        token_ids=ids,
        text="".join(parts),
        stats=done.stats,
        hit=engine.model_info(mid).last_cache_hit,
        reply_text=done.reply_text,
    )


class RestoreProbe:
    """Times the parts of a warm restore: the cache's lookup + tier read (its ``load_s``
    counter) and the backend's ``kv_unpack`` (wrapped here), and counts the bytes unpacked.

    restore time = lookup + read + unpack; restore bandwidth = payload bytes / that time.
    The re-decoded last token and the first sampled token are *not* part of it (they are
    model compute, identical for every tier).
    """

    def __init__(self, engine: erllama.Engine, mid: str) -> None:
        self.engine = engine
        backend = engine._models[mid].backend
        original = backend.kv_unpack
        self.unpacks: list[tuple[int, float]] = []

        def kv_unpack(model: Any, seq: int, data: bytes | bytearray) -> None:
            t0 = time.perf_counter()
            try:
                original(model, seq, data)
            finally:
                self.unpacks.append((len(data), time.perf_counter() - t0))

        backend.kv_unpack = kv_unpack  # type: ignore[method-assign]

    async def measure(self, run: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
        before = self.engine.cache_counters()
        self.unpacks.clear()
        result = await run()
        after = self.engine.cache_counters()
        load_s = after.load_s - before.load_s
        payload = sum(b for b, _ in self.unpacks)
        unpack_s = sum(s for _, s in self.unpacks)
        restore_s = load_s + unpack_s
        return result, {
            "restore_bytes": float(payload),
            "lookup_read_s": load_s,
            "index_walk_s": after.lookup_s - before.lookup_s,
            "unpack_s": unpack_s,
            "restore_s": restore_s,
            "restore_bytes_per_s": payload / restore_s if restore_s > 0 else float("nan"),
        }


def drop_page_cache(folder: Path) -> int:
    """Ask the kernel to forget the cached pages of every file under ``folder`` (no root
    needed: POSIX_FADV_DONTNEED on clean, fsynced pages). Returns the files advised."""
    n = 0
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n

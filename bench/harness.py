"""The benchmark runner: runs the scenarios with one progress bar, then writes
``<UTC stamp>.json`` + ``.md`` + PNG plots into the results folder, copies them to
``latest.*``, and prints the summary. See bench/README.md for the command, the scenarios and
the JSON schema.

Run it as ``erllama bench [--quick] [--only NAME ...] [--out DIR]`` or
``python bench/run.py`` with the same options.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
SCHEMA_VERSION = 1
#: Run order; the names are what ``--only`` takes.
SCENARIOS = (
    "cold_warm",
    "agents",
    "interleaved",
    "http_servers",
    "engine_overhead",
    "streams",
    "threads",
    "models",
    "refeed",
    "speculative",
    "micro",
    "router_sim",
    "scale_out",
)


def _scenario(name: str) -> ModuleType:
    return importlib.import_module(f"scenarios.{name}")


class Context:
    """What a scenario gets: settings, scratch folders, the progress bar, and notes."""

    def __init__(
        self, *, model_path: Path, quick: bool, threads: int, bar: Any, scratch_root: Path
    ) -> None:
        self.model_path = model_path
        self.quick = quick
        self.threads = threads
        self.bar = bar
        self.notes: list[str] = []
        self._dirs: list[Path] = []
        shm = Path("/dev/shm")
        self._shm_root = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        # A real filesystem for the disk tier and llama_cpp's LlamaDiskCache (not tmpfs).
        self._disk_root = scratch_root

    def step(self, what: str = "") -> None:
        if what:
            self.bar.set_postfix_str(what, refresh=False)
        self.bar.update(1)

    def fresh_dir(self, tier: str) -> Path:
        """A new empty folder: under /dev/shm for ``ram_file``, on disk otherwise."""
        root = self._shm_root if tier == "ram_file" else self._disk_root
        if root is None:
            raise RuntimeError("no writable /dev/shm for the ram_file tier")
        root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f".scratch-{tier}-", dir=root))
        self._dirs.append(path)
        return path

    def cleanup(self) -> None:
        for path in self._dirs:
            shutil.rmtree(path, ignore_errors=True)
        self._dirs.clear()


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = None
    with contextlib.suppress(OSError), open("/proc/meminfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in ("erllama", "llama-cpp-python", "anyio", "trio", "numpy"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """llama.cpp is routed to logging by erllama; keep the bar readable."""
    import logging

    logger = logging.getLogger("erllama")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def results_dir(out: Path | None, *, quick: bool) -> Path:
    """Where a run writes: ``--out`` when given, else bench/results/ for a full run and
    bench/results/quick/ for ``--quick``, so a smoke run never replaces the committed full
    results (bench/results/latest.*)."""
    if out is not None:
        return Path(out)
    return BENCH_DIR / "results" / "quick" if quick else BENCH_DIR / "results"


def run(
    *,
    quick: bool = False,
    only: Sequence[str] = (),
    out: Path | None = None,
    model: Path | None = None,
    threads: int = 2,
    command: str = "erllama bench",
    update: bool = False,
) -> dict[str, Any]:
    from tqdm import tqdm

    from erllama.bundled import INSTALL_HINT, bundled_model_path

    names = [n for n in SCENARIOS if not only or n in only]
    unknown = set(only) - set(SCENARIOS)
    if unknown:
        raise SystemExit(
            f"unknown scenario(s): {', '.join(sorted(unknown))}; pick from {SCENARIOS}"
        )
    model_path = model or bundled_model_path()
    if model_path is None:
        raise SystemExit(f"the bundled SmolLM2 model is not installed: {INSTALL_HINT}")
    out_dir = results_dir(out, quick=quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(BENCH_DIR))
    modules = {n: _scenario(n) for n in names}
    started = dt.datetime.now(dt.UTC)
    load_before = _load()
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    failed: list[str] = []
    with tqdm(total=1, desc="bench", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        ctx = Context(
            model_path=Path(model_path),
            quick=quick,
            threads=threads,
            bar=bar,
            scratch_root=out_dir,
        )
        bar.total = sum(m.steps(ctx) for m in modules.values())
        bar.refresh()
        try:
            with _quiet_logs():
                for name, mod in modules.items():
                    bar.set_description(name)
                    s0 = time.perf_counter()
                    try:
                        results[name] = mod.run(ctx)
                    except Exception as exc:
                        # One broken scenario must not throw away the others' minutes of
                        # measurements: record it, report it, exit non-zero at the end.
                        traceback.print_exc()
                        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                        failed.append(name)
                    timings[name] = round(time.perf_counter() - s0, 1)
        finally:
            ctx.cleanup()
    headline: list[dict[str, Any]] = []
    for name, mod in modules.items():
        if name in failed:
            headline.append(
                {"scenario": name, "figure": "scenario failed", "value": None,
                 "display": results[name]["error"], "target": None, "met": False}
            )  # fmt: skip
            continue
        for h in mod.headline(results[name]):
            headline.append({"scenario": name, **h})
    report = {
        "schema_version": SCHEMA_VERSION,
        "created_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "quick": quick,
        "scenarios_run": names,
        "duration_s": round(time.perf_counter() - t0, 1),
        "scenario_duration_s": timings,
        "machine": {**machine(), "load_avg_before": load_before, "load_avg_after": _load()},
        "versions": versions(),
        "model": {
            "path": str(model_path),
            "file": Path(model_path).name,
            "n_ctx": 4096,
            "n_batch": 512,
            "n_threads": threads,
            "flash_attn": True,
            "sampling": "greedy (temperature 0)",
        },
        "headline": headline,
        "notes": ctx.notes,
        "scenarios": results,
    }
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    report["runs"] = dict.fromkeys(names, report["created_utc"])
    kept: list[str] = []
    if update and (out_dir / "latest.json").is_file():
        report, kept = _merged(json.loads((out_dir / "latest.json").read_text()), report)
        modules = {n: _scenario(n) for n in report["scenarios_run"]}
    _write(report, modules, out_dir, stamp, kept)
    print(summary(report, modules))
    print(f"\nresults: {out_dir / (stamp + '.json')} (and latest.json / latest.md)")
    return report


def _merged(previous: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``--update``: the previous report with the scenarios just run replaced (each keeps
    the date of its own run in ``runs``); returns it and the scenarios kept from before."""
    ran = set(new["scenarios_run"])
    kept = [n for n in previous.get("scenarios_run", []) if n not in ran]
    runs = previous.get("runs") or dict.fromkeys(previous["scenarios"], previous["created_utc"])
    runs = {n: d for n, d in runs.items() if n in kept} | new["runs"]
    order = [n for n in SCENARIOS if n in ran or n in kept]
    scenarios = {n: new["scenarios"][n] if n in ran else previous["scenarios"][n] for n in order}
    headline = [h for h in previous["headline"] if h["scenario"] in kept] + new["headline"]
    headline.sort(key=lambda h: order.index(h["scenario"]))
    notes = [n for n in previous.get("notes", []) if n.split(":")[0] in kept] + new["notes"]
    merged = {
        **new,
        "command": f"{new['command']} (updating the report of {previous['created_utc']})",
        "scenarios_run": order,
        "runs": runs,
        "headline": headline,
        "notes": notes,
        "scenarios": scenarios,
    }
    return merged, kept


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, tuple | set | frozenset):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _write(
    report: dict[str, Any],
    modules: dict[str, ModuleType],
    out: Path,
    stamp: str,
    kept: Sequence[str] = (),
) -> None:
    text = json.dumps(report, indent=2, default=_json_default, allow_nan=True)
    (out / f"{stamp}.json").write_text(text + "\n", encoding="utf-8")
    shutil.copyfile(out / f"{stamp}.json", out / "latest.json")
    fresh = {n: m for n, m in modules.items() if n not in kept}
    pngs = _plots(report, fresh, out, stamp)
    # Scenarios kept from an earlier run (--update) keep their plots.
    pngs += [p.name for p in sorted(out.glob("latest-*.png"))
             if not any(p.name == f"latest-{q.split('-', 1)[1]}" for q in pngs)]  # fmt: skip
    md = markdown(report, modules, pngs)
    (out / f"{stamp}.md").write_text(md, encoding="utf-8")
    (out / "latest.md").write_text(md.replace(f"{stamp}-", "latest-"), encoding="utf-8")


def _plots(
    report: dict[str, Any], modules: dict[str, ModuleType], out: Path, stamp: str
) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        report["notes"].append("matplotlib missing (pip install 'erllama[bench]'): no plots")
        return []
    names = []
    for name, mod in modules.items():
        if "error" in report["scenarios"][name]:
            continue
        for plot_name, fig in mod.plot(report["scenarios"][name], plt).items():
            fig.text(0.99, 0.005, _footer(report), ha="right", va="bottom", fontsize=6, alpha=0.7)
            fig.savefig(out / f"{stamp}-{plot_name}.png", dpi=110)
            plt.close(fig)
            shutil.copyfile(out / f"{stamp}-{plot_name}.png", out / f"latest-{plot_name}.png")
            names.append(f"{stamp}-{plot_name}.png")
    return names


def _footer(report: dict[str, Any]) -> str:
    m = report["machine"]
    return (
        f"erllama {report['versions']['erllama']}, llama-cpp-python "
        f"{report['versions']['llama-cpp-python']}, {m['cpu_model']} ({m['cores']} cores), "
        f"{report['created_utc']}"
    )


def _headline_table(report: dict[str, Any]) -> str:
    lines = ["| scenario | figure | result | target |", "|---|---|---|---|"]
    for h in report["headline"]:
        target = h.get("target") or ""
        if h.get("met") is not None:
            target += " ✅" if h["met"] else " ❌"
        lines.append(f"| {h['scenario']} | {h['figure']} | {h['display']} | {target} |")
    return "\n".join(lines)


def markdown(report: dict[str, Any], modules: dict[str, ModuleType], pngs: list[str]) -> str:
    m = report["machine"]
    v = report["versions"]
    parts = [
        f"# erllama benchmark, {report['created_utc']}",
        "",
        f"- Machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB; load average "
        f"{m['load_avg_before']} before, {m['load_avg_after']} after",
        f"- erllama {v['erllama']}, llama-cpp-python {v['llama-cpp-python']}, Python "
        f"{m['python']}; model {report['model']['file']} (n_ctx 4096, n_batch 512, "
        f"{report['model']['n_threads']} threads, flash attention on, greedy)",
        f"- Command: `{report['command']}`{' (quick subset)' if report['quick'] else ''}; "
        f"took {report['duration_s'] / 60:.1f} min",
        *(
            [
                "- Scenarios from several runs (UTC): "
                + ", ".join(f"{n} {d}" for n, d in report["runs"].items())
            ]
            if len(set(report.get("runs", {}).values())) > 1
            else []
        ),
        "- TTFT is measured by the client (request sent -> first token received). Ratios "
        "compare measurements from this same run; absolute times move with machine load.",
        "",
        "## Headline",
        "",
        _headline_table(report),
    ]
    for name, mod in modules.items():
        result = report["scenarios"][name]
        if "error" in result:
            parts += ["", f"## {mod.TITLE}", "", f"**Failed:** `{result['error']}`"]
            continue
        parts += ["", f"## {mod.TITLE}", "", mod.markdown(result)]
        for png in pngs:
            if any(png.endswith(f"-{p}.png") for p in getattr(mod, "PLOTS", (name,))):
                parts += ["", f"![{name}]({png})"]
    if report["notes"]:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(parts) + "\n"


def summary(report: dict[str, Any], modules: dict[str, ModuleType]) -> str:
    lines = ["", f"erllama bench ({report['duration_s'] / 60:.1f} min)", ""]
    width = max((len(h["figure"]) for h in report["headline"]), default=10)
    for h in report["headline"]:
        mark = "" if h.get("met") is None else ("  ok" if h["met"] else "  MISSED")
        target = f"  [target {h['target']}]" if h.get("target") else ""
        lines.append(f"{h['figure']:<{width}}  {h['display']}{target}{mark}")
    return "\n".join(lines)


def parser(prog: str = "erllama bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run erllama's benchmark harness on the bundled SmolLM2 model "
        "(see bench/README.md).",
    )
    p.add_argument("--quick", action="store_true", help="a small subset for smoke runs (< 2 min)")
    p.add_argument(
        "--only",
        action="append",
        choices=SCENARIOS,
        default=[],
        metavar="SCENARIO",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default bench/results, or bench/results/quick with --quick)",
    )
    p.add_argument("--model", type=Path, default=None, help="GGUF file (default: bundled SmolLM2)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument(
        "--update",
        action="store_true",
        help="with --only: replace those scenarios in the folder's latest report and keep the "
        "others (each dated by its own run)",
    )
    return p


def main(argv: Sequence[str] | None = None, prog: str = "erllama bench") -> int:
    args = parser(prog).parse_args(argv)
    shown = " ".join(
        [prog, *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))]
    )
    report = run(
        quick=args.quick,
        only=args.only,
        out=args.out,
        model=args.model,
        threads=args.threads,
        command=shown,
        update=args.update,
    )
    return 1 if any(h["figure"] == "scenario failed" for h in report["headline"]) else 0

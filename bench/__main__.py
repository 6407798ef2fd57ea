"""``python -m bench [NAME...] [--quick]``: run the benchmarks, print a table, record them.

Results go to stdout as a table and into ``bench/RESULTS.md`` (regenerated from
``bench/results.json``, which keeps the latest result of each benchmark per mode, full or
quick, with its date, machine and command, plus a history of runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import big, changed, failover, labkit, lag, memory, reclone, small, steady, switchover

BENCHMARKS = {
    m.NAME: m for m in (big, small, changed, lag, memory, failover, switchover, steady, reclone)
}
HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "RESULTS.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=", ".join(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    if os.geteuid() != 0:
        parser.error("the benchmarks build a lab: run them as root")
    names = args.names or list(BENCHMARKS)
    console = Console(width=None if sys.stdout.isatty() else 150)
    command = " ".join(["python -m bench", *map(shlex.quote, sys.argv[1:])])
    machine = machine_facts()
    console.print(f"[bold]{command}[/] on {machine}")
    leftovers = labkit.take_down_leftovers()
    if leftovers:
        console.print(f"removed leftovers: {', '.join(leftovers)}")
    results: list[labkit.Result] = []
    started = time.monotonic()
    for name in names:
        console.rule(f"{name}{' (quick)' if args.quick else ''}")
        t0 = time.monotonic()
        try:
            result = BENCHMARKS[name].run(args.quick)
        except Exception as exc:
            traceback.print_exc()
            module = BENCHMARKS[name]
            result = labkit.Result(name, module.GOAL, "", error=f"{type(exc).__name__}: {exc}")
        result.notes.append(f"benchmark took {time.monotonic() - t0:.0f} s")
        results.append(result)
        console.print(table([result]))
    elapsed = time.monotonic() - started
    console.rule("summary")
    console.print(table(results))
    console.print(f"total {elapsed / 60:.1f} min")
    record(results, quick=args.quick, command=command, machine=machine, elapsed=elapsed)
    console.print(f"recorded in {RESULTS_MD.relative_to(HERE.parent)}")
    return 0 if all(r.error is None for r in results) else 1


def table(results: list[labkit.Result]) -> Table:
    out = Table(show_lines=True)
    for column in ("benchmark", "ratio", "goal", "met", "figures"):
        out.add_column(column, overflow="fold")
    for r in results:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}\n({r.ratio_label})"
        met = "ERROR" if r.error else ("yes" if r.met else "NO")
        lines = [f"{k}: {v}" for k, v in r.figures.items()] + r.notes
        if r.error:
            lines.append(r.error)
        out.add_row(r.name, ratio, r.goal, met, "\n".join(lines))
    return out


def machine_facts() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"nproc {os.cpu_count()}, {mem:.0f} GiB RAM, kernel {platform.release()},"
        f" Python {platform.python_version()}"
    )


def record(
    results: list[labkit.Result], *, quick: bool, command: str, machine: str, elapsed: float
) -> None:
    data: dict[str, Any] = {"latest": {"full": {}, "quick": {}}, "history": []}
    if RESULTS_JSON.exists():
        data = json.loads(RESULTS_JSON.read_text())
    mode = "quick" if quick else "full"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    for r in results:
        entry = r.to_json() | {"date": now, "command": command, "machine": machine}
        data["latest"][mode][r.name] = entry
    summary = ", ".join(
        f"{r.name} {'ERROR' if r.error else f'{r.ratio:.2f} ' + ('met' if r.met else 'missed')}"
        for r in results
    )
    data["history"].append(f"{now} · `{command}` · {machine} · {elapsed / 60:.1f} min · {summary}")
    RESULTS_JSON.write_text(json.dumps(data, indent=1) + "\n")
    RESULTS_MD.write_text(render(data))


def render(data: dict[str, Any]) -> str:
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`.venv/bin/python -m bench [NAME...] [--quick]`); do not edit",
        "by hand (the data is in `bench/results.json`). Every ratio is against a baseline",
        "measured in the same run; absolute figures are beside it. `--quick` runs use small",
        "sizes and are a smoke test only.",
        "",
    ]
    for mode in ("full", "quick"):
        latest = data["latest"].get(mode, {})
        if not latest:
            continue
        lines += [f"## Latest {mode} run of each benchmark", ""]
        lines += ["| benchmark | ratio | goal | met | figures | when, command, machine |"]
        lines += ["| --- | --- | --- | --- | --- | --- |"]
        for name in sorted(latest, key=lambda n: list(BENCHMARKS).index(n)):
            r = latest[name]
            ratio = "-" if r["ratio"] is None else f"**{r['ratio']:.2f}** ({r['ratio_label']})"
            met = "ERROR" if r["error"] else ("yes" if r["met"] else "**no**")
            figures = [f"{k}: {v}" for k, v in r["figures"].items()] + r["notes"]
            if r["error"]:
                figures.append(r["error"])
            when = f"{r['date']}<br>`{r['command']}`<br>{r['machine']}"
            cells = [name, ratio, r["goal"], met, "<br>".join(figures), when]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    lines += ["## History", ""]
    lines += [f"- {h}" for h in data["history"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

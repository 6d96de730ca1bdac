#!/usr/bin/env python3
"""Regenerates the results table of docs/benchmarks.md from load-test JSON results.

Usage: loadtest/report.py RESULTS_DIR BENCHMARKS_MD

Replaces what stands between the markers `<!-- results:begin -->` and
`<!-- results:end -->` with a table of every RESULTS_DIR/*.json (one row per
scenario) and a line describing the machine the numbers were taken on. Rows
already in the table whose scenario has no JSON in RESULTS_DIR are kept, so
re-running one scenario updates its row without dropping the others. JSON files
that are not load-test results (no "scenario" key, e.g. membership.json) are
skipped.
"""
import json
import pathlib
import platform
import re
import sys

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os
    return f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}"


def row(r: dict) -> str:
    lat = r["latency_us"]
    ms = lambda us: f"{us / 1000:.1f}"
    per_conn = r["idle_rss_per_connection_bytes"]
    resume = f"{r['resume_secs']:.2f} s" if r.get("resume_secs") is not None else "—"
    return (
        f"| {r['scenario']} | {r['connected']:,} | {r['rate_target']:,} | {r['published']:,} "
        f"| {r['delivered']:,} ({r['delivered_per_sec']:,.0f}/s) | {r['lost']} / {r['duplicated']} / {r['reordered']} "
        f"| {ms(lat['p50'])} / {ms(lat['p99'])} / {ms(lat['max'])} "
        f"| {per_conn / 1024:.1f} KiB | {r['load']['cpu_secs']:.2f} s "
        f"| {r['deliveries_per_server_cpu_sec']:,.0f} "
        f"| {resume} |"
    )


def main() -> None:
    results_dir, doc = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    results = [r for r in results if isinstance(r, dict) and "scenario" in r]
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    rows = {r["scenario"]: row(r) for r in results}
    old = re.search(re.escape(BEGIN) + "(.*?)" + re.escape(END), text, flags=re.S)
    for line in (old.group(1).splitlines() if old else []):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("scenario",) and not cells[0].startswith("---"):
            rows.setdefault(cells[0], line)
    lines = [
        BEGIN,
        f"Machine: {machine()}. Server pinned to CPU 0, load generator to the other core(s).",
        "",
        "| scenario | connections | target rate (ev/s) | published | delivered | lost / dup / reordered "
        "| latency p50 / p99 / max (ms) | idle RSS per connection | server CPU under load | deliveries per server CPU-s "
        "| all resumed in |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[rows[name] for name in sorted(rows)],
        END,
    ]
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), "\n".join(lines), text, flags=re.S)
    doc.write_text(text)
    print(f"{doc}: {len(results)} scenario(s) updated, {len(rows)} in the table")


if __name__ == "__main__":
    main()

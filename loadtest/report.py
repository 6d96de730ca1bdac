#!/usr/bin/env python3
"""Regenerates the results table of docs/benchmarks.md from load-test JSON results.

Usage: loadtest/report.py RESULTS_DIR BENCHMARKS_MD

Replaces what stands between the markers `<!-- results:begin -->` and
`<!-- results:end -->` with a table of every RESULTS_DIR/*.json (one row per
scenario) and a line describing the machine the numbers were taken on.
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
    lines = [
        BEGIN,
        f"Machine: {machine()}. Server pinned to CPU 0, load generator to the other core(s).",
        "",
        "| scenario | connections | target rate (ev/s) | published | delivered | lost / dup / reordered "
        "| latency p50 / p99 / max (ms) | idle RSS per connection | server CPU under load | deliveries per server CPU-s "
        "| all resumed in |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[row(r) for r in results],
        END,
    ]
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), "\n".join(lines), text, flags=re.S)
    doc.write_text(text)
    print(f"{doc}: {len(results)} scenario(s)")


if __name__ == "__main__":
    main()

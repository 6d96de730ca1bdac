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


def svg_chart(title: str, x_label: str, y_label: str, series: dict, log_y: bool = False) -> str:
    """A small line chart as SVG, no dependencies: `series` maps a name to
    [(x, y), ...]."""
    import math
    width, height, left, right, top, bottom = 720, 400, 70, 170, 40, 50
    points = [p for values in series.values() for p in values]
    if not points:
        return ""
    fy = (lambda v: math.log10(max(v, 1e-3))) if log_y else (lambda v: v)
    x_max = max(x for x, _ in points) or 1
    ys = [fy(y) for _, y in points]
    y_min, y_max = (min(ys), max(ys)) if log_y else (0, max(ys) or 1)
    if y_max == y_min:
        y_max = y_min + 1
    px = lambda x: left + (width - left - right) * x / x_max
    py = lambda y: top + (height - top - bottom) * (1 - (fy(y) - y_min) / (y_max - y_min))
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
        f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">{x_label}</text>',
        f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" transform="rotate(-90 16 {(top + height - bottom) / 2})">{y_label}</text>',
    ]
    for i in range(5):
        fx = x_max * i / 4
        out.append(f'<text x="{px(fx)}" y="{height - bottom + 16}" text-anchor="middle">{fx:,.0f}</text>')
        gy = y_min + (y_max - y_min) * i / 4
        value = 10 ** gy if log_y else gy
        y = top + (height - top - bottom) * (1 - i / 4)
        out.append(f'<line x1="{left}" y1="{y}" x2="{width - right}" y2="{y}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4}" text-anchor="end">{value:,.3g}</text>')
    for i, (name, values) in enumerate(sorted(series.items())):
        color = colors[i % len(colors)]
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in values)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        for x, y in values:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}"/>')
        out.append(f'<text x="{width - right + 10}" y="{top + 16 * i + 10}" fill="{color}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def plots(results: list, out_dir: pathlib.Path) -> None:
    """docs/plots/: p99 latency per second of every run with a timeline, and
    server RSS against idle connections."""
    out_dir.mkdir(parents=True, exist_ok=True)
    latency = {
        r["scenario"]: [(t["t_secs"], t["p99_us"] / 1000) for t in r["timeline"] if t["delivered_per_sec"] > 0]
        for r in results
        if r.get("timeline") and r.get("owed") is None
    }
    latency = {k: v for k, v in latency.items() if v}
    if latency:
        (out_dir / "latency-over-time.svg").write_text(
            svg_chart("p99 publish-to-receive latency, per second", "seconds into the run", "p99 (ms, log scale)", latency, log_y=True))
    memory = sorted(
        (r["connected"], r["idle"]["rss_bytes"] / 2**20)
        for r in results
        if r["scenario"].startswith("idle") and r["connected"] > 0
        # Herald on the memory bus only, not its NATS or baseline variants.
        and not r["scenario"].endswith(("-nats", "-nchan", "-baseline"))
    )
    if memory:
        (out_dir / "memory-vs-connections.svg").write_text(
            svg_chart("Edge node RSS with idle SSE streams (memory bus)", "idle streams", "RSS (MiB)",
                      {"herald-edge": memory}))


# The servers of the side-by-side table, by the suffix of their result's name
# (`make bench-baseline` runs row X as X, X-nats, X-nchan and X-baseline).
SERVERS = [
    ("nchan", "-nchan"),
    ("Herald, memory bus", ""),
    ("Herald, NATS (edge + nats-server)", "-nats"),
    ("Express + Redis", "-baseline"),
]
# What makes two results the same load (keys missing from older results are
# not compared).
LOAD_KEYS = ("connections", "users", "topic", "rate_target", "duration_secs", "owed")


def kind(r: dict) -> str:
    if r.get("owed") is not None or r.get("resume_secs") is not None:
        return "resume"
    if r["rate_target"] == 0 and r["published"] == 0:
        return "idle"
    return "broadcast" if r.get("topic") else "fanout"


def same_load(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in LOAD_KEYS if k in a and k in b)


def with_bus(r: dict, phase: str, field: str) -> tuple:
    """(server + bus, server alone) for a field of `idle` or `load`; the bus
    (nats-server) is only in results run with --bus-pids."""
    own = r[phase][field]
    bus = r.get(f"bus_{phase}")
    return (own + bus[field], own) if bus else (own, None)


def saturated(r: dict) -> bool:
    """Delivered clearly less than the load asked: the server fell behind."""
    if kind(r) in ("idle", "resume") or r["rate_target"] == 0:
        return False
    per_event = r["connections"] if r.get("topic") else r["connections"] / max(r["users"], 1)
    return r["delivered_per_sec"] < 0.9 * r["rate_target"] * per_event


def measures(k: str) -> list:
    """(measure, better, value(r) -> (number, note) or None) per kind of load."""
    def rss(r):
        total, own = with_bus(r, "idle", "rss_growth_bytes")
        n = max(r["connected"], 1)
        return total / n / 1024, (f"edge {own / n / 1024:.1f}" if own is not None else "")

    def cpu(r):
        total, own = with_bus(r, "load", "cpu_secs")
        return total, (f"edge {own:.2f}" if own is not None else "")

    def cpu_per_delivery(r):
        total, own = with_bus(r, "load", "cpu_secs")
        if not r["delivered"]:
            return None
        per = lambda c: c / r["delivered"] * 1e6
        return per(total), (f"edge {per(own):.1f}" if own is not None else "")

    delivered = lambda r: (r["delivered_per_sec"], "")
    p99 = lambda r: (r["latency_us"]["p99"] / 1000, "")
    resumed = lambda r: (r["resume_secs"], "") if r.get("resume_secs") is not None else None
    if k == "idle":
        return [("RSS per idle stream, KiB", "less", rss)]
    if k == "resume":
        return [("server CPU-s", "less", cpu), ("all resumed in, s", "less", resumed)]
    return [
        ("delivered per second", "more", delivered),
        ("server CPU-s", "less", cpu),
        ("server CPU µs per delivered event", "less", cpu_per_delivery),
        ("p99 publish → receive, ms", "less", p99),
    ]


def number(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"


def side_by_side(results: list) -> list:
    """Every load run on Herald and on at least one baseline (nchan, Express +
    Redis), one line per measure: the servers' values and Herald's ratios
    against each baseline."""
    by_name = {r["scenario"]: r for r in results}
    suffixes = [suffix for _, suffix in SERVERS if suffix]
    kinds = ["idle", "fanout", "broadcast", "resume"]
    loads = sorted(
        (name for name in by_name
         if not any(name.endswith(s) for s in suffixes)
         and any(f"{name}{s}" in by_name for s in ("-nchan", "-baseline"))),
        key=lambda n: (kinds.index(kind(by_name[n])), by_name[n]["rate_target"],
                       by_name[n]["connections"], n),
    )
    header = [
        "| load | measure | " + " | ".join(title for title, _ in SERVERS)
        + " | Herald memory ÷ nchan | Herald NATS ÷ nchan | Herald memory ÷ Express | Herald NATS ÷ Express |",
        "|---|---|" + "---|" * (len(SERVERS) + 4),
    ]
    lines, skipped, flagged = [], [], False
    for name in loads:
        herald = by_name[name]
        runs = {}
        for title, suffix in SERVERS:
            r = by_name.get(f"{name}{suffix}")
            if r is not None and not same_load(herald, r):
                skipped.append(f"{name}{suffix}")
                r = None
            runs[suffix] = r
        first = True
        load = (f"{name} ({herald['connected']:,} streams"
                + (f", {herald['rate_target']:,} ev/s" if herald["rate_target"] else "")
                + (f", {herald['owed']} owed each" if herald.get("owed") else "") + ")")
        for measure, better, value in measures(kind(herald)):
            cells, values = [], {}
            for _, suffix in SERVERS:
                r = runs[suffix]
                got = value(r) if r is not None else None
                if got is None:
                    cells.append("—")
                    continue
                v, note = got
                values[suffix] = v
                mark = " ⚠" if saturated(r) else ""
                flagged |= bool(mark)
                cells.append(f"{number(v)}{f' ({note})' if note else ''}{mark}")
            ratio = lambda a, b: (f"{values[a] / values[b]:.2f}×"
                                  if a in values and values.get(b) else "—")
            lines.append(
                f"| {load if first else ''} | {measure} ({better} is better) | " + " | ".join(cells)
                + f" | {ratio('', '-nchan')} | {ratio('-nats', '-nchan')}"
                + f" | {ratio('', '-baseline')} | {ratio('-nats', '-baseline')} |"
            )
            first = False
        if kind(herald) == "idle":
            continue
        correctness = [
            f"{r['lost']} / {r['duplicated']} / {r['reordered']}" if r is not None else "—"
            for r in (runs[suffix] for _, suffix in SERVERS)
        ]
        lines.append("| | lost / dup / reordered | " + " | ".join(correctness) + " | | | | |")
    if not lines:
        return []
    out = [
        "",
        "Side by side (`make bench-baseline`): each load on nchan, Herald (memory bus; NATS JetStream, "
        "where CPU and memory are the edge's plus nats-server's, the edge alone in brackets) and the "
        "seed article's Express + Redis design, back to back, same generator and pinning. A ratio "
        "below 1× is Herald ahead on a \"less is better\" measure, above 1× on a \"more is better\" one.",
        "",
        *header,
        *lines,
    ]
    if flagged:
        out += ["", "⚠: the server delivered under 90 % of the rate asked (saturated)."]
    if skipped:
        out += ["", "Not beside their load (run with a different load): " + ", ".join(sorted(skipped)) + "."]
    return out


def allocation_lines(results: list) -> list:
    """Runs of a node built with `--features count-allocations`
    (`make bench-allocations`): its heap allocations over the publishing
    phase, per delivered event."""
    counted = sorted((r for r in results if r.get("allocations")), key=lambda r: r["scenario"])
    if not counted:
        return []
    out = [
        "",
        "Heap allocations of the node over the publishing phase (built with `--features "
        "count-allocations`, `make bench-allocations`; its CPU is not the release build's):",
        "",
        "| scenario | delivered | allocations | per delivered event | bytes per delivered event |",
        "|---|---|---|---|---|",
    ]
    for r in counted:
        a = r["allocations"]
        out.append(
            f"| {r['scenario']} | {r['delivered']:,} | {a['allocations']:,} "
            f"| {a['per_delivered_event']:.1f} | {a['bytes_per_delivered_event']:,.0f} |"
        )
    return out


def main() -> None:
    results_dir, doc = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    results = [r for r in results if isinstance(r, dict) and "scenario" in r]
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    rows = {r["scenario"]: row(r) for r in results}
    old = re.search(re.escape(BEGIN) + "(.*?)" + re.escape(END), text, flags=re.S)
    # Only the scenario table's own rows: the side-by-side and allocation
    # tables after it are rebuilt from the results every time.
    in_table = False
    for line in (old.group(1).splitlines() if old else []):
        if line.startswith("| scenario |"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if in_table and line.startswith("| ") and not cells[0].startswith("---"):
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
        *side_by_side(results),
        *allocation_lines(results),
        END,
    ]
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), "\n".join(lines), text, flags=re.S)
    doc.write_text(text)
    plots(results, doc.parent / "plots")
    table = side_by_side(results)
    if table:
        print("\n".join(table[1:]) + "\n")
    print(f"{doc}: {len(results)} scenario(s) updated, {len(rows)} in the table")


if __name__ == "__main__":
    main()

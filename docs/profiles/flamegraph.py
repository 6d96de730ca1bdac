#!/usr/bin/env python3
"""A small flame graph maker (no dependencies), for the profiles here.

  perf script | flamegraph.py fold > NAME.folded   # stacks, root first, counted
  flamegraph.py svg TITLE < NAME.folded > NAME.svg  # an SVG flame graph
  flamegraph.py summary < NAME.folded               # where the samples went

Frames narrower than 0.4 % of the samples are left out to keep files small.
"""
import html
import re
import sys
from collections import Counter


def clean(symbol: str) -> str:
    symbol = re.sub(r"\+0x[0-9a-f]+$", "", symbol.strip())
    # Rust's hash suffix and nested generics make names long without saying
    # more: generic arguments below the first level are dropped.
    symbol = re.sub(r"::h[0-9a-f]{16}$", "", symbol)
    out, depth = [], 0
    for ch in symbol:
        if ch == "<":
            depth += 1
            if depth == 2:
                out.append("<..")
        elif ch == ">" and depth > 0:
            depth -= 1
            if depth == 1:
                out.append(">")
                continue
        if depth < 2 and ch != "<" or (ch == "<" and depth == 1):
            out.append(ch)
    return "".join(out)[:160].replace(";", ":") or "[unknown]"


def fold(lines) -> None:
    stacks: Counter = Counter()
    frames: list = []
    comm = None
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if comm is not None:
                stacks[";".join([comm] + frames[::-1])] += 1
            comm, frames = None, []
        elif not line.startswith(("\t", " ")):
            comm = line.split()[0]
        else:
            parts = line.strip().split(" ", 1)
            symbol = parts[1] if len(parts) > 1 else parts[0]
            symbol = re.sub(r"\s+\([^()]*\)$", "", symbol)  # the (dso)
            frames.append(clean(symbol))
    if comm is not None:
        stacks[";".join([comm] + frames[::-1])] += 1
    for stack, count in stacks.most_common():
        print(f"{stack} {count}")


def svg(title: str, lines) -> None:
    root: dict = {"n": 0, "c": {}}
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        count = int(count)
        node = root
        node["n"] += count
        for frame in stack.split(";"):
            node = node["c"].setdefault(frame, {"n": 0, "c": {}})
            node["n"] += count
    total = max(root["n"], 1)
    width, row, top = 1200, 16, 40
    rects = []

    def walk(node: dict, x: float, depth: int) -> int:
        deepest = depth
        for name, child in sorted(node["c"].items()):
            w = child["n"] / total * width
            if w >= width * 0.004:
                rects.append((x, depth, w, name, child["n"]))
                deepest = max(deepest, walk(child, x, depth + 1))
            x += w
        return deepest

    depth = walk(root, 0.0, 0) + 1
    height = top + depth * row + 10
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="monospace" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#fafafa"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15">'
        f"{html.escape(title)} ({total} samples; hover for names)</text>",
    ]
    for x, d, w, name, n in rects:
        y = height - 10 - (d + 1) * row
        hue = 20 + sum(name.encode()) % 40
        label = html.escape(name)
        pct = n / total * 100
        out.append(
            f'<g><title>{label} ({n} samples, {pct:.2f}%)</title>'
            f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row - 1}" fill="hsl({hue},85%,60%)"/>'
        )
        chars = int(w / 7)
        if chars >= 4:
            text = name if len(name) <= chars else name[: chars - 2] + ".."
            out.append(f'<text x="{x + 2:.1f}" y="{y + 12}">{html.escape(text)}</text>')
        out.append("</g>")
    out.append("</svg>")
    print("\n".join(out))


# Inclusive shares the summary lists: (label, any of these in the stack).
PARTS = [
    ("in the kernel (system calls, softirq)", ("entry_SYSCALL", "asm_sysvec", "asm_common_interrupt")),
    ("POST /v1/publish handler", ("herald_edge::http::publish::publish",)),
    ("  token check (publisher)", ("herald_edge::http::credentials::require_publisher",)),
    ("  body JSON (parse)", ("herald_edge::http::publish::parse",)),
    ("  memory bus publish", ("as herald_edge::bus::Bus>::publish",)),
    ("    registry fan-out (deliver)", ("as herald_edge::bus::LiveSink>::deliver",)),
    ("SSE stream body (session)", ("herald_edge::http::stream::session::body",)),
    ("malloc / free", ("malloc", "_int_free", "cfree", "__libc_free", "__libc_calloc", "realloc")),
    ("tokio timers", ("tokio::runtime::time",)),
]


def summary(lines) -> None:
    total, shares = 0, {label: 0 for label, _ in PARTS}
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack:
            continue
        count = int(count)
        total += count
        for label, keys in PARTS:
            if any(key in stack for key in keys):
                shares[label] += count
    print(f"# Inclusive shares of {total} samples (a sample counts in every part its stack is in)")
    for label, _ in PARTS:
        print(f"#  {100 * shares[label] / max(total, 1):5.1f}%  {label}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["fold"]:
        fold(sys.stdin)
    elif sys.argv[1:2] == ["summary"]:
        summary(sys.stdin)
    elif sys.argv[1:2] == ["svg"]:
        svg(sys.argv[2] if len(sys.argv) > 2 else "flame graph", sys.stdin)
    else:
        sys.exit(__doc__)

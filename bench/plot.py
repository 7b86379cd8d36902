"""Plot latency (p50, p99) and throughput against concurrency for every measured series.

``plot_concurrency(series, path)`` takes ``{label: {connections: wrk result dict}}`` (the
``single`` part of bench/results/serving.json) and writes one PNG with two panels side by side.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

_NICE_MS = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
_COLORS = ["tab:gray", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:red"]


def plot_concurrency(series: dict[str, dict], path: str | Path, title: str = "") -> Path:
    """Write ``path`` (PNG): left p50 (solid) and p99 (dashed) latency in ms, right req/s; x = connections."""
    fig, (ax_lat, ax_tput) = plt.subplots(1, 2, figsize=(12, 4.8))
    all_conns: set[int] = set()
    for color, (label, by_conn) in zip(_COLORS * 3, series.items()):
        conns = sorted(int(c) for c in by_conn)
        all_conns.update(conns)
        rows = [by_conn[str(c)] if str(c) in by_conn else by_conn[c] for c in conns]
        ax_lat.plot(conns, [r["p50_ms"] for r in rows], "-o", color=color, label=f"{label} p50")
        ax_lat.plot(conns, [r["p99_ms"] for r in rows], "--s", color=color, label=f"{label} p99")
        ax_tput.plot(conns, [r["req_per_s"] for r in rows], "-o", color=color, label=label)
    for ax in (ax_lat, ax_tput):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_conns))
        ax.xaxis.set_major_formatter(ScalarFormatter())  # 1, 4, 16 rather than 2^0, 2^2, 2^4
        ax.set_xlabel("concurrent connections (wrk, closed loop)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_lat.set_yscale("log")
    low, high = ax_lat.get_ylim()
    ax_lat.set_yticks([t for t in _NICE_MS if low <= t <= high])  # plain 1-2-5 ms ticks on the log axis
    ax_lat.yaxis.set_major_formatter(ScalarFormatter())
    ax_lat.yaxis.set_minor_formatter(NullFormatter())
    ax_lat.set_ylabel("latency (ms, log scale)")
    ax_lat.set_title("single-image latency")
    ax_tput.set_ylabel("requests/s")
    ax_tput.set_ylim(bottom=0)
    ax_tput.set_title("single-image throughput")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

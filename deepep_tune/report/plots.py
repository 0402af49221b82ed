"""PNG plots of a results dict and its observations (matplotlib, headless)."""

from __future__ import annotations

import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_sms(size_res: dict[str, Any], title: str, path: str) -> None:
    """Best dispatch, combine and total time at each num_sms, DeepEP's default configs and the pick marked."""
    rows = [r for r in size_res["per_num_sms"] if r["total_us"] is not None]
    x = [r["num_sms"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for key, label, style in (("dispatch_us", "dispatch (best at each num_sms)", "o-"),
                              ("combine_us", "combine (best at each num_sms)", "s-"),
                              ("total_us", "dispatch + combine", "^-")):
        ax.plot(x, [r[key] for r in rows], style, label=label, markersize=4)
    for name, b in size_res["baselines"].items():
        if b.get("total_us") is not None and name.startswith("deepep_default"):
            ax.plot([b["dispatch"]["num_sms"]], [b["total_us"]], "kx", markersize=9, mew=2)
            ax.annotate(f"DeepEP default\n({b['dispatch']['num_sms']} SMs)", (b["dispatch"]["num_sms"], b["total_us"]),
                        textcoords="offset points", xytext=(6, 6), fontsize=8)
    best = size_res["best"]
    ax.plot([best["num_sms"]], [best["total_us"]], "r*", markersize=14, label="tuned pick")
    probes = [r for r in rows if r.get("configs_measured", 99) <= 4]
    if probes:
        ax.plot([r["num_sms"] for r in probes], [r["total_us"] for r in probes], "o", mfc="white", mec="gray",
                markersize=9, label="probe only (quick: <= 2 configs per op, an upper bound)")
    ax.set_xlabel("num_sms (SMs given to DeepEP; channels = num_sms / 2)")
    ax.set_ylabel("time per call (us), slowest rank")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_heatmap(times: dict[tuple[int, int], float], op: str, num_sms: int, title: str, path: str) -> None:
    """nvl_chunk x nvl_buffer at one num_sms; blank cells were not measured (quick mode) or failed."""
    chunks = sorted({c for c, _ in times})
    buffers = sorted({b for _, b in times})
    grid = np.full((len(chunks), len(buffers)), np.nan)
    for (c, b), t in times.items():
        if math.isfinite(t):
            grid[chunks.index(c), buffers.index(b)] = t
    fig, ax = plt.subplots(figsize=(7, max(4, 0.32 * len(chunks) + 1.5)), dpi=110)
    im = ax.imshow(grid, aspect="auto", cmap="viridis_r", origin="lower")
    ax.set_xticks(range(len(buffers)), [str(b) for b in buffers])
    ax.set_yticks(range(len(chunks)), [str(c) for c in chunks])
    ax.set_xlabel("nvl_buffer (tokens per channel ring)")
    ax.set_ylabel("nvl_chunk (tokens per send)")
    if np.isfinite(grid).any():
        i, j = np.unravel_index(np.nanargmin(grid), grid.shape)
        ax.plot(j, i, "r*", markersize=14)
        ax.annotate(f"{grid[i, j]:.0f} us", (j, i), color="red", xytext=(8, -4), textcoords="offset points", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"{op} time (us)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_plots(stem: str, res: dict[str, Any], observed: dict[int, dict[tuple[str, Any], list[float]]]) -> list[str]:
    """Per token count: the per-num_sms plot and a heatmap per op at the chosen num_sms. `observed` holds each
    token count's observations ((op, TuneConfig) -> times)."""
    from ..stats import mean_times

    paths = []
    sections = res.get("per_num_tokens") or {str(res["workload"]["num_tokens"]): res}
    hw = res["hardware"]
    for n, obs in observed.items():
        sec = sections[str(n)]
        best_sms = sec["best"]["num_sms"]
        suffix = f"_T{n}" if len(observed) > 1 else ""
        label = (f"EP{res['ep_size']} {hw.get('device_name')}{' CO-LOCATED' if res['colocated'] else ''}, "
                 f"{n} tokens/rank, hidden {res['workload']['hidden']}, objective {res.get('objective', 'forward')}")
        p = f"{stem}{suffix}_sms.png"
        plot_sms(sec, f"{label}\nbest config at each num_sms ({res['backend']}, {res['mode']})", p)
        paths.append(p)
        times = mean_times(obs)
        for op in ("dispatch", "combine"):
            cells = {(c.nvl_chunk, c.nvl_buffer): t for (o, c), t in times.items() if o == op and c.num_sms == best_sms}
            p = f"{stem}{suffix}_heatmap_{op}.png"
            plot_heatmap(cells, op, best_sms, f"{label}\n{op} at num_sms={best_sms} (blank: not measured)", p)
            paths.append(p)
    return paths

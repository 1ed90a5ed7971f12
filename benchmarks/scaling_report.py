"""The tables (STEM.md) and the plot (STEM.png) of `benchmarks.bench_scaling`, made from its points (STEM.json) only."""

from __future__ import annotations

import itertools
import math
from pathlib import Path


def _fmt(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _held_out(point: dict) -> str:
    found = point.get("held_out")
    return "" if not found else f"{found['perplexity']:.2f} / {found['kl']:.2f}"


def _load(point: dict) -> str:
    return f"{point['load_start'][0]:.1f} -> {point['load_end'][0]:.1f}"


def memory_points(data: dict, kind: str = "memory") -> list[dict]:
    return sorted((p for p in data["points"].values() if p["kind"] == kind),
                  key=lambda p: (p["blocks"], p.get("datastore_fraction", 1.0), p["epochs"]))


def base_points(data: dict) -> list[dict]:
    return sorted((p for p in data["points"].values() if p["kind"] == "base"), key=lambda p: p["steps"])


def datastore_points(data: dict) -> list[dict]:
    """The datastore axis: its own points, and the grid's point at the same size and length (all of the datastore)."""
    setting = data.get("setup", {}).get("settings", {})
    found = memory_points(data, "datastore")
    found += [p for p in memory_points(data) if p["blocks"] == setting.get("datastore_blocks")
              and p["epochs"] == setting.get("datastore_epochs")]
    return sorted(found, key=lambda p: p["datastore_rows"])


def shared_head(grid: list[dict]) -> float | None:
    """Parameters every memory size shares (the head and the final norm): the intercept of parameters against
    blocks, which is exact because each block adds the same count (None with fewer than two sizes)."""
    sizes = sorted({(p["blocks"], p["parameters"]) for p in grid})
    if len(sizes) < 2:
        return None
    (b0, p0), (b1, p1) = sizes[0], sizes[-1]
    return p0 - b0 * (p1 - p0) / (b1 - b0)


def same_compute(data: dict, split: str) -> list[tuple[dict, float | None]]:
    """Each memory grid point beside the base's continued pretraining given the same training FLOPs: its
    ``split`` perplexity interpolated linearly in log FLOPs between the two points of the run around the
    memory's FLOPs (None outside the run, which is not extrapolated)."""
    cpt = [p for p in base_points(data) if p["steps"] > 0]
    found = []
    for point in memory_points(data):
        flops, value = point["train_flops"], None
        for lo, hi in itertools.pairwise(cpt):
            if lo["train_flops"] <= flops <= hi["train_flops"]:
                t = math.log(flops / lo["train_flops"]) / math.log(hi["train_flops"] / lo["train_flops"])
                value = (1 - t) * lo[f"{split}_perplexity"] + t * hi[f"{split}_perplexity"]
                break
        found.append((point, value))
    return found


def expected_points(settings: dict) -> int | None:
    """How many points the run's settings make: the memory grid, the base before and during its continued
    pretraining, each datastore fraction below all of it and each length of the decay check (None without the
    settings)."""
    if not settings:
        return None
    return (len(settings["memory_blocks"]) * len(settings["epochs"]) + 1 + sum(e > 0 for e in settings["cpt_epochs"])
            + sum(f < 1.0 for f in settings["datastore_fractions"]) + len(settings.get("decay_epochs", [])))


def tables(data: dict) -> str:
    lines = []
    setup = data.get("setup", {})
    settings = setup.get("settings", {})
    if (expected := expected_points(settings)) is not None and len(data["points"]) < expected:
        first = settings["memory_blocks"][0]
        lines += [f"**In progress: {len(data['points'])} of {expected} points.** `python -m benchmarks.bench_scaling` "
                  f"resumes the run; the order: the {first}-block grid, the base and its continued pretraining, the "
                  "decay check, the other sizes, the datastore axis.", ""]
    base = next((p for p in base_points(data) if p["steps"] == 0), None)
    if base:
        lines += [f"Base model alone (no training): validation {base['validation_perplexity']:.2f}, test "
                  f"{base['test_perplexity']:.2f} perplexity ({base['test_tokens']:,} test tokens).", ""]
    grid = memory_points(data)
    head = shared_head(grid)
    if grid:
        shared = (f" Every size shares the head and final norm ({head / 1e6:.1f}M parameters); the blocks' own "
                  "parameters are in brackets." if head is not None else "")
        lines += ["Memory grid (one constant-learning-rate run per size; each length is a checkpoint of it). "
                  f"Perplexity on the first validation / test windows; lmbda chosen on validation.{shared} The "
                  "held-out train rows are the datastore's last rows, which the memory's trainer keeps out of training "
                  "and validates on (its own metrics at that step).", "",
                  "| blocks | parameters | epochs | train PFLOPs | memory alone val / test | memory alone, held-out train "
                  "rows: perplexity / KL | base + memory val / test | lmbda | train rows/s | load (eval) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for p in grid:
            own = f" ({(p['parameters'] - head) / 1e6:.1f}M)" if head is not None else ""
            lines.append(f"| {p['blocks']} | {p['parameters'] / 1e6:.1f}M{own} | {p['epochs']} | {p['train_flops'] / 1e15:.2f} | "
                         f"{p['validation_memory_perplexity']:.2f} / {p['test_memory_perplexity']:.2f} | {_held_out(p)} | "
                         f"{p['validation_joint_perplexity']:.2f} / {p['test_joint_perplexity']:.2f} | {p['lmbda']:g} | "
                         f"{_fmt(p['train_rows_per_second'], 0)} | {_load(p)} |")
        lines.append("")
    cpt = [p for p in base_points(data) if p["steps"] > 0]
    if cpt:
        lines += ["The base's continued pretraining on the same text (constant learning rate "
                  f"{settings.get('cpt_learning_rate')}):", "",
                  "| steps | epochs | train PFLOPs | validation | test | wall (train + eval) | load |",
                  "|---:|---:|---:|---:|---:|---:|---|"]
        for p in cpt:
            lines.append(f"| {p['steps']} | {p['epochs']:.3f} | {p['train_flops'] / 1e15:.2f} | "
                         f"{p['validation_perplexity']:.2f} | {p['test_perplexity']:.2f} | {p['wall_seconds'] / 60:.0f} min | "
                         f"{_load(p)} |")
        lines.append("")
    if cpt and grid:
        lines += ["At the same training compute: base + memory against the base's continued pretraining given the "
                  "memory's training FLOPs (interpolated in log FLOPs between its two points around them; \"-\" "
                  "beyond its run). Neither column counts the datastore and kNN targets, built once for every memory:", "",
                  "| blocks | epochs | train PFLOPs | base + memory val / test | continued pretraining val / test | "
                  "test: memory / pretraining |", "|---:|---:|---:|---:|---:|---:|"]
        for (p, val), (_, test) in zip(same_compute(data, "validation"), same_compute(data, "test")):
            other = "-" if val is None else f"{val:.2f} / {test:.2f}"
            ratio = "-" if test is None else f"{p['test_joint_perplexity'] / test:.3f}"
            lines.append(f"| {p['blocks']} | {p['epochs']} | {p['train_flops'] / 1e15:.2f} | "
                         f"{p['validation_joint_perplexity']:.2f} / {p['test_joint_perplexity']:.2f} | {other} | {ratio} |")
        lines.append("")
    decayed = memory_points(data, "decay")
    if decayed:
        lines += ["What the constant learning rate costs: the same size and length trained again with a linear decay "
                  "to 0 after the warm-up (one run per length; the grid's points are checkpoints of one constant-rate "
                  "run):", "", "| blocks | epochs | schedule | memory alone val / test | base + memory val / test | lmbda |",
                  "|---:|---:|---|---:|---:|---:|"]
        constant = {(p["blocks"], p["epochs"]): p for p in grid}
        for p in decayed:
            for q, name in ((constant.get((p["blocks"], p["epochs"])), "constant"), (p, "linear decay")):
                if q is not None:
                    lines.append(f"| {q['blocks']} | {q['epochs']} | {name} | {q['validation_memory_perplexity']:.2f} / "
                                 f"{q['test_memory_perplexity']:.2f} | {q['validation_joint_perplexity']:.2f} / "
                                 f"{q['test_joint_perplexity']:.2f} | {q['lmbda']:g} |")
        lines.append("")
    axis = datastore_points(data)
    if len(axis) > 1 or memory_points(data, "datastore"):
        lines += [f"Datastore size ({settings.get('datastore_blocks')} blocks, {settings.get('datastore_epochs')} epochs; "
                  "kNN targets searched within each prefix):", "",
                  "| fraction | rows | memory alone val / test | base + memory val / test | lmbda |", "|---:|---:|---:|---:|---:|"]
        for p in axis:
            lines.append(f"| {p['datastore_fraction']:g} | {p['datastore_rows']:,} | {p['validation_memory_perplexity']:.2f} / "
                         f"{p['test_memory_perplexity']:.2f} | {p['validation_joint_perplexity']:.2f} / "
                         f"{p['test_joint_perplexity']:.2f} | {p['lmbda']:g} |")
        lines.append("")
    m = setup.get("machine")
    if m:
        lines.append(f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; torch {m['torch']}. Load average "
                     "(1 min) at the start and end of each point's evaluation is in the table; every point's JSON "
                     "holds its machine, load and torch threads.")
    return "\n".join(lines) + "\n"


def _blocks(n: int) -> str:
    return f"{n} block" if n == 1 else f"{n} blocks"


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    grid = memory_points(data)
    bases = base_points(data)
    base = next((p for p in bases if p["steps"] == 0), None)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    sizes = sorted({p["blocks"] for p in grid})
    colours = dict(zip(sizes, plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    ax = axes[0][0]
    # Colour is the size, the marker and line the series: one legend entry each instead of one per pair.
    for blocks in sizes:
        pts = [p for p in grid if p["blocks"] == blocks]
        epochs = [p["epochs"] for p in pts]
        ax.plot(epochs, [p["validation_memory_perplexity"] for p in pts], "o-", color=colours[blocks])
        ax.plot(epochs, [p["validation_joint_perplexity"] for p in pts], "s--", color=colours[blocks])
        kept = [p for p in pts if p.get("held_out")]
        if kept:
            ax.plot([p["epochs"] for p in kept], [p["held_out"]["perplexity"] for p in kept], ".:", color=colours[blocks])
    decayed = memory_points(data, "decay")
    for p in decayed:
        colour = colours.get(p["blocks"], "black")
        ax.plot([p["epochs"]], [p["validation_memory_perplexity"]], "x", color=colour, ms=9)
        ax.plot([p["epochs"]], [p["validation_joint_perplexity"]], "+", color=colour, ms=11)
    if base:
        ax.axhline(base["validation_perplexity"], color="gray", ls=":")
    handles = [Line2D([], [], color=colours[b], lw=3, label=f"{_blocks(b)} "
                      f"({next(p['parameters'] for p in grid if p['blocks'] == b) / 1e6:.0f}M)") for b in sizes]
    handles += [Line2D([], [], color="k", marker="o", ls="-", label="memory alone"),
                Line2D([], [], color="k", marker="s", ls="--", label="base + memory")]
    if any(p.get("held_out") for p in grid):
        handles.append(Line2D([], [], color="k", marker=".", ls=":", label="memory alone, held-out train rows"))
    if decayed:
        handles += [Line2D([], [], color="k", marker="x", ls="", ms=9, label="memory alone, linear decay"),
                    Line2D([], [], color="k", marker="+", ls="", ms=11, label="base + memory, linear decay")]
    if base:
        handles.append(Line2D([], [], color="gray", ls=":", label="base"))
    if grid:
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.45 * (high - low))  # room above the curves for the legend
        ax.legend(handles=handles, fontsize=6, ncol=2, loc="upper center")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("memory training epochs")
    ax.set_ylabel("perplexity (validation split unless said)")
    ax.set_title("Training length (overfitting shows as a rise)", fontsize=9)

    ax = axes[0][1]
    for blocks in sizes:
        pts = [p for p in grid if p["blocks"] == blocks]
        ax.plot([p["train_flops"] for p in pts], [p["validation_joint_perplexity"] for p in pts], "s--",
                color=colours[blocks], label=f"base + memory, {_blocks(blocks)}")
    cpt = [p for p in bases if p["steps"] > 0]
    if cpt:
        ax.plot([p["train_flops"] for p in cpt], [p["validation_perplexity"] for p in cpt], "k^-",
                label="base, continued pretraining")
    if base:
        ax.axhline(base["validation_perplexity"], color="gray", ls=":", label="base")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # the minor labels of a short log axis overlap
    ax.set_xlabel("training FLOPs (6 x parameters x rows)")
    ax.set_ylabel("validation perplexity")
    ax.set_title("Per unit of training compute", fontsize=9)
    _legend(ax)

    ax = axes[1][0]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for i, epochs in enumerate(sorted({p["epochs"] for p in grid})):
        pts = [p for p in grid if p["epochs"] == epochs]
        colour = cycle[i % len(cycle)]
        ax.plot([p["parameters"] for p in pts], [p["test_joint_perplexity"] for p in pts], "s--", color=colour)
        ax.plot([p["parameters"] for p in pts], [p["test_memory_perplexity"] for p in pts], "o-", color=colour, alpha=0.5)
        handles.append(Line2D([], [], color=colour, lw=3, label=f"{epochs:g} epoch{'' if epochs == 1 else 's'}"))
    handles += [Line2D([], [], color="k", marker="o", ls="-", alpha=0.5, label="memory alone"),
                Line2D([], [], color="k", marker="s", ls="--", label="base + memory")]
    if base:
        ax.axhline(base["test_perplexity"], color="gray", ls=":")
        handles.append(Line2D([], [], color="gray", ls=":", label="base"))
    if grid:
        low, high = ax.get_ylim()
        ax.set_ylim(low, high + 0.3 * (high - low))
        ax.legend(handles=handles, fontsize=6, ncol=3, loc="upper center")
    sizes_seen = sorted({(p["parameters"], p["blocks"]) for p in grid})
    ax.set_xticks([n for n, _ in sizes_seen], [f"{n / 1e6:.1f}M\n{_blocks(b)}" for n, b in sizes_seen])
    ax.set_xlabel("memory parameters")
    ax.set_ylabel("test perplexity")
    ax.set_title("Memory size", fontsize=9)

    ax = axes[1][1]
    axis = datastore_points(data)
    if axis:
        ax.plot([p["datastore_rows"] for p in axis], [p["test_memory_perplexity"] for p in axis], "o-", label="memory alone")
        ax.plot([p["datastore_rows"] for p in axis], [p["test_joint_perplexity"] for p in axis], "s--", label="base + memory")
        if base:
            ax.axhline(base["test_perplexity"], color="gray", ls=":", label="base")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks([p["datastore_rows"] for p in axis], [f"{p['datastore_rows']:,}" for p in axis])
        _legend(ax)
    ax.set_xlabel("datastore rows")
    ax.set_ylabel("test perplexity")
    ax.set_title("Datastore size", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(data: dict, stem: Path) -> None:
    """STEM.md and STEM.png from the points."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(tables(data))
    plot(data, Path(f"{stem}.png"))

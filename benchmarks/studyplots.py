"""The modes study's figures, drawn from its results.json alone.

accuracy_time.png and accuracy_samples.png: test accuracy after each epoch against the
elapsed time and against the training samples processed, the mean over seeds with a
band of one std, a line per variant; staleness.png: each variant's staleness
distribution (all seeds). Files of the earlier format get their figures as before
(accuracy.png, staleness.png); :func:`plot_accuracy` also draws benchmarks.vs_ddp's.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from benchmarks.study import median_of, staleness

STALENESS_TITLE = (
    "staleness of each push: versions applied between its pull and its arrival "
    "(ssp's bound counts clocks)"
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: dict, out: Path) -> list[Path]:
    """Every figure of a results.json, into out."""
    if "variants" not in result:
        return legacy_plot(result, out)
    return [
        plot_curves(result, "wall_s", out / "accuracy_time.png"),
        plot_curves(result, "samples", out / "accuracy_samples.png"),
        plot_staleness(result, out / "staleness.png"),
    ]


def mean_curve(runs: list[dict], x: str) -> tuple[list[float], list[float], list[float]]:
    """x, mean accuracy and its std after each epoch that every run evaluated (and has x)."""
    epochs = min(len(r["curve"]) for r in runs)
    xs, ys, sds = [], [], []
    for i in range(epochs):
        points = [r["curve"][i] for r in runs]
        if any(p.get(x) is None for p in points):
            continue
        acc = [p["accuracy"] for p in points]
        xs.append(statistics.fmean(p[x] for p in points))
        ys.append(statistics.fmean(acc))
        sds.append(statistics.stdev(acc) if len(acc) > 1 else 0.0)
    return xs, ys, sds


def _style(i: int, mode: str) -> dict:
    """A colour per variant, a line style per kind of mode."""
    dashes = {"sync": "-", "async": "--", "ssp": "-.", "local": ":", "local-async": ":"}
    return {"color": f"C{i % 10}", "linestyle": dashes.get(mode, "-")}


def plot_curves(result: dict, x: str, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, variant in enumerate(result["variants"]):
        runs = variant["runs"]
        xs, ys, sds = mean_curve(runs, x)
        style = _style(i, runs[0]["mode"])
        ax.plot(xs, ys, marker="o", markersize=3, label=variant["label"], **style)
        if len(runs) > 1:
            low = [y - s for y, s in zip(ys, sds, strict=True)]
            high = [y + s for y, s in zip(ys, sds, strict=True)]
            ax.fill_between(xs, low, high, color=style["color"], alpha=0.15, linewidth=0)
    ax.axhline(result["target_accuracy"], color="grey", linestyle=":", label="target")
    ax.set_xlim(left=0)
    ax.set_ylim(max(0.0, ax.get_ylim()[0]), min(1.0, ax.get_ylim()[1]))
    ax.set_xlabel(
        "seconds since the cluster started"
        if x == "wall_s"
        else "training samples processed when the epoch was evaluated"
    )
    ax.set_ylabel("test accuracy")
    seeds = len(result["seeds"])
    ax.set_title(
        f"{result['model']}, {result['workers']} workers"
        + (f", straggler {result['straggler']}" if result["straggler"] else "")
        + (f": mean of {seeds} seeds, band ±1 std" if seeds > 1 else "")
    )
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_staleness(result: dict, path: Path) -> Path:
    """A panel per variant: the fraction of its pushes at each staleness."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    variants = result["variants"]
    cols = min(4, len(variants))
    rows = math.ceil(len(variants) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False)
    for ax, variant in zip(axes.flat, variants, strict=False):
        hist = staleness(variant["runs"])
        total = sum(hist.values()) or 1
        ax.bar(list(hist), [n / total for n in hist.values()])
        ax.set_title(f"{variant['label']} (median {median_of(hist)})", fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.6, max([1, *hist]) + 0.6)  # one bar (sync) stays a bar
    for ax in axes.flat[len(variants) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction of pushes")
    for ax in axes[-1]:
        ax.set_xlabel("staleness (versions)")
    fig.suptitle(STALENESS_TITLE.replace(": ", ":\n", 1), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_accuracy(
    runs: list[tuple[str, list[dict], dict]],
    train_samples: int,
    target: float,
    title: str,
    path: Path,
) -> None:
    """Test accuracy against the training samples processed (epochs done x the training
    split), so that start-up, which differs between runs, is not on the axis: one line
    per (label, curve, line style) run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve, style in runs:
        ax.plot(
            [e["epoch"] * train_samples for e in curve],
            [e["accuracy"] for e in curve],
            marker="o",
            label=label,
            **style,
        )
    ax.axhline(target, color="grey", linestyle=":", label="target")
    ax.set_xlim(left=0)
    ax.set_xlabel(f"training samples processed (epochs x {train_samples:,})")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def legacy_plot(result: dict, out: Path) -> list[Path]:
    """The earlier format's figures: accuracy.png (first repeat) and staleness.png."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    accuracy = out / "accuracy.png"
    plot_accuracy(
        [(r["label"], r["curves"][0], {}) for r in result["modes"]],
        result["train_samples"],
        result["target_accuracy"],
        f"{result['model']}: test accuracy after each epoch",
        accuracy,
    )
    modes = result["modes"]
    fig, axes = plt.subplots(1, len(modes), figsize=(3 * len(modes), 3), squeeze=False)
    for ax, r in zip(axes[0], modes, strict=True):
        hist = r["staleness_histogram"]
        ax.bar([int(k) for k in hist], list(hist.values()))
        ax.set_title(r["label"])
        ax.set_xlabel("staleness (versions)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(-0.6, max([1, *map(int, hist)]) + 0.6)  # one bar (sync) stays a bar
    axes[0][0].set_ylabel("pushes")
    fig.suptitle(STALENESS_TITLE, fontsize="medium")
    fig.tight_layout()
    staleness_png = out / "staleness.png"
    fig.savefig(staleness_png, dpi=120)
    plt.close(fig)
    return [accuracy, staleness_png]

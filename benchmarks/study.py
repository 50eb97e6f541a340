"""The modes study's numbers from its JSON alone: per-variant statistics over seeds, the
Markdown table, and the "which mode and rule, when" table across settings.

A results.json of ``benchmarks.sync_vs_async`` (``"format": 2``) holds every run of
every variant; everything here is computed from those runs, so a change of a table
shows without running the study again. Files of the earlier format (one ``modes``
list of medians) are rendered as they were.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable

ACCURACY_SLACK = 0.01  # "as good as the best": a final accuracy within 1 point of it


def run_record(summary: dict) -> dict:
    """What results.json keeps of one run (one seed of a variant): enough to redraw."""
    return {
        "seed": summary["seed"],
        "mode": summary["mode"],
        "settings": summary["settings"],
        "optimizer": summary["optimizer"],
        "recipe_applied": summary["recipe_applied"],
        "epochs": summary["epochs"],
        "batch_size": summary["batch_size"],
        "wall_s": summary["wall_s"],
        "final_accuracy": summary["final_accuracy"],
        "curve": [
            {k: e[k] for k in ("epoch", "accuracy", "loss", "wall_s", "samples")}
            for e in summary["accuracy_curve"]
        ],
        "samples": summary["samples"],
        "samples_per_s": summary["samples_per_s"],
        "updates_per_s": summary["updates_per_s"],
        "updates_applied": summary["updates_applied"],
        "pushes_received": summary["pushes_received"],
        "stale_dropped": summary["stale_dropped"],
        "compensated": summary["compensated"],
        "uncompensated": summary["uncompensated"],
        # every server sees every push: server 0's histogram is the job's
        "staleness_histogram": {int(k): v for k, v in summary["staleness_histogram"][0].items()},
    }


def to_target(run: dict, target: float) -> dict | None:
    """The first evaluation of a run at or above the target accuracy, if any."""
    return next((e for e in run["curve"] if e["accuracy"] >= target), None)


def _stats(values: Iterable[float | None]) -> dict:
    """Mean and std (0 for one value) of the values present, and how many were."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(present) if len(present) > 1 else 0.0
    return {"mean": statistics.fmean(present), "std": std, "n": len(present)}


def staleness(runs: list[dict]) -> Counter[int]:
    """The staleness histogram of a variant's runs together."""
    total: Counter[int] = Counter()
    for run in runs:
        total.update({int(k): v for k, v in run["staleness_histogram"].items()})
    return total


def median_of(histogram: Counter[int]) -> int | None:
    """The median of a histogram {value: count} (the lower one of an even count)."""
    count = sum(histogram.values())
    if not count:
        return None
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if 2 * seen >= count:
            return value
    return None  # not reached: the loop ends at the last value


def summarise_variant(variant: dict, target: float) -> dict:
    """One variant's statistics over its runs (seeds)."""
    runs = variant["runs"]
    hits = [to_target(r, target) for r in runs]
    hist = staleness(runs)
    return {
        "label": variant["label"],
        "mode": runs[0]["mode"],
        "settings": runs[0]["settings"],
        "seeds": len(runs),
        "final_accuracy": _stats(r["final_accuracy"] for r in runs),
        "time_to_target_s": _stats(h and h["wall_s"] for h in hits),
        "samples_to_target": _stats(h and h["samples"] for h in hits),
        "wall_s": _stats(r["wall_s"] for r in runs),
        "samples_per_s": _stats(r["samples_per_s"] for r in runs),
        "updates_per_s": _stats(r["updates_per_s"] for r in runs),
        "pushes": _stats(sum(r["pushes_received"]) for r in runs),
        "stale_dropped": _stats(max(r["stale_dropped"]) for r in runs),
        "compensated": _stats(r.get("compensated") for r in runs),
        "compensated_share": _share(runs),
        "median_staleness": median_of(hist),
        "staleness_histogram": {str(k): hist[k] for k in sorted(hist)},
    }


def _share(runs: list[dict]) -> float | None:
    """Delay compensation: the fraction of the pushes it corrected (None when it was off)."""
    done = sum(r.get("compensated", 0) for r in runs)
    total = done + sum(r.get("uncompensated", 0) for r in runs)
    return done / total if total else None


def summaries(result: dict) -> list[dict]:
    return [summarise_variant(v, result["target_accuracy"]) for v in result["variants"]]


def _cell(stats: dict, fmt: str, of: int | None = None) -> str:
    """'mean +- std', '-' when no run has it, '(k/n)' after it when only k of n have."""
    if stats["n"] == 0:
        return "not reached" if of else "-"
    text = f"{stats['mean']:{fmt}}"
    if stats["n"] > 1:
        text += f" ± {stats['std']:{fmt}}"
    if of and stats["n"] < of:
        text += f" ({stats['n']}/{of})"
    return text


def setting(result: dict) -> str:
    """The setting of a study in words: its workers, servers and straggler."""
    workers, servers = result["workers"], result["servers"]
    return (
        f"{workers} worker{'s' * (workers != 1)}, {servers} server{'s' * (servers != 1)}, "
        f"straggler {result['straggler'] or 'none'}"
    )


def markdown(result: dict) -> str:
    """The table of a results.json: the study's, or the earlier format's."""
    if "variants" not in result:
        return legacy_markdown(result)
    target, rows = result["target_accuracy"], summaries(result)
    sync = next((r for r in rows if r["label"] == "sync"), None)
    sync_t = sync["time_to_target_s"]["mean"] if sync else None
    lines = [
        f"{result['model']} on {result['dataset']}, {setting(result)}, {result['epochs']} "
        f"epochs, batch {result['batch_size']}; "
        + (
            f"mean ± std over seeds {', '.join(map(str, result['seeds']))}"
            if len(result["seeds"]) > 1
            else f"one run (seed {result['seeds'][0]})"
        )
        + ". Pushes: received, summed over servers; "
        "staleness: versions between a worker's pull and its push.",
        "",
        f"| variant | final accuracy | time to {target:.0%} (s) | vs sync | samples to "
        f"{target:.0%} | samples/s | updates/s | pushes | median staleness | stale dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["time_to_target_s"]
        ratio = f"{t['mean'] / sync_t:.2f}" if t["n"] and sync_t else "-"
        lines.append(
            f"| {r['label']} | {_cell(r['final_accuracy'], '.3f')} | "
            f"{_cell(t, '.1f', r['seeds'])} | {ratio} | "
            f"{_cell(r['samples_to_target'], ',.0f', r['seeds'])} | "
            f"{_cell(r['samples_per_s'], '.0f')} | "
            f"{_cell(r['updates_per_s'], '.1f')} | {_cell(r['pushes'], '.0f')} | "
            f"{'-' if r['median_staleness'] is None else r['median_staleness']} | "
            f"{_cell(r['stale_dropped'], '.0f')} |"
        )
    lines += ["", "What the servers ran:", ""]
    for r in rows:
        share = r["compensated_share"]
        extra = "" if share is None else f"; {share:.0%} of the pushes compensated"
        lines.append(f"- {r['label']}: {r['settings']}{extra}")
    return "\n".join(lines) + "\n"


def best(result: dict) -> tuple[dict, list[dict]]:
    """The variant to use in a study's setting, and those as accurate: of the variants whose
    mean final accuracy is within ACCURACY_SLACK of the best, the one with the least mean
    time to the target among those that reached it on every seed (else the most accurate)."""
    rows = summaries(result)
    top = max(r["final_accuracy"]["mean"] for r in rows)
    close = [r for r in rows if r["final_accuracy"]["mean"] >= top - ACCURACY_SLACK]
    reached = [r for r in close if r["time_to_target_s"]["n"] == r["seeds"]]
    if reached:
        return min(reached, key=lambda r: r["time_to_target_s"]["mean"]), close
    return max(close, key=lambda r: r["final_accuracy"]["mean"]), close


def which_rule_when(results: list[dict]) -> str:
    """A row per study (setting): the best variant by :func:`best`, with its numbers."""
    lines = [
        f"Computed from the studies' JSON: in each setting, of the variants within "
        f"{ACCURACY_SLACK * 100:g} point of the best mean final accuracy, the fastest to the "
        "target (on every seed).",
        "",
        "| setting | use | final accuracy | time to target (s) | vs sync | as accurate |",
        "|---|---|---:|---:|---:|---|",
    ]
    for result in results:
        chosen, close = best(result)
        rows = {r["label"]: r for r in summaries(result)}
        sync_t = rows["sync"]["time_to_target_s"]["mean"] if "sync" in rows else None
        t = chosen["time_to_target_s"]
        ratio = f"{t['mean'] / sync_t:.2f}" if t["n"] and sync_t else "-"
        others = ", ".join(r["label"] for r in close if r is not chosen) or "-"
        lines.append(
            f"| {setting(result)}, target {result['target_accuracy']:.0%} | {chosen['label']} | "
            f"{_cell(chosen['final_accuracy'], '.3f')} | {_cell(t, '.1f', chosen['seeds'])} | "
            f"{ratio} | {others} |"
        )
    return "\n".join(lines) + "\n"


def legacy_markdown(result: dict) -> str:
    """The earlier format's table (medians of repeats per mode)."""
    target = result["target_accuracy"]
    lines = [
        f"{result['model']} on {result['dataset']}, {result['workers']} workers, "
        f"{result['servers']} servers, {result['epochs']} epochs, straggler "
        f"{result['straggler'] or 'none'}; medians of {result['repeats']} run(s).",
        "",
        f"| mode | time to {target:.0%} (s) | vs sync | final accuracy | samples/s | updates/s | "
        "median staleness (versions) | stale dropped |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sync = next((m["time_to_target_s"] for m in result["modes"] if m["label"] == "sync"), None)
    for r in result["modes"]:
        hist = r["staleness_histogram"]
        expanded = sorted(int(k) for k, n in hist.items() for _ in range(n))
        median = expanded[len(expanded) // 2] if expanded else 0
        t = r["time_to_target_s"]
        lines.append(
            f"| {r['label']} | {'not reached' if t is None else f'{t:.1f}'} | "
            f"{f'{t / sync:.2f}' if t is not None and sync else '-'} | "
            f"{r['final_accuracy']:.3f} | {r['samples_per_s']:.0f} | {r['updates_per_s']:.1f} | "
            f"{median} | {r['stale_dropped']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# The issue's targets for the study, as (name, goal) in words; :func:`targets` measures them.
ASYNC_MODES = ("async", "ssp", "local-async")  # asynchronous: no barrier (buffered included)
TIME_RATIO_GOAL = 0.6  # a straggler: the best asynchronous variant's time to target vs sync's
PUSH_RATIO_GOAL = 4.0  # Local SGD (barrier): sync's pushes over local's, at sync's accuracy


def _row(rows: list[dict], label: str) -> dict | None:
    return next((r for r in rows if r["label"] == label), None)


def _mean(stats: dict) -> float | None:
    return stats["mean"] if stats["n"] else None


def targets(results: list[dict]) -> str:
    """The targets measured from the studies (a row per study and target): with a
    straggler, the best asynchronous variant's time to the target against sync's and its
    accuracy; without, its accuracy against sync's; in both, Local SGD's pushes."""
    lines = ["| setting | target | goal | measured | |", "|---|---|---:|---:|---|"]
    for result in results:
        rows = summaries(result)
        sync = _row(rows, "sync")
        if sync is None:
            continue
        where = setting(result)
        sync_acc = sync["final_accuracy"]["mean"]
        asynchronous = [r for r in rows if r["mode"] in ASYNC_MODES]
        if asynchronous and result["straggler"]:
            sync_t = _mean(sync["time_to_target_s"])
            timed = [
                r
                for r in asynchronous
                if r["time_to_target_s"]["n"] == r["seeds"]
                and r["final_accuracy"]["mean"] >= sync_acc - ACCURACY_SLACK
            ]
            fastest = min(timed, key=lambda r: r["time_to_target_s"]["mean"], default=None)
            if fastest is None or sync_t is None:
                measured, met = "no asynchronous variant reached it on every seed", False
            else:
                ratio = fastest["time_to_target_s"]["mean"] / sync_t
                measured, met = f"{ratio:.2f} ({fastest['label']})", ratio <= TIME_RATIO_GOAL
            lines.append(
                f"| {where} | best asynchronous time to {result['target_accuracy']:.0%} / sync's, "
                f"within {ACCURACY_SLACK * 100:g} point of sync | <= {TIME_RATIO_GOAL} | "
                f"{measured} | {'met' if met else '**missed**'} |"
            )
        elif asynchronous:
            top = max(asynchronous, key=lambda r: r["final_accuracy"]["mean"])
            gap = top["final_accuracy"]["mean"] - sync_acc
            lines.append(
                f"| {where} | best asynchronous final accuracy - sync's ({sync_acc:.3f}) | "
                f">= -{ACCURACY_SLACK:.2f} | {gap:+.3f} ({top['label']}) | "
                f"{'met' if gap >= -ACCURACY_SLACK else '**missed**'} |"
            )
        local = [r for r in rows if r["mode"] == "local"]
        if local:
            top = max(local, key=lambda r: r["final_accuracy"]["mean"])
            pushes = _mean(top["pushes"])
            ratio = _mean(sync["pushes"]) / pushes if pushes else 0.0
            gap = top["final_accuracy"]["mean"] - sync_acc
            met = ratio >= PUSH_RATIO_GOAL and gap >= 0
            lines.append(
                f"| {where} | Local SGD (barrier): sync's pushes / its pushes, at sync's final "
                f"accuracy | >= {PUSH_RATIO_GOAL:g}, >= +0.000 | {ratio:.1f}, {gap:+.3f} "
                f"({top['label']}) | {'met' if met else '**missed**'} |"
            )
    return "\n".join(lines) + "\n"

"""What ``ps-cluster up`` prints: a line per evaluated epoch, the final table, the summary.

Epochs are counted from 1 in everything a person reads; the scheduler's
progress counts them from 0.
"""

from __future__ import annotations

from protos.job import Mode, Settings
from protos.jobspec import JobSpec


class EpochLines:
    """One line per epoch, printed once its evaluation is in, each epoch once, in order."""

    def __init__(self) -> None:
        self.printed = 0  # epochs printed so far

    def new(self, p: dict) -> list[str]:
        """The lines of epochs evaluated since the last call (an epoch evaluated before an
        earlier one waits for it)."""
        evaluated = {e["epoch"]: e for e in p["evaluations"]}
        total = p["epochs"] * p["shards_per_epoch"]
        lines = []
        while self.printed in evaluated:
            e = evaluated[self.printed]
            self.printed += 1
            lines.append(
                f"epoch {self.printed}/{p['epochs']}: test accuracy {e['accuracy']:.4f}, "
                f"loss {e['loss']:.4f} ({p['done']}/{total} shards done)"
            )
        return lines


def bar_postfix(p: dict) -> str:
    """The progress bar's words: the epoch in training, and the last evaluated one."""
    text = f"epoch {min(p['epoch'] + 1, p['epochs'])}/{p['epochs']}"
    if p["evaluations"]:
        last = p["evaluations"][-1]
        text += f"; epoch {last['epoch'] + 1} test accuracy {last['accuracy']:.3f}"
    return text


def summarise(
    spec: JobSpec, progress: dict, statuses: list, wall_s: float, started_at: float
) -> dict:
    """The job's outcome; ``started_at`` (time.time()) dates the accuracy curve."""
    curve = [
        {
            "epoch": e["epoch"] + 1,
            "loss": e["loss"],
            "accuracy": e["accuracy"],
            "wall_s": round(e["evaluated_at"] - started_at, 3),
        }
        for e in progress["evaluations"]
    ]
    ran = Settings.from_proto(statuses[0].config)  # what the servers ran, not what was asked
    return {
        "mode": ran.mode.value,
        "staleness": ran.staleness if ran.mode is Mode.SSP else None,
        "model": spec.model,
        "optimizer": {"name": ran.optimizer.name, "lr": ran.lr, **ran.optimizer.options()},
        "settings": ran.describe(),
        "settings_by_server": [Settings.from_proto(s.config).to_doc() for s in statuses],
        "compression": str(ran.compression),
        "epochs": spec.epochs,
        "workers": len(progress["workers"]),
        "servers": len(statuses),
        "wall_s": round(wall_s, 3),
        "final_accuracy": curve[-1]["accuracy"] if curve else None,
        "accuracy_curve": curve,
        "shards_completed_per_epoch": progress["completions_per_epoch"],
        "updates_applied": [s.updates_applied for s in statuses],
        "stale_dropped": [s.stale_dropped for s in statuses],
        "staleness_histogram": [dict(s.staleness_histogram) for s in statuses],
    }


def final_table(summary: dict) -> str:
    lines = [f"{'epoch':>5} {'test loss':>10} {'accuracy':>9}"]
    for e in summary["accuracy_curve"]:
        lines.append(f"{e['epoch']:>5} {e['loss']:>10.4f} {e['accuracy']:>9.4f}")
    lines.append(
        f"{summary['settings']}; {summary['workers']} workers, {summary['servers']} servers: "
        f"final test accuracy {summary['final_accuracy']:.4f} in {summary['wall_s']:.1f}s; "
        f"updates applied {max(summary['updates_applied'])}, stale gradients dropped "
        f"{sum(summary['stale_dropped'])}"
    )
    return "\n".join(lines)

"""Each built-in model's default settings per mode: what a job gets when it names no tuning.

A recipe is the study's answer (README, Results: "Which mode and rule, when";
``benchmarks.sync_vs_async``) to "what should this model run with in this mode": the
optimizer and its lr, the schedule, the staleness rules, and the epochs. A job
document (flags, job file, ``PS_*`` variables) gets from its model's recipe for
its mode every value it does not give itself; what it gives wins. Naming another
optimizer than the recipe's drops the recipe's optimizer, lr and options (they
belong together), and naming a schedule drops the recipe's final ratio.
``recipe: false`` turns recipes off: the job then gets the plain defaults of
:class:`protos.job.Settings` and :class:`protos.jobspec.JobSpec`.

The model names here are those of ``ps_worker.models.BUILTIN`` (checked there);
this module stays free of torch so that every process can read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protos.job import Mode
from protos.optimizers import OPTION_TYPES


@dataclass(frozen=True)
class Recipe:
    """What a model runs with: ``job`` in every mode, and ``modes`` for each mode."""

    job: Mapping[str, Any]
    modes: Mapping[str, Mapping[str, Any]]

    def __post_init__(self) -> None:
        missing = set(Mode.choices()) - set(self.modes)
        assert not missing, f"a recipe names every mode: missing {sorted(missing)}"

    def for_mode(self, mode: str) -> dict[str, Any]:
        """Every value the recipe gives a job in ``mode`` (none for an unknown mode)."""
        if mode not in self.modes:
            return {}
        return {**self.job, **self.modes[mode]}


# Adam without momentum (beta1 0) under asynchrony: stale gradients already act as momentum
# (Mitliagkas et al. 2016), and Adam's first moment makes it the most staleness-sensitive.
_STALE_ADAM = {"optimizer": "adam", "beta1": 0.0, "lr_schedule": "cosine", "lr_final_ratio": 0.0}

# Local SGD as DiLoCo runs it (Douillard et al. 2023): Adam on the workers, the mean change
# applied by SGD with Nesterov momentum on the servers.
_DILOCO = {
    "optimizer": "adam",
    "local_steps": 8,
    "outer_lr": 0.7,
    "outer_momentum": 0.9,
    "lr_schedule": "cosine",
}

# Chosen by the study (README, Results) on mnist1d-cnn with 4 and 16 workers; the MLPs, which
# have no study of their own, take the same per-mode rules.
_MODES = {
    "sync": {"optimizer": "adam", "lr": 0.01},
    "async": {**_STALE_ADAM, "lr": 0.01, "staleness_aware_lr": True, "lr_warmup": 50},
    # a bound of 1 keeps the 4 workers' updates fresh; a bound of 2 at lr 0.01 diverged on
    # a seed, and at 0.005 ended at 91%; 16 epochs ended at 92-94%, so 24. Without a warm-up
    # 6 runs ended at 0.927-0.962 (the low one stuck near 27% for its first 3 epochs); with
    # async's warm-up of 50 updates 5 runs ended at 0.948-0.965
    "ssp": {
        **_STALE_ADAM,
        "lr": 0.01,
        "staleness": 1,
        "staleness_aware_lr": True,
        "lr_warmup": 50,
        "epochs": 24,
    },
    # 24 epochs at 8 local steps: still over 4x fewer pushes than sync's 16 epochs
    "local": {**_DILOCO, "lr": 0.01, "epochs": 24},
    "local-async": {
        "optimizer": "adam",
        "lr": 0.01,
        "local_steps": 4,
        "staleness_aware_lr": True,
        "lr_schedule": "cosine",
    },
}

RECIPES: dict[str, Recipe] = {
    "mnist1d-cnn": Recipe(job={"epochs": 16, "batch_size": 100}, modes=_MODES),
    "mnist1d-mlp": Recipe(job={"epochs": 16, "batch_size": 100}, modes=_MODES),
    "digits-mlp": Recipe(job={"epochs": 10, "batch_size": 32}, modes=_MODES),
}

# What belongs to the optimizer: given by the job, the recipe's are dropped together.
_OPTIMIZER_KEYS = {"optimizer", "lr", *OPTION_TYPES}


def recipe_values(model: str, mode: str) -> dict[str, Any]:
    """The values ``model``'s recipe gives a job in ``mode`` (none for a model without one)."""
    recipe = RECIPES.get(model)
    return recipe.for_mode(mode) if recipe else {}


def fill(given: Mapping[str, Any], model: str, mode: str) -> dict[str, Any]:
    """The values of ``model``'s recipe for ``mode`` that a document giving ``given`` (its
    fields and optimizer options, parsed) takes: every one it does not give itself, but
    the recipe's optimizer group when it names another optimizer, and the recipe's final
    ratio when it names a schedule."""
    values = recipe_values(model, mode)
    if "optimizer" in given and given["optimizer"] != values.get("optimizer"):
        values = {k: v for k, v in values.items() if k not in _OPTIMIZER_KEYS}
    if "lr_schedule" in given:
        values.pop("lr_final_ratio", None)
    return {k: v for k, v in values.items() if k not in given}


def describe(model: str, mode: str, applied: Mapping[str, Any]) -> str:
    """One line for logs: what a job took from its model's recipe."""
    if not applied:
        return f"no recipe applied ({model}, {mode})"
    shown = ", ".join(f"{k} {v}" for k, v in sorted(applied.items()))
    return f"{model}'s recipe for {mode}: {shown}"

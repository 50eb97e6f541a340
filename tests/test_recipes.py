"""Per-model, per-mode recipes (protos/recipes.py): which values a job document takes
from them, and that they reach the servers through ps-cluster with no tuning flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from protos.job import Mode
from protos.jobspec import JobSpec, SpecError
from protos.recipes import RECIPES, describe, fill, recipe_values
from ps_worker.data import prepare, read_manifest
from ps_worker.models import BUILTIN
from scheduler.lifecycle import JOB_FILE


def spec(**doc) -> JobSpec:
    return JobSpec.from_dict({"data_dir": "unused", **doc})


def test_every_builtin_model_has_a_valid_recipe_for_every_mode():
    assert set(RECIPES) == set(BUILTIN)
    for model in RECIPES:
        for mode in Mode.choices():
            s = spec(model=model, mode=mode)
            assert s.recipe_applied == recipe_values(model, mode)
            settings = s.job_settings(50)  # builds: the values fit together
            assert settings.mode.value == mode


def test_a_job_without_tuning_gets_its_models_recipe_for_its_mode():
    s = spec(model="mnist1d-cnn", mode="async")
    want = RECIPES["mnist1d-cnn"].for_mode("async")
    assert s.epochs == want["epochs"] and s.lr == want["lr"]
    assert s.optimizer_options["beta1"] == want["beta1"]
    assert s.staleness_aware_lr is want["staleness_aware_lr"]
    assert s.job_settings(200).lr == want["lr"]
    # the mode without a recipe'd value keeps the plain default
    local = spec(model="mnist1d-cnn", mode="local")
    assert local.staleness == JobSpec.staleness


def test_what_the_job_gives_wins_and_the_optimizer_group_goes_together():
    s = spec(model="mnist1d-cnn", mode="async", lr=0.05, epochs=2)
    assert (s.lr, s.epochs) == (0.05, 2)
    assert s.optimizer_options["beta1"] == 0.0  # the rest of the recipe still applies
    other = spec(model="mnist1d-cnn", mode="async", optimizer="sgd", momentum=0.9)
    assert other.lr == JobSpec.lr  # the recipe's Adam lr is not SGD's
    assert other.optimizer_options == {"momentum": 0.9}
    assert other.staleness_aware_lr is True  # not an optimizer setting: still the recipe's
    constant = spec(model="mnist1d-cnn", mode="sync", lr_schedule="constant")
    assert constant.lr_schedule == "constant" and constant.lr_final_ratio == 0.0
    assert "lr_final_ratio" not in fill({"lr_schedule": "constant"}, "mnist1d-cnn", "async")


def test_recipe_false_and_models_without_one_get_the_plain_defaults():
    off = spec(model="mnist1d-cnn", mode="async", recipe="false")
    assert off.recipe_applied == {} and off.lr == JobSpec.lr and off.optimizer_options == {}
    custom = spec(model="my_models:make", mode="async")
    assert custom.recipe_applied == {} and custom.epochs == JobSpec.epochs
    assert fill({}, "mnist1d-cnn", "no-such-mode") == {}
    with pytest.raises(SpecError, match="recipe"):
        spec(recipe="maybe")


def test_a_document_read_back_takes_nothing_more():
    """A worker reads the scheduler's full document: nothing is applied twice."""
    first = spec(model="digits-mlp", mode="ssp")
    again = JobSpec.from_json(first.to_json())
    assert again.to_dict() == first.to_dict() and again.recipe_applied == {}
    assert "digits-mlp's recipe for ssp" in describe("digits-mlp", "ssp", first.recipe_applied)


def test_a_stored_spec_from_before_a_setting_existed_takes_nothing_from_a_recipe():
    """The scheduler's stored job and a worker's copy are whole: a key they lack (written
    before it existed) keeps its plain default, as the servers' checkpointed job does."""
    doc = spec(model="mnist1d-cnn", mode="async").to_dict()
    for newer in ("lr_warmup", "buffer", "recipe"):
        del doc[newer]
    old = JobSpec.from_json(json.dumps(doc))
    assert old.lr_warmup == 0 and old.buffer == 1 and old.recipe_applied == {}
    assert JobSpec.from_dict(doc).lr_warmup == RECIPES["mnist1d-cnn"].for_mode("async")["lr_warmup"]


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_ps_cluster_with_no_tuning_flags_runs_the_recipe_on_every_server(tmp_path):
    data = tmp_path / "digits"
    prepare("digits", data, shards=2, samples=400)
    summary_file = tmp_path / "summary.json"
    result = subprocess.run(
        [
            *(str(Path(sys.executable).parent / "ps-cluster"), "up", "--data-dir", str(data)),
            *("--model", "digits-mlp", "--mode", "async", "--servers", "2", "--workers", "1"),
            *("--epochs", "1", "--work-dir", str(tmp_path / "work"), "--quiet"),
            *("--summary-json", str(summary_file), "--timeout-s", "200"),
        ],
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "digits-mlp's recipe for async" in result.stdout
    want = RECIPES["digits-mlp"].for_mode("async")
    summary = json.loads(summary_file.read_text())
    assert len(summary["settings_by_server"]) == 2
    batches = read_manifest(data).batches_per_epoch(want["batch_size"])
    for reported in summary["settings_by_server"]:  # read back from each server's Status
        assert reported["mode"] == "async"
        assert reported["lr"] == pytest.approx(want["lr"])
        assert reported["beta1"] == want["beta1"]
        assert reported["staleness_aware_lr"] is want["staleness_aware_lr"]
        assert reported["lr_schedule"] == f"cosine:{batches}"  # one epoch: the flag won
    job_file = json.loads((tmp_path / "work" / JOB_FILE).read_text())
    assert job_file["epochs"] == 1 and job_file["lr"] == want["lr"]  # what was applied
    assert job_file["batch_size"] == want["batch_size"]

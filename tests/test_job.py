"""The job model: one registry, one translation each way, clear refusals."""

from __future__ import annotations

import argparse

import pytest
import torch

from protos import ps_pb2
from protos.compression import Compression
from protos.job import Job, JobError, Mode, Settings
from protos.jobspec import JobSpec, SpecError, add_job_arguments, flag_names, spec_from_args
from protos.layout import TensorSpec
from protos.optimizers import OPTIMIZERS, SGD, Adagrad, Adam, OptimizerError, make_optimizer
from protos.recipes import recipe_values
from protos.schedule import LrSchedule
from ps_worker import Client, ClientConfig, DistributedOptimizer
from ps_worker.errors import InvalidRequestError
from scheduler.state import SchedulerState, StateError

pytestmark = pytest.mark.timeout(30)
SPECS = [TensorSpec("w", "float32", (10, 3)), TensorSpec("b", "float32", (3,))]


def every_setting() -> Settings:
    return Settings(
        mode=Mode.SYNC,
        staleness=5,
        backup_workers=2,
        optimizer=SGD(momentum=0.9, dampening=0.1, weight_decay=1e-4),
        lr=0.25,
        lr_schedule=LrSchedule("cosine", 100, 0.2),
        compression=Compression.parse("bf16,topk:0.1"),
        part_bytes=64,
    )


@pytest.mark.parametrize(
    "settings",
    [
        Settings(),
        every_setting(),
        Settings(mode=Mode.ASYNC, staleness_aware_lr=True, buffer=3, delay_compensation=0.04),
        Settings(
            mode=Mode.LOCAL_ASYNC,
            staleness_aware_lr=True,
            buffer=2,
            local_steps=4,
            outer_lr=0.5,
            outer_momentum=0.9,
            lr_schedule=LrSchedule("cosine", 10, 0.1, 5),
        ),
        Settings(optimizer=Adam(0.0, 0.95, 1e-6, 0.01), lr=3e-3),
        Settings(mode=Mode.ASYNC, optimizer=Adagrad(0.1, 1e-9, 0.0, 0.5)),
    ],
)
def test_a_job_survives_the_wire_and_the_document_form(settings):
    job = Job.for_model("j", SPECS, 2, settings, ("a", "b"))
    for index in (0, 1):
        back = Job.from_proto(job.for_server(index).to_proto())
        assert back == job.for_server(index) and back.workers == ("a", "b")
    assert Settings.build(**settings.to_doc()) == settings


def test_the_registry_matches_the_proto_and_every_derived_table():
    oneof = ps_pb2.OptimizerConfig.DESCRIPTOR.oneofs_by_name["kind"]
    assert [f.name for f in oneof.fields] == list(OPTIMIZERS)
    assert Mode.choices() == ["sync", "async", "ssp", "local", "local-async"]
    parser = argparse.ArgumentParser()
    add_job_arguments(parser)
    choices = {a.dest: a.choices for a in parser._actions}
    assert choices["optimizer"] == list(OPTIMIZERS) and choices["mode"] == Mode.choices()
    assert set(Settings.names()) <= set(flag_names())  # every setting has a flag


def test_a_config_without_an_optimizer_or_with_an_unknown_mode_is_refused():
    config = Job.for_model("j", SPECS, 1, Settings()).to_proto()
    config.optimizer.ClearField("adam")
    with pytest.raises(JobError, match="optimizer: none given"):
        Job.from_proto(config)
    config = Job.for_model("j", SPECS, 1, Settings()).to_proto()
    config.mode = 7
    with pytest.raises(JobError, match="mode 7 is not one of sync, async, ssp"):
        Job.from_proto(config)
    config = Job.for_model("j", SPECS, 1, Settings()).to_proto()
    config.optimizer.adam.beta1 = 1.5
    with pytest.raises(JobError, match="betas"):
        Job.from_proto(config)


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ({"optimizer": "lion"}, "unknown optimizer 'lion' \\(choose from sgd, adam, adagrad\\)"),
        ({"optimizer": "adam", "momentum": 0.9}, "momentum: not an option of adam"),
        ({"mode": "bsp"}, "mode 'bsp' is not one of sync, async, ssp"),
        ({"mode": "ssp", "backup_workers": 1}, "backup_workers applies to modes sync, local only"),
        ({"lr": 0}, "learning rate"),
        ({"staleness": -1}, "staleness must be a whole number >= 0"),
        ({"part_bytes": 0}, "part_bytes"),
        ({"colour": "red"}, "unknown job setting\\(s\\) colour"),
        ({"optimizer": SGD(), "momentum": 0.9}, "give options to the optimizer object"),
        ({"lr_schedule": "cosine"}, "at least 1"),
        ({"compression": "zip"}, "unknown item 'zip'"),
    ],
)
def test_bad_settings_are_refused_with_what_is_wrong(given, error):
    with pytest.raises(JobError, match=error):
        Settings.build(**given)


def test_build_applies_options_to_the_named_optimizer():
    s = Settings.build(optimizer="sgd", momentum=0.9, weight_decay=1e-4, lr=1)
    assert s.optimizer == SGD(momentum=0.9, weight_decay=1e-4) and s.lr == 1.0
    assert Settings.build(beta1=0).optimizer == Adam(beta1=0.0)  # the default optimizer's
    assert make_optimizer("adagrad", lr_decay=0.5) == Adagrad(lr_decay=0.5)
    with pytest.raises(OptimizerError):
        make_optimizer("sgd", nesterov=True)  # nesterov needs momentum


def test_job_differences_name_the_settings():
    a = Job.for_model("j", SPECS, 1, Settings())
    b = Job.for_model("j", SPECS, 1, Settings(optimizer=Adam(beta1=0.0), staleness=3))
    assert a.differences(b) == ["staleness", "optimizer"]


def test_a_spec_document_holds_every_option_and_reads_back():
    spec = JobSpec.from_dict(
        {
            "data_dir": "d",
            "optimizer": "sgd",
            "momentum": "0.9",
            "nesterov": "true",
            "staleness_aware_lr": "no",
        }
    )
    assert spec.job_settings(10).optimizer == SGD(momentum=0.9, nesterov=True)
    doc = spec.to_dict()
    assert doc["momentum"] == 0.9 and doc["dampening"] == 0.0 and "beta1" not in doc
    assert JobSpec.from_json(spec.to_json()) == JobSpec.from_dict(doc)
    with pytest.raises(SpecError, match="beta1: not an option of sgd"):
        JobSpec.from_dict({**doc, "beta1": 0})
    with pytest.raises(SpecError, match="nesterov: expected true or false"):
        JobSpec.from_dict({"data_dir": "d", "optimizer": "sgd", "nesterov": "maybe"})


def test_flags_override_the_file_and_variables_give_defaults(tmp_path, monkeypatch):
    config = tmp_path / "job.yaml"
    config.write_text("data_dir: d\noptimizer: sgd\nmomentum: 0.5\nlr: 0.1\n")
    monkeypatch.setenv("PS_WEIGHT_DECAY", "0.001")
    monkeypatch.setenv("PS_STALENESS", "")  # empty: unset
    parser = argparse.ArgumentParser()
    add_job_arguments(parser, env=True)
    args = parser.parse_args(["--config", str(config), "--momentum", "0.9", "--nesterov"])
    settings = spec_from_args(args).job_settings(10)
    assert settings.optimizer == SGD(momentum=0.9, nesterov=True, weight_decay=0.001)
    # unset: the model's recipe for the mode (protos/recipes.py), else the plain default
    assert settings.lr == 0.1 and settings.staleness == recipe_values("mnist1d-cnn", "ssp").get(
        "staleness", Settings().staleness
    )


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ({"lr": True}, "learning rate lr must be a positive number, got True"),
        ({"lr": 10**400}, "learning rate lr must be a positive number"),
        ({"optimizer": 42}, "optimizer must be an optimizer .* got 42"),
        ({"optimizer": None}, "optimizer must be .* got None"),
        ({"compression": 3}, "compression must be .* got 3"),
        ({"lr_schedule": None}, "lr_schedule must be .* got None"),
        ({"staleness": 1 << 32}, "staleness must be at most 4294967295"),
        ({"mode": "sync", "backup_workers": 1 << 40}, "backup_workers must be at most"),
        ({"part_bytes": 1 << 64}, "part_bytes must be at most"),
        ({"lr_schedule": "cosine:" + "9" * 25}, "total_steps 9+: not a whole number < 2"),
        ({"lr_schedule": "cosine:10", "lr_final_ratio": "x"}, "lr_final_ratio 'x' is not a number"),
        ({"optimizer": "sgd", "momentum": float("nan")}, "sgd option momentum must be a finite"),
        ({"optimizer": "sgd", "dampening": float("inf")}, "sgd option dampening must be a finite"),
        ({"optimizer": "sgd", "momentum": "0.9"}, "momentum must be a number, got '0.9'"),
        ({"optimizer": "sgd", "momentum": True}, "sgd option momentum must be a number, got True"),
        ({"optimizer": "sgd", "momentum": 0.9, "nesterov": "maybe"}, "nesterov must be true or f"),
        ({"eps": float("nan")}, "adam option eps must be a finite number, got nan"),
        ({"eps": float("inf")}, "adam option eps must be a finite number"),
        ({"weight_decay": float("inf")}, "adam option weight_decay must be a finite number"),
        ({"beta1": None}, "adam option beta1 must be a number, got None"),
        ({"optimizer": "adagrad", "lr_decay": float("nan")}, "adagrad option lr_decay must be"),
    ],
)
def test_values_of_the_wrong_type_or_not_finite_are_refused_naming_the_setting(given, error):
    """Each of these was accepted (and failed later, deep in to_proto, on the servers as
    NaN weights, or not at all: lr=True ran at lr 1) or refused with a bare TypeError."""
    with pytest.raises(JobError, match=error):
        Settings.build(**given)


def test_a_config_with_non_finite_optimizer_options_is_refused():
    for kind, option in (("sgd", "momentum"), ("adam", "eps"), ("adagrad", "lr_decay")):
        config = Job.for_model("j", SPECS, 1, Settings.build(optimizer=kind)).to_proto()
        setattr(getattr(config.optimizer, kind), option, float("nan"))
        with pytest.raises(JobError, match=f"{kind} option {option} must be a finite number"):
            Job.from_proto(config)


def test_whole_number_options_are_stored_as_floats():
    s = Settings.build(optimizer="sgd", momentum=1, lr=1)
    assert s.optimizer == SGD(momentum=1.0) and isinstance(s.optimizer.momentum, float)
    assert s.to_doc() == Settings.build(optimizer="sgd", momentum=1.0, lr=1.0).to_doc()


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ({"lr": "0.1"}, "learning rate lr must be a positive number, got '0.1'"),
        ({"staleness": True}, "staleness must be a whole number >= 0, got True"),
        ({"optimizer": 42}, "optimizer must be an optimizer"),
        ({"mode": None}, "mode None is not one of"),
        ({"compression": 3}, "compression must be a compression"),
        ({"settings": "adam"}, "settings must be a protos.job.Settings .* got 'adam'"),
        ({"settings": {"lr": 0.1}}, "settings must be a protos.job.Settings"),
        ({"workers": "worker0"}, "workers must be a list of non-empty worker ids, got 'worker0'"),
        ({"workers": 5}, "workers must be a list of non-empty worker ids, got 5"),
        ({"workers": ["a", ""]}, "workers must be a list of non-empty worker ids"),
    ],
)
def test_client_init_refuses_bad_arguments_before_calling_a_server(given, error):
    """No server listens on port 1: each refusal comes before any call. A bare string of
    workers was split into one-letter worker ids; settings='adam' was an AttributeError."""
    model = torch.nn.Linear(2, 2)
    client = Client(["127.0.0.1:1"], job_id="j", worker_id="w", config=ClientConfig())
    with client, pytest.raises(InvalidRequestError, match=error):
        client.init(model, **given)


@pytest.mark.parametrize(("rank", "world"), [("0", 2), (0, "2"), (0.0, 2), (True, 2)])
def test_distributed_optimizer_refuses_a_rank_or_world_that_is_not_a_whole_number(rank, world):
    with pytest.raises(InvalidRequestError, match="must be whole numbers"):
        DistributedOptimizer(torch.nn.Linear(2, 2), ["127.0.0.1:1"], "j", rank, world)


@pytest.mark.parametrize(
    ("doc", "error"),
    [
        ({"data_dir": None}, "data_dir: expected text, got None"),  # was the directory "None"
        ({"job_id": ["a"]}, "job_id: expected text, got \\['a'\\]"),
        ({"optimizer": [1, 2]}, "optimizer: expected text, got \\[1, 2\\]"),
        ({"staleness": True}, "staleness: expected a whole number, got True"),  # was 1
        ({"epochs": True}, "epochs: expected a whole number, got True"),
        ({"lr": True}, "lr: expected a number, got True"),  # was 1.0
        ({"staleness": "1.5"}, "staleness: expected a whole number, got '1.5'"),
        ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
        ({"optimizer": "sgd", "momentum": None}, "momentum: expected a number, got None"),
        ({"servers": 5}, "servers: expected HOST:PORT addresses, got 5"),
        ({"beta1": 1}, "beta1 is 1"),
        ({"mode": "SSP"}, "mode 'SSP' is not one of sync, async, ssp"),
    ],
)
def test_a_spec_document_refuses_values_of_the_wrong_kind_naming_the_field(doc, error):
    with pytest.raises(SpecError, match=error):
        JobSpec.from_dict({"data_dir": "d", **doc})


def test_a_job_file_that_is_not_a_mapping_is_refused(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("- data_dir: d\n- lr: 0.1\n")
    with pytest.raises(SpecError, match="expected a mapping of job fields"):
        JobSpec.from_yaml(config)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"optimizer": "sgd"}, {"optimizer": "sgd", "momentum": 0, "nesterov": "false"}),
        ({"recipe": False}, {"recipe": "no", "beta1": 0.9, "beta2": "0.999", "eps": 1e-8}),
        ({"recipe": False}, {"recipe": False, "mode": "ssp", "lr": "1e-2", "lr_final_ratio": 0}),
        ({}, {"model": "mnist1d-cnn", "mode": "ssp", "beta1": 0}),  # the recipe's own beta1
        ({"compression": "bf16"}, {"compression": "bfloat16"}),
        ({"compression": "bf16,topk:0.01"}, {"compression": "topk:0.01, BF16"}),
        ({"lr_schedule": "cosine:100"}, {"lr_schedule": " cosine:100 "}),
    ],
)
def test_a_restarted_scheduler_resumes_the_same_job_however_it_is_spelled(tmp_path, first, second):
    """create_or_resume compares spec documents: the same job with explicit default options
    or another spelling of its compression was 'a different spec'."""
    base = {"data_dir": "d", "servers": "a:1"}
    state = SchedulerState(str(tmp_path / "s.db"))
    assert state.create_or_resume(JobSpec.from_dict({**base, **first}), 2)
    assert not state.create_or_resume(JobSpec.from_dict({**base, **second}), 2)
    with pytest.raises(StateError, match="differs in lr"):
        state.create_or_resume(JobSpec.from_dict({**base, **second, "lr": 0.5}), 2)

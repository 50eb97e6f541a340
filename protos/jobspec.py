"""The job spec: the document the scheduler, servers and workers agree on.

A spec is what a person writes (a YAML or JSON file, flags, ``PS_*``
variables): the data, the model, the epochs, and the job's settings as
plain values. :meth:`JobSpec.job_settings` is the one place a spec becomes
the :class:`~protos.job.Settings` the servers run; the flags and variables
are derived from the fields here and from the optimizer registry.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from protos import recipes
from protos.job import JobError, Mode, Settings
from protos.optimizers import OPTIMIZERS, OPTION_TYPES, OptimizerError, make_optimizer
from protos.schedule import LrSchedule, ScheduleError

_DEFAULT = Settings()
ENV_PREFIX = "PS_"  # ps-scheduler reads PS_<FIELD> for every field a flag can set
_NOT_DOCUMENT = ("optimizer_options", "recipe_applied")  # fields no document key sets


class SpecError(ValueError):
    """A job spec with a missing, unknown or invalid field."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class JobSpec:
    data_dir: str = field(metadata=_help("prepared data set directory (ps-data prepare)"))
    servers: tuple[str, ...] = field(
        default=(), metadata=_help("parameter server addresses HOST:PORT, comma-separated")
    )
    job_id: str = field(default="job", metadata=_help("the job's name on the servers"))
    model: str = field(default="mnist1d-cnn", metadata=_help("model to train"))
    # The job's settings, as a document writes them; Settings.build parses and checks them.
    mode: str = field(default=_DEFAULT.mode.value, metadata=_help("how workers stay in step"))
    staleness: int = field(
        default=_DEFAULT.staleness, metadata=_help("ssp: clocks a worker may run ahead")
    )
    backup_workers: int = field(
        default=_DEFAULT.backup_workers, metadata=_help("sync: steps need all but this many")
    )
    staleness_aware_lr: bool = field(
        default=_DEFAULT.staleness_aware_lr,
        metadata=_help("async, ssp, local-async: lr / staleness"),
    )
    buffer: int = field(
        default=_DEFAULT.buffer,
        metadata=_help("async, ssp, local-async: gradients averaged into one update"),
    )
    delay_compensation: float = field(
        default=_DEFAULT.delay_compensation,
        metadata=_help("async, ssp: DC-ASGD's lambda, 0 for none"),
    )
    local_steps: int = field(
        default=_DEFAULT.local_steps, metadata=_help("local modes: batches between pushes")
    )
    outer_lr: float = field(
        default=_DEFAULT.outer_lr, metadata=_help("local modes: the server's lr on the changes")
    )
    outer_momentum: float = field(
        default=_DEFAULT.outer_momentum,
        metadata=_help("local modes: the server's Nesterov momentum, 0 for averaging"),
    )
    optimizer: str = field(default=_DEFAULT.optimizer.name, metadata=_help("server optimizer"))
    lr: float = field(default=_DEFAULT.lr, metadata=_help("learning rate"))
    lr_schedule: str = field(
        default="constant",
        metadata=_help("constant, cosine (decay over the job's updates) or cosine:STEPS"),
    )
    lr_final_ratio: float = field(
        default=0.0, metadata=_help("cosine: the last updates' lr as a fraction of lr")
    )
    lr_warmup: int = field(
        default=0, metadata=_help("updates over which lr rises linearly from lr / lr_warmup")
    )
    compression: str = field(
        default=str(_DEFAULT.compression),
        metadata=_help("on the wire: none, fp16, bf16, topk:R or e.g. bf16,topk:0.01"),
    )
    part_bytes: int = field(
        default=_DEFAULT.part_bytes, metadata=_help("largest piece of a tensor a server holds")
    )
    # The named optimizer's options (momentum, beta1, ...), written flat in a document.
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    batch_size: int = field(default=100, metadata=_help("samples per gradient"))
    epochs: int = field(default=5, metadata=_help("passes over the training shards"))
    expected_workers: int = field(
        default=1, metadata=_help("leases wait until this many workers have registered")
    )
    seed: int = field(default=0, metadata=_help("model initialisation and shuffling"))
    lease_timeout_s: float = field(
        default=10.0, metadata=_help("a worker silent this long loses its lease")
    )
    recipe: bool = field(
        default=True,
        metadata=_help("take the settings not given from the model's recipe for the mode"),
    )
    # What the document took from its model's recipe (protos/recipes.py): for logs only.
    recipe_applied: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        """Every check of a job's numbers and names, before anything runs it."""
        problems = []
        for name in ("batch_size", "epochs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("expected_workers", "seed"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 < self.lease_timeout_s < math.inf:
            problems.append(
                f"lease_timeout_s must be a positive number, got {self.lease_timeout_s}"
            )
        try:
            settings = self.job_settings(1)
        except (JobError, ScheduleError) as e:
            problems.append(str(e))
        else:  # one spelling per value, so that specs of the same job compare equal
            object.__setattr__(self, "compression", str(settings.compression))
            object.__setattr__(self, "lr_schedule", self.lr_schedule.strip())
        if problems:
            raise SpecError("; ".join(problems))

    def expected_updates(self, batches: int | Sequence[int]) -> int:
        """Updates each server applies over the job, from the batches of an epoch (or of each
        shard, which the local modes need: a worker pushes at the end of every shard): one per
        pushed gradient in async and ssp, one per barrier (to which every worker brings one)
        in sync and local; a push of a local mode stands for up to local_steps batches, and a
        buffer averages that many pushes."""
        mode = Mode.parse(self.mode) if self.mode in Mode.choices() else Mode.ASYNC
        shards = [batches] if isinstance(batches, int) else list(batches)
        steps = max(1, self.local_steps) if mode.local else 1
        total = max(1, self.epochs) * sum(-(-b // steps) for b in shards)  # bad epochs: reported
        if mode.barrier:
            total //= max(1, self.expected_workers)
        else:
            total //= max(1, self.buffer)
        return max(1, total)

    def job_settings(self, batches: int | Sequence[int]) -> Settings:
        """The settings the servers run: the one translation of a spec into a job.
        A bare ``cosine`` schedule spans the job's expected updates (``batches``: as
        :meth:`expected_updates` takes them)."""
        values = {f.name: getattr(self, f.name) for f in fields(Settings)}
        values["lr_schedule"] = LrSchedule.parse(
            self.lr_schedule,
            self.lr_final_ratio,
            self.expected_updates(batches),
            self.lr_warmup,
        )
        return Settings.build(**values, **self.optimizer_options)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a flat document, with every option of its optimizer spelled out."""
        doc = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_DOCUMENT}
        doc["servers"] = list(self.servers)
        doc.update(make_optimizer(self.optimizer, **self.optimizer_options).options())
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], recipe: bool = True) -> JobSpec:
        """A spec from a flat document (values may be strings, as flags and variables give);
        unless ``recipe`` is False, what it does not give comes from the model's recipe
        when the document's own ``recipe`` allows."""
        known = {f.name: f for f in fields(cls) if f.name not in _NOT_DOCUMENT}
        unknown = sorted(set(doc) - set(known) - set(OPTION_TYPES))
        if unknown:
            raise SpecError(
                f"unknown job field(s): {', '.join(unknown)} (known: "
                f"{', '.join([*known, *OPTION_TYPES])})"
            )
        if "data_dir" not in doc:
            raise SpecError("data_dir is required")
        values: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for name, value in doc.items():
            try:
                if name == "servers":
                    if isinstance(value, str):
                        value = value.split(",")
                    elif value is not None and not isinstance(value, (list, tuple)):
                        raise TypeError(f"expected HOST:PORT addresses, got {value!r}")
                    values[name] = tuple(str(s).strip() for s in (value or ()) if str(s).strip())
                elif name in known:
                    values[name] = _convert(value, known[name].default, name)
                else:
                    options[name] = _convert(value, OPTION_TYPES[name](), name)
            except (TypeError, ValueError) as e:
                raise SpecError(f"{name}: {e}") from None
        applied = {}
        if recipe and values.get("recipe", cls.recipe):
            model, mode = values.get("model", cls.model), values.get("mode", cls.mode)
            applied = recipes.fill({**values, **options}, model, mode)
            for name, value in applied.items():
                (options if name in OPTION_TYPES else values)[name] = value
        optimizer = values.get("optimizer", cls.optimizer)
        try:
            make_optimizer(optimizer, **options)
        except OptimizerError as e:
            raise SpecError(str(e)) from None
        return cls(**values, optimizer_options=options, recipe_applied=applied)

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        """A spec :meth:`to_json` wrote (the scheduler's stored job, a worker's copy): whole
        already, so it takes nothing from a recipe, even one written before a setting
        existed (which then keeps its plain default, as the servers' job does)."""
        return cls.from_dict(json.loads(text), recipe=False)

    @classmethod
    def from_yaml(cls, path: Path, overrides: Mapping[str, Any] | None = None) -> JobSpec:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise SpecError(f"cannot read job file {path}: {e}") from None
        if not isinstance(doc, dict):
            raise SpecError(f"{path}: expected a mapping of job fields")
        doc.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(doc)


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _convert(value: Any, default: Any, name: str) -> Any:
    """A document's value in the type of the field's default. A string is parsed; a value
    of another kind (null, a list, a mapping, true for a number) is an error, not
    converted: ``data_dir: null`` is not the directory "None", ``staleness: true`` not 1."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError(f"expected true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        kinds = {int: "a whole number", float: "a number", str: "text"}
        raise TypeError(f"expected {kinds.get(type(default), 'text')}, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise ValueError(f"expected a whole number, got {value!r}") from None
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected a whole number, got {value!r}")
        return int(value)
    if isinstance(default, float):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return str(value)


# ---------------------------------------------------------------- flags and variables


def flag_names(skip: tuple[str, ...] = ()) -> list[str]:
    """Every document key a flag sets: the spec's fields, then every optimizer option."""
    names = [f.name for f in fields(JobSpec) if f.name not in _NOT_DOCUMENT]
    return [n for n in [*names, *OPTION_TYPES] if n not in skip]


def job_variables() -> list[str]:
    """The ``PS_<NAME>`` variable of every job flag, as ps-scheduler reads them."""
    return [variable_of(name) for name in flag_names()]


def variable_of(name: str) -> str:
    """The environment variable ps-scheduler reads for a job field: ``beta1`` -> ``PS_BETA1``."""
    return ENV_PREFIX + name.upper()


def add_job_arguments(
    parser: argparse.ArgumentParser,
    skip: tuple[str, ...] = (),
    env: bool = False,
    custom: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """One flag per spec field and optimizer option (``--mode``, ``--beta1``, ...), each
    overriding ``--config``; with ``env``, ``PS_<NAME>`` (e.g. ``PS_BETA1``) gives a default.
    ``custom`` adds argparse keywords to a field's flag (a ``type`` that checks a model
    name, say); its ``help`` replaces the field's own, before the default is named."""
    parser.add_argument("--config", type=Path, help="job spec as YAML or JSON (flags override it)")
    specs = {f.name: f for f in fields(JobSpec)}
    owners = {
        o: [n for n, c in OPTIMIZERS.items() if o in {f.name for f in fields(c)}]
        for o in OPTION_TYPES
    }
    group = parser.add_argument_group("job settings (override --config)")
    parser.set_defaults(job_flags=tuple(flag_names(skip)))  # what spec_from_args reads back
    for name in flag_names(skip):
        kwargs: dict[str, Any] = {"default": None, "dest": name}
        extra = dict((custom or {}).get(name, {}))
        if name in specs:
            spec_field = specs[name]
            text = extra.pop("help", None) or spec_field.metadata.get("help", "")
            if spec_field.default is dataclasses.MISSING:
                text += " (required)"
            elif spec_field.default not in ((), ""):
                text += f" (default {spec_field.default})"
            default_type = type(spec_field.default)
        else:
            default_type = OPTION_TYPES[name]
            text = f"{'/'.join(owners[name])} option"
        # A registry's names in any case from a flag or a variable (PS_MODE=SSP is ssp).
        if name == "mode":
            kwargs.update(choices=Mode.choices(), type=str.lower)
        elif name == "optimizer":
            kwargs.update(choices=list(OPTIMIZERS), type=str.lower)
        if env:
            variable = variable_of(name)
            text += f" [env {variable}]"
            kwargs["default"] = os.environ.get(variable) or None
        if default_type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        kwargs["help"] = text
        group.add_argument("--" + name.replace("_", "-"), **{**kwargs, **extra})


def spec_from_args(args: argparse.Namespace, base: Mapping[str, Any] | None = None) -> JobSpec:
    """The spec the flags (over ``--config``, over ``base``) give; SpecError if invalid."""
    overrides = {n: getattr(args, n) for n in args.job_flags if getattr(args, n) is not None}
    doc = {**(base or {}), **overrides}
    if args.config:
        return JobSpec.from_yaml(args.config, doc)
    return JobSpec.from_dict(doc)

"""Client library and worker daemon of the parameter server.

The public API: :class:`DistributedOptimizer`, which puts the servers in
place of a training loop's ``torch.optim`` optimizer; :class:`Client` with
``init``, ``pull``, ``pull_into``, ``push``, ``push_from``, ``set_membership``,
``status``, ``leave``, ``join`` and ``state_dict``; :func:`shard`, each rank's
share of a dataset; the optimizers :class:`SGD`, :class:`Adam` and
:class:`Adagrad` (the registry :data:`OPTIMIZERS`); the job's :class:`Settings`
and :class:`Mode`; :class:`LrSchedule`; typed errors.
"""

from protos.job import Mode, Settings
from protos.optimizers import OPTIMIZERS, SGD, Adagrad, Adam
from protos.schedule import LrSchedule
from protos.security import ClientSecurity
from ps_worker.client import Client, ClientConfig, PushSummary
from ps_worker.errors import (
    ConflictError,
    InvalidRequestError,
    PSError,
    ServerUnavailableError,
    StateError,
    UnknownJobError,
    WaitTimeoutError,
    WorkerIdInUseError,
)
from ps_worker.sharding import shard
from ps_worker.torch_api import DistributedOptimizer

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "Adagrad",
    "Adam",
    "Client",
    "ClientConfig",
    "ClientSecurity",
    "ConflictError",
    "DistributedOptimizer",
    "InvalidRequestError",
    "LrSchedule",
    "Mode",
    "PSError",
    "PushSummary",
    "ServerUnavailableError",
    "Settings",
    "StateError",
    "UnknownJobError",
    "WaitTimeoutError",
    "WorkerIdInUseError",
    "shard",
]

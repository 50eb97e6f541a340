"""A torch-native way in: the parameter servers as a model's optimizer.

    optimizer = DistributedOptimizer(model, ["127.0.0.1:7001"], job_id="digits",
                                     mode="async", optimizer="adam", lr=0.003)
    for x, y in batches:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()    # push the gradients, pull the weights that follow

Like Horovod's ``DistributedOptimizer``, it replaces the ``torch.optim``
line of a training loop: the update itself runs on the servers (their
optimizer, in the job's mode), and ``step()`` leaves the model holding the
weights the next batch needs, waiting as the mode requires. Every worker
constructs it the same way; the first one initialises the servers with its
model's weights and the others start from those.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from protos.job import JobError, Settings
from ps_worker.client import Client, ClientConfig, PushSummary
from ps_worker.errors import InvalidRequestError


class DistributedOptimizer:
    """Pushes a module's gradients to the job's servers and pulls its weights back."""

    def __init__(
        self,
        model: torch.nn.Module,
        servers: Sequence[str],
        job_id: str = "default",
        rank: int | None = None,
        world: int | None = None,
        *,
        workers: Iterable[str] = (),
        worker_id: str | None = None,
        config: ClientConfig | None = None,
        **settings: Any,
    ) -> None:
        """``rank`` and ``world`` (this worker's index and the number of workers) name the
        workers ``worker0`` ... and make them the job's initial members, as sync mode needs;
        without them the worker gets a unique id and joins on contact. ``settings`` are the
        job's, as :meth:`Client.init` takes them (``mode``, ``optimizer``, ``lr``, the
        optimizer's options such as ``momentum`` or ``beta1``, ``lr_schedule``, ...)."""
        self.model = model
        whole = [v for v in (rank, world) if v is not None]
        if any(isinstance(v, bool) or not isinstance(v, int) for v in whole):
            raise InvalidRequestError(f"rank {rank!r} and world {world!r} must be whole numbers")
        if (rank is None) != (world is None) or (world is not None and not 0 <= rank < world):
            raise ValueError(f"rank {rank} and world {world}: give both, with 0 <= rank < world")
        if world is not None:
            worker_id = worker_id or f"worker{rank}"
            workers = workers or [f"worker{r}" for r in range(world)]
        try:
            job_settings = Settings.build(**settings)
        except JobError as e:
            raise InvalidRequestError(str(e)) from None
        self.client = Client(servers, job_id=job_id, worker_id=worker_id, config=config)
        try:
            self.client.wait_for_servers()
            self.client.init(model, job_settings, workers=workers)
            self.client.pull_into(model)  # every worker starts from the servers' weights
        except BaseException:
            self.client.close()
            raise

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the module's gradients (kept allocated by default: they are pushed as is)."""
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self) -> PushSummary:
        """Push the gradients, then load the weights that follow into the module."""
        return self.client.push_pull_into(self.model)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> DistributedOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

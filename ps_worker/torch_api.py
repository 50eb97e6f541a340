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
model's weights and the others start from those. Under torchrun-style
launchers ``DistributedOptimizer(model, mode=...)`` is enough: the servers,
rank and world come from ``PS_SERVERS``, ``RANK`` and ``WORLD_SIZE``
(:mod:`ps_worker.environment`). ``join()`` ends a rank's training, whatever
the others' step counts, with the final weights in the model.

In the local modes (Local SGD: ``mode="local"`` or ``"local-async"``, with
``local_steps=H``) the loop stays the same, but ``step()`` takes the job's
optimizer step on this rank (:class:`ps_worker.local.LocalSteps`) and only
every H-th call pushes the change of the weights since the last pull and
pulls the weights that follow (in ``local``, waiting for every rank's change
as sync does); ``join()`` and ``close()`` push a partial round first.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from protos.job import JobError, Settings
from ps_worker import environment
from ps_worker.client import Client, ClientConfig, PushSummary
from ps_worker.errors import InvalidRequestError, PSError, StateError
from ps_worker.local import LocalSteps

log = logging.getLogger("ps_worker")


class DistributedOptimizer:
    """Pushes a module's gradients to the job's servers and pulls its weights back."""

    def __init__(
        self,
        model: torch.nn.Module,
        servers: str | Sequence[str] | None = None,
        job_id: str = "default",
        rank: int | None = None,
        world: int | None = None,
        *,
        workers: Iterable[str] = (),
        worker_id: str | None = None,
        config: ClientConfig | None = None,
        **settings: Any,
    ) -> None:
        """``servers``: else ``$PS_SERVERS``. ``rank`` and ``world`` (this worker's index and
        the number of workers; else ``$RANK`` and ``$WORLD_SIZE``) name the workers
        ``worker0`` ... and make them the job's initial members, as sync and local need;
        without them the worker gets a unique id and joins on contact. ``settings`` are the
        job's, as :meth:`Client.init` takes them (``mode``, ``optimizer``, ``lr``, the
        optimizer's options such as ``momentum`` or ``beta1``, ``lr_schedule``, and in the
        local modes ``local_steps``, ``outer_lr``, ``outer_momentum``, ...)."""
        self.model = model
        rank, world = environment.rank_and_world(rank, world)
        servers = environment.servers(servers)
        if world is not None:
            worker_id = worker_id or environment.worker_name(rank)
            workers = workers or [environment.worker_name(r) for r in range(world)]
        try:
            job_settings = Settings.build(**settings)
        except JobError as e:
            raise InvalidRequestError(str(e)) from None
        self.client = Client(servers, job_id=job_id, worker_id=worker_id, config=config)
        self.local: LocalSteps | None = None  # the local modes: this rank's own steps
        self._closed = False
        self._over = False  # join() or close() ended this rank's training
        try:
            self.client.wait_for_servers()
            self.client.init(model, job_settings, workers=workers)
            if job_settings.mode.local:
                self.local = LocalSteps(self.client, model, job_settings)
                self.local.pull()  # every worker starts from the servers' weights
            else:
                self.client.pull_into(model)  # every worker starts from the servers' weights
        except BaseException:
            self.client.close()
            raise

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the module's gradients (kept allocated by default: they are pushed as is)."""
        self.model.zero_grad(set_to_none=set_to_none)

    def step(self) -> PushSummary | None:
        """Push the gradients, then load the weights that follow into the module. In the
        local modes: a step of the job's optimizer on this rank, and on every
        ``local_steps``-th call the push of the change and the pull (None on the others)."""
        if self._over:
            raise StateError(
                f"{self.client.worker_id}: step() after join() or close(): this rank's "
                "training is over"
            )
        if self.local is not None:
            return self.local.step()
        return self.client.push_pull_into(self.model)

    def flush(self) -> PushSummary | None:
        """The local modes: push the change of a partial round now and load the weights
        that follow (None when there is none, and in the other modes)."""
        return self.local.flush() if self.local is not None else None

    def join(self, timeout_s: float | None = None) -> None:
        """End this rank's training, whatever the others' step counts (Horovod's
        ``hvd.join()``): leave the job so no one waits for this rank, wait until every
        worker has left, then load the final weights into the module. ``step()`` is over
        after it; :meth:`Client.join` has the details. In the local modes the change of a
        partial round is pushed first."""
        self.flush()
        self._over = True
        self.client.join(self.model, timeout_s)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict()`` with the servers' current weights (CPU tensors;
        buffers, which the servers do not hold, from the module), for
        ``model.load_state_dict`` or ``safetensors.torch.save_file``. Not named
        ``state_dict``: a torch optimizer's ``state_dict`` is optimizer state, and that
        stays on the servers."""
        return self.client.state_dict(self.model)

    def close(self) -> None:
        """Push a partial round (the local modes), leave the job and release the
        connections (also done as the process exits, without that push). Never raises: a
        push that fails is logged."""
        self._close(flush=True)

    def _close(self, flush: bool) -> None:
        self._over = True
        try:
            if flush and not self._closed:
                self.flush()
        except PSError as e:
            log.warning("%s: the last local round was not pushed: %s", self.client.worker_id, e)
        finally:
            self._closed = True
            self.client.close()

    def __enter__(self) -> DistributedOptimizer:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._close(flush=exc_type is None)  # after an error, leave without pushing

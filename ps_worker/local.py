"""Local SGD on a worker: its own optimizer steps, and every few a push of the change.

In the local modes (``local``, ``local-async``) a worker runs the job's
optimizer itself (:mod:`protos.optimizers`, per parameter tensor, its state
kept across rounds) at ``settings.worker_lr(version)``, the version being the
lowest server version its weights came from. After ``local_steps`` batches,
or when told to (the end of a task, ``join``), it pushes its change
``delta = w_pulled - w_now`` as the gradient, through the client's ordinary
fused push and pull (retries, clocks and sessions as for any push), and
carries on from the weights that pull returns. The servers apply the outer
step to the (mean) change: with outer_lr 1 and no momentum the new weights
are the mean of the workers' local weights.
"""

from __future__ import annotations

import torch

from protos.job import Settings
from protos.optimizers import State
from ps_worker.client import Client
from ps_worker.protocol import PushSummary


class LocalSteps:
    """One module's local optimizer, the weights it last pulled, and its step counts.

    The loop that owns it calls :meth:`pull` once (every worker starts from the
    servers' weights), then :meth:`step` after each batch's ``backward()``, and
    :meth:`flush` to push a partial round.
    """

    def __init__(self, client: Client, module: torch.nn.Module, settings: Settings) -> None:
        if not settings.mode.local:
            raise ValueError(f"local steps are for the local modes, not {settings.mode.value}")
        self.client = client
        self.module = module
        self.settings = settings
        self.params = dict(module.named_parameters())
        self.state: dict[str, State] = {
            name: settings.optimizer.init_state(p.detach()) for name, p in self.params.items()
        }
        self.anchor: dict[str, torch.Tensor] = {}  # the weights last pulled (w_pulled)
        self.steps = 0  # local steps taken in all (the optimizer's step count)
        self.pending = 0  # local steps since the last push

    @property
    def lr(self) -> float:
        """The lr of the next local step: the schedule at the lowest version pulled."""
        return self.settings.worker_lr(min(self.client.versions, default=0))

    def pull(self) -> None:
        """Load the servers' weights (waiting as the mode requires) and start a round there."""
        self.client.pull_into(self.module)
        self._anchor()

    def step(self) -> PushSummary | None:
        """One local optimizer step on the module's ``.grad`` (a parameter without one takes
        none); at the ``local_steps``-th since the last push, push and pull (its summary)."""
        lr = self.lr
        self.steps += 1
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is not None:
                    self.settings.optimizer.step(p, p.grad, self.state[name], self.steps, lr)
        self.pending += 1
        return self.flush() if self.pending >= self.settings.local_steps else None

    def flush(self) -> PushSummary | None:
        """Push the change since the last pull, if any step was taken, and load the weights
        that follow (the next round's start); None when there was nothing to push. The
        module's ``.grad`` hold zeros afterwards."""
        if not self.pending:
            return None
        if not self.anchor:
            raise RuntimeError("LocalSteps.pull() must load the servers' weights first")
        with torch.no_grad():
            for name, p in self.params.items():
                if p.grad is None:
                    p.grad = torch.empty_like(p)
                torch.sub(self.anchor[name], p, out=p.grad)
        summary = self.client.push_pull_into(self.module)
        self.pending = 0
        self._anchor()
        for p in self.params.values():
            assert p.grad is not None
            p.grad.zero_()
        return summary

    def _anchor(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                if name in self.anchor:
                    self.anchor[name].copy_(p)
                else:
                    self.anchor[name] = p.detach().clone()

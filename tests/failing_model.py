"""A model for tests: it passes the launcher's one-batch check, then fails in a worker.

``ps-cluster up --model tests.failing_model:build`` (with the repository on PYTHONPATH)
is a job that starts and then fails, as a job whose worker hits a bug does;
``tests.failing_model:aborting`` one whose worker dies of a signal (SIGABRT, as a crash
in native code) as soon as it builds the model.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from scheduler.preflight import FIT_SAMPLES

MESSAGE = "this model fails on batches larger than the launcher's check"


class FailsOnRealBatches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > FIT_SAMPLES:
            raise RuntimeError(MESSAGE)
        return self.linear(x)


def build() -> nn.Module:
    return FailsOnRealBatches()


def aborting() -> nn.Module:
    if "ps-worker" in sys.argv[0]:
        os.abort()
    return FailsOnRealBatches()

"""Each rank its share of the data, as torch's ``DistributedSampler`` gives it.

``shard(data, rank, world)`` takes every ``world``-th item from ``rank`` on:
the shares of all ranks are disjoint and together cover the data exactly
once. Nothing is padded or dropped, so shares differ in length by at most one
(the first ``len % world`` ranks have one more item): ranks may then take
different numbers of steps, which ``DistributedOptimizer.join()`` (or
``Client.join()``) absorbs. Rank and world default to ``$RANK`` and
``$WORLD_SIZE`` (:mod:`ps_worker.environment`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Subset

from ps_worker import environment
from ps_worker.errors import InvalidRequestError


def shard(data: Any, rank: int | None = None, world: int | None = None) -> Any:
    """This rank's share of ``data``:

    - a length (int): the indices, as a ``range``;
    - a tensor, array, list, tuple or range: the same type, rows ``rank::world``;
    - any other dataset with ``len()`` and indexing: a ``torch.utils.data.Subset``.
    """
    rank, world = environment.rank_and_world(rank, world)
    if rank is None or world is None:
        raise InvalidRequestError(
            f"shard needs this process's rank and the world size: pass rank= and world=, "
            f"or set {environment.RANK_ENV} and {environment.WORLD_ENV}"
        )
    if isinstance(data, bool) or not (isinstance(data, int) or hasattr(data, "__len__")):
        raise InvalidRequestError(
            f"shard takes a length, or data with a length, got {type(data).__name__}"
        )
    if isinstance(data, int):
        if data < 0:
            raise InvalidRequestError(f"shard: a length must be >= 0, got {data}")
        return range(rank, data, world)
    if isinstance(data, (torch.Tensor, np.ndarray, list, tuple, range)):
        return data[rank::world]
    if hasattr(data, "__getitem__"):
        return Subset(data, range(rank, len(data), world))
    raise InvalidRequestError(f"shard cannot index {type(data).__name__}")

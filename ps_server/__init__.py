"""``ps-server``: one partition of a job's parameters and optimizer state.

``store`` is the parameter store (the sync, async and ssp rules; no gRPC) over ``flat``,
its per-dtype tensor buffers; ``service`` the thin gRPC adapter over it, ``checkpoint``
saving and restoring it, ``metrics`` its Prometheus view, ``main`` the daemon. It depends
on ``protos`` only.
"""

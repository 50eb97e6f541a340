"""``ps-scheduler`` and ``ps-cluster``: the job, worker membership and the shard task queue.

``state`` is the scheduler's durable state machine (SQLite, no gRPC), ``service`` its gRPC
adapter, ``main`` the daemon, ``status`` the live table. ``cluster`` and ``launch`` start
whole clusters as local processes; as launchers they may use the client library in
``ps_worker``, which never imports this package.
"""

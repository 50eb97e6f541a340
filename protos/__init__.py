"""What every process shares: the wire protocol and the job.

- ``ps.proto`` / ``scheduler.proto`` and their generated modules (``python -m protos.generate``);
- ``job``, ``jobspec``, ``optimizers``, ``schedule``, ``compression``: the job as plain
  data, the one registry of modes and optimizers, and their one translation to the wire;
- ``codec``, ``layout``, ``shm``: tensor chunks, which server holds which part, the
  same-host shared-memory segment;
- ``rpc``, ``status``, ``security``, ``observability``: channels and servers, typed error
  reasons, tokens and TLS, logs and metrics.

It imports none of ``ps_server``, ``ps_worker`` or ``scheduler``.
"""

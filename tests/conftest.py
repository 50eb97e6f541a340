"""Suite-wide settings, applied before any test module imports torch.

The suite runs two test processes (``make test``) on a machine of two cores, and each test
starts several daemons of its own. Torch's default of one OpenMP thread per core made every
process's threads busy-wait for cores the other processes held: the two-worker example took
38 s of CPU with the default against 17 s with one thread. ps-cluster gives its children one
thread for the same reason (``scheduler.launch.SHARED_CORES_ENV``); this gives it to the test
processes and to every daemon a test starts itself. A value already in the environment wins.
"""

from __future__ import annotations

import os

from scheduler.launch import SHARED_CORES_ENV

for _name, _value in SHARED_CORES_ENV.items():
    os.environ.setdefault(_name, _value)

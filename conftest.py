"""Set-up shared by every test suite: as many BLAS/OpenMP threads as cores, not per worker.

``make test`` runs pytest with two xdist workers, and torch gives each worker a thread pool
as large as the machine, so two workers on two cores ran four threads. Small linear algebra
(most of the property suite) then spends its time handing work between threads: on two
cores that also ran two other processes, two property-test files took four times longer
than with one thread per worker; on an idle 2-core machine, CI's whole pytest step took
16 and 18 minutes in the two runs before the change and 12 min 51 s after it. Each worker, and
every process a test starts (notebook kernels, the installed wheel's commands, Flower nodes),
gets ``cores // workers`` threads, unless the caller has set ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import os

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _N = max(1, (_CORES or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_N)

    import torch

    torch.set_num_threads(_N)

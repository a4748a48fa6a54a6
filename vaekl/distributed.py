"""One run over several processes and hosts: `jax.distributed` from the environment, the mesh.

A run is one JAX process, or one of several that share one global device mesh. Which
one is read from the environment, before any other JAX call (`initialize`):

  VAEKL_COORDINATOR, VAEKL_NUM_PROCESSES, VAEKL_PROCESS_ID
      set by `launch.sweep --executor=local --processes=P` for each of its P processes
      (the coordinator on 127.0.0.1 at a free port);
  SLURM_NTASKS > 1, with SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID
      a task of a Slurm job step (`srun`, e.g. a `launch.sweep --executor=slurm --nodes=N
      --tasks_per_node=G` job): JAX's own Slurm detection takes the coordinator (the step's
      first node, a port from the job id), the process count and rank, and gives each
      process the one GPU of its local rank; nothing is set by hand.

Anything else is a single process. On CPUs the processes reduce over gloo.

Signals act as for one process (`vaekl.interrupt`): JAX's preemption service, which
would catch SIGTERM, is off. Before training and after it SIGTERM ends a process at
once; during training SIGINT or SIGTERM to any process stops them all after the same
epoch (`shared_signal`), with a checkpoint, exiting 130 or 143.

If a process dies, the others' collectives fail at once (gloo) or, where one blocks,
the coordination service declares the silent process dead after
`HEARTBEAT_TIMEOUT_S`; either way every process ends with an error within that bound.
"""

import os
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

LOCAL_VARS = ("VAEKL_COORDINATOR", "VAEKL_NUM_PROCESSES", "VAEKL_PROCESS_ID")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")
# JAX's defaults (100 s, 300 s) would keep the survivors of a dead process waiting minutes.
HEARTBEAT_TIMEOUT_S = 30
SHUTDOWN_TIMEOUT_S = 120
INITIALIZATION_TIMEOUT_S = 300
TIMEOUTS = dict(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
                initialization_timeout=INITIALIZATION_TIMEOUT_S)


def initialize_args(environ: Mapping[str, str]) -> dict | None:
    """The keyword arguments of `jax.distributed.initialize` for `environ`; None: one process.

    Raises:
      ValueError: naming the VAEKL_* variable that is missing or not a valid number.
    """
    given = [name for name in LOCAL_VARS if environ.get(name)]
    if given:
        missing = [name for name in LOCAL_VARS if name not in given]
        if missing:
            raise ValueError(f"{', '.join(missing)}: set with {', '.join(given)} (all of"
                             f" {', '.join(LOCAL_VARS)} or none).")
        num = _int(environ, "VAEKL_NUM_PROCESSES", low=1)
        process_id = _int(environ, "VAEKL_PROCESS_ID", low=0)
        if process_id >= num:
            raise ValueError(f"VAEKL_PROCESS_ID: expected < VAEKL_NUM_PROCESSES = {num}, got"
                             f" {process_id}.")
        if num == 1:
            return None
        # "deactivate": inside a Slurm allocation JAX would otherwise take its ranks from Slurm.
        return dict(coordinator_address=environ["VAEKL_COORDINATOR"], num_processes=num,
                    process_id=process_id, cluster_detection_method="deactivate", **TIMEOUTS)
    if all(name in environ for name in SLURM_VARS) and int(environ["SLURM_NTASKS"]) > 1:
        return dict(cluster_detection_method="slurm", **TIMEOUTS)
    return None


def _int(environ: Mapping[str, str], name: str, *, low: int) -> int:
    try:
        value = int(environ[name])
    except ValueError:
        value = None
    if value is None or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {environ[name]!r}.")
    return value


def initialize(environ: Mapping[str, str] | None = None) -> bool:
    """Joins the run's other processes when `environ` (default: os.environ) says there are any.

    Call before any other JAX call. Returns whether this process is one of several.
    """
    args = initialize_args(os.environ if environ is None else environ)
    if args is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's preemption service would install a C handler that swallows SIGTERM (for its
    # sync points, which vaekl does not use); without it SIGTERM acts as for one process.
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(**args)
    logging.info("Process %d of %d: %d devices in all, %d here.", jax.process_index(),
                 jax.process_count(), jax.device_count(), jax.local_device_count())
    return True


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0; always, for one process)."""
    return jax.process_index() == 0


def agree(flag: bool) -> bool:
    """Process 0's `flag`, on every process: for decisions that read a clock.

    The processes of a run must call collectives (a checkpoint save) together; a
    decision from each one's own `time.time()` could differ between them.
    """
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def shared_signal(signum: int | None) -> int | None:
    """The signal that the lowest-numbered process holding one has got, on every process.

    `signum` is this process's (None: none yet). A signal reaches the processes of a run
    at different moments, or only some of them (Slurm's warning signal only task 0's);
    deciding on it together makes all of them stop at the same point, as the checkpoint
    they then save is a collective. One all-gather of an int per call under
    `jax.distributed`; nothing for a single process.
    """
    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils

    signums = np.ravel(multihost_utils.process_allgather(np.int32(signum or 0)))
    return next((int(s) for s in signums if s), None)


def data_mesh() -> jax.sharding.Mesh | None:
    """A 1-D mesh, axis "data", over every process's devices; None for a single device."""
    devices = jax.devices()
    if len(devices) == 1:
        return None
    return jax.make_mesh((len(devices),), ("data",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh | None) -> NamedSharding | None:
    """The sharding that puts a whole copy on every device of `mesh` (None: no mesh)."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh | None) -> NamedSharding | None:
    """The sharding that splits the leading (batch) axis over `mesh` (None: no mesh)."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec("data"))


def shard_batch(x, mesh: jax.sharding.Mesh | None) -> jax.Array:
    """A global array of host array `x` [B, ...], split over `mesh` along B.

    Every process holds the whole `x` (the same everywhere) and copies only the rows
    of its own devices to them. Without a mesh `x` is returned as it is.
    """
    if mesh is None:
        return x
    return jax.make_array_from_callback(x.shape, batch_sharded(mesh), lambda index: x[index])

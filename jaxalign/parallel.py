"""Device mesh, logical-axis sharding rules, multi-host start-up and global batches.

The same code runs on one CPU, eight fake CPU devices, a GPU box or a TPU pod:
a mesh has three axes,

- ``data``: pure data parallelism (parameters replicated);
- ``fsdp``: data parallelism with parameters, gradients and optimizer state
  sharded along their ``embed`` dimension (ZeRO-3 style);
- ``tensor``: Megatron-style tensor parallelism over heads, MLP and vocabulary;

and one rules table (:data:`LOGICAL_AXIS_RULES`) maps the logical axis names the
model puts on every parameter onto those mesh axes. The batch dimension is
split over ``data`` and ``fsdp`` together.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "layers": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all of ``jax.devices()``).

    One of the sizes may be ``-1``: it takes whatever the others leave. The
    product must equal the number of devices. On TPU/GPU the device order
    follows the physical topology (``jax.make_mesh``), so ``tensor`` lands on
    the fastest links.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}"
        )
    for name, size in zip(MESH_AXES, sizes, strict=True):
        if size == 0 or size < -1:
            raise ValueError(f"mesh axis {name}={size}: use a positive size or -1 for the rest")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"cannot fill the mesh: {n} devices are not divisible by the fixed axes' "
                f"product {known} (data={data}, fsdp={fsdp}, tensor={tensor})"
            )
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"devices, but {n} are available; make the product {n} or set one axis to -1"
        )
    auto = (jax.sharding.AxisType.Auto,) * 3
    try:
        return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError):
        # Topology-aware placement knows only some device kinds; plain order always works.
        return Mesh(np.array(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def _mesh_axes_for(
    logical: Sequence[str | None],
    shape: Sequence[int] | None,
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None],
) -> PartitionSpec:
    """The mesh ``PartitionSpec`` for one array's logical axis names.

    A dimension is replicated when its rule is missing/None, when a mesh axis is
    already used by an earlier dimension, or when its size is not divisible by
    the mesh axes' size (e.g. SmolLM2's 9 heads on ``tensor=2``).
    """
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        target = rules.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or used.intersection(axes) or (shape is not None and shape[i] % size != 0):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def logical_to_mesh_sharding(
    partition_spec_tree,
    mesh: Mesh,
    rules: Mapping[str, str | tuple[str, ...] | None] | None = None,
    shapes=None,
):
    """Maps a tree of logical ``PartitionSpec``s (``nnx.get_partition_spec``) to ``NamedSharding``s.

    ``shapes``: an optional tree of the same structure whose leaves have
    ``.shape`` (arrays or ``jax.ShapeDtypeStruct``); with it, dimensions not
    divisible by their mesh axes fall back to replication.
    """
    rules = LOGICAL_AXIS_RULES if rules is None else rules
    is_spec = lambda x: isinstance(x, PartitionSpec)

    def one(spec, shape=None):
        return NamedSharding(mesh, _mesh_axes_for(tuple(spec), shape, mesh, rules))

    if shapes is None:
        return jax.tree.map(one, partition_spec_tree, is_leaf=is_spec)
    return jax.tree.map(
        lambda spec, x: one(spec, x.shape), partition_spec_tree, shapes, is_leaf=is_spec
    )


def model_shardings(state: nnx.State, mesh: Mesh, rules=None):
    """``NamedSharding``s for a model's parameter state, from its logical axis names."""
    return logical_to_mesh_sharding(nnx.get_partition_spec(state), mesh, rules, shapes=state)


def shard_model_state(state: nnx.State, mesh: Mesh, rules=None) -> nnx.State:
    """Places a model's parameter state on ``mesh`` according to the rules table."""
    return jax.device_put(state, model_shardings(state, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp``; other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    """The number of batch shards: a global batch size must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded by :func:`batch_sharding`.

    On one host ``local_batch`` is the whole batch; on ``P`` hosts each passes its
    own ``B/P`` rows and the global batch has ``B`` rows.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        local_rows = value.shape[0] * jax.process_count()
        if local_rows % batch_divisor(mesh):
            raise ValueError(
                f"batch field {name!r} has {local_rows} rows in all, not a multiple of the "
                f"data x fsdp mesh size {batch_divisor(mesh)}; pad the batch with weight-0 pairs"
            )
        out[name] = jax.make_array_from_process_local_data(sharding, value)
    return out


_PROCESS_COUNT_VARS = ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts JAX's multi-process runtime when more than one process takes part.

    Multi-process is detected from the arguments, from ``JAX_COORDINATOR_ADDRESS``
    / ``JAX_NUM_PROCESSES`` / SLURM / Open MPI variables, or from a multi-host TPU
    slice (``TPU_WORKER_HOSTNAMES`` lists several hosts), in which case
    ``jax.distributed.initialize`` finds the rest by itself. Returns whether it
    initialised; a single process does nothing and returns ``False``.
    """
    counts = [num_processes] if num_processes is not None else []
    counts += [int(os.environ[v]) for v in _PROCESS_COUNT_VARS if os.environ.get(v, "").isdigit()]
    tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    multi = (
        any(c > 1 for c in counts)
        or len(tpu_hosts) > 1
        or (coordinator is not None and num_processes != 1)
        or (bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) and not counts)
    )
    if not multi:
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    return True

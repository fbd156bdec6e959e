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

import glob
import json
import logging
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


def describe_devices(mesh: Mesh | None = None) -> str:
    """The one line a run starts with: what it computes on and how the mesh cuts it, e.g.
    ``devices: 8 x cpu (1 process); mesh data=2 fsdp=2 tensor=2``.

    When JAX fell back to the CPU although it saw an accelerator (a message that
    :func:`quiet_backend_probes` holds back), the line ends with what to install.
    """
    devices = jax.devices()
    kinds: dict[str, int] = {}
    for d in devices:
        kind = d.platform if d.platform == "cpu" else f"{d.platform} ({d.device_kind})"
        kinds[kind] = kinds.get(kind, 0) + 1
    processes = jax.process_count()
    line = ", ".join(f"{n} x {kind}" for kind, n in kinds.items())
    line = f"devices: {line} ({processes} process{'es' if processes > 1 else ''})"
    if mesh is not None:
        line += "; mesh " + " ".join(f"{k}={v}" for k, v in mesh.shape.items())
    if _MISSED_ACCELERATORS and all(d.platform == "cpu" for d in devices):
        line += "; " + "; ".join(dict.fromkeys(_MISSED_ACCELERATORS))
    return line


# What JAX logs while it probes for backends (jax/_src/xla_bridge.py, jax 0.10): every
# platform it tries and cannot start, at INFO, e.g. "Unable to initialize backend 'tpu':
# ... libtpu.so ..." on every machine without a TPU; and, at WARNING, that it fell back
# to the CPU although an NVIDIA GPU or a TPU seems present. A backend the user asked for
# (JAX_PLATFORMS) that fails raises an error instead, which this never touches.
_PROBE_LOGGER = "jax._src.xla_bridge"
_MISSED_ACCELERATOR_HINTS = {
    "An NVIDIA GPU may be present": (
        "an NVIDIA GPU is visible but this jax has no CUDA support: "
        "pip install 'jaxalign[cuda12]' (driver >= 525) or 'jaxalign[cuda13]' (driver >= 580)"
    ),
    "A Google TPU may be present": (
        "a TPU is visible but this jax has no TPU support: pip install 'jaxalign[tpu]'"
    ),
}
_MISSED_ACCELERATORS: list[str] = []


class _BackendProbeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno <= logging.INFO and message.startswith("Unable to initialize backend"):
            return False
        for start, hint in _MISSED_ACCELERATOR_HINTS.items():
            if message.startswith(start):
                _MISSED_ACCELERATORS.append(hint)  # said once, in describe_devices' line
                return False
        return True


def quiet_backend_probes() -> None:
    """Holds back JAX's backend-probe messages (see above); the fall-back-to-CPU warning
    becomes a hint at the end of :func:`describe_devices`' line. Idempotent."""
    logger = logging.getLogger(_PROBE_LOGGER)
    if not any(isinstance(f, _BackendProbeFilter) for f in logger.filters):
        logger.addFilter(_BackendProbeFilter())


COMPILE_CACHE_ENV = "JAXALIGN_COMPILE_CACHE"


def use_compile_cache(directory: str | os.PathLike, min_compile_seconds: float = 1.0) -> str | None:
    """Turns on JAX's persistent compilation cache in ``directory``, so a rerun, a resumed
    run or another command with the same shapes loads its programs instead of compiling
    them again (runs use ``xla/`` under the jaxalign cache,
    :func:`jaxalign.loading.compile_cache_dir`).

    Programs that compile faster than ``min_compile_seconds`` are not stored.
    ``JAXALIGN_COMPILE_CACHE=0`` turns the cache off; any other value of it is the directory
    used instead. Call before the first compile; returns the directory, or ``None`` when off.
    """
    setting = os.environ.get(COMPILE_CACHE_ENV, "")
    if setting.lower() in ("0", "false", "off", "no"):
        return None
    directory = os.fspath(setting or directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    return directory


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


def place_params(state: nnx.State, mesh: Mesh | None = None) -> nnx.State:
    """``state`` on the devices a stage computes on, moved at most once.

    With a ``mesh``: each leaf with its training sharding (:func:`model_shardings`: FSDP
    and tensor axes as configured); without one, on the default device. Leaves already
    placed that way are returned as they are, so calling this on placed parameters moves
    nothing. A stage calls it once and hands the result to every batch: a jitted program
    given host arrays would copy them to the devices again on every call.
    """
    if mesh is None:
        device = jax.local_devices()[0]
        target = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device), state)
    else:
        target = model_shardings(state, mesh)

    def place(x, sharding):
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        return jax.device_put(x, sharding)

    return jax.tree.map(place, state, target)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp``; other dimensions whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_divisor(mesh: Mesh) -> int:
    """The number of batch shards: a global batch size must be a multiple of it."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_row_blocks(mesh: Mesh, global_rows: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` row ranges of a ``global_rows`` batch that this process feeds.

    They are the distinct row blocks of :func:`batch_sharding` on this process's
    devices, in global order: exactly the rows :func:`make_global_batch` expects
    from this process. Processes that replicate each other (a ``tensor`` axis
    spanning hosts) get the same blocks.
    """
    if global_rows % batch_divisor(mesh):
        raise ValueError(
            f"a batch of {global_rows} rows does not split over the data x fsdp mesh size "
            f"{batch_divisor(mesh)}; pad the batch with weight-0 pairs"
        )
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_rows,))
    blocks = {
        (idx[0].start or 0, global_rows if idx[0].stop is None else idx[0].stop)
        for idx in index_map.values()
    }
    return sorted(blocks)


def process_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
    """Indices of the rows of a ``global_rows`` batch that this process feeds (sorted)."""
    blocks = process_row_blocks(mesh, global_rows)
    return np.concatenate([np.arange(a, b) for a, b in blocks])


def data_shard(mesh: Mesh, global_rows: int | None = None) -> tuple[int, int]:
    """``(share, shares)``: which share of the data this process reads, of how many.

    A share is a set of row blocks of every global batch (:func:`process_row_blocks`):
    processes feeding different rows read disjoint shares (e.g. records
    ``share, share + shares, ...``), while processes that replicate each other's rows
    (a ``tensor`` axis spanning hosts) read the same share, numbered in row order.
    """
    rows = batch_divisor(mesh) if global_rows is None else global_rows
    index_map = batch_sharding(mesh).devices_indices_map((rows,))
    blocks: dict[int, set[tuple[int, int]]] = {}
    for device, idx in index_map.items():
        block = (idx[0].start or 0, rows if idx[0].stop is None else idx[0].stop)
        blocks.setdefault(device.process_index, set()).add(block)
    groups = sorted({tuple(sorted(b)) for b in blocks.values()})
    claimed = [block for group in groups for block in group]
    if len(claimed) != len(set(claimed)):
        raise ValueError(
            f"processes feed overlapping but different row blocks of a batch ({groups}); "
            "lay the mesh out so each process's devices hold whole data x fsdp blocks"
        )
    return groups.index(tuple(sorted(blocks[jax.process_index()]))), len(groups)


def allgather_array(value: np.ndarray) -> np.ndarray:
    """``[processes, ...]``: every process's ``value`` (the same shape and dtype on each),
    stacked in process order. Every process must call it together."""
    value = np.asarray(value)
    if jax.process_count() == 1:
        return value[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value))


def allgather_json(value) -> list:
    """Every process's ``value`` (anything JSON can carry), in process order.

    For small host-side facts (counts, reports, an error message) that processes must
    agree on; every process must call it together. One process: ``[value]`` round-tripped.
    """
    data = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    if jax.process_count() == 1:
        return [json.loads(data.tobytes())]
    sizes = allgather_array(np.array([data.size], np.int32))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = allgather_array(padded)
    return [json.loads(gathered[q, : int(n)].tobytes()) for q, n in enumerate(sizes.reshape(-1))]


def make_global_batch(
    local_batch: Mapping[str, np.ndarray], mesh: Mesh, global_rows: int | None = None
) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded by :func:`batch_sharding`.

    On one host ``local_batch`` is the whole batch; on ``P`` hosts each passes only
    its own rows, ``batch[process_rows(mesh, B)]``, and the global batch has ``B``
    rows, in the same order as on one host. ``global_rows`` (``B``) is inferred
    from the local row count when not given.
    """
    sharding = batch_sharding(mesh)
    shards = batch_divisor(mesh)
    local_shards = len(process_row_blocks(mesh, shards))  # this process's distinct row blocks
    out = {}
    for name, value in local_batch.items():
        value = np.asarray(value)
        rows = value.shape[0]
        total = rows // local_shards * shards if global_rows is None else global_rows
        if rows % local_shards or total % shards or rows != total // shards * local_shards:
            raise ValueError(
                f"batch field {name!r} has {rows} rows on this process for a global batch of "
                f"{total}; the global batch must be a multiple of the data x fsdp mesh size "
                f"{shards} and this process feeds {local_shards} of its {shards} row blocks "
                "(batch[process_rows(mesh, global_rows)]); pad the batch with weight-0 pairs"
            )
        out[name] = jax.make_array_from_process_local_data(
            sharding, value, (total, *value.shape[1:])
        )
    return out


def shard_host_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """A global batch from one every process holds whole (e.g. built from small in-memory data).

    Each process hands over only its own rows (:func:`process_rows`); on one
    process this is :func:`make_global_batch` of the whole batch. Fields may differ in
    their row counts (a packed batch's rows and its pairs, ``jaxalign.data.packing``):
    each is split by its own.
    """
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        rows = process_rows(mesh, value.shape[0])
        out.update(make_global_batch({name: value[rows]}, mesh, value.shape[0]))
    return out


def to_host(x: jax.Array) -> np.ndarray:
    """A numpy copy of a whole (global) array on every process.

    Arrays that span other processes' devices are gathered over the network
    (every process must call this together); local ones are just copied.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def tree_to_host(tree):
    """:func:`to_host` on every array leaf of a pytree (e.g. trained parameters)."""
    return jax.tree.map(to_host, tree)


def is_primary_process() -> bool:
    """Whether this process writes the run's files (process 0 of a multi-process run)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# Batch schedulers whose variables JAX's own cluster detection reads (SLURM, Open MPI).
_SCHEDULER_COUNT_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
# Hosts of a TPU slice on GKE, in the order JAX's GkeTpuCluster reads them.
_TPU_HOST_LIST_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
_METADATA_TIMEOUT_S = 2.0
_METADATA_TRIES = 3
_METADATA_IP = "169.254.169.254"


class MetadataUnavailable(RuntimeError):
    """The GCE metadata server did not answer (timed out, refused, or an HTTP error)."""


def local_tpu_chips() -> int:
    """How many TPU chips this machine has (0 on anything but a TPU VM).

    JAX's own count of Google TPU devices on the PCI bus (v2 to TPU7x), the one
    its TPU start-up uses; where ``/sys/bus/pci`` cannot be read, the TPU device
    files: ``/dev/accel<n>`` (v2-v4) and ``/dev/vfio/<n>`` (v5e, v5p, v6e). No
    network, no TPU runtime start.
    """
    try:
        from jax._src import hardware_utils

        return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
    except (ImportError, AttributeError, OSError):
        return len(glob.glob("/dev/accel[0-9]*")) + len(glob.glob("/dev/vfio/[0-9]*"))


def gce_metadata_attribute(
    name: str, timeout: float = _METADATA_TIMEOUT_S, tries: int = _METADATA_TRIES
) -> str | None:
    """One instance attribute from the GCE metadata server; ``None`` if the server says
    it does not exist (HTTP 404).

    Uses the server's link-local IP (``GCE_METADATA_IP`` overrides it), so no DNS
    lookup can hang, and makes ``tries`` attempts of ``timeout`` seconds each.
    Raises :class:`MetadataUnavailable` when none of them gets an answer.
    """
    import time
    import urllib.error
    import urllib.request

    host = os.environ.get("GCE_METADATA_IP", _METADATA_IP)
    request = urllib.request.Request(
        f"http://{host}/computeMetadata/v1/instance/attributes/{name}",
        headers={"Metadata-Flavor": "Google"},
    )
    failure = ""
    for attempt in range(tries):
        if attempt:
            time.sleep(0.5)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read().decode("utf-8", "replace").strip()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            failure = f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            failure = f"{type(e).__name__}: {e}"
    raise MetadataUnavailable(
        f"the GCE metadata server at {host} gave no {name!r} "
        f"({tries} tries of {timeout:g} s; last: {failure})"
    )


def _slice_count(value: str | None, where: str) -> int:
    if value is None or not value.strip():
        return 1
    value = value.strip().strip("'\"")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MEGASCALE_NUM_SLICES={value!r} ({where}) is not a positive whole number")
    return int(value)


def _tpu_env_value(tpu_env: str | None, key: str) -> str | None:
    """``key``'s value in the ``tpu-env`` metadata attribute (lines like ``KEY: 'value'``)."""
    for line in (tpu_env or "").splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip().strip("'\"")
    return None


def tpu_vm_process_count(
    tpu_chips=local_tpu_chips, metadata=gce_metadata_attribute, environ=None
) -> int:
    """The number of processes (one per host) of the Cloud TPU slice(s) this machine is in.

    1 when this is not a Cloud TPU VM: no TPU chips (:func:`local_tpu_chips`) or
    ``TPU_SKIP_MDS_QUERY`` set, and then no metadata query at all. Otherwise the
    hosts listed in the ``worker-network-endpoints`` metadata attribute
    (``host,host,...`` or ``name:id:ip,...``) times the number of slices of a
    multi-slice run (``MEGASCALE_NUM_SLICES``, from the environment or else from the
    ``tpu-env`` attribute), as JAX's own ``GceTpuCluster`` counts them. A metadata
    server that does not answer is an error (:class:`MetadataUnavailable`), never a
    guess of one host: a guess that differs between hosts hangs the slice.
    ``tpu_chips``, ``metadata`` and ``environ`` are injectable for tests.
    """
    env = os.environ if environ is None else environ
    if env.get("TPU_SKIP_MDS_QUERY") or tpu_chips() == 0:
        return 1
    endpoints = metadata("worker-network-endpoints")
    if endpoints is None:  # the server answers, but this VM is not part of a TPU slice
        return 1
    hosts = max(1, len([w for w in endpoints.split(",") if w.strip()]))
    if "MEGASCALE_NUM_SLICES" in env:
        slices = _slice_count(env["MEGASCALE_NUM_SLICES"], "environment")
    else:
        tpu_env = metadata("tpu-env")
        slices = _slice_count(_tpu_env_value(tpu_env, "MEGASCALE_NUM_SLICES"), "tpu-env metadata")
    return hosts * slices


def _whole_number(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{name}={value!r} is not a whole number; set it to one or unset it")
    return int(value)


_ENV_FIX = (
    "set, on every machine, JAX_COORDINATOR_ADDRESS=HOST:PORT (the same everywhere: the "
    "machine with process id 0 and a free port, e.g. 10.0.0.2:8476), JAX_NUM_PROCESSES "
    "(the number of machines) and JAX_PROCESS_ID (0, 1, ..., a different one on each)"
)


def _metadata_error(chips: int, error: MetadataUnavailable) -> RuntimeError:
    return RuntimeError(
        f"this machine has {chips} TPU chip(s), but {error}, so jaxalign cannot tell whether "
        "it is one host of a multi-host TPU slice (guessing one host would leave the slice's "
        "other hosts waiting for it). Fix: retry once the metadata server answers (check with "
        "curl -s -H Metadata-Flavor:Google "
        f"http://{_METADATA_IP}/computeMetadata/v1/instance/attributes/worker-network-endpoints); "
        "on a single TPU host without a metadata server set TPU_SKIP_MDS_QUERY=1; on several "
        f"hosts without one {_ENV_FIX}."
    )


def distributed_settings(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    tpu_processes=tpu_vm_process_count,
    tpu_chips=local_tpu_chips,
) -> dict | None:
    """The arguments for ``jax.distributed.initialize``, or ``None`` for a single process.

    Decides, in this order, from

    1. the arguments and ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
       ``JAX_PROCESS_ID`` (jax 0.10 reads only the first of these itself, so all
       three are read here and passed on);
    2. SLURM (``SLURM_NTASKS``) or Open MPI (``OMPI_COMM_WORLD_SIZE``): JAX's cluster
       detection then finds the coordinator and this process's id;
    3. a TPU slice on GKE (``TPU_PROCESS_ADDRESSES``, else ``TPU_WORKER_HOSTNAMES``,
       times ``MEGASCALE_NUM_SLICES``);
    4. a Cloud TPU VM (:func:`tpu_vm_process_count`, a bounded metadata query).

    In cases 2-4 the arguments left ``None`` are JAX's to detect: this function only
    decides whether there is more than one process, so that a single host never
    starts the distributed runtime. Incomplete settings are an error that says what
    to set.
    """
    env = os.environ if environ is None else environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _whole_number(env, "JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _whole_number(env, "JAX_PROCESS_ID")
    settings = {
        "coordinator_address": coordinator,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    scheduled = [_whole_number(env, v) for v in _SCHEDULER_COUNT_VARS]
    scheduled = [n for n in scheduled if n is not None]
    tpu_hosts = next((env[v] for v in _TPU_HOST_LIST_VARS if env.get(v) is not None), None)
    detectable = bool(scheduled) or tpu_hosts is not None

    if num_processes is not None:
        if num_processes < 1:
            raise ValueError(f"JAX_NUM_PROCESSES (or num_processes) is {num_processes}; {_ENV_FIX}")
        if num_processes == 1:
            return None
        if process_id is not None and not 0 <= process_id < num_processes:
            raise ValueError(
                f"JAX_PROCESS_ID={process_id} is outside 0..{num_processes - 1} for "
                f"JAX_NUM_PROCESSES={num_processes}; give each machine its own id in that range"
            )
        missing = [
            name
            for name, value in (
                ("JAX_COORDINATOR_ADDRESS", coordinator),
                ("JAX_PROCESS_ID", process_id),
            )
            if value is None
        ]
        if missing and not detectable:
            raise ValueError(
                f"JAX_NUM_PROCESSES={num_processes} is set but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not: {_ENV_FIX}"
            )
        return settings
    if coordinator is not None or process_id is not None:
        if not detectable:
            given = "JAX_COORDINATOR_ADDRESS" if coordinator is not None else "JAX_PROCESS_ID"
            raise ValueError(f"{given} is set but JAX_NUM_PROCESSES is not: {_ENV_FIX}")
        return settings
    if scheduled:
        return settings if max(scheduled) > 1 else None
    if tpu_hosts is not None:
        hosts = max(1, len([h for h in tpu_hosts.split(",") if h.strip()]))
        slices = _slice_count(env.get("MEGASCALE_NUM_SLICES"), "environment")
        return settings if hosts * slices > 1 else None
    try:
        processes = tpu_processes()
    except MetadataUnavailable as e:
        raise _metadata_error(tpu_chips(), e) from None
    return settings if processes > 1 else None


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    tpu_processes=tpu_vm_process_count,
) -> bool:
    """Starts JAX's multi-process runtime when more than one process takes part.

    :func:`distributed_settings` decides whether, and with what; on a Cloud TPU
    VM, SLURM or Open MPI ``jax.distributed.initialize`` detects the coordinator,
    the process count and this process's id itself. Returns whether the runtime
    is running; a single process does nothing and returns ``False``. Call it
    before anything else touches JAX's devices.
    """
    if jax.distributed.is_initialized():
        return True
    settings = distributed_settings(
        coordinator, num_processes, process_id, tpu_processes=tpu_processes
    )
    if settings is None:
        return False
    jax.distributed.initialize(**settings)
    return True

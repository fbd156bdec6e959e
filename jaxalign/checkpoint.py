"""Checkpoints of the train state (orbax), with JSON metadata such as the data cursor.

``Checkpointer`` keeps the last ``keep`` steps of a run under one directory and
writes asynchronously (training goes on while the arrays are written). Restores
place every array directly onto the shardings given, so a run saved on one mesh
shape resumes on another. ``save_params``/``load_params`` hold a model's
parameters alone, as passed between rounds.

Directories may be local paths or object-store URLs (``gs://bucket/run/ckpt``);
they reach orbax as ``etils.epath`` paths, never through ``pathlib.Path`` (which
would collapse ``gs://`` to ``gs:/``). In a multi-process run every process
calls the same methods: orbax writes each array shard once and finishes the
checkpoint on process 0, so a multi-host run needs a directory all hosts share.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxalign.parallel import tree_to_host


def checkpoint_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as orbax wants it: absolute when local, untouched when it is a URL."""
    if "://" in os.fspath(path):
        return epath.Path(path)
    return epath.Path(pathlib.Path(path).absolute())


def _abstract(target: Any, shardings: Any = None) -> Any:
    """Shape/dtype (and sharding) stand-ins for ``target``'s arrays, for a sharded restore."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target,
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings
    )


class Checkpointer:
    """An orbax ``CheckpointManager`` for one run: ``state`` arrays plus ``extra`` JSON.

    ``directory`` is created if needed; ``keep`` is how many recent steps survive;
    ``async_`` writes in the background (call :meth:`wait` before reading them or
    exiting; :meth:`close` does).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_: bool = True):
        self.directory = checkpoint_path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "extra")
        )

    def save(self, step: int, state: Any, extra: dict | None = None) -> None:
        """Saves ``state`` (any pytree of arrays) and ``extra`` (JSON-able dict) as ``step``."""
        self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra or {})
            ),
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None`` for an empty directory."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore(
        self, step: int | None = None, target_state: Any = None, shardings: Any = None
    ) -> tuple[Any, dict]:
        """Loads ``(state, extra)`` of ``step`` (default: the latest).

        ``target_state``: a pytree of the saved structure (arrays or
        ``jax.ShapeDtypeStruct``s, e.g. a freshly created ``TrainState``); the
        result has its structure. ``shardings``: a matching tree of shardings to
        place the arrays on (default: ``target_state``'s own). Without a target
        the raw saved tree (nested dicts) is returned on the default device.
        """
        self.wait()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(
                    f"no checkpoint in {self.directory}; train first or point at the run's "
                    "checkpoint directory"
                )
        if step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; saved steps: "
                f"{self.all_steps()}"
            )
        state_args = (
            ocp.args.StandardRestore()
            if target_state is None
            else ocp.args.StandardRestore(_abstract(target_state, shardings))
        )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=state_args, extra=ocp.args.JsonRestore())
        )
        return restored["state"], dict(restored["extra"] or {})

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_params(path: str | os.PathLike, params: Any) -> None:
    """Writes a model's parameter state (a pytree) to ``path``, replacing what was there.

    Device arrays are written from host copies (gathered from every process when they
    span several), so the files carry no sharding and any topology reads them back: a
    run trained on a pod slice loads on one CPU. Every process must call this together.
    """
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(checkpoint_path(path), tree_to_host(params), force=True)
        checkpointer.wait_until_finished()


def load_params(path: str | os.PathLike, abstract: Any, shardings: Any = None) -> Any:
    """Reads parameters written by :func:`save_params` into ``abstract``'s structure.

    ``abstract``: e.g. ``nnx.state(jaxalign.models.abstract_model(config))``
    (``jax.ShapeDtypeStruct`` leaves, optionally with shardings) or real arrays.
    """
    path = checkpoint_path(path)
    if not path.exists():
        raise FileNotFoundError(f"no parameter checkpoint at {path}")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(path, _abstract(abstract, shardings))

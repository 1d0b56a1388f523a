r"""Exact resumption: checkpoints that are never half-written, and the state they must hold.

Re-running a killed training command must reach the *same* final model as a run that was
never interrupted (bit-identical on CPU). SpeechBrain's ``Checkpointer`` already restores
whatever is registered with it (model, optimizer, epoch counter, the
``SaveableDataLoader``'s position, the ``Brain``'s step counters, privasr's
``RunCounters``, a DP run's privacy ledger and noise generator ...); this module adds the
two missing pieces:

* :class:`RandomState` -- the python, numpy, torch CPU and CUDA generator states *of every
  process* (dropout, SpecAugment and any ``random``/``numpy`` draw continue exactly);
  :class:`PerRankState` is the base of recoverables whose state differs between ranks:
  every rank takes part in the save (one ``all_gather_object``), rank 0 writes one file,
  and each rank loads its own entry.
* :class:`AtomicCheckpointer` -- a ``Checkpointer`` whose checkpoint directories appear
  complete or not at all: files are written into ``.partial-CKPT+...``, flushed, then
  renamed, and deletions rename before removing. A SIGKILL at any instant therefore
  leaves either the previous checkpoint or the new one, never a directory SpeechBrain
  would try (and fail) to load. Its directory is only created by the first save, so a run
  refused for bad input leaves nothing behind. :func:`make_atomic` upgrades a plain
  ``Checkpointer`` built by a recipe's YAML (what :class:`privasr.brain.PrivasrBrain` does).

Data order is a function of ``(seed, epoch, position)``: SpeechBrain's samplers reseed
from ``seed + epoch`` and the loader fast-forwards to the saved position. The one
global-RNG draw a ``DataLoader`` makes per epoch (the base seed of its workers) comes
instead from the training loader's own generator, which
:class:`~privasr.brain.PrivasrBrain` reseeds with :func:`seed_for_epoch` at the start of
every epoch, so it neither depends on nor disturbs the global streams restored here.
"""
from __future__ import annotations

import logging
import os
import pathlib
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
from speechbrain.utils.checkpoints import (
    METAFNAME,
    PARAMFILE_EXT,
    Checkpoint,
    Checkpointer,
    ckpt_recency,
    get_default_hook,
    DEFAULT_SAVE_HOOKS,
    mark_as_loader,
    mark_as_saver,
    register_checkpoint_hooks,
)
from speechbrain.utils.distributed import ddp_barrier, ddp_broadcast, if_main_process

from privasr.distributed import world_info

logger = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"
DELETING_PREFIX = ".deleting-"


# -- random number generators -------------------------------------------------------------
def capture_rng_state() -> dict:
    """The state of every global generator of this process (torch-serialisable, weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_as_python_state(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning("checkpoint holds CUDA RNG states of %d devices, %d visible: CUDA streams reseeded",
                           len(cuda), torch.cuda.device_count())


def _as_python_state(state) -> tuple:
    """``random.setstate`` wants tuples; a serialised state may come back with lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def seed_for_epoch(seed: int, epoch: int) -> int:
    """A distinct 63-bit seed per ``(seed, epoch)``: ``(seed * 1,000,003 + epoch) mod 2^63``.

    The seed of the training loader's own generator in epoch ``epoch`` (the draw of its workers'
    base seed); distinct for every epoch < 1,000,003 of one seed.
    """
    return (int(seed) * 1_000_003 + int(epoch)) % (2 ** 63)


# -- per-rank recoverables ----------------------------------------------------------------
class PerRankState:
    """A recoverable whose state differs between processes.

    Subclasses define :meth:`state_dict` and :meth:`load_state_dict`. Saving is a
    collective (every rank's ``Checkpointer.save_checkpoint`` reaches it, in the same
    order); rank 0 writes ``{"world_size": W, "ranks": [state_0, ..., state_{W-1}]}``.
    Loading picks this rank's entry; with another number of processes, rank ``r`` takes
    entry ``r`` if it exists and :meth:`missing_rank` otherwise.
    """

    def state_dict(self) -> Any:
        raise NotImplementedError

    def load_state_dict(self, state: Any) -> None:
        raise NotImplementedError

    def missing_rank(self, rank: int, saved_world_size: int) -> None:
        """Called instead of :meth:`load_state_dict` when the checkpoint has no entry for ``rank``."""

    def save(self, path) -> None:
        rank, world_size = world_info()
        states: list = [None] * world_size
        if world_size > 1:
            torch.distributed.all_gather_object(states, self.state_dict())
        else:
            states[0] = self.state_dict()
        if rank == 0:
            torch.save({"world_size": world_size, "ranks": states}, path)

    def load(self, path, end_of_epoch: bool = False) -> None:
        del end_of_epoch
        saved = torch.load(path, weights_only=True)
        if not (isinstance(saved, dict) and "ranks" in saved):  # a single-process state of older runs
            saved = {"world_size": 1, "ranks": [saved]}
        rank, world_size = world_info()
        if world_size != saved["world_size"]:
            logger.warning("%s: checkpoint written by %d process(es), resuming with %d: the resumed run "
                           "is not bit-identical to an uninterrupted one", type(self).__name__,
                           saved["world_size"], world_size)
        if rank < len(saved["ranks"]):
            self.load_state_dict(saved["ranks"][rank])
        else:
            self.missing_rank(rank, saved["world_size"])


def register_per_rank(cls):
    """Class decorator: register a :class:`PerRankState` subclass's save (on every rank) and load."""
    cls.save = mark_as_saver(cls.save)
    cls.load = mark_as_loader(cls.load)
    return register_checkpoint_hooks(cls, save_on_main_only=False)


@register_per_rank
class RandomState(PerRankState):
    """The global random generators of every process, for bit-identical resumption."""

    def state_dict(self) -> dict:
        return capture_rng_state()

    def load_state_dict(self, state: dict) -> None:
        restore_rng_state(state)

    def missing_rank(self, rank: int, saved_world_size: int) -> None:
        logger.warning("no RNG state for rank %d in the checkpoint (%d process(es)): keeping this seed's streams",
                       rank, saved_world_size)


# -- atomic checkpoints -------------------------------------------------------------------
class AtomicCheckpointer(Checkpointer):
    """A SpeechBrain ``Checkpointer`` whose checkpoints are complete or absent, never partial.

    Same arguments and behaviour as ``Checkpointer``; see the module docstring for what
    differs. Leftovers of a killed save or deletion are removed by the next save or
    recovery (on the main process).
    """

    def __init__(self, checkpoints_dir, recoverables=None, custom_load_hooks=None, custom_save_hooks=None,
                 allow_partial_load=False):
        # As Checkpointer.__init__, minus creating the directory (the first save does).
        self.checkpoints_dir = pathlib.Path(checkpoints_dir)
        self.recoverables, self.optional_recoverables = {}, {}
        if recoverables is not None:
            self.add_recoverables(recoverables)
        self.custom_load_hooks = dict(custom_load_hooks or {})
        self.custom_save_hooks = dict(custom_save_hooks or {})
        self.allow_partial_load = allow_partial_load

    # -- saving ---------------------------------------------------------------------------
    def save_checkpoint(self, meta={}, end_of_epoch=True, name=None, verbosity=logging.INFO):  # noqa: B006 (SB's signature)
        """Write every recoverable into a hidden directory, then rename it into place."""
        final = staging = None
        if if_main_process():
            self.remove_leftovers()
            final = self._new_checkpoint_dirpath() if name is None else self._custom_checkpoint_dirpath(name)
            staging = final.with_name(PARTIAL_PREFIX + final.name)
            os.makedirs(staging)
        staging = ddp_broadcast(staging, src=0)
        paramfiles = self._save_recoverables(staging)
        ddp_barrier()  # savers of other ranks (if any wrote) are done
        if not if_main_process():
            return None
        saved_meta = self._save_checkpoint_metafile(staging / METAFNAME, meta, end_of_epoch)
        self._publish(staging, final)
        kind = "end-of-epoch" if end_of_epoch else "intra-epoch"
        logger.log(verbosity, f"Saved an {kind} checkpoint in {final}")
        return Checkpoint(final, saved_meta, {k: final / p.name for k, p in paramfiles.items()})

    def _save_recoverables(self, directory: pathlib.Path) -> dict:
        paramfiles = {}
        for name, obj in self.recoverables.items():
            path = directory / f"{name}{PARAMFILE_EXT}"
            paramfiles[name] = path
            hook = self.custom_save_hooks.get(name) or get_default_hook(obj, DEFAULT_SAVE_HOOKS)
            if hook is None:
                raise RuntimeError(f"don't know how to save {type(obj)}: register a default or custom save hook")
            hook(obj, path)
        return paramfiles

    @staticmethod
    def _publish(staging: pathlib.Path, final: pathlib.Path) -> None:
        """fsync the files, then one atomic rename makes the checkpoint visible."""
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():  # a named checkpoint saved again: retire the old one first
            AtomicCheckpointer._remove(final)
        os.rename(staging, final)
        _fsync_directory(final.parent)

    # -- deleting -------------------------------------------------------------------------
    def delete_checkpoints(self, *, num_to_keep=1, min_keys=None, max_keys=None, importance_keys=[ckpt_recency],
                           ckpt_predicate=None, verbosity=logging.INFO):  # noqa: B006 (SB's signature)
        """As ``Checkpointer.delete_checkpoints``, each deletion being a rename then a removal."""
        if num_to_keep < 0:
            raise ValueError("num_to_keep must be >= 0")
        doomed, protected = set(), set()
        keys = [{"min_key": key} for key in min_keys or []]
        keys += [{"max_key": key} for key in max_keys or []]
        keys += [{"importance_key": key} for key in importance_keys]
        for key_kwargs in keys:
            key_kwargs["ckpt_predicate"] = ckpt_predicate
            doomed.update(self.find_checkpoints(**key_kwargs))
            protected.update(self.find_checkpoints(max_num_checkpoints=num_to_keep, **key_kwargs))
        ddp_barrier()
        if if_main_process():
            for ckpt in doomed - protected:
                self._remove(ckpt.path)
                logger.log(verbosity, f"Deleted checkpoint in {ckpt.path}")
        ddp_barrier()

    @staticmethod
    def _remove(path: pathlib.Path) -> None:
        hidden = path.with_name(DELETING_PREFIX + path.name)
        os.rename(path, hidden)
        shutil.rmtree(hidden)

    def remove_leftovers(self) -> None:
        """Remove directories of saves or deletions that a kill interrupted (main process only)."""
        if not self.checkpoints_dir.is_dir():
            return
        for path in self.checkpoints_dir.iterdir():
            if path.name.startswith((PARTIAL_PREFIX, DELETING_PREFIX)) and path.is_dir():
                logger.info("removing %s, left by an interrupted checkpoint save or deletion", path)
                shutil.rmtree(path)

    # -- listing / recovering -------------------------------------------------------------
    def _list_checkpoint_dirs(self):
        if not self.checkpoints_dir.is_dir():
            return []
        return super()._list_checkpoint_dirs()

    def recover_if_possible(self, importance_key=None, max_key=None, min_key=None, ckpt_predicate=None):
        if if_main_process():
            self.remove_leftovers()
        return super().recover_if_possible(importance_key, max_key, min_key, ckpt_predicate)


def _fsync_directory(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_atomic(checkpointer: Optional[Checkpointer]) -> Optional[Checkpointer]:
    """Give a plain ``Checkpointer`` the atomic save/delete of :class:`AtomicCheckpointer` (in place).

    A recipe's YAML may build ``speechbrain.utils.checkpoints.Checkpointer`` directly; its
    instance keeps every attribute and recoverable, only the save and delete methods change.
    Subclasses of ``Checkpointer`` other than ``AtomicCheckpointer`` are left alone.
    """
    if type(checkpointer) is Checkpointer:
        checkpointer.__class__ = AtomicCheckpointer
    return checkpointer


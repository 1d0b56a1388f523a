"""Helpers to run real multi-process (gloo, CPU) code from the tests."""
import os
import socket
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp

from privasr.distributed import ordered_shutdown


def free_port(held=None) -> int:
    """A free TCP port; with ``held`` (a contextlib.ExitStack) its socket stays bound until the stack closes,
    so that ports chosen one after another are distinct."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    if held is None:
        s.close()
    else:
        held.callback(s.close)
    return port


def _entry(rank, world_size, store_file, fn, args):
    # A file rendezvous (no port to choose): two test runs side by side (pytest -n 2) cannot take each other's port
    # between one picking it and its rank 0 binding it, as free_port() + MASTER_PORT could.
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    with ordered_shutdown():  # barrier, then destroy; no barrier when fn raised
        fn(rank, world_size, *args)


def run_processes(fn, world_size, *args):
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; raises if any fails."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(world_size, os.path.join(tmp, "rendezvous"), fn, args), nprocs=world_size, join=True)

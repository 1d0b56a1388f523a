"""On a GPU machine: per-core clipping on CUDA (NCCL across processes) equals the float64 CPU reference.

    torchrun --nproc_per_node 2 tools/device_equivalence.py     # 2 GPUs: NCCL, 2 processes x 2 cores = 4 cores
    python tools/device_equivalence.py                          # 1 GPU: one process emulating the 4 cores
    python tools/device_equivalence.py --cpu                    # the same checks on the CPU (gloo): a dry run

For every method (none, global, pcc, apcc) and reduction, a small Conformer-sized MLP's aggregated update
computed on the GPU (loop and vmap, fp32 accumulation, fp32 and bf16 all-reduce) is compared with
``privasr.clipping.clip_and_aggregate`` on float64 CPU copies of the same per-core gradients. Prints one line
per case and exits 1 if any fp32 case is off by more than 1e-5 (relative), or a bf16 all-reduce case by more
than 2^-6. Run by tools/device_check.sh. No CUDA device without ``--cpu``: one line, exit status 2.
"""
from __future__ import annotations

import itertools
import os
import sys

import torch
import torch.distributed as dist

from privasr.cli import CliParser, run_cli
from privasr.clipping import clip_and_aggregate
from privasr.distributed import CoreAccumulator, ordered_shutdown, world_info
from privasr.errors import UserError
from privasr.per_sample import shard_grads_loop, shard_grads_vmap

PROG = "device_equivalence"
CORES = 4
CASES = [(m, b, r) for (m, b), r in itertools.product(
    [("none", None), ("global", 1.0), ("pcc", 5.0), ("apcc", None)], ["mean", "sum"])]


def model_and_batch(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 32)).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=g)
    y = torch.randn(16, 32, generator=g) * torch.linspace(0.1, 3.0, 16).unsqueeze(1)
    return model, x.to(device), y.to(device)


def loss_of(model):
    return lambda x, y: ((model(x) - y) ** 2).sum(dim=1).mean()


def reference(method, bound, reduction):
    model, x, y = model_and_batch("cpu")
    model = model.double()
    per_core = []
    for xs, ys in zip(x.double().chunk(CORES), y.double().chunk(CORES)):
        model.zero_grad()
        loss_of(model)(xs, ys).backward()
        per_core.append([p.grad.clone() for p in model.parameters()])
    return torch.cat([g.flatten() for g in clip_and_aggregate(per_core, method, bound, reduction)])


def on_device(rank, world, method, bound, reduction, mode, dtype, device):
    model, x, y = model_and_batch(device)
    per_process = x.shape[0] // world
    mine = (x[rank * per_process:(rank + 1) * per_process], y[rank * per_process:(rank + 1) * per_process])
    acc = CoreAccumulator(list(model.parameters()), method, bound, reduction, dtype)
    if mode == "vmap":
        grads, _ = shard_grads_vmap(model, loss_of(model), mine, CORES // world)
        acc.add_cores(grads)
    else:
        for grads, _ in shard_grads_loop(model, loss_of(model), mine, CORES // world):
            acc.add_core(grads)
    grads, _ = acc.reduce()
    return torch.cat([g.flatten() for g in grads]).double().cpu()


def _parser() -> CliParser:
    p = CliParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the same checks on the CPU (gloo): a dry run")
    return p


def _main(argv=None) -> int:
    cpu = _parser().parse_args(argv).cpu
    if not cpu and not torch.cuda.is_available():
        raise UserError("no CUDA device (--cpu runs the same checks on the CPU)")
    if "RANK" in os.environ:
        if not cpu:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("gloo" if cpu else "nccl")
    rank, world = world_info()
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    failures = 0
    with ordered_shutdown():
        for (method, bound, reduction), mode, dtype in itertools.product(CASES, ("loop", "vmap"),
                                                                         (torch.float32, torch.bfloat16)):
            got = on_device(rank, world, method, bound, reduction, mode, dtype, device)
            expected = reference(method, bound, reduction)
            rel = float((got - expected).norm() / expected.norm())
            limit = 1e-5 if dtype == torch.float32 or world == 1 else 2 ** -6
            ok = rel <= limit
            failures += not ok
            if rank == 0:
                print(f"{'ok  ' if ok else 'FAIL'} {method:6s} {reduction:4s} {mode:4s} all-reduce "
                      f"{str(dtype).split('.')[-1]:8s} {world} process(es): relative error {rel:.2e} (<= {limit:.0e})")
    return 1 if failures else 0


def main(argv=None) -> int:
    """The exit status: 0 when every case is within its tolerance, 1 when one is not, 2 on bad input."""
    return run_cli(_main, argv, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())

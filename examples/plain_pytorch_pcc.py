"""Per-core clipping (PCC) in a plain PyTorch training loop: an MLP on random data.

    python examples/plain_pytorch_pcc.py                          # 1 process x 4 virtual cores = 4 cores
    torchrun --nproc_per_node 2 examples/plain_pytorch_pcc.py     # 2 processes (gloo, CPU) x 4 = 8 cores
"""
import os

import torch
import torch.distributed as dist

from privasr.distributed import ordered_shutdown
from privasr.private_step import PerCoreClipping


def main(steps=10, method="pcc", bound=1.0, virtual_cores=4, batch=16):
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(rank)  # a different init per process: PerCoreClipping broadcasts rank 0's
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))  # no DDP wrapper
    clip = PerCoreClipping(model, method=method, bound=bound, virtual_cores=virtual_cores)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(batch, 8, generator=torch.Generator().manual_seed(100 + rank))  # each process its own data
    y = x.sum(dim=1, keepdim=True)

    def loss_fn(x, y):  # the mean loss of one core's shard
        return torch.nn.functional.mse_loss(model(x), y)

    for step in range(steps):
        loss = clip.backward(loss_fn, x, y)  # per-core gradients, each clipped to `bound`
        stats = clip.reduce()                # one all_reduce of the clipped sum; sets p.grad
        if not stats.skipped:                # every core NaN/Inf: no update
            optimizer.step()
        if rank == 0:
            print(f"step {step}: loss {float(loss):.4f}, cores clipped {stats.clipped_fraction:.0%}", flush=True)
    return model


if __name__ == "__main__":
    if "WORLD_SIZE" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
    with ordered_shutdown():  # ends the process group in order (a no-op with one process)
        main()

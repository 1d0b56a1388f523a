"""Run under torchrun by tests/test_brain.py: each rank trains on its half of every batch."""
import sys

import speechbrain as sb
import torch

from privasr.distributed import ordered_shutdown
from tests.test_brain import CASES, LR, batches_of, hparams
from tests.toy import fit_toy_brain, make_toy_brain


def main(out_path):
    sb.utils.distributed.ddp_init_group({"distributed_backend": "gloo"})
    with ordered_shutdown():  # rank 0 still saving while rank 1 is done: the barrier orders the teardown
        train_and_gather(out_path)


def train_and_gather(out_path):
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {}
    for method, bound in CASES:
        mine = [(x[rank * 4: rank * 4 + 4], y[rank * 4: rank * 4 + 4]) for x, y in batches_of(8)]
        brain = make_toy_brain(hparams(method, bound, 2), lr=LR, run_opts={"distributed_backend": "gloo"})
        results[(rank, method)] = fit_toy_brain(brain, mine)
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        torch.save({k: v for part in gathered for k, v in part.items()}, out_path)


if __name__ == "__main__":
    main(sys.argv[1])

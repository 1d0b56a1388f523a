"""A small but complete privasr training run, for the fault tests (resume, worker loss, NaN).

    python tests/toy_train.py OUT [--epochs 2] [--ckpt-steps 1] [--clipping pcc] ...
    torchrun --nproc_per_node 2 tests/toy_train.py OUT ...

It exercises every piece of state a resume must restore: shuffled data order
(SpeechBrain's samplers), dropout (torch RNG), numpy and python ``random`` draws in the
step, Adam's moments, an LR scheduler, the epoch counter, intra-epoch checkpoints every
``--ckpt-steps`` batches and an end-of-epoch checkpoint. At the end, rank 0 writes
``OUT/final.pt``: its parameters, run counters and optimizer step, and those of every
rank under ``"ranks"``. Each process prints the optimizer step it starts (or resumes) at.
"""
import argparse
import os
import random
import sys

import numpy as np
import speechbrain as sb
import torch

from privasr.brain import PrivateBrain
from privasr.distributed import ordered_shutdown, world_info
from privasr.resume import AtomicCheckpointer


class NoisyToyBrain(PrivateBrain):
    """Regression with dropout, numpy noise and a python-random scale: every RNG matters."""

    def batch_to_tensors(self, batch):
        x, y = batch
        noise = torch.from_numpy(np.random.randn(*x.shape).astype("float32"))
        return (x + 0.05 * noise) * (1.0 + 0.1 * random.random()), y

    def shard_loss(self, x, y):
        return ((self.modules.model(x) - y) ** 2).sum(dim=1).mean()

    def on_fit_start(self):
        super().on_fit_start()  # recovers the last checkpoint, if any
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        print(f"toy_train: rank {world_info()[0]} attempt {attempt} starts at optimizer step {self.optimizer_step}",
              flush=True)

    def init_optimizers(self):
        super().init_optimizers()
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=0.5)
        self.checkpointer.add_recoverable("scheduler", self.scheduler)

    def on_stage_end(self, stage, stage_loss, epoch=None):
        if stage == sb.Stage.TRAIN:
            self.scheduler.step()
            self.checkpointer.save_and_keep_only(meta={"epoch": epoch}, end_of_epoch=True, num_to_keep=1)


def toy_data(n: int = 32):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 6, generator=g)
    y = torch.randn(n, 3, generator=g) * torch.linspace(0.1, 3.0, n).unsqueeze(1)
    return [(x[i], y[i]) for i in range(n)]


def parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ckpt-steps", type=int, default=1)
    parser.add_argument("--clipping", default="pcc")
    parser.add_argument("--clip-bound", type=float, default=1.0)
    parser.add_argument("--virtual-cores", type=int, default=2)
    parser.add_argument("--grad-accumulation", type=int, default=1)
    parser.add_argument("--nonfinite-patience", type=int, default=3)
    parser.add_argument("--seed", type=int, default=3)
    return parser.parse_args(argv)


def main(argv):
    args = parse(argv)
    sb.utils.seed.seed_everything(args.seed, verbose=False)
    distributed = os.environ.get("RANK") is not None
    run_opts = {"device": "cpu", "ckpt_interval_steps": args.ckpt_steps, "noprogressbar": True,
                "nonfinite_patience": args.nonfinite_patience, "grad_accumulation_factor": args.grad_accumulation}
    if distributed:
        run_opts["distributed_backend"] = "gloo"
        sb.utils.distributed.ddp_init_group(run_opts)
    # every rank reaches the teardown before any closes its gloo pairs, and the group is destroyed
    # before the interpreter exits, errors included (privasr.distributed.shutdown_process_group)
    with ordered_shutdown():
        train(args, run_opts, distributed)


def train(args, run_opts: dict, distributed: bool) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    epochs = sb.utils.epoch_loop.EpochCounter(args.epochs)
    brain = NoisyToyBrain(modules={"model": model}, opt_class=lambda p: torch.optim.Adam(p, lr=0.01),
                          run_opts=run_opts, checkpointer=AtomicCheckpointer(os.path.join(args.out, "save")),
                          hparams={"clipping": args.clipping, "clip_bound": args.clip_bound, "seed": args.seed,
                                   "virtual_cores": args.virtual_cores})
    brain.checkpointer.add_recoverables({"model": model, "counter": epochs})
    brain.fit(epochs, toy_data(), train_loader_kwargs={"batch_size": args.batch_size, "shuffle": True})
    mine = {"params": torch.cat([p.detach().flatten() for p in model.parameters()]),
            "counters": dict(vars(brain.counters)), "optimizer_step": brain.optimizer_step}
    ranks = [mine]
    if distributed:
        ranks = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(ranks, mine)
    if sb.utils.distributed.if_main_process():
        torch.save({**mine, "ranks": ranks}, os.path.join(args.out, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1:])

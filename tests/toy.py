"""A tiny deterministic model and batch shared by the exactness tests."""
import torch


def toy_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def toy_batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randn(n, 3, generator=g) * torch.linspace(0.1, 3.0, n).unsqueeze(1)  # varied per-core norms
    return x, y


def mse_loss_fn(model):
    def loss(x, y):
        return ((model(x) - y) ** 2).sum(dim=1).mean()
    return loss


def make_toy_brain(hparams: dict, lr: float = 0.1, run_opts=None):
    """A PrivateBrain around toy_model() with plain SGD, for exactness tests of the training step."""

    from privasr.brain import PrivateBrain

    class ToyBrain(PrivateBrain):
        def batch_to_tensors(self, batch):
            return tuple(t.to(self.device) for t in batch)

        def shard_loss(self, x, y):
            return mse_loss_fn(self.modules.model)(x, y)

        def compute_forward(self, batch, stage):
            return self.modules.model(batch[0].to(self.device))

        def compute_objectives(self, predictions, batch, stage):
            return ((predictions - batch[1]) ** 2).sum(1).mean()

    model = toy_model()
    opts = {"device": "cpu", **(run_opts or {})}
    return ToyBrain(modules={"model": model}, opt_class=lambda p: torch.optim.SGD(p, lr=lr),
                    hparams=hparams, run_opts=opts)


def fit_toy_brain(brain, batches):
    """Fit one epoch over the given list of (x, y) batches."""
    import speechbrain as sb

    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # the batches as they are
    brain.fit(sb.utils.epoch_loop.EpochCounter(1), train_set=loader, progressbar=False)
    return torch.cat([p.detach().flatten() for p in brain.modules.parameters()])

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

"""Shared pieces of the examples: the scikit-learn digits, augmentations, an MLP encoder, an evaluation."""

from __future__ import annotations

import math
import resource

import torch
import torch.nn.functional as F

import contrastbound as cb


def check_args(parser, args, positive=("steps", "batch", "dim", "log_every")) -> None:
    """argparse errors (exit 2) for sizes below 1, a seed outside [0, 2^63), a temperature that is not a positive
    finite number and a momentum outside [0, 1], instead of a traceback later (or, for the momentum, a run that
    trains to NaN)."""
    for name in positive:
        if hasattr(args, name) and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if hasattr(args, "seed") and not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2^63), got {args.seed}")
    if hasattr(args, "temperature") and not 0 < args.temperature < math.inf:
        parser.error(f"--temperature must be a positive finite number, got {args.temperature}")
    if hasattr(args, "momentum") and not 0 <= args.momentum <= 1:  # (NaN fails both)
        parser.error(f"--momentum must be in [0, 1] (the key encoder's EMA weight), got {args.momentum}")


def load_digits_tensors(seed: int = 0):
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover
        raise SystemExit("these examples need scikit-learn: pip install scikit-learn") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random shift of the 8x8 image by up to one pixel, pixel dropout and noise."""
    imgs = x.view(-1, 1, 8, 8)
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=generator))
    imgs = torch.roll(imgs, shifts=(dy, dx), dims=(2, 3))
    keep = (torch.rand(imgs.shape, generator=generator) > 0.1).float()
    noise = 0.05 * torch.randn(imgs.shape, generator=generator)
    return (imgs * keep + noise).view(x.shape[0], -1)


def encoder(dim: int = 32) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, dim)
    )


@torch.no_grad()
@torch.no_grad()
def evaluate(model: torch.nn.Module, train, test) -> dict:
    """Mean-classifier accuracy and supervised loss of the (normalised) features on the test split, and the test
    features' alignment (two augmentations of each image, drawn from a fixed seed) and uniformity (Wang & Isola)."""
    f_train = F.normalize(model(train[0]), dim=1)
    f_test = F.normalize(model(test[0]), dim=1)
    means = cb.class_means(f_train, train[1], num_classes=10)
    acc = ((f_test @ means.t()).argmax(1) == test[1]).float().mean().item()
    loss = cb.mean_classifier_loss(f_test, test[1], means).item()
    g = torch.Generator().manual_seed(0)
    align = cb.alignment(model(augment(test[0], g)), model(augment(test[0], g))).item()
    return {"test_accuracy": acc, "test_supervised_loss": loss, "test_alignment": align,
            "test_uniformity": cb.uniformity(f_test).item()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

"""An MNIST-1D-style dataset, generated procedurally from a seed.

After Greydanus (2020): ten fixed 1-D templates (loosely shaped like the
digits' strokes), each example a template that is randomly stretched,
shifted, scaled and sheared, plus smooth correlated noise and white noise.
Small enough to train in seconds, hard enough that a linear model and an
MLP and a CNN separate clearly.  Everything is vectorised over examples.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .arrays import ArrayData

LENGTH = 40
N_TRAIN, N_TEST = 4000, 1000

# Ten 12-point patterns; values are interpolated linearly between points.
TEMPLATES = torch.tensor([
    [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],        # 0: a hump
    [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],      # 1: a dip then a ramp
    [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 8, 5],      # 2: like 1 with a late spike
    [5, 3, 4.2, 5.4, 4, 6, 8, 7, 6, 5, 6, 5],              # 3: two bumps
    [5, 3, 3, 3, 8, 8, 8, 8, 3, 3, 3, 5],                  # 4: a plateau
    [5, 8, 8, 8, 6, 5, 4, 3, 2.5, 2.5, 3, 5],              # 5: high then low
    [5, 5, 6, 7, 8, 7, 6, 5, 4, 3, 4, 5],                  # 6: a wave
    [5, 8, 8, 8, 8, 6, 4, 2, 2, 2, 2, 5],                  # 7: a step down
    [5, 8, 2, 8, 2, 8, 2, 8, 2, 8, 2, 5],                  # 8: oscillation
    [5, 2, 2, 2, 2, 4, 6, 8, 8, 8, 8, 5],                  # 9: a step up
]) - 5.0


def _interpolate(templates: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Sample each row's template at positions t in [0, 1] (0 outside)."""
    n_points = templates.shape[1]
    pos = t.clamp(0, 1) * (n_points - 1)
    lo = pos.floor().long().clamp(max=n_points - 2)
    frac = pos - lo
    left = templates.gather(1, lo)
    right = templates.gather(1, lo + 1)
    values = left + frac * (right - left)
    return values * ((t >= 0) & (t <= 1))


def generate_mnist1d(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float, shape=(n, 1)) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    labels = torch.randint(10, (n,), generator=g)
    u = torch.linspace(0, 1, LENGTH).expand(n, LENGTH)
    width = uniform(0.45, 0.7)                      # stretch
    start = uniform(0.0, 1.0) * (1 - width)         # shift, kept inside the window
    signal = _interpolate(TEMPLATES[labels], (u - start) / width)
    signal = signal * uniform(0.7, 1.3)              # amplitude
    signal = signal + uniform(-1.0, 1.0) * (u - 0.5)  # shear
    white = torch.randn(n, 1, LENGTH + 8, generator=g)
    smooth = F.avg_pool1d(white, kernel_size=9, stride=1).squeeze(1)  # correlated noise
    signal = signal + 0.6 * smooth + 0.25 * torch.randn(n, LENGTH, generator=g)
    return signal.unsqueeze(1), labels  # (n, 1, LENGTH) for Conv1d; MLPs flatten


def load_mnist1d_data(seed: int = 0) -> ArrayData:
    train_x, train_y = generate_mnist1d(N_TRAIN, seed)
    test_x, test_y = generate_mnist1d(N_TEST, seed + 1)
    mean, std = train_x.mean(), train_x.std()
    return ArrayData(((train_x - mean) / std, train_y), ((test_x - mean) / std, test_y))

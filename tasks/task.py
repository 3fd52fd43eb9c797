"""The Task: a model family instance bound to a dataset, a loss and a metric.

A task is cheap to construct (no data loaded, no model built) so the whole
suite can be listed instantly; data is loaded on first use and cached.
Both ordinary training code (`loss(model, batch)`) and the functional
meta-training inner loop (`loss_fn(model)(params, buffers, batch)`) use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from . import data

Batch = tuple[Tensor, Tensor]
OBJECTIVES = ("classify", "mse")
# train: meta-training; valid: every choice (recipe, checkpoint, thresholds);
# heldout: the test split, reported once and never used to choose.
SPLITS = ("train", "valid", "heldout")


@dataclass(eq=False)
class Task:
    """One training problem.

    Every batch is `(inputs, targets)`.  `objective` is "classify"
    (cross-entropy over the last dimension; per-token targets are flattened,
    metric: accuracy) or "mse" (metric: mse).  `build` makes the model from
    the current RNG state; `init(seed)` seeds it.  `input_shape` and
    `input_dtype` describe one example so `example_inputs` needs no data.
    """

    name: str
    family: str
    split: str                       # "train" | "valid" | "heldout" (test)
    dataset: str
    batch_size: int
    build: Callable[[], nn.Module]
    objective: str
    input_shape: tuple[int, ...]
    input_dtype: torch.dtype = torch.float32
    vocab_size: int = 0              # for token inputs: example inputs are drawn below it
    config: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None     # for datasets read from disk; None -> $L2O_DATA
    _num_params: int | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"{self.name}: split must be one of {SPLITS}, got {self.split!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"{self.name}: objective must be one of {OBJECTIVES}")

    # -- model ---------------------------------------------------------------
    def init(self, seed: int = 0) -> nn.Module:
        """A freshly initialised model on CPU; the same seed gives identical weights."""
        # fork_rng keeps the caller's global RNG stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = self.build()
        return model.train()

    def num_params(self, seed: int = 0) -> int:
        if self._num_params is None:
            self._num_params = sum(p.numel() for p in self.init(seed).parameters())
        return self._num_params

    def example_inputs(self) -> tuple[Tensor]:
        """A 2-example input for torch.fx shape propagation (no data loaded)."""
        g = torch.Generator().manual_seed(0)
        shape = (2, *self.input_shape)
        if self.input_dtype == torch.long:
            return (torch.randint(self.vocab_size, shape, generator=g),)
        return (torch.randn(shape, generator=g, dtype=self.input_dtype),)

    # -- data ----------------------------------------------------------------
    def available(self) -> bool:
        """False when the task needs files from the data directory that are not there."""
        return data.is_available(self.dataset, self.data_root)

    def load_data(self):
        return data.load_dataset(self.dataset, self.data_root)

    def batches(self, split: str = "train", seed: int = 0, device="cpu") -> Iterator[Batch]:
        """Infinite reproducible stream of (inputs, targets) for "train" or "test"."""
        return data.batch_stream(self.load_data(), split, self.batch_size, seed, device)

    # -- objective -----------------------------------------------------------
    def loss(self, model_or_output, batch: Batch) -> Tensor:
        inputs, targets = batch
        output = model_or_output(inputs) if isinstance(model_or_output, nn.Module) else model_or_output
        if self.objective == "classify":
            return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))
        return F.mse_loss(output.reshape(output.shape[0], -1), targets.reshape(targets.shape[0], -1))

    @torch.no_grad()
    def metric(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Accuracy or MSE on a batch, evaluated in eval mode (running norm stats)."""
        was_training = model.training
        model.eval()
        try:
            inputs, targets = batch
            output = model(inputs)
        finally:
            model.train(was_training)
        if self.objective == "classify":
            correct = output.argmax(-1) == targets
            return {"accuracy": correct.float().mean().item(), "loss": self.loss(output, batch).item()}
        return {"mse": self.loss(output, batch).item()}

    def loss_fn(self, model: nn.Module) -> Callable[[dict, dict, Batch], Tensor]:
        """Functional loss: `f(params, buffers, batch)` equal to `loss(model, batch)`.

        The model stays in train mode; BatchNorm running statistics are
        written in place into the given buffer tensors, exactly as the module
        would update its own.
        """
        def functional_loss(params: dict[str, Tensor], buffers: dict[str, Tensor], batch: Batch) -> Tensor:
            output = functional_call(model, (params, buffers), (batch[0],))
            return self.loss(output, batch)
        return functional_loss

    def describe(self) -> str:
        return f"{self.name} ({self.family}, {self.split}, {self.dataset}, {self.num_params()} params)"

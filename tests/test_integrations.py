"""GMNOptimizer inside other people's training loops: Lightning and Accelerate."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2o


def digits_loader(batch_size=64):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    return x, y, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size,
                                             shuffle=True, generator=torch.Generator().manual_seed(0))


def test_lightning_trainer_with_scheduler():
    L = pytest.importorskip("lightning")

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = l2o.GMNOptimizer(self)  # the shipped weights
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50)}

    torch.manual_seed(0)
    x, y, loader = digits_loader()
    model = Classifier()
    before = F.cross_entropy(model(x), y).item()
    trainer = L.Trainer(max_epochs=2, enable_progress_bar=False, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader)
    assert F.cross_entropy(model(x), y).item() < 0.6 * before
    opt = trainer.optimizers[0]
    assert all(opt.state[p]["step"] == 2 * len(loader) for p in model.parameters())


def test_accelerate_prepare():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    x, y, loader = digits_loader()
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = l2o.GMNOptimizer(net)
    acc = accelerate.Accelerator(cpu=True)
    net, opt, loader = acc.prepare(net, opt, loader)
    before = F.cross_entropy(net(x), y).item()
    for xb, yb in loader:
        opt.zero_grad()
        acc.backward(F.cross_entropy(net(xb), yb))
        opt.step()
    assert F.cross_entropy(net(x), y).item() < 0.8 * before
    state = opt.state_dict()  # Accelerate wraps the optimizer; the state still round-trips
    assert "lopt" in state

"""GMNOptimizer inside other people's training loops: Lightning and Accelerate."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import l2o


# Lightning, Accelerate, Hugging Face Trainer, torch.compile end to end.
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def trains(before: float, after: float) -> bool:
    """The recipe trains: the loss falls by over 10% (each recipe is ~27-60 steps of a digits
    MLP; Adam at lr 1e-3 takes it down ~15% in 27). What is tested here is the wiring -- a
    framework that dropped the gradients, the steps or the updates would leave it flat --
    not how good the optimizer is (that is the evaluation protocol's job)."""
    return after < 0.9 * before


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
    assert trains(before, F.cross_entropy(model(x), y).item())
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
    assert trains(before, F.cross_entropy(net(x), y).item())
    state = opt.state_dict()  # Accelerate wraps the optimizer; the state still round-trips
    assert "lopt" in state


# ------------------------------------------------------------------ recipes
class _HFClassifier(nn.Module):
    """What HF Trainer expects of a model: keyword inputs, a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x, labels=None):
        logits = self.net(x)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _hf_run(tmp_path, how):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    x, y, _ = digits_loader()
    data = [{"x": a, "labels": b} for a, b in zip(x, y)]
    model = _HFClassifier()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=64, weight_decay=1e-4,
        warmup_steps=3, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=0)
    before = F.cross_entropy(model(x)["logits"], y).item()
    if how == "cls_and_kwargs":
        # graph_model=, not model=: Trainer would pass the model instead of its groups
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       optimizer_cls_and_kwargs=(l2o.GMNOptimizer, {"graph_model": model}))
    else:
        decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
        groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 1e-4},
                  {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
        opt = l2o.GMNOptimizer(groups, model=model)
        sched = transformers.get_linear_schedule_with_warmup(opt, 3, 30)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    after = F.cross_entropy(model(x)["logits"], y).item()
    return model, trainer.optimizer, before, after


@pytest.mark.parametrize("how", ["cls_and_kwargs", "optimizers"])
def test_hf_trainer_recipe(tmp_path, how):
    model, opt, before, after = _hf_run(tmp_path, how)
    opt = getattr(opt, "optimizer", opt)  # Trainer wraps it in Accelerate's AcceleratedOptimizer
    assert isinstance(opt, l2o.GMNOptimizer)
    assert trains(before, after)
    # Trainer's decay / no-decay groups arrive: weights decay, biases and LayerNorm do not
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 1e-4 and plain["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model.net[0].weight), id(model.net[3].weight)}
    assert any(p is model.net[1].weight for p in plain["params"])
    # the linear schedule scaled the learned step from 1 (TrainingArguments'
    # learning_rate is not passed to an optimizer_cls_and_kwargs class) down to 0
    assert decayed["initial_lr"] == 1.0 and plain["initial_lr"] == 1.0
    assert float(decayed["lr"]) == 0.0 and float(plain["lr"]) == 0.0
    assert all(s["step"] == 30 for s in opt.state.values())


class _LitClassifier:
    """Built lazily so the module imports without lightning."""

    @staticmethod
    def make(L):
        class Classifier(L.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

            def forward(self, x):
                return self.net(x)

            def training_step(self, batch, _):
                return F.cross_entropy(self(batch[0]), batch[1])

            def configure_optimizers(self):
                decay = [p for p in self.parameters() if p.ndim >= 2]     # as in the README recipe
                no_decay = [p for p in self.parameters() if p.ndim < 2]
                opt = l2o.GMNOptimizer([{"params": decay, "weight_decay": 1e-4},
                                        {"params": no_decay, "lr": 0.5}], model=self, weights=None)
                sched = torch.optim.lr_scheduler.StepLR(opt, 4, 0.5)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        return Classifier


def test_lightning_param_groups_and_checkpoint_resume(tmp_path):
    """Two epochs in one go == one epoch, checkpoint, resume for the second
    (bit for bit: optimizer state incl. per-tensor counters, groups and the
    scheduler round-trip through Lightning's checkpoint)."""
    L = pytest.importorskip("lightning")
    Classifier = _LitClassifier.make(L)
    x, y, _ = digits_loader()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:320], y[:320]), batch_size=64)

    def trainer(epochs, **kw):
        return L.Trainer(max_epochs=epochs, enable_progress_bar=False, logger=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=str(tmp_path), **kw)

    straight = Classifier()
    trainer(2, enable_checkpointing=False).fit(straight, loader)

    first = Classifier()
    t1 = trainer(1)
    t1.fit(first, loader)
    ckpt = t1.checkpoint_callback.best_model_path
    resumed = Classifier()
    t2 = trainer(2, enable_checkpointing=False)
    t2.fit(resumed, loader, ckpt_path=ckpt)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    opt = t2.optimizers[0]
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.125]  # StepLR(4, 0.5) after 10 steps
    assert all(s["step"] == 10 for s in opt.state.values())


def test_grad_scaler_recipe():
    """torch.amp.GradScaler: scaler.step unscales the gradients first (same
    step as unscaled), and skips the step when they overflow."""
    x, y, _ = digits_loader()
    results = []
    for use_scaler in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = l2o.GMNOptimizer(net, weights=None)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=use_scaler)
        for i in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(net(x[i * 64:(i + 1) * 64]), y[i * 64:(i + 1) * 64])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    before = [p.detach().clone() for p in net.parameters()]
    opt.zero_grad()
    loss = F.cross_entropy(net(x[:64]), y[:64])
    scaler.scale(loss * float("inf")).backward()
    scaler.step(opt)  # inf gradients: the scaler skips opt.step
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before))
    assert scaler.get_scale() < 1024.0
    assert all(s["step"] == 3 for s in opt.state.values())


def test_torch_compiled_model_recipe():
    """GMNOptimizer(torch.compile(model)): the graph comes from the original module."""
    torch.manual_seed(0)
    x, y, _ = digits_loader()
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    compiled = torch.compile(net, backend="eager")  # the inductor backend needs a C++ toolchain per model
    opt = l2o.GMNOptimizer(compiled, weight_decay=1e-4)  # the shipped weights
    assert not opt.graph.unstructured
    before = F.cross_entropy(net(x), y).item()
    for i in range(27):
        opt.zero_grad()
        F.cross_entropy(compiled(x[i * 64:][:64]), y[i * 64:][:64]).backward()
        opt.step()
    assert trains(before, F.cross_entropy(net(x), y).item())


def test_accelerate_with_param_groups():
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    x, y, loader = digits_loader()
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = l2o.GMNOptimizer([{"params": [net[0].weight, net[2].weight], "weight_decay": 1e-4},
                            {"params": [net[0].bias, net[2].bias], "lr": 0.0}], model=net, weights=None)
    biases = [net[0].bias.detach().clone(), net[2].bias.detach().clone()]
    acc = accelerate.Accelerator(cpu=True)
    net, opt, loader = acc.prepare(net, opt, loader)
    for xb, yb in loader:
        opt.zero_grad()
        acc.backward(F.cross_entropy(net(xb), yb))
        opt.step()
    assert torch.equal(net[0].bias, biases[0]) and torch.equal(net[2].bias, biases[1])  # lr 0
    assert len(opt.state_dict()["param_groups"]) == 2


def test_ddp_wrapped_model_recipe(tmp_path):
    """GMNOptimizer(ddp_model) in a one-process gloo group: the gradients DDP
    all-reduces are what the optimizer steps with."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x, y, _ = digits_loader()
        net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        ddp = nn.parallel.DistributedDataParallel(net)
        short = l2o.GMNOptimizer(ddp)  # the README's form: the graph of the module inside
        assert not short.graph.unstructured and list(map(id, short.param_groups[0]["params"])) == list(map(id, net.parameters()))
        opt = l2o.GMNOptimizer(ddp.parameters(), model=ddp)
        assert not opt.graph.unstructured
        before = F.cross_entropy(net(x), y).item()
        for i in range(27):
            opt.zero_grad()
            F.cross_entropy(ddp(x[i * 64:][:64]), y[i * 64:][:64]).backward()
            opt.step()
        assert trains(before, F.cross_entropy(net(x), y).item())
    finally:
        dist.destroy_process_group()

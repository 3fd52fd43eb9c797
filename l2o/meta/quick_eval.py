"""Quick held-out evaluation during meta-training.

Trains one held-out task for ``steps`` inner steps with the current learned
optimizer and with Adam (lr 1e-3, the learned optimizer's nominal starting
point) from the same initialisation on the same batches, and reports the
final and mean training losses of both. Cheap enough to run every few hundred
outer steps; a proper evaluation is ``l2o.evaluate``.
"""
from __future__ import annotations

import torch

from .config import ConfigError, MetaConfig
from .inner import batch_stream, new_run, unroll
from .tasks_pool import TaskPool

EVAL_SEED = 1234
MEASURE = MetaConfig(meta_objective="raw", diverge_factor=float("inf"))   # plain mean loss, never reset


def check_eval_task(name: str) -> None:
    """Refuse, before training starts, an ``eval_task`` the quick evaluation could not
    or must not run: an unknown name (UnknownTaskError, with suggestions), a test
    (heldout) task -- the evaluation picks checkpoints, so it would leak the test
    set into the choice -- or a task whose dataset is missing here."""
    import tasks

    task = tasks.get_task(name)
    if task.split == "heldout":
        raise ConfigError(f"eval_task {name!r} is a test (heldout) task, which must never choose anything; "
                          f"use a validation task such as {sorted(tasks.list_tasks('valid'))[0]!r}")
    if not task.available():
        raise ConfigError(f"eval_task {name!r} needs the {task.dataset} dataset, which is not available here "
                          "(is $L2O_DATA set?)")


@torch.no_grad()
def quick_eval(lopt, pool: TaskPool, task_name: str, steps: int) -> dict[str, float]:
    device = pool.device
    entry = pool.get(f"task:{task_name}")
    run = new_run(pool, f"task:{task_name}", EVAL_SEED, lopt, slot=-1, index=0, length=steps)
    loss0 = run.init_loss
    first = next(batch_stream(entry, run, device))     # the batch new_run took the first gradient on
    model = entry.task.init(EVAL_SEED)                 # Adam starts from the same initialisation
    was_training = lopt.training
    lopt.eval()
    try:
        res = unroll(lopt, run, entry, steps, MEASURE, device, meta=False)
    finally:
        lopt.train(was_training)

    # Adam on the same batches: batch 0 for the first gradient, then the unroll's stream.
    model = model.to(device)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = batch_stream(entry, run, device)
    losses = []
    with torch.enable_grad():
        batch = first
        for i in range(steps + 1):
            loss = entry.task.loss(model, batch)
            if i > 0:
                losses.append(float(loss.detach()))
            if i == steps:
                break
            adam.zero_grad()
            loss.backward()
            adam.step()
            batch = next(stream) if i > 0 else (next(stream), next(stream))[1]
    return {"lopt_final": res.final["last_loss"], "lopt_mean": float(res.meta_loss),
            "adam_final": losses[-1], "adam_mean": sum(losses) / len(losses), "initial": loss0}

"""The training engine: one stage of SGD training under DDP, and evaluation.

Every run is a DDP run (a world of one when started without torchrun). The sample order of
each epoch is drawn identically on every rank and sharded; per-epoch metrics are reduced over
ranks before rank 0 logs them; evaluation counts every image of a split exactly once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ltbench.checkpoint import Interrupted, Progress, Resume, StopVote, apply
from ltbench.config import RecipeConfig, TrainConfig
from ltbench.data import LongTailData, Split, epoch_indices
from ltbench.distributed import Dist
from ltbench.errors import ConfigError, TrainingError
from ltbench.method import Composed, MethodContext
from ltbench.metrics import ClassTally
from ltbench.tracking import RunLog

log = logging.getLogger(__name__)


def lr_factor(epoch: int, recipe: RecipeConfig) -> float:
    """The learning-rate multiplier of 0-based ``epoch``, set once per epoch.

    Linear warm-up ``(epoch + 1) / W`` while ``epoch + 1 <= W``; then either step decay (the
    factor of the last of ``lr_steps`` with ``epoch + 1 > int(step * epochs)``) or a cosine
    from 1 at the end of warm-up to 0 at the end of training.
    """
    warmup = recipe.warmup
    if epoch + 1 <= warmup:
        return (epoch + 1) / warmup
    if recipe.schedule == "cosine":
        progress = (epoch - warmup) / max(1, recipe.epochs - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    factor = 1.0
    for step, step_factor in zip(recipe.lr_steps, recipe.lr_step_factors, strict=True):
        if epoch + 1 > int(step * recipe.epochs):
            factor = step_factor
    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: with weight decay, and those a method marked
    ``param.no_weight_decay = True``."""
    decayed, exempt = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            exempt_ = getattr(parameter, "no_weight_decay", False)
            (exempt if exempt_ else decayed).append(parameter)
    groups = [{"params": decayed, "weight_decay": weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return groups


@dataclass
class Stage:
    """What one stage trains: the method's view of it, its recipe, and what stays frozen."""

    method: Composed
    ctx: MethodContext
    recipe: RecipeConfig
    freeze_backbone: bool = False


class Evaluator:
    """Evaluates a model on one split, each image counted once over all ranks."""

    def __init__(
        self,
        split: Split,
        data: LongTailData,
        dist: Dist,
        settings: TrainConfig,
        batch_size: int,
        recipe: RecipeConfig,
    ) -> None:
        self.split = split
        self.num_classes = data.num_classes
        self.dist = dist
        self.batch_size = batch_size
        self.loader = split.loader(
            train=False,
            recipe=recipe,
            mean=data.mean,
            std=data.std,
            device=dist.device,
            seed=0,
            channels_last=settings.channels_last,
            num_workers=settings.num_workers,
        )

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the split, in batches; every image is in one rank's share."""
        indices = self.dist.shard(torch.arange(len(self.split)), even=False)
        return self.loader.batches(indices, self.batch_size)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> ClassTally:
        was_training = model.training
        model.eval()
        correct = torch.zeros(self.num_classes, dtype=torch.int64, device=self.dist.device)
        total = torch.zeros_like(correct)
        for images, labels in self.batches():
            predictions = model(images).argmax(dim=1)
            total += torch.bincount(labels, minlength=self.num_classes)
            correct += torch.bincount(labels[predictions == labels], minlength=self.num_classes)
        model.train(was_training)
        tally = self.dist.all_reduce_sum(torch.stack([correct, total]))
        return ClassTally(tally[0].cpu(), tally[1].cpu())


def train_stage(
    model: nn.Module,
    data: LongTailData,
    stage: Stage,
    settings: TrainConfig,
    dist: Dist,
    run_log: RunLog,
    seed: int,
    on_eval: Callable[[int], None] | None = None,
    resume: Resume | None = None,
) -> None:
    """Train ``model`` in place for one stage, logging per-epoch metrics with their epoch as
    step; ``on_eval(epoch)`` is called every ``settings.eval_every`` epochs (not the last).

    With ``resume``, the stage continues from its checkpoint when there is one, checkpoints
    after every epoch, and on SIGTERM checkpoints at the next step and raises Interrupted.
    """
    recipe, ctx, method = stage.recipe, stage.ctx, stage.method
    if settings.sync_bn:
        model = sync_batch_norm(model, dist)
    loader = data.train.loader(
        train=True,
        recipe=recipe,
        mean=data.mean,
        std=data.std,
        device=dist.device,
        seed=seed * 1000 + dist.rank,
        channels_last=settings.channels_last,
        num_workers=settings.num_workers,
    )
    loss_fn = method.build_loss(ctx)
    sampling = method.class_sampling(ctx)
    optimizer = torch.optim.SGD(
        param_groups(model, recipe.weight_decay),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
    )
    device_ids = [dist.device.index] if dist.device.type == "cuda" else None
    trained = DistributedDataParallel(model, device_ids=device_ids)
    if settings.compile:
        trained = torch.compile(trained)
    per_rank_batch = max(1, recipe.batch_size // dist.world_size)
    started = time.perf_counter()
    saved = _restore(resume, model, optimizer, dist, run_log)
    vote = StopVote(resume.watch, dist) if resume is not None else None

    for epoch in range(saved["epoch"] if saved else 0, recipe.epochs):
        lr = recipe.lr * lr_factor(epoch, recipe)
        for group in optimizer.param_groups:
            group["lr"] = lr
        method.on_epoch_start(epoch, model, ctx)
        mid_epoch = saved is not None and epoch == saved["epoch"] and saved["step"] > 0
        if mid_epoch:  # loaded after the hook, whose effect the checkpoint already holds
            apply(saved, model, optimizer)
        weights = method.class_weights(epoch, ctx)
        weights = None if weights is None else weights.to(dist.device, torch.float32)
        order = epoch_indices(data.train.labels, data.num_classes, sampling, epoch, seed)
        model.train()
        if stage.freeze_backbone:
            model.backbone.eval()

        totals = torch.zeros(3, dtype=torch.float64, device=dist.device)
        first_bad = torch.full((1,), -1.0, dtype=torch.float64, device=dist.device)
        if mid_epoch:
            totals, first_bad = saved["totals"].to(dist.device), saved["first_bad"].to(dist.device)
        for step, (images, labels) in enumerate(
            loader.batches(dist.shard(order, even=True), per_rank_batch, epoch)
        ):
            if mid_epoch and step < saved["step"]:
                continue  # done before the stop; drawn again so the augmentation stays in step
            if vote is not None and vote.poll():
                resume.save(dist, model, optimizer, Progress(epoch, step, totals, first_bad))
                raise Interrupted(f"stopped on SIGTERM at epoch {epoch + 1}, step {step + 1}")
            if len(labels) < 2:
                continue  # NOTE: BN cannot train on one image; a lone last image is skipped.
            logits = trained(images)
            loss = loss_fn(logits, labels, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            detached = loss.detach()
            first_bad = torch.where(
                (first_bad < 0) & ~torch.isfinite(detached), float(step), first_bad
            )
            totals += torch.stack(
                [
                    detached * len(labels),
                    (logits.detach().argmax(1) == labels).sum(),
                    torch.tensor(len(labels), device=dist.device),
                ]
            ).double()

        check_finite(first_bad, dist, epoch)
        totals = dist.all_reduce_sum(totals)
        metrics = {
            "train_loss": float(totals[0] / totals[2]),
            "train_acc": float(100 * totals[1] / totals[2]),
            "lr": lr,
        }
        if resume is not None:  # saved before logging: a resume re-logs what never got logged
            resume.save(dist, model, optimizer, Progress(epoch + 1, 0, None, None), metrics)
        run_log.log_metrics(metrics, step=epoch + 1)
        if dist.is_main and (epoch + 1 == recipe.epochs or (epoch + 1) % settings.log_every == 0):
            log.info(
                "%s epoch %d/%d: loss %.4f, train acc %.2f%%, lr %.5f (%.1f s)",
                ctx.stage,
                epoch + 1,
                recipe.epochs,
                metrics["train_loss"],
                metrics["train_acc"],
                lr,
                time.perf_counter() - started,
            )
        if (
            on_eval
            and settings.eval_every
            and (epoch + 1) % settings.eval_every == 0
            and (epoch + 1 < recipe.epochs)
        ):
            on_eval(epoch + 1)
        if vote is not None and vote.decided():
            raise Interrupted(f"stopped on SIGTERM after epoch {epoch + 1}")


def _restore(
    resume: Resume | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dist: Dist,
    run_log: RunLog,
) -> dict | None:
    """The checkpoint this stage continues from, if any. One taken at an epoch boundary is
    loaded here (and its epoch's metrics logged if the stop came before they were); one taken
    mid-epoch is loaded in the loop, after that epoch's ``on_epoch_start``."""
    saved = resume.restore(dist) if resume is not None else None
    if saved is None:
        return None
    if saved["step"] == 0:
        apply(saved, model, optimizer)
        if saved["metrics"] and saved["epoch"] not in run_log.logged_steps("train_loss"):
            run_log.log_metrics(saved["metrics"], step=saved["epoch"])
    if dist.is_main:
        log.info("resuming at epoch %d, step %d", saved["epoch"] + 1, saved["step"] + 1)
    return saved


def sync_batch_norm(model: nn.Module, dist: Dist) -> nn.Module:
    """``model`` with its plain BatchNorm layers turned into SyncBatchNorm (batch statistics over
    all ranks). Subclasses of BatchNorm (a method's own layers) keep per-rank statistics."""
    if dist.device.type != "cuda":
        raise ConfigError(
            "train.sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel); "
            "set train.sync_bn=false on the CPU"
        )
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in plain:
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
            elif isinstance(child, nn.modules.batchnorm._BatchNorm) and dist.is_main:
                log.warning("train.sync_bn: %s (%s) keeps per-rank statistics", name, type(child))
    return model


def check_finite(first_bad: torch.Tensor, dist: Dist, epoch: int) -> None:
    """Stop every rank when any rank's loss stopped being finite, naming epoch and step."""
    flags = torch.zeros(dist.world_size, dtype=torch.float64, device=dist.device)
    flags[dist.rank] = first_bad[0] + 1  # 0 means "finite throughout" on that rank
    flags = dist.all_reduce_sum(flags)
    bad = [(int(f) - 1, rank) for rank, f in enumerate(flags.tolist()) if f > 0]
    if bad:
        step, rank = min(bad)
        raise TrainingError(
            f"the loss became NaN or infinite at epoch {epoch + 1}, step {step + 1} (rank {rank});"
            " the run is stopped. Lower recipe.lr, check the data, or check the method's loss"
        )

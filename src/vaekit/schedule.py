"""What changes over a training run: the learning rate and the KL weight of each step, and when to
stop early. Each is a pure function of the step or of metrics.jsonl, so a resumed run follows the
same course as an uninterrupted one."""
from __future__ import annotations

import math

from .config import TrainConfig


class Schedule:
    """The learning rate and the KL warm-up weight at each optimizer step (counted from 0)."""

    def __init__(self, tc: TrainConfig, steps_per_epoch: int) -> None:
        self.tc = tc
        self.total_steps = max(1, tc.epochs * steps_per_epoch)
        self.warmup_steps = tc.warmup_epochs * steps_per_epoch

    @property
    def varies_lr(self) -> bool:
        return self.tc.lr_schedule != "constant"

    def lr(self, step: int) -> float:
        """--lr, or under cosine, --lr down to --lr-final along half a cosine over all the run's steps
        (a resume with more --epochs stretches what is left of it)."""
        if not self.varies_lr:
            return self.tc.lr
        progress = min(max(step, 0) / self.total_steps, 1.0)
        return self.tc.lr_final + 0.5 * (self.tc.lr - self.tc.lr_final) * (1 + math.cos(math.pi * progress))

    def kl_weight(self, step: int) -> float:
        """1.0, or during a warm-up of --warmup-epochs the share of it done: 0 at the first step."""
        if not self.warmup_steps or step >= self.warmup_steps:
            return 1.0
        return step / self.warmup_steps


class EarlyStop:
    """Watches each epoch's validation ELBO (val_elbo in metrics.jsonl): `record` says whether an
    epoch is the best so far, `due` whether `patience` epochs have passed since the best. Built
    from the metrics already written, so a resume knows the run's best."""

    def __init__(self, patience: int, metrics: list[dict]) -> None:
        self.patience, self.best, self.best_epoch, self.last_epoch = patience, -math.inf, 0, 0
        for record in metrics:
            self.record(record)

    def record(self, metrics: dict) -> bool:
        """Takes an epoch's metrics line; True when its validation ELBO is the best so far."""
        if "val_elbo" not in metrics:
            return False
        self.last_epoch = metrics["epoch"]
        if metrics["val_elbo"] > self.best:
            self.best, self.best_epoch = metrics["val_elbo"], metrics["epoch"]
            return True
        return False

    def due(self) -> bool:
        return bool(self.patience) and self.best_epoch > 0 and self.last_epoch - self.best_epoch >= self.patience

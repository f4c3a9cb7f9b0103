"""One training run's settings, built once from the validated params sections and handed whole from the
stage script down to `loop.fit`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tlpipe.config.choices import AUTO


@dataclass(frozen=True)
class TrainSettings:
    """How `loop.fit` trains.

    epochs, batch_size, seed: the stage section's (head, head_aug, finetune); epochs None (finetune.epochs:
      auto): the stage sets it from the training set's size before fitting.
    lr: the rate the model is compiled with (None: fit leaves the optimizer as compiled); a checkpoint
      resumes only under the same one.
    schedule: the section's (constant, cosine): fit sets each epoch's rate (compile.learning_rates);
      None (head has no schedule): the compiled rate throughout. learning_rates: explicit per-epoch
      rates instead (tests, benches).
    warmup_steps: the rate rises linearly over the run's first this many optimizer steps to the epoch's
      rate (callbacks.Warmup); None or 0: none. No param, and no stage sets one: bench/finetune_warmup.py
      measured fine-tuning with one (cats vs dogs: 20 steps, 2 / (1 - rho) after Ma & Yarats, lifted
      validation accuracy after epoch 1 from 59.9% to 79.6%, but the epoch kept after 8 scored 84.5%
      against 86.4% without; docs/results.md).
    resume, keep, patience: params.train's (docs/design.md, "Training: one shape").
    fingerprint: further settings a checkpoint must match (e.g. head.units), besides the data's.
    """

    epochs: int | None
    batch_size: int
    seed: int
    lr: float | None = None
    schedule: str | None = None
    learning_rates: tuple[float, ...] | None = None
    warmup_steps: int | None = None
    resume: bool = False
    keep: str = "best"
    patience: int | None = None
    fingerprint: dict = field(default_factory=dict)

    def __post_init__(self):
        # epochs, batch_size, keep and patience were validated with params.yaml (config); explicit
        # per-epoch rates come only from code (tests, benches), so only they are checked here.
        if self.learning_rates is not None and len(self.learning_rates) != int(self.epochs):
            raise ValueError(f"learning_rates: {len(self.learning_rates)} rates for {self.epochs} epochs")

    @classmethod
    def from_params(cls, section, train=None) -> "TrainSettings":
        """From a stage section (params.head, .head_aug, .finetune: lr, epochs, batch_size, seed and,
        where it has one, schedule) and params.train (resume, keep, patience; None: the defaults)."""
        schedule = getattr(section, "schedule", None)
        extra = {} if train is None else {"resume": bool(train.resume), "keep": str(train.keep),
                                          "patience": train.patience}
        lr = None if section.lr == AUTO else float(section.lr)  # auto: the stage sets it once chosen
        epochs = None if section.epochs == AUTO else int(section.epochs)  # auto: likewise
        return cls(epochs=epochs, batch_size=int(section.batch_size), seed=int(section.seed),
                   lr=lr, schedule=None if schedule is None else str(schedule), **extra)

    def rates(self) -> list[float] | None:
        """The learning rate of each epoch, or None to leave the compiled one."""
        if self.learning_rates is not None:
            return [float(r) for r in self.learning_rates]
        if self.schedule is None:
            return None
        from tlpipe.train.compile import learning_rates

        return learning_rates(self.lr, self.epochs, self.schedule)

    def run_fingerprint(self) -> dict:
        """The settings (besides seed, batch size, keep, patience and the data) a checkpoint must have
        been made under: the rate, a non-constant schedule's epochs (a cosine's rates depend on them) and
        the warm-up."""
        out = {} if self.lr is None else {"lr": float(self.lr)}
        if self.schedule not in (None, "constant"):
            out.update(schedule=self.schedule, epochs=int(self.epochs))
        if self.warmup_steps:
            out.update(warmup_steps=int(self.warmup_steps))
        return {**out, **self.fingerprint}


def budget_epochs(n_train: int, batch_size: int, steps: int, max_epochs: int) -> int:
    """epochs: auto (head_aug, finetune): the epochs that make at least `steps` optimizer steps of
    `batch_size` over `n_train` images, at least 1 and at most `max_epochs`. A budget in steps, not
    epochs: a small set gets the updates it needs (10 batches an epoch would otherwise make a few
    hundred), a large one is not held to more epochs than it needs."""
    steps_per_epoch = math.ceil(int(n_train) / int(batch_size))
    return max(1, min(int(max_epochs), math.ceil(int(steps) / steps_per_epoch)))


def with_budget_epochs(run: TrainSettings, n_train: int, auto_epochs, key: str) -> TrainSettings:
    """`run` with epochs: auto (None) resolved by the stage's `auto_epochs(n_train, batch_size)` (its step
    budget, budget_epochs), and the value logged under the param's name `key` (head_aug.epochs,
    finetune.epochs); `run` itself when its epochs were given."""
    from dataclasses import replace

    from tlpipe.runtime.log import log

    if run.epochs is not None:
        return run
    run = replace(run, epochs=auto_epochs(n_train, run.batch_size))
    log.info(f"{key} auto: {run.epochs} ({n_train} training images, batches of {run.batch_size})")
    return run

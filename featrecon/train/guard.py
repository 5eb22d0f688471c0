"""The divergence guard: a training run never spends its remaining epochs at the floor.

A step whose loss is not finite, or jumps to JUMP times its recent level (an exponential
average over about the last 50 steps), an epoch whose mean loss jumps to JUMP times the
best epoch's so far, or an epoch whose validation PSNR falls DROP_DB below the best so far
(an update late in the epoch can wreck the weights with no step left to see it), is a
blow-up. The run then rolls back to the weights and optimiser state it had at the start of
that epoch and redoes the epoch with the learning rate capped at LR_FACTOR of the largest
rate that epoch used. The cap is a ceiling, not a scale, and a short one: below it the run
follows its own schedule, and once CAP_EPOCHS epochs have passed under it (the redone one
first) it is lifted, so a blow-up near the peak does not leave the rest of the run at a lower
rate (both a scaled schedule and a cap kept until the schedule fell under it cost layer1
holdout PSNR on the QUALITY.md protocol). Should the loss jump again at the full rate, the
next rollback caps it again. Each rollback is logged in one line and recorded in that
epoch's line of metrics.jsonl. The run stops, naming the epoch and the settings to try, with its
last good checkpoint kept, when one epoch has been rolled back MAX_ROLLBACKS times and blows up
again (each redo halves its cap: the rate is not what breaks it), or when the run as a whole has
been rolled back MAX_RUN_ROLLBACKS times. Blow-ups at different epochs that each train through
once capped do not stop it (a layer1 run on random:7 weights in bf16 blew up at epochs 14, 21
and 45 and was training on, benchmarks/QUALITY.md). The guard's state (the cap and the
epochs run under it, the recent level, the rollbacks) is saved in last.pt, so a resumed run
is the uninterrupted one, bit for bit on a CPU. (Runs recorded before the cap scaled the
whole schedule by `lr_scale`; they resume so.)
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import torch

from ..errors import FeatreconError

JUMP = 10.0  # a loss this many times its recent level is a blow-up
DECAY = 0.98  # the recent level: an exponential average, weight 0.02 for the newest step
WARM_STEPS = 20  # steps of a run before its recent level is trusted
DROP_DB = 6.0  # a validation PSNR this far below the best so far is a blow-up
LR_FACTOR = 0.5  # each rollback caps the learning rate at half the largest its epoch used
MAX_ROLLBACKS = 3  # of one epoch: a fourth blow-up of the same epoch stops the run
MAX_RUN_ROLLBACKS = 10  # of the whole run, at any epochs
CAP_EPOCHS = 3  # good epochs under a rollback's cap (the redone one included) before it is lifted


class BlowUp(Exception):
    """A step or epoch whose loss blew up; `where` says which, and with what numbers."""

    def __init__(self, where: str, value: float, reference: float,
                 what: str = "loss {:.4g} against a recent level of {:.4g}"):
        super().__init__(f"{where}: " + what.format(value, reference))
        self.where, self.loss, self.level = where, value, reference


@dataclass
class Guard:
    """The guard's state, saved in last.pt."""

    lr_scale: float = 1.0  # runs recorded before the cap: the schedule's rate times this (new rollbacks leave it)
    lr_cap: float | None = None  # the ceiling the rollbacks put on the learning rate (None: none yet)
    level: float = 0.0  # the recent step loss (exponential average)
    steps: int = 0  # steps seen
    best_epoch_loss: float = math.inf
    rollbacks: list[dict] = field(default_factory=list)  # one record per rollback
    capped_epochs: int = 0  # good epochs run under the current cap

    def epoch_done(self) -> None:
        """A good epoch has ended: the cap is lifted after CAP_EPOCHS of them."""
        if self.lr_cap is not None:
            self.capped_epochs += 1
            if self.capped_epochs >= CAP_EPOCHS:
                self.lr_cap, self.capped_epochs = None, 0

    def bound(self, lr: float) -> float:
        """The learning rate the run uses where its schedule says `lr`."""
        lr *= self.lr_scale
        return lr if self.lr_cap is None else min(lr, self.lr_cap)

    def check_step(self, loss: float, step: int) -> None:
        """Raise BlowUp for a blown-up step loss, else take it into the recent level."""
        if not math.isfinite(loss) or (self.steps >= WARM_STEPS and loss > JUMP * self.level):
            raise BlowUp(f"step {step}", loss, self.level)
        self.level = loss if self.steps == 0 else DECAY * self.level + (1 - DECAY) * loss
        self.steps += 1

    def check_epoch(self, loss: float) -> None:
        """Raise BlowUp for an epoch whose mean loss jumped above the best epoch's, else take it."""
        if not math.isfinite(loss) or loss > JUMP * self.best_epoch_loss:
            raise BlowUp("the epoch's mean", loss, self.best_epoch_loss, "loss {:.4g} against the best epoch's {:.4g}")
        self.best_epoch_loss = min(self.best_epoch_loss, loss)

    def check_validation(self, psnr: float, best: float) -> None:
        """Raise BlowUp for an epoch whose validation PSNR fell far below the best so far."""
        if not math.isfinite(psnr) or psnr < best - DROP_DB:
            raise BlowUp("validation", psnr, best, "PSNR {:.2f} dB against the best epoch's {:.2f} dB")

    def state(self) -> dict:
        return copy.deepcopy(asdict(self))

    @classmethod
    def from_state(cls, state: dict | None) -> Guard:
        """The saved guard of a checkpoint (a run written before the guard: a fresh one)."""
        return cls(**copy.deepcopy(state)) if state else cls()


@dataclass
class Snapshot:
    """What a rollback returns to: the weights, the optimiser and the guard at an epoch's start."""

    model: dict
    optimizer: dict
    guard: dict

    @classmethod
    def take(cls, model: torch.nn.Module, opt: torch.optim.Optimizer, guard: Guard) -> Snapshot:
        return cls({k: v.detach().clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()),
                   guard.state())


def roll_back(snapshot: Snapshot, model: torch.nn.Module, opt: torch.optim.Optimizer, guard: Guard, epoch: int,
              blow_up: BlowUp, epoch_lr: float, out) -> Guard:
    """Restore `snapshot` for a redo of `epoch` (0-based) with the learning rate capped at LR_FACTOR of
    `epoch_lr`, the largest rate the epoch used; the new guard carries every rollback so far. Stops the
    run after MAX_ROLLBACKS of one epoch or MAX_RUN_ROLLBACKS in all."""
    record = {"epoch": epoch + 1, "where": blow_up.where, "loss": blow_up.loss, "level": blow_up.level,
              "lr_cap": LR_FACTOR * epoch_lr}
    rollbacks = [*guard.rollbacks, record]
    this_epoch = sum(r["epoch"] == epoch + 1 for r in rollbacks)
    if this_epoch > MAX_ROLLBACKS or len(rollbacks) > MAX_RUN_ROLLBACKS:
        why = (f"after {MAX_ROLLBACKS} rollbacks of this epoch that capped the learning rate at {epoch_lr:.3g}"
               if this_epoch > MAX_ROLLBACKS else
               f"after {MAX_RUN_ROLLBACKS} rollbacks in this run (at epochs "
               f"{', '.join(str(r['epoch']) for r in guard.rollbacks)})")
        raise FeatreconError(
            f"the loss blew up at epoch {epoch + 1} ({blow_up}) {why}; stopped, the last good checkpoint is kept "
            f"in {out}. Try a lower --lr (e.g. {epoch_lr:.1g}), --grad-clip 0.5, or a longer --warmup (e.g. 0.2)")
    model.load_state_dict(snapshot.model)
    opt.load_state_dict(copy.deepcopy(snapshot.optimizer))
    restored = Guard.from_state(snapshot.guard)
    restored.lr_cap, restored.rollbacks, restored.capped_epochs = record["lr_cap"], rollbacks, 0
    return restored

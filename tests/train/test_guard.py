"""The divergence guard: a blow-up rolls back to the epoch's start and goes on under a lower
learning rate, is recorded, survives a resume bit for bit, and stops the run after a few."""

from __future__ import annotations

import json
import math

import pytest
import torch

from featrecon.errors import FeatreconError
from featrecon.evaluate.config import ScoreConfig
from featrecon.evaluate.scoring import score
from featrecon.train import guard as guard_module
from featrecon.train import loop
from featrecon.train import step as step_module
from featrecon.train.config import TrainConfig
from featrecon.train.guard import CAP_EPOCHS, JUMP, WARM_STEPS, BlowUp, Guard, Snapshot, roll_back
from featrecon.train.loop import fit, train_one_epoch


def tcfg(cache, out, **kw) -> TrainConfig:
    base = dict(layers=("layer1",), epochs=4, batch_size=4, width=32, lr=3e-3, progress=False, eval_samples=8)
    return TrainConfig(cache=cache, out=out, **{**base, **kw})


def rows(out) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_guard_flags_jumps_and_non_finite_losses_only():
    g = Guard()
    for i in range(WARM_STEPS):
        g.check_step(1.0 if i % 2 else 0.5, i)  # noisy, but no blow-up
    g.check_step(0.9 * JUMP * g.level, WARM_STEPS)
    with pytest.raises(BlowUp, match="step 21: loss"):
        g.check_step(1.1 * JUMP * g.level, WARM_STEPS + 1)
    with pytest.raises(BlowUp):
        Guard().check_step(math.nan, 0)  # not finite: from the first step
    g.check_epoch(0.1)
    with pytest.raises(BlowUp, match="epoch's mean"):
        g.check_epoch(1.01)
    assert Guard.from_state(g.state()) == g and Guard.from_state(None) == Guard()


def test_a_rollback_caps_the_rate_at_half_its_epochs_peak_for_a_few_epochs_and_the_schedule_takes_over():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    start = Snapshot.take(model, opt, Guard())
    g = roll_back(start, model, opt, Guard(), 5, BlowUp("step 3", 1e6, 1.0), 2e-3, "out")
    assert g.lr_cap == 1e-3 and g.rollbacks[0]["epoch"] == 6 and g.lr_scale == 1.0
    assert g.bound(3e-3) == 1e-3 and g.bound(5e-4) == 5e-4  # a ceiling: below it, the schedule as it was
    g.epoch_done()  # the redone epoch
    g = roll_back(start, model, opt, g, 6, BlowUp("step 9", 1e6, 1.0), g.bound(3e-3), "out")
    assert g.lr_cap == 5e-4 and len(g.rollbacks) == 2 and g.capped_epochs == 0  # a new cap counts afresh
    for _ in range(CAP_EPOCHS - 1):
        g.epoch_done()
        assert g.lr_cap == 5e-4
    g.epoch_done()
    assert g.lr_cap is None and g.bound(3e-3) == 3e-3 and len(g.rollbacks) == 2  # lifted; the record stays
    assert Guard(lr_scale=0.5).bound(2e-3) == 1e-3  # a run recorded before the cap resumes as it ran
    assert Guard.from_state({k: v for k, v in Guard().state().items() if k != "capped_epochs"}) == Guard()  # older last.pt


def spike_at(monkeypatch, calls_to_spike: set[int]):
    """compute_loss, with the loss of the given calls multiplied by 1e6 (as a blown-up step gives)."""
    real, calls = step_module.compute_loss, {"n": 0}

    def spiking(pred, target, cfg, *rest):
        calls["n"] += 1
        loss = real(pred, target, cfg, *rest)
        return loss * 1e6 if calls["n"] in calls_to_spike else loss

    monkeypatch.setattr(step_module, "compute_loss", spiking)


def test_a_blow_up_rolls_back_redoes_the_epoch_under_a_capped_rate_and_resumes_bit_for_bit(zarr_cache, tmp_path,
                                                                                      monkeypatch):
    spike_at(monkeypatch, {22})  # just after the guard's warm-up of 20 steps
    whole = tmp_path / "whole"
    fit(tcfg(zarr_cache, whole, epochs=10))
    history = rows(whole)
    hit = [r for r in history if r["rollbacks"]]
    assert len(hit) == 1 and hit[0]["rollbacks"][0]["where"].startswith("step ")
    cap, at = hit[0]["lr_cap"], hit[0]["epoch"]
    assert hit[0]["rollbacks"][0]["lr_cap"] == cap and 0 < cap <= 0.5 * 3e-3
    assert at + CAP_EPOCHS <= 10  # the run goes on past the cap
    assert all(r["lr_cap"] == (cap if at <= r["epoch"] < at + CAP_EPOCHS else None) for r in history)
    assert all(r["lr"] <= cap for r in history if at <= r["epoch"] < at + CAP_EPOCHS)
    last = torch.load(whole / "last.pt", weights_only=False)
    assert last["guard"]["lr_cap"] is None and last["guard"]["lr_scale"] == 1.0 and len(last["guard"]["rollbacks"]) == 1
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    # The same run killed after the rollback's epoch and resumed: the same weights and losses.
    spike_at(monkeypatch, {22})
    cut, real = tmp_path / "cut", train_one_epoch

    def killed(step, loader, epoch, *a, **k):
        if epoch == hit[0]["epoch"]:  # 0-based: the epoch after the one that blew up
            raise KeyboardInterrupt
        return real(step, loader, epoch, *a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        fit(tcfg(zarr_cache, cut, epochs=10))
    monkeypatch.setattr(loop, "train_one_epoch", real)
    monkeypatch.setattr(step_module, "compute_loss", step_module.compute_loss)  # no more spikes after the cut
    fit(tcfg(zarr_cache, cut, epochs=10, resume=True))
    resumed = torch.load(cut / "last.pt", weights_only=False)
    for k in last["model"]:
        assert torch.equal(last["model"][k], resumed["model"][k]), k
    assert [(r["loss"], r["lr_cap"]) for r in rows(cut)] == [(r["loss"], r["lr_cap"]) for r in history]  # cap lifted alike


def test_a_learning_rate_far_too_high_for_a_few_steps_is_caught_and_the_run_still_learns(zarr_cache, tmp_path,
                                                                                       monkeypatch, caplog):
    """A real blow-up, through the weights: three steps at a learning rate a thousand times too high,
    the first time the run reaches them."""
    real, seen = step_module.Schedule.lr, set()

    def hot(self, step):
        if 30 <= step < 33 and step not in seen:
            seen.add(step)
            return 0.5
        return real(self, step)

    monkeypatch.setattr(step_module.Schedule, "lr", hot)
    out = tmp_path / "runs" / "hot"
    fit(tcfg(zarr_cache, out, epochs=10))
    history = rows(out)
    assert sum(len(r["rollbacks"]) for r in history) >= 1 and any(r["lr_cap"] is not None for r in history)
    assert "rolled back to the epoch's start" in caplog.text
    last = torch.load(out / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    rep = score(ScoreConfig(cache=zarr_cache, runs=tmp_path / "runs", which="last", out=tmp_path / "rep", split="all",
                            progress=False))
    assert rep["runs"][0]["psnr"]["mean"] > rep["baseline"]["psnr"]["mean"] + 1.0  # learned, not at the floor


def test_blow_ups_that_keep_coming_stop_the_run_in_one_line(zarr_cache, tmp_path, monkeypatch):
    spike_at(monkeypatch, set(range(21, 1000)))  # every step after the warm-up
    with pytest.raises(FeatreconError,
                       match=r"blew up at epoch \d+ .*after 3 rollbacks of this epoch.*kept in .*--lr.*--grad-clip"):
        fit(tcfg(zarr_cache, tmp_path / "r", epochs=10))
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in last["model"].values()) and last["guard"]["lr_cap"] is None


def test_blow_ups_at_different_epochs_that_train_through_do_not_stop_the_run(zarr_cache, tmp_path, monkeypatch):
    """Four blow-ups, each in another epoch and each trained through once capped: more than
    MAX_ROLLBACKS in all, but none of them an epoch that keeps blowing up, so the run finishes."""
    spike_at(monkeypatch, {22, 42, 62, 82})
    out = tmp_path / "r"
    fit(tcfg(zarr_cache, out, epochs=30))
    history = rows(out)
    hit = [r["epoch"] for r in history for _ in r["rollbacks"]]
    assert len(hit) == 4 > guard_module.MAX_ROLLBACKS and len(set(hit)) == 4 and history[-1]["epoch"] == 30


def test_a_run_that_blows_up_at_epoch_after_epoch_stops_after_its_tenth_rollback(zarr_cache, tmp_path, monkeypatch):
    spike_at(monkeypatch, set(range(22, 400, 9)))  # a blow-up every two or three epochs, each trained through
    n = guard_module.MAX_RUN_ROLLBACKS
    with pytest.raises(FeatreconError, match=rf"after {n} rollbacks in this run \(at epochs [\d, ]+\)"
                                             r".*kept in .*--lr.*--grad-clip"):
        fit(tcfg(zarr_cache, tmp_path / "r", epochs=60))
    last = torch.load(tmp_path / "r" / "last.pt", weights_only=False)
    assert len(last["guard"]["rollbacks"]) == n
    assert all(torch.isfinite(v).all() for v in last["model"].values())

"""train-decoder: loader coverage, loss goes down, resume equals uninterrupted, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featrecon.errors import FeatreconError
from featrecon.train.config import TrainConfig
from featrecon.train.loop import fit
from featrecon.train.step import StepSettings, step_settings


def tcfg(cache, out, **kw) -> TrainConfig:
    base = dict(layers=("layer1",), epochs=3, batch_size=4, width=32, lr=3e-3, progress=False, eval_samples=8)
    base.update(kw)
    return TrainConfig(cache=cache, out=out, **base)


def test_a_failed_compile_trains_eagerly_with_one_warning(zarr_cache, tmp_path, monkeypatch, caplog):
    eager = tmp_path / "eager"
    fit(tcfg(zarr_cache, eager, epochs=2, compile="no"))

    def broken_compile(model, *a, **k):
        def fails(*args, **kw):
            raise RuntimeError("inductor: no C++ compiler\nmore detail")
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback = tmp_path / "fallback"
    fit(tcfg(zarr_cache, fallback, epochs=2, compile="yes"))
    warnings = [r.getMessage() for r in caplog.records if "torch.compile of the decoder failed" in r.getMessage()]
    assert warnings == ["torch.compile of the decoder failed (RuntimeError: inductor: no C++ compiler); training eagerly"]
    a, b = (torch.load(p / "last.pt", weights_only=False)["model"] for p in (eager, fallback))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the failed attempt changed nothing


@pytest.mark.parametrize("setting,value,message", [
    ("precision", "fp8", "--precision 'fp8': choose one of auto, bf16, fp32"),
    ("compile", "maybe", "--compile 'maybe': choose one of auto, yes, no"),
])
def test_step_settings_refuse_unknown_choices(zarr_cache, tmp_path, setting, value, message):
    with pytest.raises(FeatreconError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit(tcfg(zarr_cache, tmp_path / "r", **{setting: value}))


@pytest.mark.parametrize("bf16_cpu", [False, True])
def test_cpu_defaults_are_the_measured_ones(monkeypatch, bf16_cpu):
    from featrecon.train import step as step_module
    real = step_module.native_bf16
    monkeypatch.setattr(step_module, "native_bf16", lambda d: bf16_cpu if d.type == "cpu" else real(d))
    cfg = TrainConfig(cache=None, layers=("layer1",), out=None)
    s = step_settings(cfg, torch.device("cpu"))  # bf16 only where the CPU has bf16 instructions
    assert s == StepSettings(autocast=bf16_cpu, channels_last=True, compile=False, fused_adamw=False)
    s = step_settings(cfg, torch.device("cuda"))
    assert s == StepSettings(autocast=True, channels_last=True, compile=True, fused_adamw=True)
    for asked, autocast in (("fp32", False), ("bf16", True)):  # an explicit choice wins on any CPU
        assert step_settings(TrainConfig(cache=None, layers=("layer1",), out=None, precision=asked),
                             torch.device("cpu")).autocast is autocast


def test_native_bf16_reads_the_cpu_probes(monkeypatch):
    from featrecon.device import native_bf16
    for avx512, amx, expect in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert native_bf16(torch.device("cpu")) is expect
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert native_bf16(torch.device("cpu")) is False  # a torch without the probes: fp32, the safe choice
    assert native_bf16(torch.device("cuda")) is True


def test_precision_auto_is_recorded_resolved_and_a_resumed_run_keeps_what_it_trained_with(monkeypatch):
    from featrecon.train import resume
    from featrecon.train.config import left_to_auto
    monkeypatch.setattr(resume, "auto_precision", lambda d: "bf16")
    cfg = TrainConfig(cache=Path("c.zarr"), layers=("layer1",), out=Path("r"))
    auto = left_to_auto(cfg)
    assert "precision" in auto
    cpu = torch.device("cpu")
    assert resume.settled(cfg, auto, None, cpu).precision == "bf16"  # a new run: what this machine does best
    for recorded, expect in (("fp32", "fp32"), ("bf16", "bf16"), ("auto", "fp32")):
        # "auto" was recorded before precision was resolved, when auto meant fp32 on a CPU
        old = {"train_config": {**cfg.to_dict(), "precision": recorded}}
        assert resume.settled(cfg, auto, old, cpu).precision == expect
    old = {"train_config": {**cfg.to_dict(), "precision": "auto"}}
    assert resume.settled(cfg, auto, old, torch.device("cuda")).precision == "bf16"
    explicit = TrainConfig(cache=Path("c.zarr"), layers=("layer1",), out=Path("r"), precision="fp32")
    assert resume.settled(explicit, left_to_auto(explicit), None, cpu).precision == "fp32"


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_grad_clip_bounds_the_gradient_each_step_takes(clip):
    from featrecon.train.step import Schedule, Step, StepSettings

    class OneLayer(torch.nn.Module):  # a decoder's interface: a list of feature maps in, an image out
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 3, 3, padding=1)

        def forward(self, feats):
            return self.conv(feats[0])

    torch.manual_seed(0)
    model = OneLayer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = TrainConfig(cache=Path("unused"), layers=("layer1",), out=Path("unused"), grad_clip=clip)
    step = Step(model, opt, Schedule(1e-3, total=1, warmup=0), cfg, torch.device("cpu"),
                StepSettings(autocast=False, channels_last=False, compile=False, fused_adamw=False))
    step([torch.randn(2, 4, 8, 8) * 10], torch.rand(2, 3, 8, 8))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert (norm <= clip * (1 + 1e-5)) if clip else (norm > 1e-2)


def test_the_feature_loss_is_zero_for_the_original_and_pulls_a_reconstruction_towards_its_features(zarr_cache):
    from featrecon.cache import schema as S
    from featrecon.cache.factory import open_cache
    from featrecon.extract.backbone import FeatureExtractor, rebuild_backbone
    from featrecon.train.step import feature_loss

    with open_cache(zarr_cache) as store:
        meta = store.meta
        images = torch.from_numpy(store.read_rows(S.IMAGES, [0, 1])).float() / 255
        feats = [torch.from_numpy(store.read_rows(S.feature_path("layer2"), [0, 1])).float()]
    encoder = FeatureExtractor(rebuild_backbone(meta), {"layer2": meta.nodes["layer2"]}, meta.preprocessing).eval()
    encoder.requires_grad_(False)
    assert feature_loss(encoder, images, feats).item() < 1e-5  # the cached features are the original's (float16)
    pred = torch.full_like(images, 0.5, requires_grad=True)
    loss = feature_loss(encoder, pred, feats)
    loss.backward()
    assert loss.item() > 0.01 and pred.grad.abs().sum() > 0  # a gradient reaches the pixels
    stepped = (pred - 2 * pred.grad / pred.grad.norm()).detach()  # a small step down the gradient
    assert feature_loss(encoder, stepped, feats).item() < loss.item()

"""The backbone (any torchvision classifier of `models`): weights, preprocessing, fingerprint and
layer capture.

`FeatureExtractor` is the one object that owns layer capture. It is built with
torchvision's `create_feature_extractor`, which traces the model and drops every
node after the deepest requested one, so the forward stops there and no hook
handles need managing. ResNet's ReLUs work in place, which is faster on a CPU
than out-of-place (benchmarks/DESIGN.md); but an in-place ReLU applied to a captured tensor
(say `layer1.0.bn1`, or the `add` before a block's last ReLU) would overwrite it.
`_protect_captured` gives exactly those ReLU calls a copy to work on and leaves
every other one in place. `_fold_batchnorm` folds each BatchNorm into its
convolution, as inference runtimes do. Where a model's graph cannot take these
rewrites, the extractor falls back to the traced graph as it is, with every in-place
op turned off, and says so in one line.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import operator
import socket
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from ..cache.schema import Preprocessing
from ..errors import FeatreconError
from .config import check_weights
from .models import DEFAULT_MODEL, LAYOUT_NOTES, NCHW, NHWC, TOKENS, build, check_size, family_of

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 60


def weights_enum(model_name: str):
    """torchvision's weights enum of a model (IMAGENET1K_V1, ..., DEFAULT)."""
    import torchvision

    return torchvision.models.get_model_weights(model_name)


def named_weights(model_name: str, name: str):
    """The enum member of --weights NAME for this model, or a one-line error listing the model's own."""
    enum = weights_enum(model_name)
    try:
        return enum[name]
    except KeyError:
        raise FeatreconError(f"--weights {name!r}: not a known name nor an existing file; {model_name} has "
                             f"{', '.join([w.name for w in enum] + ['DEFAULT'])}, or give a state-dict path, "
                             "random[:SEED] or auto") from None


def preprocessing_for(weights: str, size: int | None = None, model_name: str = DEFAULT_MODEL) -> Preprocessing:
    """Resize/crop/interpolation of the chosen weights (torchvision's own recipe), scaled to `size`;
    256/224 bilinear for random weights and state-dict files."""
    resize, crop, interpolation = 256, 224, "bilinear"
    if is_named_weights(weights):
        kw = named_weights(model_name, weights).transforms.keywords
        resize, crop = kw.get("resize_size", resize), kw.get("crop_size", crop)
        interpolation = getattr(kw.get("interpolation"), "value", interpolation)
    if size is not None:
        if size < 32:
            raise FeatreconError(f"--size {size}: too small (the networks' coarsest stride is 32); use at least 32")
        resize, crop = round(size * resize / crop), size
    return Preprocessing(resize=resize, crop=crop, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation=interpolation)


def is_named_weights(weights: str) -> bool:
    return weights not in ("auto", "random") and not weights.startswith("random:") and weights.isupper()


def download_state_dict(weights, label: str, alternative: str) -> dict:
    """The state dict of a torchvision weights enum member: from torchvision's cache (torch hub's
    checkpoints folder), downloaded there once, or a one-line error: `label` and what could not be
    downloaded, where to put the file, and the `alternative`."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # never hang on a dead network
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # URLError, timeout, hash mismatch, ...
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise FeatreconError(f"{label}: could not download {weights.url} ({e}); this machine may be offline. Put that "
                             f"file in {hub}, or {alternative}") from None
    finally:
        socket.setdefaulttimeout(old)


def load_state_dict_file(path: Path, flag: str = "--weights") -> dict:
    """A state dict saved with torch.save (a {"state_dict": ...} wrapper and DDP's "module." prefix undone)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FeatreconError(f"{flag} {path}: not a readable torch state-dict file ({e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise FeatreconError(f"{flag} {path}: expected a state dict, found {type(sd).__name__}")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_backbone(model_name: str = DEFAULT_MODEL, weights: str = "auto", size: int = 224) -> tuple[nn.Module, str]:
    """Build a torchvision classifier in eval mode (vision transformers for `size`). Returns the model
    and the weights name to record (what was actually used: `auto` resolves to the model's DEFAULT
    weights or, when they cannot be had, random:0)."""
    family_of(model_name)
    if weights == "auto":
        try:
            return load_backbone(model_name, named_weights(model_name, "DEFAULT").name, size)
        except FeatreconError as e:
            log.warning("%s -- falling back to --weights random:0; the cache records this, "
                        "and its numbers describe a randomly initialised network", e)
            return load_backbone(model_name, "random:0", size)
    check_weights(weights)
    if weights == "random" or weights.startswith("random:"):
        seed_text = weights.partition(":")[2] or "0"
        check_size(model_name, size)
        with torch.random.fork_rng():
            torch.manual_seed(int(seed_text))
            model = build(model_name, size)
        return model.eval(), f"random:{int(seed_text)}"
    if is_named_weights(weights):
        member = named_weights(model_name, weights)
        name = member.name  # DEFAULT -> its own name
        sd = download_state_dict(member, f"--weights {name}", "pass --weights PATH (a state dict saved "
                                 "with torch.save(model.state_dict(), PATH)), or --weights random for a seeded random init")
        size = member.meta.get("min_size", (size,))[0] if family_of(model_name).name == "vit" else size
    else:
        sd, name = load_state_dict_file(Path(weights)), str(Path(weights).resolve())
    check_size(model_name, size)
    model = build(model_name, size)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise FeatreconError(f"--weights {weights}: not a torchvision {model_name} state dict "
                             f"({str(e).splitlines()[0]})") from None
    return model.eval(), name


def fingerprint(model: nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes and bytes), in key order."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def graph_nodes(model: nn.Module) -> list[str]:
    """Every node name torchvision can capture from this model, in forward order."""
    from torchvision.models.feature_extraction import get_graph_node_names

    return get_graph_node_names(model)[1]


def standard_layers(model_name: str, model: nn.Module) -> dict[str, str]:
    """What `--layers all` means for this model: its own stages, {name: node}, shallow to deep."""
    return family_of(model_name).standard_layers(model)


def resolve_layers(spec: str, model: nn.Module, model_name: str = DEFAULT_MODEL) -> dict[str, str]:
    """`all`, or a comma list of the model's standard layer names or any graph node -> {layer name: node},
    shallow to deep."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise FeatreconError("--layers is empty; use all, or a comma list such as layer1,layer3")
    standard = standard_layers(model_name, model)
    if names == ["all"]:
        return dict(standard)
    nodes = graph_nodes(model)
    # A module name (layer2, layer3.1) stands for its last node, as in torchvision.
    order = {}
    for i, n in enumerate(nodes):
        parts = n.split(".")
        for j in range(1, len(parts) + 1):
            order[".".join(parts[:j])] = i
    out = {}
    for name in names:
        node = standard.get(name, name)
        if node not in order:
            raise FeatreconError(
                f"--layers: unknown layer {name!r}; use all, {', '.join(standard)}, "
                f"or a torchvision node name of {model_name} such as {', '.join(nodes[4:9])}, ... ({len(nodes)} in all; "
                "extract-features --layers list shows them)")
        out[name] = node
    return dict(sorted(out.items(), key=lambda kv: order[kv[1]]))


def _traced(model: nn.Module, layers: dict[str, str], inplace: bool = True) -> torch.fx.GraphModule:
    """torchvision's traced graph of a copy of `model` that returns `layers` ({name: node}) and stops at
    the deepest; without `inplace`, every module's in-place flag turned off."""
    from torchvision.models.feature_extraction import create_feature_extractor

    model = copy.deepcopy(model).eval()  # the traced graph shares modules with its model, and folding swaps some
    if not inplace:
        for m in model.modules():
            if getattr(m, "inplace", False):
                m.inplace = False
    return create_feature_extractor(model, return_nodes={node: name for name, node in layers.items()}).eval()


def as_grid(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A captured tensor as (B, C, h, w): NCHW as it is, NHWC transposed, a ViT's (B, 1 + h*w, C) tokens
    without the class token."""
    if layout == NHWC:
        return x.permute(0, 3, 1, 2)
    if layout == TOKENS:
        b, n, c = x.shape
        side = int(round((n - 1) ** 0.5))
        return x[:, 1:].reshape(b, side, side, c).permute(0, 3, 1, 2)
    return x


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _inplace_input(gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor `node` overwrites, if it is an in-place op: a module with `inplace` set (ReLU, SiLU),
    an augmented assignment (`x += y`, as MBConv's residual) or a trailing-underscore method."""
    target = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    if node.op == "call_module":
        return target if getattr(gm.get_submodule(node.target), "inplace", False) else None
    name = getattr(node.target, "__name__", str(node.target))
    if node.op in ("call_function", "call_method") and (
            node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))
            or node.kwargs.get("inplace")):
        return target
    return None


def _protect_captured(gm: torch.fx.GraphModule) -> int:
    """Give every in-place op that would overwrite a returned tensor a copy to work on instead.

    Storage is shared along a chain of in-place ops (bn1, then relu in place), so an op
    is harmful when any node of its input's chain is returned. Returns how many ops
    got a copy."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    returned: set[torch.fx.Node] = set()
    torch.fx.node.map_arg(output.args, returned.add)
    overwrites: dict[torch.fx.Node, torch.fx.Node] = {}  # in-place node -> the node whose storage it reuses
    changed = 0
    for node in list(gm.graph.nodes):
        target = _inplace_input(gm, node)
        if target is None:
            continue
        chain = [target]
        while chain[-1] in overwrites:
            chain.append(overwrites[chain[-1]])
        if returned.intersection(chain):
            with gm.graph.inserting_before(node):
                copy = gm.graph.call_method("clone", (target,))
            node.args = (copy, *node.args[1:])
            target, changed = copy, changed + 1
        overwrites[node] = target
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def _fold_batchnorm(gm: torch.fx.GraphModule) -> int:
    """Fold every eval-mode BatchNorm into the convolution that feeds it.

    One pass over the activations less per BatchNorm (53 in ResNet-50): faster on a CPU
    (benchmarks/DESIGN.md), for a result that differs by about 1e-6 relative, far below
    float16's resolution. A convolution whose own output is captured (or used
    twice) keeps its BatchNorm. Returns how many were folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    folded = 0
    for bn in list(gm.graph.nodes):
        conv = bn.args[0] if bn.op == "call_module" and bn.args else None
        if (not isinstance(conv, torch.fx.Node) or conv.op != "call_module"
                or not isinstance(gm.get_submodule(bn.target), nn.BatchNorm2d)
                or not isinstance(gm.get_submodule(conv.target), nn.Conv2d)
                or len(conv.users) != 1 or calls[conv.target] != 1 or calls[bn.target] != 1):
            continue
        fused = fuse_conv_bn_eval(gm.get_submodule(conv.target), gm.get_submodule(bn.target))
        parent, _, name = conv.target.rpartition(".")
        setattr(gm.get_submodule(parent), name, fused)
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        folded += 1
    if folded:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return folded


class FeatureExtractor(nn.Module):
    """uint8 images (B, 3, H, W) in, {layer: (B, C, h, w)} out; normalisation on the device.

    The traced graph ends at the deepest requested node, so asking for layer1 costs
    only the stem and layer1. BatchNorms are folded into their convolutions and
    ReLUs work in place wherever that cannot change a captured value. Every layer comes
    out as a (C, h, w) grid, whatever the model's own layout (see `models`)."""

    def __init__(self, model: nn.Module, layers: dict[str, str], pre: Preprocessing,
                 channels_last: bool = True, autocast: str = "none", model_name: str = DEFAULT_MODEL):
        super().__init__()
        self.layers = dict(layers)
        family = family_of(model_name)
        self.layouts = {name: family.layout(node) for name, node in self.layers.items()}
        try:
            self.body = _traced(model, self.layers)
            self.folded = _fold_batchnorm(self.body)
            _protect_captured(self.body)
        except Exception as e:  # a graph the rewrites do not understand: the plain forward, nothing in place
            why = str(e).splitlines()[0][:200] if str(e) else ""
            log.warning("%s: the forward's graph rewrites do not apply (%s: %s); the traced forward runs as it is, "
                        "with in-place ops off", model_name, type(e).__name__, why)
            self.body, self.folded = _traced(model, self.layers, inplace=False), 0
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255)
        self.channels_last = channels_last
        if autocast not in ("none", "bf16", "fp16"):
            raise FeatreconError(f"--autocast {autocast!r}: choose none, bf16 or fp16")
        self.autocast = autocast
        self.autocast_cache = True  # off while a CUDA graph is captured (autocast's cache breaks graphs)
        if channels_last:
            self.body = self.body.to(memory_format=torch.channels_last)

    def layout_notes(self) -> dict[str, str]:
        """{layer: how it is stored} for the layers not captured as (C, H, W) maps."""
        return {name: LAYOUT_NOTES[layout] for name, layout in self.layouts.items() if layout != NCHW}

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> the network's input: torchvision's normalisation, in the chosen memory layout."""
        x = (images.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def precision(self, device_type: str):
        """The autocast context of the chosen --autocast (disabled for none)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.autocast)
        return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None,
                              cache_enabled=self.autocast_cache)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.features(images)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The forward without its inference-mode wrapper, for torch.compile to trace."""
        x = self.prepare(images)
        with self.precision(x.device.type):
            out = self.body(x)
        out = {k: as_grid(v, self.layouts.get(k, NCHW)) for k, v in out.items()}
        return out if self.autocast == "none" else {k: v.float() for k, v in out.items()}

    def layer_shapes(self, size: int) -> dict[str, list[int]]:
        """[C, H, W] of every captured layer for a size x size input."""
        dev = self.mean.device
        out = self.forward(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=dev))
        return {k: list(v.shape[1:]) for k, v in out.items()}


def rebuild_backbone(meta):
    """The backbone a cache records (its `CacheMeta`), as a torchvision model in eval mode, checked against
    the cache's fingerprint; or a FeatreconError saying why it cannot be rebuilt."""
    model, _ = load_backbone(meta.backbone, meta.weights, meta.preprocessing.crop)
    if fingerprint(model) != meta.weights_fingerprint:
        raise FeatreconError(f"the weights {meta.weights} are not the ones the cache was made with (their "
                             "fingerprint differs)")
    return model

"""What the cache's own backbone makes of a reconstruction: its top-1 class (against the
label, and against the original image's top-1) and its features, compared with the cached
features of the decoded layer and of every deeper cached layer (Mahendran & Vedaldi's
question: how close are the reconstruction's features to the target's?).

The backbone is rebuilt from what the cache records (weights, nodes, preprocessing) and
checked against its fingerprint; when it cannot be rebuilt (a state-dict file that is gone,
pretrained weights offline), `Judge.why` says which metrics are left out and why.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..cache.schema import CacheMeta
from ..errors import FeatreconError
from ..extract.backbone import FeatureExtractor, rebuild_backbone
from ..extract.models import classifier_node

log = logging.getLogger(__name__)
LOGITS = "logits"  # the classifier's output, captured beside the cached layers


class Judge:
    """Top-1 and feature fidelity of reconstructions under the cache's backbone."""

    def __init__(self, meta: CacheMeta, device: torch.device | None = None, model=None):
        self.meta, self.device, self.extractor, self.why = meta, device or torch.device("cpu"), None, ""
        self._original_top1: dict[int, int] = {}
        try:
            model = model if model is not None else rebuild_backbone(meta)
        except FeatreconError as e:
            self.why = f"the cache's backbone cannot be rebuilt: {e}"
            log.warning("top-1 and feature fidelity left out: %s", self.why)
            return
        nodes = {**meta.nodes, LOGITS: classifier_node(model)}
        self.extractor = FeatureExtractor(model, nodes, meta.preprocessing, channels_last=True,
                                          autocast=meta.autocast, model_name=meta.backbone).to(self.device)

    @property
    def available(self) -> bool:
        return self.extractor is not None

    def layers_for(self, decoded: list[str]) -> list[str]:
        """The cached layers a decoder of `decoded` is judged at: those and every deeper one."""
        order = list(self.meta.layers)
        return order[min(order.index(l) for l in decoded):]

    @torch.no_grad()
    def judge(self, pred: torch.Tensor, target: torch.Tensor, indices: np.ndarray, labels: np.ndarray,
              cached: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Per-image metrics of [0, 1] reconstructions `pred` of samples `indices` (their originals
        `target`): "top1_correct" (NaN where the label is unknown), "top1_agreement" with the original's
        top-1, and for each layer of `cached` ({layer: (B, C, h, w) stored features})
        "rel_l2/<layer>" (||f(pred) - f|| / ||f||) and "cosine/<layer>"."""
        if self.extractor is None:
            return {}
        out = self.extractor(pred.to(self.device).float() * 255)  # the network's input from [0, 1] pixels
        top1 = out[LOGITS].argmax(1).cpu().numpy()
        todo = [j for j, i in enumerate(indices.tolist()) if i not in self._original_top1]
        if todo:
            orig = self.extractor(target[todo].to(self.device).float() * 255)[LOGITS].argmax(1).cpu().numpy()
            self._original_top1.update({int(indices[j]): int(c) for j, c in zip(todo, orig)})
        result = {"top1_correct": np.where(labels >= 0, (top1 == labels).astype(np.float64), np.nan),
                  "top1_agreement": (top1 == np.array([self._original_top1[int(i)] for i in indices])).astype(np.float64)}
        for layer, want in cached.items():
            got = out[layer].float().flatten(1).cpu().double()
            ref = want.float().flatten(1).cpu().double()
            result[f"rel_l2/{layer}"] = ((got - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).numpy()
            result[f"cosine/{layer}"] = torch.nn.functional.cosine_similarity(got, ref, dim=1).numpy()
        return result

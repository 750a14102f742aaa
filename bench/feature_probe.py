"""Is a weak Omni-Seg tissue the head's fault or the shared features'? A probe on frozen features.

Omni-Seg's heads read the 8 decoder channels that every tissue shares. For each tissue, this bench
freezes a trained model, fits a fresh network of the head's shape (``8->8, ReLU, 8->8, ReLU,
8->2``, one fixed head, no controller) on that tissue's training patches, pixel by pixel
(cross-entropy, Adam), and prints the test and train Dice (%, an empty mask predicted empty
scores 100) of the model's own head and of the probe. A probe well above the own head: the
information is in the features, the generated head misses it. A probe no better: the features
do not hold it, and no head or controller change can recover it::

    python bench/feature_probe.py results/models/omniseg/all/model.pt [MODEL ...]
        [--patches results/patches] [--tissues dt ves] [--steps 1500] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from omniseg.checkpoint import load_model
from omniseg.data.patchset import read_patch_set
from omniseg.metrics import dice_batch
from omniseg.models.omniseg import OmniSeg
from omniseg.tissues import TissueTable

REPO = Path(__file__).resolve().parents[1]


def _batches(x: Tensor, size: int = 16):
    return (x[i : i + size] for i in range(0, len(x), size))


def features_and_own(model: OmniSeg, images: np.ndarray, tissue: int) -> tuple[Tensor, Tensor]:
    """Decoder features ``(N, c, H, W)`` and the model's own foreground ``(N, H, W)`` bool."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    feats, own = [], []
    with torch.inference_mode():
        for b in _batches(x):
            ids = torch.full((len(b),), tissue, dtype=torch.long)
            feats.append(model.encode(b, ids)[0])
            own.append(model.predict_proba(b, [tissue])[:, 0] > 0.5)
    return torch.cat(feats), torch.cat(own)


def fit_probe(feats: Tensor, masks: Tensor, steps: int, seed: int) -> nn.Module:
    """A head-shaped MLP fitted on the pixels of ``feats`` ``(N, c, H, W)`` against ``masks``."""
    torch.manual_seed(seed)
    c = feats.shape[1]
    probe = nn.Sequential(nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c), nn.ReLU(), nn.Linear(c, 2))
    pixels = feats.permute(0, 2, 3, 1).reshape(-1, c)
    labels = masks.reshape(-1).long()
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(pixels), (8192,))
        loss = nn.functional.cross_entropy(probe(pixels[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe


def probe_tissue(model: OmniSeg, patch_set: Path, tissue: int, steps: int, seed: int) -> dict:
    data = read_patch_set(patch_set)
    split = data["meta"]["split"].to_numpy()
    feats, own = features_and_own(model, data["images"], tissue)
    masks = torch.from_numpy(data["masks"] > 0)
    train = torch.from_numpy(split == "train")
    probe = fit_probe(feats[train], masks[train], steps, seed)
    with torch.inference_mode():
        probed = probe(feats.permute(0, 2, 3, 1)).argmax(dim=-1) == 1
    row = {}
    for name in ("test", "train"):
        sel = torch.from_numpy(split == name)
        gt = masks[sel].numpy()
        row[f"own_{name}"] = round(float(dice_batch(own[sel].numpy(), gt).mean()), 1)
        row[f"probe_{name}"] = round(float(dice_batch(probed[sel].numpy(), gt).mean()), 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="Omni-Seg model files")
    p.add_argument("--patches", type=Path, default=REPO / "results" / "patches")
    p.add_argument("--tissues", nargs="*", default=None, help="tissue keys (default: all)")
    p.add_argument("--steps", type=int, default=1500, help="Adam steps of 8192 pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    result = {}
    for path in a.models:
        model, meta = load_model(path)
        if not isinstance(model, OmniSeg):
            p.error(f"{path} is a {type(model).__name__}, not an Omni-Seg model")
        tissues = TissueTable.from_records(meta["tissues"])
        keys = a.tissues or list(tissues.keys)
        unknown = sorted(set(keys) - set(tissues.keys))
        if unknown:
            p.error(f"{path} has no tissue {', '.join(unknown)}; it has {', '.join(tissues.keys)}")
        result[str(path)] = {
            t.key: probe_tissue(model.eval(), a.patches / f"{t.key}.h5", t.id, a.steps, a.seed)
            for t in tissues
            if t.key in keys
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

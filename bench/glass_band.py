"""Does a model's answer on tissue change when glass lies beside it in the same tile?

Slide tiles at a biopsy's edge show glass next to tissue: a 5x tile (128 px, 256 um) of a
needle biopsy 200-400 um wide almost always does. This bench takes each tissue's test patches,
keeps the left ``--keep`` share of every patch as it is and paints the rest with bare glass
(the synthetic renderer's glass colour and noise), and scores the head of that tissue on the
kept pixels only, with and without the glass beside them. The same pixels go through the same
network twice; only their neighbours change. A network that never saw glass in training can
mislabel the tissue of such tiles (the demo's Omni-Seg before ``data.synthetic.edge_fraction``:
its tuft head marked 65% of the kept half instead of 10%).

Prints one JSON object: per model and tissue the Dice (%) on the kept pixels without and with
the glass band, the share of kept pixels predicted foreground in each case and the Dice
between the two predictions (100: glass changes nothing)::

    python bench/glass_band.py results/models/omniseg/all/model.pt [MODEL ...]
        [--patches results/patches] [--keep 0.6] [--threads 1]

A per-tissue method (``results/models/multi_unet/{tissue}/model.pt``) is given as its folder
``results/models/multi_unet``: each tissue's own network is used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from omniseg.checkpoint import load_model
from omniseg.data.patchset import read_patch_set
from omniseg.metrics import dice_batch
from omniseg.synthetic.render import GLASS_RGB
from omniseg.synthetic.slide import GLASS_SIGMA
from omniseg.tissues import TissueTable

REPO = Path(__file__).resolve().parents[1]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice (%) of all the pixels of a stack of masks pooled (100 when both are empty)."""
    return float(dice_batch(a[None], b[None])[0])


def glass_band(images: np.ndarray, keep: int, seed: int = 0) -> np.ndarray:
    """``images`` ``(N, H, W, 3)`` uint8 with columns ``keep:`` painted as bare glass."""
    out = images.copy()
    rng = np.random.default_rng(seed)
    band = out[:, :, keep:]
    noise = rng.normal(0.0, GLASS_SIGMA, band.shape[:3])[..., None]
    out[:, :, keep:] = np.clip(np.rint(np.asarray(GLASS_RGB) + noise), 0, 255).astype(np.uint8)
    return out


def _model_for(path: Path, key: str, tissues: TissueTable) -> torch.nn.Module:
    file = path / key / "model.pt" if path.is_dir() else path
    model, _meta = load_model(file, tissues)
    return model.eval()


def check(path: Path, patches: Path, tissues: TissueTable, keep_share: float) -> dict:
    out = {}
    for t in tissues:
        test = read_patch_set(patches / f"{t.key}.h5", "test")
        images, masks = test["images"], test["masks"] > 0
        keep = int(round(images.shape[2] * keep_share))
        model = _model_for(path, t.key, tissues)
        preds = []
        for variant in (images, glass_band(images, keep)):
            x = torch.from_numpy(variant).permute(0, 3, 1, 2).float().div_(255.0)
            with torch.inference_mode():
                prob = model.predict_proba(x, [t.id])[:, 0].float().numpy()
            preds.append(prob[:, :, :keep] > 0.5)
        truth = masks[:, :, :keep]
        plain, glass = preds
        out[t.key] = {
            "dice_plain": round(_dice(plain, truth), 1),
            "dice_glass": round(_dice(glass, truth), 1),
            "fg_share_plain": round(float(plain.mean()), 3),
            "fg_share_glass": round(float(glass.mean()), 3),
            "fg_share_truth": round(float(truth.mean()), 3),
            "agreement": round(_dice(plain, glass), 1),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="model files or per-tissue folders")
    p.add_argument("--patches", type=Path, default=REPO / "results" / "patches")
    p.add_argument("--tissues", type=Path, default=REPO / "config" / "tissues.tsv")
    p.add_argument("--keep", type=float, default=0.6, help="share of columns kept (0-1)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if not 0 < a.keep < 1:
        p.error(f"--keep must be in (0, 1), got {a.keep}")
    torch.set_num_threads(a.threads)
    tissues = TissueTable.from_tsv(a.tissues)
    result = {str(m): check(m, a.patches, tissues, a.keep) for m in a.models}
    print(json.dumps({"keep": a.keep, "models": result}, indent=1))


if __name__ == "__main__":
    main()

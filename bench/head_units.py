"""Which hidden units of Omni-Seg's dynamic heads ever fire, per tissue, on its test patches?

Each generated head is ``1x1 conv 8->8, act, 1x1 conv 8->8, act, 1x1 conv 8->2``. One controller
bias is shared by every tissue's head, so a ReLU unit pushed below 0 on all pixels is dead for
every tissue at once and gets no gradient back; a head with few live units is nearly linear and
its tissues' heads resemble each other. This bench runs each tissue's head on that tissue's test
patches (``results/patches``) and prints, per model and tissue, the share of pixels on which
each hidden unit is positive, layer by layer, how many units never are (dead) or are on
fewer than 1% of the pixels, and the share of pixels predicted foreground::

    python bench/head_units.py results/models/omniseg/all/model.pt [MODEL ...]
        [--patches results/patches] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from omniseg.checkpoint import load_model
from omniseg.data.patchset import read_patch_set
from omniseg.models.omniseg import OmniSeg, head_hidden
from omniseg.tissues import TissueTable

REPO = Path(__file__).resolve().parents[1]


def units(model: OmniSeg, patches: Path, tissues: TissueTable) -> dict:
    out = {}
    for t in tissues:
        images = read_patch_set(patches / f"{t.key}.h5", "test")["images"]
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        with torch.inference_mode():
            ids = torch.full((len(x),), t.id, dtype=torch.long)
            features, bottleneck = model.encode(x, ids)
            params = model.controller_params(bottleneck, ids)
            hidden = head_hidden(features, params, model.head_negative_slope)
            fg = model.predict_proba(x, [t.id])[:, 0] > 0.5
        row = {}
        for i, h in enumerate(hidden, start=1):
            share = (h > 0).float().mean(dim=(0, 2, 3))
            row[f"layer{i}_active_share"] = [round(float(v), 3) for v in share]
            row[f"layer{i}_dead"] = int((share == 0).sum())
            row[f"layer{i}_under_1pct"] = int((share < 0.01).sum())
        row["fg_share"] = round(float(fg.float().mean()), 3)
        out[t.key] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="Omni-Seg model files")
    p.add_argument("--patches", type=Path, default=REPO / "results" / "patches")
    p.add_argument("--tissues", type=Path, default=REPO / "config" / "tissues.tsv")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tissues = TissueTable.from_tsv(a.tissues)
    result = {}
    for path in a.models:
        model, _meta = load_model(path, tissues)
        if not isinstance(model, OmniSeg):
            p.error(f"{path} is a {type(model).__name__}, not an Omni-Seg model")
        result[str(path)] = units(model.eval(), a.patches, tissues)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

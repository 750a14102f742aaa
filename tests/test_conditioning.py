"""Omni-Seg's tissue code conditions its heads: two tissues that contradict each other on the same
images get different heads, each following its own labels.

The toy tissues elsewhere in the suite share one labelling rule, so a model that ignored the
tissue code would pass them. Here tissue 0 and tissue 1 see the *same* images with contradicting
labels (tissue 0: the bright disc; tissue 1: its complement, or nothing at all), so only the
tissue code can tell the two heads apart. The same training with the one-hot code zeroed must
fail the same criterion: that shows the criterion can fail.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import omniseg.models.omniseg as omniseg_module
from omniseg.models import build_model
from omniseg.partial_labels import loss_for
from omniseg.train import make_optimizer, merge_config

SIZE = 32
STEPS = 60


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def discs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy images ``(n, 3, S, S)`` in [0, 1], each with one bright disc, and its mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.4
    masks = torch.zeros(n, 1, SIZE, SIZE)
    for i in range(n):
        cy, cx = torch.randint(8, SIZE - 8, (2,), generator=g).tolist()
        r = int(torch.randint(4, 8, (1,), generator=g))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        masks[i, 0] = disc.float()
        images[i, :, disc] += 0.5
    return images.clamp(0, 1), masks


def label_of_tissue_1(masks: torch.Tensor, rule: str) -> torch.Tensor:
    """Tissue 1 contradicts tissue 0 (whose label is the disc) on every disc pixel."""
    return 1 - masks if rule == "complement" else torch.zeros_like(masks)


def train_two_tissues(
    rule: str, kind: str = "omniseg", steps: int = STEPS, image_conditioning: bool = True
):
    """A tiny Omni-Seg trained on both tissues' labels of the same images; test predictions."""
    torch.manual_seed(0)
    images, masks = discs(16, seed=0)
    model = build_model("omniseg", num_tissues=2, width=8, image_conditioning=image_conditioning)
    cfg = merge_config({"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0})
    optimizer = make_optimizer(model, cfg)
    loss_fn = loss_for(model.output_kind)  # the project's binary strategy
    tissue = torch.tensor([0, 0, 1, 1])
    for _ in range(steps):
        idx = torch.randint(0, len(images), (2,))
        x = torch.cat([images[idx], images[idx]])  # the same two images for both tissues
        y = torch.cat([masks[idx], label_of_tissue_1(masks[idx], rule)])
        loss = loss_fn(model, x, y, tissue, kind=kind)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    test_images, test_masks = discs(8, seed=1)
    model.eval()
    with torch.no_grad():
        prob = model.predict_proba(test_images, [0, 1])  # the inference path: all heads at once
    return prob[:, 0], prob[:, 1], test_masks[:, 0], label_of_tissue_1(test_masks, rule)[:, 0]


def separation(p0, p1, y0, y1) -> dict[str, float]:
    """On the pixels where the two tissues' labels contradict: how far apart the heads are, and
    each head's mean error against its own labels and against the other tissue's."""
    c = y0 != y1
    return {
        "apart": float((p0 - p1).abs()[c].mean()),
        "err0_own": float((p0 - y0).abs()[c].mean()),
        "err0_other": float((p0 - y1).abs()[c].mean()),
        "err1_own": float((p1 - y1).abs()[c].mean()),
        "err1_other": float((p1 - y0).abs()[c].mean()),
    }


def separated(s: dict[str, float]) -> bool:
    """The heads differ substantially and each follows its own tissue's labels."""
    return (
        s["apart"] > 0.6
        and s["err0_own"] < 0.25 < s["err0_other"]
        and s["err1_own"] < 0.25 < s["err1_other"]
    )


@pytest.mark.parametrize("kind", ["omniseg", "authors"])
@pytest.mark.parametrize("rule", ["complement", "empty"])
def test_contradicting_tissues_get_different_heads(rule, kind):
    s = separation(*train_two_tissues(rule, kind))
    assert separated(s), s


@pytest.mark.parametrize("rule", ["complement", "empty"])
def test_heads_of_the_code_alone_separate_too(rule):
    # image_conditioning=False: the controller reads only the tissue code
    s = separation(*train_two_tissues(rule, image_conditioning=False))
    assert separated(s), s


def test_without_the_tissue_code_the_heads_cannot_separate(monkeypatch):
    # Break the conditioning inside the model: its one-hot tissue code is all zeros, so every
    # tissue gets the same head. The criterion above must then fail. (If the model stops
    # building its code with F.one_hot, "apart" stays large here: update the patch.)
    def zero_one_hot(tensor, num_classes=-1):
        return torch.zeros_like(F.one_hot(tensor, num_classes))

    broken_f = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
    broken_f.one_hot = zero_one_hot
    monkeypatch.setattr(omniseg_module, "F", broken_f)
    p0, p1, y0, y1 = train_two_tissues("complement")
    s = separation(p0, p1, y0, y1)
    assert s["apart"] < 0.05, s  # one head for both tissues
    assert not separated(s), s

"""Tests of the partial-label strategies: hand-made cases for what each loss must ignore."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from omniseg import partial_labels as pl
from omniseg.losses import authors_dice_bce_loss, dice_bce_loss
from omniseg.models import build_model

torch.set_num_threads(1)

OPTIONS = {"boundary_weight", "ring_width", "dice_weight", "bce_weight", "kind", "dice"}


def disc_masks(batch: int = 2, size: int = 16) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    masks = torch.zeros(batch, 1, size, size)
    for b in range(batch):
        c = size / 2 + b - 1
        masks[b, 0] = ((yy - c) ** 2 + (xx - c) ** 2 <= (size / 4) ** 2).float()
    return masks


def random_logits(batch=2, classes=4, size=16, seed=0) -> torch.Tensor:
    return torch.randn(batch, classes, size, size, generator=torch.Generator().manual_seed(seed))


# -- strategy lookup ----------------------------------------------------------------------------
def test_loss_for_names():
    assert pl.loss_for("binary") is pl.binary_loss
    assert pl.loss_for("tal") is pl.tal_loss
    assert pl.loss_for("multiclass") is pl.multiclass_loss
    assert pl.loss_for(None) is pl.binary_loss
    assert pl.loss_for("marginal") is pl.tal_loss
    assert pl.loss_for(" Naive ") is pl.multiclass_loss
    assert set(pl.STRATEGIES) == {"binary", "tal", "multiclass"}
    with pytest.raises(ValueError, match="known: binary, tal, multiclass"):
        pl.loss_for("dice")


@pytest.mark.parametrize("name", sorted(pl.STRATEGIES))
def test_strategies_take_the_training_loss_options(name):
    # train.py passes config["loss"] as keywords and checks them against keyword-only params.
    params = inspect.signature(pl.STRATEGIES[name]).parameters
    keyword_only = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    # binary_loss also takes the implied-label relations, which the trainer sets
    assert keyword_only - set(pl.IMPLIED_OPTIONS) == OPTIONS
    assert (keyword_only & set(pl.IMPLIED_OPTIONS)) == (
        set(pl.IMPLIED_OPTIONS) if name == "binary" else set()
    )
    assert list(params)[:4] == ["model", "images", "masks", "tissue"]


def test_strategy_refuses_the_wrong_output_kind():
    x, masks, tissue = torch.rand(1, 3, 32, 32), disc_masks(1, 32), torch.zeros(1, dtype=torch.long)
    unet = build_model("unet", width=2)
    multi = build_model("multiclass", width=2)
    for name in ("tal", "multiclass"):
        with pytest.raises(ValueError, match="multiclass output"):
            pl.loss_for(name)(unet, x, masks, tissue)
    with pytest.raises(ValueError, match="binary output"):
        pl.loss_for("binary")(multi, x, masks, tissue)


def test_marginal_log_probs_are_one_minus_pk_and_pk():
    logits, tissue = random_logits(), torch.tensor([0, 2])
    two = pl.marginal_log_probs(logits, tissue)
    p = logits.softmax(1)
    pk = torch.stack([p[0, 1], p[1, 3]])
    assert two.shape == (2, 2, 16, 16)
    torch.testing.assert_close(two[:, 1].exp(), pk)
    torch.testing.assert_close(two[:, 0].exp(), 1 - pk)
    torch.testing.assert_close(two.softmax(1), two.exp())  # valid 2-class logits


def test_marginal_is_stable_where_pk_is_one():
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 2] = 200.0  # p_k = 1 - 2e-87: 1 - p_k underflows in float32
    two = pl.marginal_log_probs(logits, torch.tensor([1]))
    assert torch.isfinite(two).all()
    torch.testing.assert_close(two[:, 0], torch.full((1, 2, 2), -200.0 + math.log(2)))
    loss = pl.tal_loss_from_logits(
        logits.requires_grad_(), torch.zeros(1, 1, 2, 2), torch.tensor([1])
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def move_mass(logits: torch.Tensor, tissue: torch.Tensor, other: int) -> torch.Tensor:
    """Logits where, in every pixel, probability moves between background and tissue ``other``
    (``other != k``) and nothing else changes."""
    p = logits.softmax(1).clone()
    share = torch.linspace(0.1, 0.9, p.shape[-1])  # per column, how much of p_other moves
    for b in range(len(tissue)):
        assert other != int(tissue[b])
        delta = p[b, other + 1] * share
        p[b, other + 1] -= delta
        p[b, 0] += delta
    return p.log()


def test_tal_ignores_mass_moving_between_background_and_another_tissue():
    logits, tissue, masks = random_logits(), torch.tensor([0, 2]), disc_masks()
    moved = move_mass(logits, tissue, other=1)
    assert not torch.allclose(moved.softmax(1), logits.softmax(1), atol=1e-3)
    torch.testing.assert_close(
        pl.tal_loss_from_logits(moved, masks, tissue),
        pl.tal_loss_from_logits(logits, masks, tissue),
    )
    # The naive loss counts tissue 1 in background pixels as an error: moving its mass to
    # background lowers the loss.
    naive_before = pl.naive_loss_from_logits(logits, masks, tissue)
    naive_after = pl.naive_loss_from_logits(moved, masks, tissue)
    assert naive_after < naive_before - 1e-3


def test_tal_gradient_on_other_classes_is_proportional_to_their_share():
    logits = random_logits(seed=1).requires_grad_()
    tissue, masks = torch.tensor([1, 0]), disc_masks()
    pl.tal_loss_from_logits(logits, masks, tissue).backward()
    p = logits.detach().softmax(1)
    for b, k in enumerate(tissue.tolist()):
        others = [c for c in range(4) if c != k + 1]
        ratio = logits.grad[b, others] / p[b, others]  # (3, H, W): one factor per pixel
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-4, atol=1e-7)
        assert ratio.abs().max() > 0
    # The naive loss pushes background up and other tissues down: not proportional.
    logits.grad = None
    pl.naive_loss_from_logits(logits, masks, tissue).backward()
    ratio = logits.grad[0, [0, 1, 3]] / p[0, [0, 1, 3]]
    assert not torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-2)


def test_with_one_tissue_tal_and_naive_are_the_binary_loss():
    logits, tissue, masks = random_logits(classes=2), torch.zeros(2, dtype=torch.long), disc_masks()
    ref = dice_bce_loss(logits, masks)
    torch.testing.assert_close(pl.tal_loss_from_logits(logits, masks, tissue), ref)
    torch.testing.assert_close(pl.naive_loss_from_logits(logits, masks, tissue), ref)


# -- naive multi-class --------------------------------------------------------------------------
def test_naive_target():
    masks = torch.zeros(2, 1, 2, 3)
    masks[0, 0, 0, 1] = masks[1, 0, 1, 2] = 1
    target = pl.naive_target(masks, torch.tensor([4, 0]))
    assert target.dtype == torch.int64
    assert target.tolist() == [[[0, 5, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 1]]]


def test_naive_loss_closed_form_for_uniform_logits():
    # All-zero logits over C classes: CE = log C in every pixel whatever its weight; the soft Dice
    # of p = 1/C against a mask of m pixels in N is (2 m / C + 1) / (N / C + m + 1).
    c, masks = 5, disc_masks(1, 16)
    m, n = float(masks.sum()), 16 * 16
    dice = (2 * m / c + 1) / (n / c + m + 1)
    for bw in (1.0, 1.2, 3.0):
        loss = pl.naive_loss_from_logits(
            torch.zeros(1, c, 16, 16), masks, torch.tensor([2]), boundary_weight=bw
        )
        assert float(loss) == pytest.approx(math.log(c) + 1 - dice, rel=1e-6)
    weighted = pl.naive_loss_from_logits(
        torch.zeros(1, c, 16, 16), masks, torch.tensor([2]), dice_weight=0.0, bce_weight=2.0
    )
    assert float(weighted) == pytest.approx(2 * math.log(c), rel=1e-6)


def test_naive_boundary_ring_weighs_more():
    masks, tissue = disc_masks(1), torch.tensor([0])
    logits = torch.zeros(1, 3, 16, 16)
    logits[:, 1] = 4 * masks[:, 0]  # right inside, uncertain in the ring
    low = pl.naive_loss_from_logits(logits, masks, tissue, boundary_weight=1.0, dice_weight=0.0)
    high = pl.naive_loss_from_logits(logits, masks, tissue, boundary_weight=5.0, dice_weight=0.0)
    assert high > low  # ring pixels have a higher CE than the average


def test_bad_logits_and_ids():
    masks = disc_masks(1)
    with pytest.raises(ValueError, match="out of range"):
        pl.tal_loss_from_logits(random_logits(1), masks, torch.tensor([3]))
    with pytest.raises(ValueError, match="masks"):
        pl.naive_loss_from_logits(random_logits(1), disc_masks(2), torch.tensor([0]))
    with pytest.raises(ValueError, match="tissue"):
        pl.naive_loss_from_logits(random_logits(1), masks, torch.tensor([0, 1]))


# -- every method trains ------------------------------------------------------------------------
METHODS = [
    ("omniseg", {"width": 4}, "binary"),
    ("unet", {"width": 4}, "binary"),
    ("deeplabv3", {"depth": 18, "width": 4, "aspp_channels": 8}, "binary"),
    ("multihead", {"width": 4}, "binary"),
    ("multiclass", {"width": 4}, "tal"),
    ("multiclass", {"width": 4}, "multiclass"),
]


@pytest.mark.parametrize(("name", "kwargs", "strategy"), METHODS)
def test_a_few_sgd_steps_decrease_the_loss(name, kwargs, strategy):
    torch.manual_seed(0)
    model = build_model(name, num_tissues=6, **kwargs).train()
    masks = disc_masks(4, 32)
    g = torch.Generator().manual_seed(2)
    images = 0.3 + 0.4 * masks.expand(-1, 3, -1, -1) + 0.1 * torch.rand(4, 3, 32, 32, generator=g)
    tissue = torch.full((4,), 2, dtype=torch.long)
    loss_fn = pl.loss_for(strategy)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(4):
        loss = loss_fn(model, images, masks, tissue)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        after = float(loss_fn(model, images, masks, tissue))
    assert all(math.isfinite(v) for v in losses)
    assert after < losses[0], (losses, after)


def test_loss_kind_picks_the_binary_formulation():
    torch.manual_seed(0)
    x, masks, tissue = torch.rand(2, 3, 32, 32), disc_masks(2, 32), torch.tensor([0, 1])
    model = build_model("omniseg", num_tissues=2, width=4).eval()
    with torch.no_grad():
        logits = model(x, tissue)
        ours = pl.binary_loss(model, x, masks, tissue)
        authors = pl.binary_loss(model, x, masks, tissue, kind="authors")
    assert ours.item() == pytest.approx(dice_bce_loss(logits, masks).item(), rel=1e-6)
    assert authors.item() == pytest.approx(authors_dice_bce_loss(logits, masks).item(), rel=1e-6)
    assert authors.item() != pytest.approx(ours.item())
    with pytest.raises(ValueError, match="loss kind must be one of omniseg, authors"):
        pl.binary_loss(model, x, masks, tissue, kind="softmax")


@pytest.mark.parametrize("name", ["tal", "multiclass"])
def test_multiclass_strategies_refuse_the_authors_kind(name):
    x, masks, tissue = torch.rand(1, 3, 32, 32), disc_masks(1, 32), torch.zeros(1, dtype=torch.long)
    model = build_model("multiclass", num_tissues=2, width=2)
    pl.STRATEGIES[name](model, x, masks, tissue, kind="omniseg")
    with pytest.raises(ValueError, match="2-channel"):
        pl.STRATEGIES[name](model, x, masks, tissue, kind="authors")


@pytest.mark.parametrize("name", ["binary", "tal", "multiclass"])
def test_every_strategy_pools_dice_per_tissue_when_asked(name):
    torch.manual_seed(0)
    model = build_model("multiclass" if name != "binary" else "omniseg", width=4)
    x, masks = torch.rand(4, 3, 32, 32), disc_masks(4, 32)
    masks[2:] = 0  # two patches without their tissue
    tissue = torch.tensor([0, 1, 0, 1])
    per_sample = pl.STRATEGIES[name](model, x, masks, tissue, dice="sample")
    pooled = pl.STRATEGIES[name](model, x, masks, tissue, dice="tissue")
    assert torch.isfinite(pooled) and not torch.isclose(per_sample, pooled)
    with pytest.raises(ValueError, match="loss dice must be one of sample, tissue, batch"):
        pl.STRATEGIES[name](model, x, masks, tissue, dice="patient")


def test_binary_loss_trains_the_presence_gate_per_image():
    """With a presence gate, the loss adds a per-image BCE on "the mask is not empty": on a
    patch without its tissue it lowers that tissue's presence logit."""
    torch.manual_seed(0)
    model = build_model("omniseg", num_tissues=2, width=4, norm="batch", presence=True)
    images = torch.rand(2, 3, 32, 32)
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, :, 8:20, 8:20] = 1  # tissue 0 present, tissue 1's patch empty
    tissue = torch.tensor([0, 1])
    loss = pl.binary_loss(model, images, masks, tissue)
    loss.backward()
    grad = model.presence.bias.grad
    assert grad is not None and grad[1] > 0 and grad[0] < 0  # descent: 1 down, 0 up
    # the term is the BCE of the presence logits against "the mask is not empty"
    with torch.no_grad():
        logits, presence = model.forward_with_presence(images, tissue)
        seg = dice_bce_loss(logits, masks)  # the heads' loss reads the logits before the gate
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            presence, torch.tensor([1.0, 0.0])
        )
    torch.testing.assert_close(loss.detach(), seg + bce)


# -- implied labels -----------------------------------------------------------------------------
def registry():
    from omniseg.tissues import load_tissues

    return load_tissues()


def test_label_relations_of_the_kidney_registry():
    """One scale: tissues exclude each other (DT, PT, VES at 10x); the nested pair tuft in
    capsule relates inside/contains; other scales (PTC at 40x) are unrelated."""
    t = registry()
    r = pl.label_relations(t, [["tuft", "cap"]])
    ids = {k: t[k].id for k in t.keys}
    for a in ("dt", "pt", "ves"):
        for b in ("dt", "pt", "ves"):
            assert r[ids[a], ids[b]] == (pl.NO_RELATION if a == b else pl.EXCLUDES)
        for b in ("cap", "tuft", "ptc"):
            assert r[ids[a], ids[b]] == pl.NO_RELATION
    assert r[ids["tuft"], ids["cap"]] == pl.INSIDE
    assert r[ids["cap"], ids["tuft"]] == pl.CONTAINS
    assert not r[ids["ptc"]].any() and not r[:, ids["ptc"]].any()
    # without the nested pair, the two 5x tissues would exclude each other
    assert pl.label_relations(t)[ids["tuft"], ids["cap"]] == pl.EXCLUDES
    # a network that learns DT and PT only: VES is no longer related to them
    only = pl.label_relations(t, trained=[ids["dt"], ids["pt"]])
    assert only[ids["dt"], ids["pt"]] == pl.EXCLUDES and only[ids["dt"], ids["ves"]] == 0
    assert int((only != 0).sum()) == 2


@pytest.mark.parametrize(
    "pair, match",
    [(["tuft", "glom"], "two different tissue keys"), (["cap", "cap"], "two different"),
     (["ptc", "cap"], "must share its scale"), (["tuft"], "two different")],
)  # fmt: skip
def test_label_relations_refuse_bad_nested_pairs(pair, match):
    with pytest.raises(ValueError, match=match):
        pl.label_relations(registry(), [pair])


def test_implied_label_loss_reads_only_the_implied_pixels():
    """Patch 0 is labelled for tissue 0, which excludes tissue 1: tissue 1's head is pushed to
    background inside patch 0's mask and nowhere else; tissue 2 (nested in 0) is pushed to
    background outside that mask. Patch 1 (tissue 2, inside 0) pushes head 0 to foreground on
    its mask. The loss is the mean cross-entropy over exactly those pixels."""
    rel = torch.tensor([[0, pl.EXCLUDES, pl.CONTAINS], [pl.EXCLUDES, 0, 0], [pl.INSIDE, 0, 0]])
    masks = disc_masks(2, 16)
    tissue = torch.tensor([0, 2])
    logits = torch.zeros(2, 3, 2, 16, 16, requires_grad=True)
    loss = pl.implied_label_loss(logits, masks, tissue, rel)
    # zero logits: every implied pixel costs log 2
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))
    loss.backward()
    g = logits.grad
    fg = masks[:, 0].bool()
    assert g[0, 0].abs().sum() == 0 and g[1, 2].abs().sum() == 0  # own heads: not this loss
    assert g[1, 1].abs().sum() == 0  # tissue 2 says nothing about tissue 1
    assert (g[0, 1, :, fg[0]].abs() > 0).all() and g[0, 1, :, ~fg[0]].abs().sum() == 0
    assert (g[0, 2, :, ~fg[0]].abs() > 0).all() and g[0, 2, :, fg[0]].abs().sum() == 0
    assert (g[1, 0, :, fg[1]].abs() > 0).all() and g[1, 0, :, ~fg[1]].abs().sum() == 0
    # descent direction: background up where a tissue is excluded, foreground up where implied
    assert (g[0, 1, 1, fg[0]] > 0).all() and (g[0, 1, 0, fg[0]] < 0).all()
    assert (g[1, 0, 1, fg[1]] < 0).all()
    # heads that already answer right cost (almost) nothing
    right = torch.zeros(2, 3, 2, 16, 16)
    right[0, 1, 0], right[0, 2, 0], right[1, 0, 1] = 20.0, 20.0, 20.0
    assert pl.implied_label_loss(right, masks, tissue, rel) < 1e-6
    # no implied pixel at all: 0
    assert pl.implied_label_loss(logits, masks, tissue, torch.zeros(3, 3, dtype=torch.long)) == 0


def test_binary_loss_adds_the_implied_labels_of_the_other_heads():
    torch.manual_seed(0)
    model = build_model("omniseg", num_tissues=3, width=4, norm="batch").eval()
    images, masks, tissue = torch.rand(2, 3, 32, 32), disc_masks(2, 32), torch.tensor([0, 2])
    rel = torch.tensor([[0, pl.EXCLUDES, 0], [pl.EXCLUDES, 0, 0], [0, 0, 0]])
    with torch.no_grad():
        base = pl.binary_loss(model, images, masks, tissue)
        both = pl.binary_loss(model, images, masks, tissue, relations=rel, implied_weight=0.5)
        all_logits = model.heads_logits(images, range(3))
        torch.testing.assert_close(all_logits[[0, 1], [0, 2]], model(images, tissue))
        implied = pl.implied_label_loss(all_logits, masks, tissue, rel)
        assert implied > 0
        torch.testing.assert_close(both, base + 0.5 * implied)
        # weight 0 or no relation: the plain loss
        torch.testing.assert_close(
            pl.binary_loss(model, images, masks, tissue, relations=rel, implied_weight=0), base
        )
    # a network without every head on one backbone pass cannot take implied labels
    with pytest.raises(ValueError, match="implied labels need a network"):
        pl.binary_loss(build_model("unet", width=2), images, masks, tissue, relations=rel,
                       implied_weight=1.0)  # fmt: skip

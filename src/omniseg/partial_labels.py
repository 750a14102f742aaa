"""Partial-label training strategies: how a patch labelled for one tissue becomes a loss.

Every training patch is labelled for one tissue ``k`` only: its mask says "k here, not k
elsewhere", and says nothing about the other tissues. The methods of the paper's Table 1 differ
in how their loss treats that:

``"binary"``
    Omni-Seg, Multi U-Net, Multi DeepLabV3, Med3D: the model is asked for tissue ``k`` and gives
    2-channel logits; Dice + boundary-weighted cross-entropy (:func:`omniseg.losses.dice_bce_loss`).
    An Omni-Seg with a presence gate (``presence=True``) adds a per-image binary cross-entropy
    of its presence logit against "the mask is not empty"; its heads' loss reads the logits
    before the gate.
``"tal"``
    Target adaptive loss / marginal loss (Fang & Yan 2020) for a ``T + 1``-way softmax: for a
    patch of tissue ``k`` the probabilities of background and every other tissue are merged into
    one "not k" class, ``p_notk = 1 - p_k``, then the same Dice + boundary-weighted CE on the two
    classes ``{not k, k}``. Moving probability between background and another tissue ``j != k``
    does not change the loss.
``"multiclass"``
    Naive partial labels (González et al. 2018): target ``k`` inside the mask, background
    elsewhere; cross-entropy over all ``T + 1`` classes (boundary ring weighted) + Dice of class
    ``k``. Unlabelled tissues in the patch are pushed towards background.

A strategy is ``fn(model, images, masks, tissue, *, boundary_weight=1.2, ring_width=2,
dice_weight=1.0, bce_weight=1.0, kind="omniseg", dice="sample") -> scalar``, with ``images`` ``(B, 3, H, W)``
in [0, 1], ``masks`` ``(B, 1, H, W)`` in {0, 1} and ``tissue`` ``(B,)`` int64 ids; the keyword
options are the training config's ``loss`` section. ``kind`` (:data:`omniseg.losses.LOSS_KINDS`)
picks the 2-channel loss of ``"binary"``; ``"tal"`` and ``"multiclass"`` accept only
``"omniseg"``. ``dice`` (:data:`omniseg.losses.DICE_POOLING`) pools the soft Dice per sample or
per tissue over the batch (:func:`omniseg.losses.mean_dice`), for every strategy alike.

Implied labels (``"binary"`` networks that run every head on one backbone pass, not in the
paper): a patch labelled for tissue ``k`` also says something about some other tissues
(:func:`label_relations`): a proximal-tubule pixel is not a distal tubule and not an artery,
a tuft pixel is inside a glomerular unit, a pixel outside a glomerular unit is no tuft.
:func:`implied_label_loss` adds the cross-entropy of those other heads on exactly those pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from omniseg.losses import binary_loss_of, boundary_ring, dice_bce_loss, dice_groups, mean_dice
from omniseg.models.registry import SegmentationModel
from omniseg.tissues import TissueTable

#: ``fn(model, images, masks, tissue, **loss_options) -> scalar loss``.
LossFn = Callable[..., Tensor]

DEFAULT_STRATEGY = "binary"


#: :func:`label_relations` codes: what a pixel of a patch labelled for tissue ``k`` says about
#: tissue ``j``. ``EXCLUDES``: inside k's mask is not j. ``INSIDE``: inside k's mask is j (k lies
#: within j). ``CONTAINS``: outside k's mask is not j (j lies within k).
NO_RELATION, EXCLUDES, INSIDE, CONTAINS = 0, 1, 2, 3

#: Keyword options of :func:`binary_loss` that the trainer sets from ``implied_labels`` (not
#: from the training config's ``loss`` section).
IMPLIED_OPTIONS = ("relations", "implied_weight")


def label_relations(
    tissues: TissueTable,
    nested: Sequence[Sequence[str]] = (),
    trained: Sequence[int] | None = None,
) -> Tensor:
    """``(T, T)`` int64 relation codes between the tissues' labels, ``R[k, j]`` for a patch of
    tissue ``k`` and the head of tissue ``j``.

    Tissues at one scale exclude each other (a pixel is at most one of them), except the
    ``nested`` pairs ``(inner, outer)``: inside the inner's mask is the outer, outside the
    outer's mask is not the inner. Tissues at different scales are unrelated: a head is never
    applied at another tissue's scale. ``trained``: ids of the tissues the network learns; a
    relation to any other tissue is dropped.

    Raises:
        ValueError: a nested pair that is not two different known tissues of one scale.
    """
    n = len(tissues)
    rel = torch.zeros((n, n), dtype=torch.long)
    scale = [t.scale for t in tissues]
    for k in range(n):
        for j in range(n):
            if k != j and scale[k] == scale[j]:
                rel[k, j] = EXCLUDES
    for pair in nested:
        if len(pair) != 2 or any(key not in tissues for key in pair) or pair[0] == pair[1]:
            raise ValueError(
                f"nested pair {list(pair)!r} must be two different tissue keys of "
                f"{', '.join(tissues.keys)}"
            )
        inner, outer = tissues[pair[0]].id, tissues[pair[1]].id
        if scale[inner] != scale[outer]:
            raise ValueError(
                f"nested pair {list(pair)!r}: {pair[0]} is at {scale[inner]}, {pair[1]} at "
                f"{scale[outer]}; a nested pair must share its scale"
            )
        rel[inner, outer], rel[outer, inner] = INSIDE, CONTAINS
    if trained is not None:
        keep = torch.zeros(n, dtype=torch.bool)
        keep[list(trained)] = True
        rel[~keep] = NO_RELATION
        rel[:, ~keep] = NO_RELATION
    return rel


def implied_label_loss(
    all_logits: Tensor, masks: Tensor, tissue: Tensor, relations: Tensor
) -> Tensor:
    """Cross-entropy of every head on the pixels its relation to the patch's tissue labels.

    Args:
        all_logits: ``(B, T, 2, H, W)``, every tissue's head on every patch.
        masks: ``(B, 1, H, W)`` in {0, 1}, each patch's labels for its own tissue.
        tissue: ``(B,)`` ids.
        relations: ``(T, T)`` from :func:`label_relations`.

    Returns:
        The mean cross-entropy over all (patch, head, pixel) triples with an implied label;
        0 (with a gradient path) when there are none.
    """
    b, t = all_logits.shape[:2]
    if all_logits.ndim != 5 or all_logits.shape[2] != 2 or tuple(relations.shape) != (t, t):
        raise ValueError(
            f"all_logits must be (B, T, 2, H, W) and relations (T, T), got "
            f"{tuple(all_logits.shape)} and {tuple(relations.shape)}"
        )
    _check_masks(masks, all_logits[:, 0])
    rel = relations.to(tissue.device)[tissue][:, :, None, None]  # (B, T, 1, 1)
    fg = masks.bool()[:, :1]  # (B, 1, H, W)
    known = ((rel == EXCLUDES) | (rel == INSIDE)) & fg | (rel == CONTAINS) & ~fg
    target = (rel == INSIDE).expand_as(known).long()
    ce = F.cross_entropy(
        all_logits.float().flatten(0, 1), target.flatten(0, 1), reduction="none"
    ).reshape(known.shape)
    weight = known.to(ce.dtype)
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


# -- losses on logits ---------------------------------------------------------------------------
def marginal_log_probs(logits: Tensor, tissue: Tensor) -> Tensor:
    """Merge every class but ``tissue + 1`` into one: log-probabilities of ``{not k, k}``.

    Args:
        logits: ``(B, T + 1, H, W)``; channel 0 background, channel ``id + 1`` tissue ``id``.
        tissue: ``(B,)`` int64, the labelled tissue ``k`` of each sample.

    Returns:
        ``(B, 2, H, W)``: channel 0 ``log p_notk = logsumexp(other logits) - logsumexp(all)``,
        channel 1 ``log p_k``; they are valid 2-class logits (their softmax is ``(1 - p_k,
        p_k)``), computed without forming ``1 - p_k``.
    """
    b, c = _check_multiclass(logits, tissue)
    log_p = logits.float().log_softmax(dim=1)
    own = F.one_hot(tissue + 1, c).bool()[:, :, None, None]  # (B, C, 1, 1)
    log_pk = log_p.gather(1, (tissue + 1)[:, None, None, None].expand(b, 1, *logits.shape[2:]))
    log_notk = log_p.masked_fill(own, -torch.inf).logsumexp(dim=1, keepdim=True)
    return torch.cat([log_notk, log_pk], dim=1)


def tal_loss_from_logits(
    logits: Tensor,
    masks: Tensor,
    tissue: Tensor,
    *,
    boundary_weight: float = 1.2,
    ring_width: int = 2,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    groups: Tensor | None = None,
) -> Tensor:
    """Marginal (target adaptive) loss: Dice + boundary-weighted CE on ``{not k, k}``.

    Args:
        logits: ``(B, T + 1, H, W)``; masks: ``(B, 1, H, W)`` {0, 1} of tissue ``k``;
            tissue: ``(B,)`` ids ``k``.
    """
    return dice_bce_loss(
        marginal_log_probs(logits, tissue),
        masks,
        boundary_weight=boundary_weight,
        ring_width=ring_width,
        dice_weight=dice_weight,
        bce_weight=bce_weight,
        groups=groups,
    )


def naive_target(masks: Tensor, tissue: Tensor) -> Tensor:
    """Class map of a partially labelled patch: ``k + 1`` inside the mask, 0 elsewhere.

    Args:
        masks: ``(B, 1, H, W)`` {0, 1}; tissue: ``(B,)`` ids.

    Returns:
        ``(B, H, W)`` int64.
    """
    fg = masks[:, 0].bool()
    return torch.where(fg, (tissue + 1)[:, None, None], 0).long()


def naive_loss_from_logits(
    logits: Tensor,
    masks: Tensor,
    tissue: Tensor,
    *,
    boundary_weight: float = 1.2,
    ring_width: int = 2,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    groups: Tensor | None = None,
) -> Tensor:
    """Naive multi-class loss: ``T + 1``-way CE against :func:`naive_target` + Dice of class k.

    ``dice_weight * (1 - mean_b dice_b) + bce_weight * CE``: ``dice_b`` is the soft Dice (smooth
    1) of softmax channel ``k + 1`` against the mask; CE is the pixel mean over all classes with
    the :func:`~omniseg.losses.boundary_ring` pixels weighing ``boundary_weight``.

    Args:
        logits: ``(B, T + 1, H, W)``; masks: ``(B, 1, H, W)`` {0, 1}; tissue: ``(B,)`` ids.
    """
    b, _ = _check_multiclass(logits, tissue)
    _check_masks(masks, logits)
    logits = logits.float()
    fg = masks.bool()
    ce = F.cross_entropy(logits, naive_target(masks, tissue), reduction="none")  # (B, H, W)
    if boundary_weight != 1.0 and ring_width > 0:
        weight = 1 + (boundary_weight - 1) * boundary_ring(fg, ring_width)[:, 0].to(ce.dtype)
        ce = (ce * weight).sum() / weight.sum()
    else:
        ce = ce.mean()
    index = (tissue + 1)[:, None, None, None].expand(b, 1, *logits.shape[2:])
    prob_k = logits.softmax(dim=1).gather(1, index)
    dice = 1 - mean_dice(prob_k, fg, groups)
    return dice_weight * dice + bce_weight * ce


# -- strategies (model -> loss) -----------------------------------------------------------------
def binary_loss(
    model: SegmentationModel,
    images: Tensor,
    masks: Tensor,
    tissue: Tensor,
    *,
    boundary_weight: float = 1.2,
    ring_width: int = 2,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    kind: str = "omniseg",
    dice: str = "sample",
    relations: Tensor | None = None,
    implied_weight: float = 0.0,
) -> Tensor:
    """``"binary"``: Dice + boundary-weighted BCE of the model's logits for ``tissue``.

    ``kind`` picks the formulation (:data:`omniseg.losses.LOSS_KINDS`): ``"omniseg"`` (softmax)
    or ``"authors"`` (sigmoid on both channels, as in the authors' code). With ``relations``
    (:func:`label_relations`) and ``implied_weight > 0``, every head runs on every patch and
    ``implied_weight`` x :func:`implied_label_loss` is added (a model with ``heads_logits``).
    """
    _check_kind(model, "binary", "binary")
    loss = binary_loss_of(kind)
    presence = None
    implied = None
    if relations is not None and implied_weight > 0 and bool((relations != 0).any()):
        if not hasattr(model, "heads_logits") or getattr(model, "has_presence", False):
            raise ValueError(
                "implied labels need a network that runs every tissue's head on one backbone "
                f"pass without a presence gate; {type(model).__name__} does not"
            )
        all_logits = model.heads_logits(images, range(relations.shape[0]))
        logits = all_logits[torch.arange(len(tissue), device=tissue.device), tissue]
        implied = implied_label_loss(all_logits, masks, tissue, relations)
    elif getattr(model, "has_presence", False):
        # the heads learn where their tissue is from the logits before the gate, the gate
        # whether it is there (trained through the gated logits, heads and gate stalled at
        # their empty answers for half the demo schedule)
        logits, presence = model.forward_with_presence(images, tissue)
    else:
        logits = model(images, tissue)
    total = loss(
        logits.float(),
        masks,
        boundary_weight=boundary_weight,
        ring_width=ring_width,
        dice_weight=dice_weight,
        bce_weight=bce_weight,
        groups=dice_groups(dice, tissue),
    )
    if presence is not None:  # one decision per image: is its tissue there at all
        present = masks.flatten(1).any(dim=1).to(torch.float32)
        total = total + F.binary_cross_entropy_with_logits(presence.float(), present)
    if implied is not None:
        total = total + implied_weight * implied
    return total


def tal_loss(
    model: SegmentationModel,
    images: Tensor,
    masks: Tensor,
    tissue: Tensor,
    *,
    boundary_weight: float = 1.2,
    ring_width: int = 2,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    kind: str = "omniseg",
    dice: str = "sample",
) -> Tensor:
    """``"tal"``: marginal loss (:func:`tal_loss_from_logits`) of a multiclass model."""
    _check_kind(model, "multiclass", "tal")
    _check_loss_kind(kind, "tal")
    return tal_loss_from_logits(
        model(images, tissue),
        masks,
        tissue,
        boundary_weight=boundary_weight,
        ring_width=ring_width,
        dice_weight=dice_weight,
        bce_weight=bce_weight,
        groups=dice_groups(dice, tissue),
    )


def multiclass_loss(
    model: SegmentationModel,
    images: Tensor,
    masks: Tensor,
    tissue: Tensor,
    *,
    boundary_weight: float = 1.2,
    ring_width: int = 2,
    dice_weight: float = 1.0,
    bce_weight: float = 1.0,
    kind: str = "omniseg",
    dice: str = "sample",
) -> Tensor:
    """``"multiclass"``: naive partial-label loss (:func:`naive_loss_from_logits`)."""
    _check_kind(model, "multiclass", "multiclass")
    _check_loss_kind(kind, "multiclass")
    return naive_loss_from_logits(
        model(images, tissue),
        masks,
        tissue,
        boundary_weight=boundary_weight,
        ring_width=ring_width,
        dice_weight=dice_weight,
        bce_weight=bce_weight,
        groups=dice_groups(dice, tissue),
    )


#: Strategy name -> loss; the training config's ``strategy`` picks one (default ``"binary"``).
STRATEGIES: dict[str, LossFn] = {
    "binary": binary_loss,
    "tal": tal_loss,
    "multiclass": multiclass_loss,
}

#: Other accepted spellings.
ALIASES = {"marginal": "tal", "naive": "multiclass"}


def loss_for(method_or_kind: str | None) -> LossFn:
    """The loss of a strategy: ``"binary"``, ``"tal"`` or ``"multiclass"``.

    Also accepts ``"marginal"`` (= tal), ``"naive"`` (= multiclass) and None (= binary); since
    a model's ``output_kind`` is ``"binary"`` or ``"multiclass"``, it names its default strategy.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    name = DEFAULT_STRATEGY if method_or_kind is None else str(method_or_kind).strip().lower()
    name = ALIASES.get(name, name)
    try:
        return STRATEGIES[name]
    except KeyError:
        known = ", ".join([*STRATEGIES, *ALIASES])
        raise ValueError(
            f"unknown partial-label strategy {method_or_kind!r}; known: {known}"
        ) from None


# -- checks -------------------------------------------------------------------------------------
def _check_kind(model: SegmentationModel, kind: str, strategy: str) -> None:
    found = getattr(model, "output_kind", None)
    if found != kind:
        raise ValueError(
            f"strategy {strategy!r} needs a model with {kind} output, but "
            f"{getattr(model, 'name', '') or type(model).__name__!r} has {found!r} output"
        )


def _check_loss_kind(kind: str, strategy: str) -> None:
    binary_loss_of(kind)  # an unknown kind: ValueError listing the known ones
    if kind != "omniseg":
        raise ValueError(
            f"loss kind {kind!r} is a loss of 2-channel (binary) outputs; strategy {strategy!r} "
            "has its own loss: set loss.kind to omniseg for this method"
        )


def _check_multiclass(logits: Tensor, tissue: Tensor) -> tuple[int, int]:
    if logits.ndim != 4 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (B, T + 1, H, W) with T >= 1, got {tuple(logits.shape)}")
    b, c = logits.shape[:2]
    if tissue.shape != (b,) or tissue.is_floating_point():
        raise ValueError(
            f"tissue must be ({b},) integer ids for logits {tuple(logits.shape)}, got "
            f"{tuple(tissue.shape)} {tissue.dtype}"
        )
    if tissue.numel() and (int(tissue.min()) < 0 or int(tissue.max()) >= c - 1):
        raise ValueError(f"tissue ids {tissue.tolist()} out of range 0..{c - 2} for {c} classes")
    return b, c


def _check_masks(masks: Tensor, logits: Tensor) -> None:
    b, _, h, w = logits.shape
    if tuple(masks.shape) != (b, 1, h, w):
        raise ValueError(
            f"masks must be ({b}, 1, {h}, {w}) to match logits, got {tuple(masks.shape)}"
        )

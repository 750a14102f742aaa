"""Adapting a network's first BatchNorm layers to a slide (omniseg.wsi.adapt)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

from omniseg.models import build_model
from omniseg.wsi.adapt import (
    adapt_batch_norm,
    batch_norms,
    slide_batches,
    tissue_positions,
)
from omniseg.wsi.slide import Slide


class _TwoNorms(nn.Module):
    """BatchNorm on the input's channels, a 1x1 convolution, BatchNorm again:
    ``forward(x, tissue)`` like the segmentation models."""

    def __init__(self):
        super().__init__()
        self.first = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.second = nn.BatchNorm2d(3)

    def forward(self, x, tissue):
        return self.second(self.conv(self.first(x)))


def _trained_on(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``model`` with the running statistics of ``x`` (a few steps at the default momentum
    after the exact average, as a trained network's differ slightly from its data's)."""
    model.train()
    with torch.no_grad():
        for m in batch_norms(model):
            m.momentum = None
        model(x, torch.zeros(len(x), dtype=torch.long))
        for m in batch_norms(model):
            m.momentum = 0.1
        for _ in range(3):
            model(x[: len(x) // 2], torch.zeros(len(x) // 2, dtype=torch.long))
    return model.eval()


def test_only_the_first_layers_take_the_plain_average_of_the_batches():
    torch.manual_seed(0)
    model = _trained_on(_TwoNorms(), torch.rand(8, 3, 16, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.rand(4, 3, 16, 16) * 0.5 + 0.3 * k for k in range(3)]
    seen = adapt_batch_norm(model, ((x, torch.zeros(4, dtype=torch.long)) for x in batches), 1)
    assert seen == 3
    after = model.state_dict()
    # the first layer: the mean of each batch's per-channel mean and unbiased variance
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches]).mean(0)
    vars_ = torch.stack([x.transpose(0, 1).reshape(3, -1).var(dim=1) for x in batches]).mean(0)
    torch.testing.assert_close(after["first.running_mean"], means)
    torch.testing.assert_close(after["first.running_var"], vars_)
    assert not torch.equal(after["first.running_mean"], before["first.running_mean"])
    # everything else as it was, the model in eval mode, the momentum restored
    for k in before:
        if not k.startswith("first.running") and k != "first.num_batches_tracked":
            assert torch.equal(after[k], before[k]), k
    assert not any(m.training for m in model.modules())
    assert model.first.momentum == pytest.approx(0.1)


def test_adapting_undoes_a_stain_shift_of_the_first_features():
    """A slide whose colours are an affine shift of the training images: after adapting the
    first BatchNorm (on the input channels) the network sees the same features as on the
    training images, and without adapting it does not."""
    torch.manual_seed(1)
    train = torch.rand(16, 3, 24, 24)
    model = _trained_on(_TwoNorms(), train)
    gain, offset = torch.tensor([0.5, 0.9, 0.7]), torch.tensor([0.45, 0.05, 0.3])
    shifted = train * gain[None, :, None, None] + offset[None, :, None, None]
    ids = torch.zeros(16, dtype=torch.long)
    with torch.no_grad():
        expected = model(train, ids)
        unadapted = model(shifted, ids)
    adapt_batch_norm(model, [(shifted[:8], ids[:8]), (shifted[8:], ids[8:])], 1)
    with torch.no_grad():
        adapted = model(shifted, ids)
    assert (unadapted - expected).abs().mean() > 0.3
    assert (adapted - expected).abs().mean() < 0.1 * (unadapted - expected).abs().mean()


def test_the_stem_comes_first_in_every_batchnorm_network():
    unet = build_model("unet", num_tissues=6, width=4)
    assert batch_norms(unet)[0] is unet.encoder[0][1]  # right after the first convolution
    omni = build_model("omniseg", num_tissues=6, width=4, norm="batch")
    first = dict(omni.named_modules())["backbone.encoder.stages.0.0.body.0.0"]
    assert batch_norms(omni)[0] is first


def test_bad_requests_are_named_and_leave_the_statistics_alone():
    model = _trained_on(_TwoNorms(), torch.rand(4, 3, 8, 8))
    before = model.first.running_mean.clone()
    batch = [(torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="must be >= 1"):
        adapt_batch_norm(model, batch, 0)
    with pytest.raises(ValueError, match=r"m\.pt: adapt_norm 3 .* the network has 2"):
        adapt_batch_norm(model, batch, 3, name="m.pt")
    with pytest.raises(ValueError, match="m.pt: no tiles"):
        adapt_batch_norm(model, [], 1, name="m.pt")
    assert torch.equal(model.first.running_mean, before)
    assert model.first.momentum == pytest.approx(0.1) and not model.first.training
    group = build_model("omniseg", num_tissues=6, width=4)  # the paper's GroupNorm
    with pytest.raises(ValueError, match="GroupNorm network has none"):
        adapt_batch_norm(group, batch, 2, name="g.pt")


def test_positions_lie_on_the_tissue():
    mask = np.zeros((20, 30), bool)
    mask[5:8, 10:25] = True
    pos = tissue_positions(mask, 500, np.random.default_rng(0))
    assert pos.shape == (500, 2)
    assert mask[pos[:, 0].astype(int), pos[:, 1].astype(int)].all()
    assert pos[:, 1].min() < 11 and pos[:, 1].max() > 24  # the whole strip, not one pixel
    with pytest.raises(ValueError, match="no tissue"):
        tissue_positions(np.zeros((4, 4), bool), 1, np.random.default_rng(0))


def test_tiles_are_tissue_at_each_tissues_scale_mixed_per_batch(tmp_path):
    rgb = np.full((256, 256, 3), 245, np.uint8)  # glass
    rgb[64:192, 96:224] = (120, 40, 90)  # tissue
    tifffile.imwrite(tmp_path / "s.tif", rgb)
    mask = np.zeros((32, 32), bool)  # 8 level-0 pixels per mask pixel
    mask[8:24, 12:28] = True
    reads = []
    with Slide(tmp_path / "s.tif", mpp=0.5) as slide:
        read = slide.read_scaled

        def spy(x0, y0, w0, h0, um_per_px, out_size=None):
            reads.append((w0, um_per_px))
            return read(x0, y0, w0, h0, um_per_px, out_size)

        slide.read_scaled = spy
        tissues, cpu = [(3, 1.0), (5, 0.5)], torch.device("cpu")
        batches = list(slide_batches(slide, mask, 8.0, tissues, 16, cpu))
        again = list(slide_batches(slide, mask, 8.0, tissues, 16, cpu))
    assert len(batches) == 25
    x, ids = batches[0]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert ids.tolist() == [3] * 4 + [5] * 4
    # each tissue's tiles at its own scale: 16 px at 1 um/px read 32 level-0 px, at 0.5 um/px 16
    assert {w for w, um in reads if um == 1.0} == {32}
    assert {w for w, um in reads if um == 0.5} == {16}
    centres = torch.cat([b[0] for b in batches])[:, :, 8, 8]
    assert (centres < 0.9).all()  # every tile is centred on tissue, not glass
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))  # seeded


def test_the_forward_stops_once_every_chosen_layer_has_seen_the_batch():
    model = _trained_on(_TwoNorms(), torch.rand(4, 3, 8, 8))
    calls = []
    model.conv.register_forward_hook(lambda *a: calls.append(1))
    batches = [(torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))] * 3
    assert adapt_batch_norm(model, batches, 1) == 3
    assert calls == []  # nothing after the first layer ran
    assert adapt_batch_norm(model, batches, 2) == 3
    assert len(calls) == 3
    with torch.no_grad():  # and the model still runs whole afterwards
        assert model(*batches[0]).shape == (2, 3, 8, 8)
    assert len(calls) == 4

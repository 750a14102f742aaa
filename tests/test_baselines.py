"""Tests of the baseline networks: U-Net, DeepLabV3, Med3D-style multi-head, multi-class.

Each model family subclasses :class:`test_models.ModelContract` (shapes, gradients, predict_proba,
config round trip, bad input); the extra tests check architecture facts with known answers
(parameter counts, output strides, dilations, which decoder a tissue trains).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_models import ModelContract
from torch import nn

from omniseg.checkpoint import load_model, save_model
from omniseg.losses import dice_bce_loss
from omniseg.models import build_model, count_parameters
from omniseg.models.deeplab import ResNet
from omniseg.models.resunet import ResUNet, ResUNetDecoder
from omniseg.tissues import load_tissues

torch.set_num_threads(1)


def conv(cin: int, cout: int, k: int, bias: bool = False) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def same_for_every_tissue(model, x):
    with torch.inference_mode():
        outs = [model(x, torch.full((x.shape[0],), t, dtype=torch.long)) for t in (0, 3, 5)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0])


# -- U-Net --------------------------------------------------------------------------------------
class TestUNet(ModelContract):
    model_name = "unet"
    model_kwargs = {"num_tissues": 6, "width": 4}

    def test_tissue_is_ignored(self, model, batch_data):
        same_for_every_tissue(model, batch_data[0])

    def test_parameter_count_standard_unet(self):
        # Standard U-Net, base 64, depth 5, BatchNorm (2 params per channel), 2 output classes.
        widths = [64, 128, 256, 512, 1024]

        def double(cin, cout):
            return conv(cin, cout, 3) + 2 * cout + conv(cout, cout, 3) + 2 * cout

        enc = sum(double(a, b) for a, b in zip([3, *widths[:-1]], widths, strict=True))
        dec = sum(conv(2 * c, c, 2, bias=True) + double(2 * c, c) for c in widths[:-1])
        analytic = enc + dec + conv(64, 2, 1, bias=True)
        assert count_parameters(build_model("unet", width=64)) == analytic == 31_037_698

    def test_depth_sets_size_multiple(self):
        model = build_model("unet", width=2, depth=3).eval()
        assert model.size_multiple == 4
        with torch.inference_mode():
            assert model(torch.rand(1, 3, 12, 20), torch.zeros(1, dtype=torch.long)).shape == (
                1,
                2,
                12,
                20,
            )
        with pytest.raises(ValueError, match="multiples of 4"):
            model(torch.rand(1, 3, 12, 18), torch.zeros(1, dtype=torch.long))

    def test_group_norm_variant_and_bad_arguments(self, batch_data):
        x, tissue = batch_data
        model = build_model("unet", width=4, norm="group")
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
        assert model(x, tissue).shape == (2, 2, 32, 32)
        with pytest.raises(ValueError, match="norm"):
            build_model("unet", norm="layer")
        with pytest.raises(ValueError, match="depth"):
            build_model("unet", depth=1)


# -- DeepLabV3 ----------------------------------------------------------------------------------
class TestDeepLabV3(ModelContract):
    model_name = "deeplabv3"
    model_kwargs = {"num_tissues": 6, "depth": 18, "width": 4, "aspp_channels": 8}

    def test_tissue_is_ignored(self, model, batch_data):
        same_for_every_tissue(model, batch_data[0])

    def test_resnet50_backbone_has_the_standard_parameter_count(self):
        # torchvision's resnet50 without its fc layer: 25,557,032 - (2048 * 1000 + 1000).
        backbone = ResNet(depth=50, width=64)
        assert count_parameters(backbone) == 23_508_032
        assert backbone.out_channels == 2048
        assert count_parameters(ResNet(depth=18, width=64)) == 11_176_512  # resnet18 minus fc

    @pytest.mark.parametrize(
        ("depth", "output_stride", "expansion"), [(18, 8, 1), (18, 16, 1), (50, 8, 4), (50, 16, 4)]
    )
    def test_output_stride(self, depth, output_stride, expansion):
        net = ResNet(depth=depth, width=4, output_stride=output_stride).eval()
        with torch.inference_mode():
            out = net(torch.rand(1, 3, 64, 64))
        side = 64 // output_stride
        assert out.shape == (1, 8 * 4 * expansion, side, side)

    @pytest.mark.parametrize(
        ("output_stride", "layer3", "layer4"),
        [(16, [1, 1, 1, 1, 1, 1], [1, 2, 2]), (8, [1, 2, 2, 2, 2, 2], [2, 4, 4])],
    )
    def test_dilations(self, output_stride, layer3, layer4):
        net = ResNet(depth=50, width=4, output_stride=output_stride)

        def dilations(layer):
            return [block.body[3].dilation[0] for block in layer]

        assert dilations(net.layers[2]) == layer3
        assert dilations(net.layers[3]) == layer4
        assert net.layers[1][0].body[3].stride == (2, 2)

    def test_aspp_rates_follow_output_stride(self):
        for output_stride, rates in ((16, [6, 12, 18]), (8, [12, 24, 36])):
            model = build_model("deeplabv3", depth=18, width=4, output_stride=output_stride)
            atrous = [b[0].dilation[0] for b in model.aspp.branches[1:]]
            assert atrous == rates
            assert model.aspp.branches[0][0].kernel_size == (1, 1)

    def test_paper_size_and_default_aspp_width(self):
        model = build_model("deeplabv3", depth=50, width=64)
        assert model.aspp.project[0].out_channels == 256
        assert count_parameters(model) == 39_633_730

    def test_batch_of_one_trains(self):
        model = build_model("deeplabv3", depth=18, width=4).train()
        x = torch.rand(1, 3, 32, 32)
        out = model(x, torch.zeros(1, dtype=torch.long))
        dice_bce_loss(out, (x[:, :1] > 0.5).float()).backward()

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="depth"):
            build_model("deeplabv3", depth=20)
        with pytest.raises(ValueError, match="output_stride"):
            build_model("deeplabv3", output_stride=32)


# -- Med3D-style multi-head ---------------------------------------------------------------------
class TestMultiHead(ModelContract):
    model_name = "multihead"
    model_kwargs = {"num_tissues": 6, "width": 4}

    def test_gradients_reach_every_parameter(self, model, batch_data):
        # Overrides the contract: only the decoders of the batch's tissues may get gradients.
        x, tissue = batch_data
        model.train()
        dice_bce_loss(model(x, tissue), (x[:, :1] > 0.5).float()).backward()
        used = set(tissue.tolist())
        for name, p in model.named_parameters():
            if name.startswith("decoders."):
                k = int(name.split(".")[1])
                assert (p.grad is not None) == (k in used), name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert used == {0, 1}

    def test_mixed_batch_equals_per_sample(self, model):
        g = torch.Generator().manual_seed(5)
        x = torch.rand(4, 3, 32, 32, generator=g)
        tissue = torch.tensor([2, 0, 2, 5])
        with torch.inference_mode():
            mixed = model(x, tissue)
            for b in range(4):
                torch.testing.assert_close(mixed[b : b + 1], model(x[b : b + 1], tissue[b : b + 1]))
        assert not torch.allclose(mixed[0], mixed[1])

    def test_step_on_tissue_k_updates_encoder_and_head_k_only(self, model):
        model.train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(
            model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3
        )
        x = torch.rand(2, 3, 32, 32)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            out = model(x, torch.full((2,), 3, dtype=torch.long))
            dice_bce_loss(out, (x[:, :1] > 0.5).float()).backward()
            opt.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        decoders = {int(n.split(".")[1]) for n in changed if n.startswith("decoders.")}
        assert decoders == {3}
        assert any(n.startswith("encoder.") for n in changed)

    def test_parameter_count_shares_the_encoder(self):
        w, t = 32, 6
        ref = ResUNet(w, 3, 8)
        encoder = count_parameters(ref.encoder)  # stem, stages, fusion
        decoder = count_parameters(ref.decoder.blocks) + 2 * w + conv(w, 2, 1, bias=True)
        model = build_model("multihead", num_tissues=t, width=w)
        assert count_parameters(ResUNetDecoder(w, 2)) == decoder
        assert count_parameters(model) == encoder + t * decoder


# -- one network, background + every tissue -----------------------------------------------------
class TestMultiClass(ModelContract):
    model_name = "multiclass"
    model_kwargs = {"num_tissues": 6, "width": 4}

    def test_tissue_is_ignored(self, model, batch_data):
        same_for_every_tissue(model, batch_data[0])

    def test_softmax_channels_and_predict_proba(self, model, batch_data):
        x, _ = batch_data
        with torch.inference_mode():
            logits = model(x, torch.zeros(2, dtype=torch.long))
            prob = model.predict_proba(x, list(range(6)))
        assert model.output_kind == "multiclass" and logits.shape[1] == 7
        torch.testing.assert_close(prob, logits.softmax(1)[:, 1:])
        assert (prob.sum(1) < 1).all()  # background holds the rest

    def test_parameter_count_is_omniseg_backbone_with_seven_outputs(self):
        model = build_model("multiclass", num_tissues=6, width=32)
        assert count_parameters(model) == count_parameters(ResUNet(32, 3, 7))
        # Omni-Seg's backbone (8 outputs) + controller vs. this one (7 outputs, no controller).
        omni = build_model("omniseg", num_tissues=6, width=32)
        controller = count_parameters(omni.controller) + count_parameters(omni.controller_norm)
        assert count_parameters(model) == count_parameters(omni) - controller - (32 + 1)


def test_every_baseline_is_registered():
    from omniseg.models import available_models

    assert {"unet", "deeplabv3", "multihead", "multiclass", "omniseg"} <= set(available_models())


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("unet", {"width": 2, "depth": 3}),
        ("deeplabv3", {"depth": 18, "width": 4, "output_stride": 8}),
        ("multihead", {"width": 4}),
        ("multiclass", {"width": 4}),
    ],
)
def test_model_file_round_trip(tmp_path, name, kwargs):
    tissues = load_tissues(Path(__file__).parents[1] / "config" / "tissues.tsv")
    torch.manual_seed(0)
    model = build_model(name, num_tissues=len(tissues), **kwargs)
    model.train()
    model(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))  # moves BatchNorm running stats
    model.eval()
    save_model(tmp_path / "m.pt", model, tissues, extra={"method": name})
    loaded, meta = load_model(tmp_path / "m.pt", tissues=tissues)
    assert type(loaded) is type(model) and meta["model"]["kwargs"]["width"] == kwargs["width"]
    x = torch.rand(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.predict_proba(x, [0, 4]), model.predict_proba(x, [0, 4]))

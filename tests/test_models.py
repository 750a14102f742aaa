"""Tests of the model registry and Omni-Seg.

``ModelContract`` holds what every segmentation method must satisfy; each model family gets a
subclass (``TestOmniSeg`` here; baselines add theirs) that sets ``model_name``/``model_kwargs``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omniseg.losses import dice_bce_loss
from omniseg.models import (
    OmniSeg,
    SegmentationModel,
    available_models,
    build_model,
    count_parameters,
    register_model,
    registry,
)
from omniseg.models.blocks import TissueNorm, num_groups, window_cells, window_pool
from omniseg.models.omniseg import HEAD_IMPLS, head_hidden, run_heads, run_heads_loop

torch.set_num_threads(1)


class ModelContract:
    """Contract of a :class:`SegmentationModel`; subclass and set the class attributes."""

    model_name: str = ""
    model_kwargs: dict = {}
    num_tissues: int = 6
    size: int = 32
    batch: int = 2

    @pytest.fixture
    def model(self) -> SegmentationModel:
        torch.manual_seed(0)
        return build_model(self.model_name, **self.model_kwargs).eval()

    @pytest.fixture
    def batch_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        x = torch.rand(self.batch, 3, self.size, self.size, generator=g)
        tissue = torch.arange(self.batch) % self.num_tissues
        return x, tissue

    def test_registered(self):
        assert self.model_name in available_models()

    def test_output_shape(self, model, batch_data):
        x, tissue = batch_data
        out = model(x, tissue)
        channels = 2 if model.output_kind == "binary" else self.num_tissues + 1
        assert out.shape == (self.batch, channels, self.size, self.size)
        assert out.dtype == torch.float32
        assert model.num_tissues == self.num_tissues

    def test_gradients_reach_every_parameter(self, model, batch_data):
        x, tissue = batch_data
        model.train()
        out = model(x, tissue)
        target = (x[:, :1] > 0.5).float()
        if model.output_kind == "binary":
            loss = dice_bce_loss(out, target)
        else:
            loss = nn.functional.cross_entropy(out, target[:, 0].long())
        loss.backward()
        missing = [
            n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0
        ]
        assert not missing, f"no gradient reaches {missing}"

    def test_predict_proba_shape_and_range(self, model, batch_data):
        x, _ = batch_data
        tissues = [self.num_tissues - 1, 0]
        with torch.inference_mode():
            prob = model.predict_proba(x, tissues)
        assert prob.shape == (self.batch, 2, self.size, self.size)
        assert prob.min() >= 0 and prob.max() <= 1

    def test_predict_proba_matches_forward(self, model, batch_data):
        x, _ = batch_data
        tissues = [3 % self.num_tissues, 0, self.num_tissues - 1]
        with torch.inference_mode():
            prob = model.predict_proba(x, tissues)
            for k, t in enumerate(tissues):
                ids = torch.full((self.batch,), t, dtype=torch.long)
                soft = model(x, ids).softmax(dim=1)
                ref = soft[:, 1] if model.output_kind == "binary" else soft[:, t + 1]
                torch.testing.assert_close(prob[:, k], ref, rtol=1e-5, atol=1e-6)

    def test_config_round_trip(self, model, batch_data):
        cfg = model.config()
        assert cfg["name"] == self.model_name
        for key, value in self.model_kwargs.items():
            assert cfg["kwargs"][key] == value
        rebuilt = build_model(cfg["name"], **cfg["kwargs"]).eval()
        rebuilt.load_state_dict(model.state_dict())
        x, tissue = batch_data
        with torch.inference_mode():
            torch.testing.assert_close(rebuilt(x, tissue), model(x, tissue))

    @pytest.mark.parametrize("shape", [(2, 3, 40, 32), (2, 3, 32, 24), (2, 4, 32, 32), (3, 32, 32)])
    def test_bad_input_shape(self, model, shape):
        x = torch.rand(*shape)
        with pytest.raises(ValueError, match="input"):
            model(x, torch.zeros(shape[0], dtype=torch.long))
        with pytest.raises(ValueError, match="input"):
            model.predict_proba(x, [0])

    def test_bad_tissue(self, model, batch_data):
        x, _ = batch_data
        for bad in (self.num_tissues, -1):
            with pytest.raises(ValueError, match="out of range"):
                model(x, torch.full((self.batch,), bad, dtype=torch.long))
            with pytest.raises(ValueError, match="out of range"):
                model.predict_proba(x, [0, bad])
        with pytest.raises(ValueError, match="tissue"):
            model(x, torch.zeros(self.batch + 1, dtype=torch.long))
        with pytest.raises(ValueError, match="integers"):
            model(x, torch.zeros(self.batch))


class TestOmniSeg(ModelContract):
    model_name = "omniseg"
    model_kwargs = {"num_tissues": 6, "width": 8}

    def test_controller_emits_162_numbers(self, model, batch_data):
        x, tissue = batch_data
        _, bottleneck = model.encode(x)
        assert bottleneck.shape == (self.batch, 64, self.size // 16, self.size // 16)
        params = model.controller_params(bottleneck, tissue)
        assert params.shape == (self.batch, 162)
        assert model.controller.out_channels == 162
        assert model.controller.in_channels == 64 + self.num_tissues

    def test_head_holds_no_parameters(self, model):
        names = {n.split(".")[0] for n, _ in model.named_parameters()}
        assert names == {"backbone", "controller_norm", "controller"}
        head_free = sum(
            count_parameters(m) for m in (model.backbone, model.controller_norm, model.controller)
        )
        assert count_parameters(model) == head_free

    def test_encoder_ignores_tissue_and_head_uses_it(self, model, batch_data):
        x, _ = batch_data
        a = model(x, torch.zeros(self.batch, dtype=torch.long))
        b = model(x, torch.ones(self.batch, dtype=torch.long))
        assert not torch.allclose(a, b)
        feats, _ = model.encode(x)
        assert feats.shape == (self.batch, 8, self.size, self.size)

    @pytest.mark.parametrize("impl", HEAD_IMPLS)
    def test_batched_heads_equal_per_sample_loop(self, impl):
        g = torch.Generator().manual_seed(3)
        feats = torch.randn(3, 8, 8, 16, generator=g)  # H != W catches a transposition
        params = torch.randn(3, 4, 162, generator=g)
        torch.testing.assert_close(run_heads(feats, params, impl), run_heads_loop(feats, params))

    @pytest.mark.parametrize("impl", HEAD_IMPLS)
    def test_dynamic_head_per_sample(self, model, impl):
        g = torch.Generator().manual_seed(4)
        feats = torch.randn(3, 8, 16, 16, generator=g)
        params = torch.randn(3, 162, generator=g)
        model.head_impl = impl
        out = model.dynamic_head(feats, params)
        ref = run_heads_loop(feats, params[:, None])[:, 0]
        torch.testing.assert_close(out, ref)
        # Sample 0 with sample 1's head parameters gives sample 1's head output on sample 0.
        swapped = model.dynamic_head(feats[:1], params[1:2])
        torch.testing.assert_close(swapped, run_heads_loop(feats[:1], params[1:2, None])[:, 0])

    def test_head_param_layout(self):
        # Head: w1 (8x8) | w2 (8x8) | w3 (2x8) | b1 | b2 | b3. Set w1 = w2 = I, b = 0, w3 rows
        # pick channels 2 and 5, b3 = (1, -1): output = relu(relu(x))[[2, 5]] + (1, -1).
        eye = torch.eye(8).flatten()
        w3 = torch.zeros(2, 8)
        w3[0, 2] = w3[1, 5] = 1
        params = torch.cat([eye, eye, w3.flatten(), torch.zeros(16), torch.tensor([1.0, -1.0])])
        feats = torch.randn(1, 8, 4, 4)
        for impl in HEAD_IMPLS:
            out = run_heads(feats, params[None, None], impl)[0, 0]
            torch.testing.assert_close(out[0], feats[0, 2].relu() + 1)
            torch.testing.assert_close(out[1], feats[0, 5].relu() - 1)

    def test_leaky_head_keeps_a_gradient_where_relu_has_none(self):
        """``head_negative_slope``: identity weights and a bias of -10 make every hidden unit
        negative on these features: with ReLU the head is constant and its first-layer weights
        get no gradient; a leaky head passes slope^2-scaled features on and trains them."""
        eye = torch.eye(8).flatten()
        w3 = torch.zeros(2, 8)
        w3[1, 3] = 1
        params = torch.cat(
            [eye, eye, w3.flatten(), torch.full((8,), -10.0), torch.zeros(8), torch.zeros(2)]
        )
        feats = torch.rand(1, 8, 4, 4)  # in [0, 1): every unit of layer 1 is below 0
        for impl in HEAD_IMPLS:
            for slope in (0.0, 0.1):
                p = params[None, None].clone().requires_grad_(True)
                out = run_heads(feats, p, impl, slope)[0, 0]
                torch.testing.assert_close(out, run_heads_loop(feats, p, slope)[0, 0])
                # the activations below 0: f - 10 -> slope (f - 10) -> slope^2 (f - 10)
                torch.testing.assert_close(out[1], slope**2 * (feats[0, 3] - 10))
                out[1].sum().backward()
                assert (p.grad[0, 0, :64].abs().sum() > 0) == (slope > 0)
        model = build_model("omniseg", num_tissues=2, width=4, head_negative_slope=0.1)
        assert model.head_negative_slope == 0.1
        with pytest.raises(ValueError, match="head_negative_slope must be in"):
            build_model("omniseg", num_tissues=2, width=4, head_negative_slope=1.0)

    @pytest.mark.parametrize("slope", [0.0, 0.1])
    def test_head_hidden_is_the_heads_hidden_layers(self, slope):
        """``head_hidden`` (bench/head_units.py) gives the activations that ``run_heads``'s
        last layer reads: that layer applied to them is the head's output."""
        g = torch.Generator().manual_seed(5)
        feats = torch.randn(3, 8, 4, 6, generator=g)
        params = torch.randn(3, 162, generator=g)
        h1, h2 = head_hidden(feats, params, slope)
        assert h1.shape == h2.shape == feats.shape
        assert (h1 >= 0).all() == (slope == 0)
        w3, b3 = params[:, 128:144].reshape(3, 2, 8), params[:, 160:162]
        out = torch.einsum("boc,bchw->bohw", w3, h2) + b3[:, :, None, None]
        torch.testing.assert_close(out, run_heads(feats, params[:, None], "bmm", slope)[:, 0])

    def test_head_impls_give_same_model_output(self, model, batch_data):
        x, tissue = batch_data
        outs = []
        for impl in HEAD_IMPLS:
            model.head_impl = impl
            outs.append(model(x, tissue))
        torch.testing.assert_close(outs[0], outs[1])

    def test_parameter_count_paper_width(self):
        def conv(cin, cout, k, bias=False):
            return cin * cout * k * k + (cout if bias else 0)

        def gn(c):
            return 2 * c

        def block(cin, cout, stride=1):
            n = gn(cin) + conv(cin, cout, 3) + gn(cout) + conv(cout, cout, 3)
            if stride != 1 or cin != cout:
                n += gn(cin) + conv(cin, cout, 1)
            return n

        w, t = 32, 6
        analytic = (
            conv(3, w, 3)
            + block(w, w)
            + block(w, 2 * w, 2)
            + block(2 * w, 2 * w)
            + block(2 * w, 4 * w, 2)
            + block(4 * w, 4 * w)
            + block(4 * w, 8 * w, 2)
            + block(8 * w, 8 * w)
            + block(8 * w, 8 * w, 2)
            + block(8 * w, 8 * w)
            + gn(8 * w)
            + conv(8 * w, 8 * w, 1)  # bottleneck fusion
            + block(8 * w, 4 * w)
            + block(4 * w, 2 * w)
            + block(2 * w, w)
            + block(w, w)  # decoder
            + gn(w)
            + conv(w, 8, 1, bias=True)  # decoder output
            + gn(8 * w)
            + conv(8 * w + t, 162, 1, bias=True)  # controller
        )
        model = OmniSeg(num_tissues=t, width=w)
        assert count_parameters(model) == analytic == 5_956_822
        assert count_parameters(OmniSeg(num_tissues=t + 1, width=w)) == analytic + 162

    def test_count_trainable_only(self, model):
        total = count_parameters(model)
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        assert count_parameters(model, trainable_only=True) == total - count_parameters(
            model.backbone
        )
        assert count_parameters(model) == total

    @pytest.mark.parametrize(("channels", "groups"), [(8, 8), (16, 16), (256, 16), (24, 12)])
    def test_group_norm_groups(self, channels, groups):
        assert num_groups(channels) == groups

    def test_odd_width_builds(self, batch_data):
        x, tissue = batch_data
        assert build_model("omniseg", width=12)(x, tissue).shape == (2, 2, 32, 32)


def test_registry_errors():
    with pytest.raises(ValueError, match="known models: .*omniseg"):
        build_model("no-such-model")
    with pytest.raises(ValueError, match="depth"):
        build_model("omniseg", depth=3)
    with pytest.raises(TypeError):
        register_model("not-a-model")(nn.Linear)
    with pytest.raises(ValueError, match="already registered"):

        @register_model("omniseg")
        class Impostor(SegmentationModel):
            pass


def test_register_new_model_and_generic_predict_proba():
    @register_model("_test_constant")
    class Constant(SegmentationModel):
        output_kind = "multiclass"

        def __init__(self, num_tissues: int = 3, level: float = 0.5):
            super().__init__()
            self.num_tissues = num_tissues
            self.logit = nn.Parameter(torch.linspace(0, level, num_tissues + 1))

        def forward(self, x, tissue):
            self.check_input(x, tissue)
            return self.logit[None, :, None, None].expand(x.shape[0], -1, *x.shape[2:])

    try:
        assert "_test_constant" in available_models()
        m = build_model("_test_constant", level=1.0)
        assert m.config() == {"name": "_test_constant", "kwargs": {"num_tissues": 3, "level": 1.0}}
        prob = m.predict_proba(torch.rand(2, 3, 4, 4), [2, 0])
        ref = torch.linspace(0, 1.0, 4).softmax(0)
        torch.testing.assert_close(prob[0, :, 0, 0], ref[[3, 1]])

        @register_model("_test_constant_child")
        class Child(Constant):  # inherits __init__: config() must still record its arguments
            pass

        child = build_model("_test_constant_child", num_tissues=2)
        assert child.config() == {
            "name": "_test_constant_child",
            "kwargs": {"num_tissues": 2, "level": 0.5},
        }
    finally:
        for name in ("_test_constant", "_test_constant_child"):
            registry._REGISTRY.pop(name, None)  # keep the registry clean for other tests


@pytest.mark.parametrize("name", ["omniseg", "multihead", "multiclass"])
def test_norm_option_keeps_the_parameters_and_rebuilds(name):
    group = build_model(name, num_tissues=6, width=8)
    batch = build_model(name, num_tissues=6, width=8, norm="batch")
    assert count_parameters(batch) == count_parameters(group)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in batch.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in group.modules())
    cfg = batch.config()
    again = build_model(cfg["name"], **cfg["kwargs"])
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in again.modules())
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_model(name, num_tissues=6, width=8, norm="layer")


def test_group_norm_of_the_demo_width_is_instance_norm():
    """Why the demo offers BatchNorm: at w = 16, min(16, C) groups leave one channel a group,
    so an image's features are normalised channel by channel and a patch without a structure
    is stretched like one with it."""
    from omniseg.models.blocks import make_norm

    group, batch = make_norm("group", 16), make_norm("batch", 16).eval()
    x = torch.rand(1, 16, 8, 8)
    faint = x * 0.1 + 0.5  # the same pattern, ten times fainter, on another background
    assert torch.allclose(group(x), group(faint), atol=0.05)  # GroupNorm eps aside
    assert not torch.allclose(batch(x), batch(faint), atol=0.05)


def test_resunet_is_the_shared_encoder_and_decoder_and_loads_files_of_the_old_layout():
    """ResUNet is ResUNetEncoder + ResUNetDecoder (the halves Med3D uses); files written with the
    old parameter names (stem, encoder.N, fusion, decoder.N, out) still load to the same model."""
    from omniseg.models.resunet import ResUNet, ResUNetDecoder, ResUNetEncoder

    torch.manual_seed(0)
    net = ResUNet(width=4, out_channels=8, norm="batch").eval()
    assert isinstance(net.encoder, ResUNetEncoder) and isinstance(net.decoder, ResUNetDecoder)
    renames = {"encoder.stem.": "stem.", "encoder.stages.": "encoder.", "encoder.fusion.": "fusion.",
               "decoder.blocks.": "decoder.", "decoder.head.": "out."}  # fmt: skip
    old = {}
    for key, value in net.state_dict().items():
        new_prefix = next(p for p in renames if key.startswith(p))
        old[renames[new_prefix] + key[len(new_prefix) :]] = value
    assert "stem.weight" in old and "out.2.weight" in old
    fresh = ResUNet(width=4, out_channels=8, norm="batch").eval()
    fresh.load_state_dict(old)
    x = torch.rand(2, 3, 32, 32)
    for a, b in zip(net(x), fresh(x), strict=True):
        assert torch.equal(a, b)


def test_resunet_decoder_options_concat_skips_and_bilinear_upsampling():
    """decoder_skip="concat" widens each level's block input to 2c (the block's shortcut becomes
    a 1x1 conv); "bilinear" changes the output of the same weights; the defaults are the paper's
    decoder, parameter for parameter; unknown options are refused by name."""
    from omniseg.models.resunet import ENCODER_STAGES, ResUNet

    w = 4
    torch.manual_seed(0)
    paper = ResUNet(width=w, out_channels=8, norm="batch").eval()
    concat = ResUNet(width=w, out_channels=8, norm="batch", decoder_skip="concat").eval()
    bilinear = ResUNet(width=w, out_channels=8, norm="batch", decoder_upsample="bilinear").eval()
    assert paper.decoder.skip == "add" and paper.decoder.upsample == "nearest"
    assert set(bilinear.state_dict()) == set(paper.state_dict())
    skip_widths = [mult * w for _, mult in ENCODER_STAGES[:-1]][::-1]  # 8w, 4w, 2w, w
    for block, c in zip(concat.decoder.blocks, skip_widths, strict=True):
        assert block.body[0][2].in_channels == 2 * c  # norm -> ReLU -> conv(2c -> c_out)
        assert isinstance(block.shortcut, torch.nn.Sequential)
    assert sum(p.numel() for p in concat.parameters()) > sum(p.numel() for p in paper.parameters())
    x = torch.rand(2, 3, 32, 32)
    bilinear.load_state_dict(paper.state_dict())
    with torch.no_grad():
        (a, _), (b, _), (c, _) = paper(x), bilinear(x), concat(x)
    assert a.shape == b.shape == c.shape == (2, 8, 32, 32)
    assert not torch.allclose(a, b)
    net = build_model("omniseg", width=w, norm="batch", decoder_conditioning=True,
                      decoder_skip="concat", decoder_upsample="bilinear")  # fmt: skip
    assert net.backbone.decoder.skip == "concat" and net.backbone.decoder.upsample == "bilinear"
    assert len(net._tissue_norms) == len(paper.decoder.blocks) * 3 + 1  # every norm conditioned
    with torch.no_grad():
        out = net(x, torch.tensor([0, 1]))
    assert out.shape == (2, 2, 32, 32) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="decoder skip 'sum'"):
        ResUNet(width=w, decoder_skip="sum")
    with pytest.raises(ValueError, match="decoder upsample 'cubic'"):
        build_model("omniseg", width=w, decoder_upsample="cubic")


def test_image_conditioning_off_gives_one_head_per_tissue_for_every_image():
    torch.manual_seed(0)
    on = build_model("omniseg", width=8, norm="batch").eval()
    off = build_model("omniseg", width=8, norm="batch", image_conditioning=False).eval()
    x = torch.rand(2, 3, 32, 32)
    x[1] = 1 - x[1]  # a very different image
    ids = torch.tensor([3, 3])
    with torch.no_grad():
        p_on = on.controller_params(on.encode(x)[1], ids)
        p_off = off.controller_params(off.encode(x)[1], ids)
        assert not torch.allclose(p_on[0], p_on[1])  # the paper's controller follows the image
        assert torch.equal(p_off[0], p_off[1])  # the code alone: the same head
        assert off.controller.in_channels == 6 and not any(
            isinstance(m, torch.nn.BatchNorm2d) for m in off.controller_norm.modules()
        )
        # the batched inference path matches forward
        prob = off.predict_proba(x, [3])[:, 0]
        ref = off(x, ids).softmax(dim=1)[:, 1]
        torch.testing.assert_close(prob, ref)


@pytest.mark.parametrize("head_init", ["he", "default"])
def test_head_prior_starts_every_head_near_its_foreground_probability(head_init):
    torch.manual_seed(0)
    kwargs = {"width": 8, "norm": "batch", "head_init": head_init}
    plain = build_model("omniseg", **kwargs).eval()
    torch.manual_seed(0)
    prior = build_model("omniseg", head_prior=0.05, **kwargs).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        p_plain = plain.predict_proba(x, range(6))
        p_prior = prior.predict_proba(x, range(6))
    # the same draws but the last layer's bias: the heads start mostly background
    assert p_plain.mean() > 0.2
    assert 0.0 < p_prior.mean() < 0.15
    assert (p_prior > 0.5).float().mean() < (p_plain > 0.5).float().mean() / 2
    b3 = prior.controller.bias[-2:]
    torch.testing.assert_close(b3[1] - b3[0], torch.logit(torch.tensor(0.05)))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="head_prior"):
            build_model("omniseg", head_prior=bad)


def test_presence_gate_multiplies_the_foreground_odds_of_each_head():
    torch.manual_seed(0)
    gated = build_model("omniseg", width=8, norm="batch", presence=True).eval()
    x = torch.rand(3, 3, 32, 32)
    ids = torch.tensor([0, 3, 5])
    with torch.no_grad():
        raw, presence = gated.forward_with_presence(x, ids)
        out = gated(x, ids)
        assert presence.shape == (3,)
        # odds after the gate = odds before it x sigmoid(presence), pixel by pixel
        odds = lambda logits: (logits[:, 1] - logits[:, 0]).exp()  # noqa: E731
        ratio = odds(out) / odds(raw)
        torch.testing.assert_close(ratio, presence.sigmoid()[:, None, None].expand_as(ratio))
        # presence per tissue reads the image: the logit of tissue k is column k of the read-out
        table = gated.presence_logits(gated.encode(x)[1])
        torch.testing.assert_close(presence, table[torch.arange(3), ids])
        # the batched inference path gates every requested head like forward
        prob = gated.predict_proba(x, [3, 0])
        for j, k in enumerate([3, 0]):
            ref = gated(x, torch.full((3,), k)).softmax(dim=1)[:, 1]
            torch.testing.assert_close(prob[:, j], ref)
        # a strongly absent tissue switches its head off whatever the head says
        with torch.no_grad():
            gated.presence.bias[3] = -50.0
        assert gated.predict_proba(x, [3]).max() < 1e-6
    # training: the gate and the controller share one pass through the controller's norm, so
    # its BatchNorm counts the batch once
    gated.train()
    gated.forward_with_presence(x, ids)
    assert int(gated.controller_norm[0].num_batches_tracked) == 1
    plain = build_model("omniseg", width=8, norm="batch").eval()
    assert plain.presence is None and plain.forward_with_presence(x, ids)[1] is None
    assert gated.has_presence and not plain.has_presence
    with pytest.raises(RuntimeError, match="no presence gate"):
        plain.presence_logits(plain.encode(x)[1])


class TestOmniSegDecoderConditioning(ModelContract):
    """The contract holds with the tissue-conditioned decoder (``decoder_conditioning``)."""

    model_name = "omniseg"
    model_kwargs = {"width": 8, "norm": "batch", "presence": True, "decoder_conditioning": True,
                    "decoder_code_scale": 10.0}  # fmt: skip

    @pytest.fixture
    def model(self) -> SegmentationModel:
        """Per-tissue scales and shifts away from their zero start, so tissues differ."""
        torch.manual_seed(0)
        model = build_model(self.model_name, **self.model_kwargs).eval()
        with torch.no_grad():
            for layer in model._tissue_norms:
                layer.scale.normal_(0.0, 0.05)
                layer.shift.normal_(0.0, 0.05)
        return model


def test_decoder_conditioning_starts_as_the_plain_network_and_gives_each_tissue_its_features():
    kwargs = {"width": 8, "norm": "batch", "presence": True}
    torch.manual_seed(0)
    plain = build_model("omniseg", **kwargs).eval()
    torch.manual_seed(0)
    cond = build_model("omniseg", decoder_conditioning=True, decoder_code_scale=10.0, **kwargs)
    cond.eval()
    # every decoder norm is wrapped (12 at any width), no encoder or controller norm
    wrapped = [n for n, m in cond.named_modules() if isinstance(m, TissueNorm)]
    assert len(wrapped) == 12 and all(n.startswith("backbone.decoder.") for n in wrapped)
    x = torch.rand(3, 3, 32, 32)
    ids = torch.tensor([0, 1, 5])
    with torch.no_grad():
        # zero scales and shifts: bitwise the plain network, the same draws
        assert torch.equal(cond(x, ids), plain(x, ids))
        for layer in cond._tissue_norms:
            layer.shift[1] = 0.05
        same = torch.zeros(3, dtype=torch.long)
        f0 = cond.encode(x, same)[0]
        f1 = cond.encode(x, same + 1)[0]
        f2 = cond.encode(x, same + 2)[0]
        assert not torch.allclose(f0, f1)  # tissue 1's shift changes its features
        assert torch.equal(f0, f2)  # tissue 2's are still 0: the plain decoder
        torch.testing.assert_close(f0, plain.encode(x)[0])
        # forward reads every sample's own tissue; the ids are cleared after each pass
        mixed = cond.encode(x, torch.tensor([0, 1, 2]))[0]
        torch.testing.assert_close(mixed[1], f1[1])
        torch.testing.assert_close(mixed[2], f0[2])
        assert all(layer.tissue is None for layer in cond._tissue_norms)
    with pytest.raises(ValueError, match="decoder_conditioning"):
        cond.encode(x)
    with pytest.raises(ValueError, match="decoder_code_scale"):
        build_model("omniseg", decoder_conditioning=True, decoder_code_scale=0.0)


def test_decoder_conditioning_trains_only_the_batchs_tissues_at_its_rate():
    grads = {}
    for rate in (1.0, 10.0):
        torch.manual_seed(0)
        model = build_model("omniseg", width=8, norm="batch", decoder_conditioning=True,
                            decoder_code_scale=rate)  # fmt: skip
        x = torch.rand(4, 3, 32, 32)
        model(x, torch.tensor([2, 2, 4, 4])).logsumexp(dim=1).mean().backward()
        layer = model._tissue_norms[0]
        grads[rate] = (layer.scale.grad.clone(), layer.shift.grad.clone())
        touched = layer.scale.grad.abs().sum(dim=1) > 0
        assert touched.tolist() == [False, False, True, False, True, False]
        # heads_logits decodes once per tissue and stays differentiable
        model.zero_grad()
        model.heads_logits(x, [0, 3]).sum().backward()
        touched = layer.shift.grad.abs().sum(dim=1) > 0
        assert touched.tolist() == [True, False, False, True, False, False]
    # the stored numbers are multiplied by the rate: their gradient is rate times larger
    for g1, g10 in zip(grads[1.0], grads[10.0], strict=True):
        torch.testing.assert_close(g10, 10 * g1, rtol=1e-4, atol=1e-7)


def test_feature_scale_keeps_the_start_and_slows_the_image_path_under_adam():
    """The pooled features are all positive, so one Adam step moves every generated number by
    about ``lr x sum(features)``; ``feature_scale`` scales that by itself, the start unchanged."""
    x = torch.rand(2, 3, 32, 32)
    ids = torch.tensor([1, 4])
    runs = {}
    for scale in (1.0, 1 / 64):
        torch.manual_seed(0)
        model = build_model("omniseg", width=8, norm="batch", feature_scale=scale).eval()
        with torch.no_grad():
            bottleneck = model.encode(x)[1]
        c = model.backbone.bottleneck_channels
        before = model.controller_params(bottleneck, ids).detach()
        optimizer = torch.optim.Adam([model.controller.weight], lr=1e-3)
        model.controller_params(bottleneck, ids).sum().backward()
        model.controller.weight.grad[:, c:] = 0  # the image path only
        optimizer.step()
        after = model.controller_params(bottleneck, ids).detach()
        runs[scale] = (before, (after - before).abs().mean())
    torch.testing.assert_close(runs[1.0][0], runs[1 / 64][0])  # the same generated heads
    torch.testing.assert_close(runs[1 / 64][1] * 64, runs[1.0][1], rtol=0.05, atol=0)
    with pytest.raises(ValueError, match="feature_scale"):
        build_model("omniseg", feature_scale=0.0)


# -- pooling a training-sized window of a larger input (slide tiles) ------------------------------
def test_window_pool_gives_every_position_a_full_window_inside_the_input():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7)
    for cells, (kh, kw) in [(3, (3, 3)), (2, (2, 2)), (6, (5, 6))]:
        mean, peak = window_pool(x, cells, "mean"), window_pool(x, cells, "max")
        assert mean.shape == peak.shape == x.shape
        for i in range(5):
            for j in range(7):
                r0, c0 = min(max(i - kh // 2, 0), 5 - kh), min(max(j - kw // 2, 0), 7 - kw)
                window = x[:, :, r0 : r0 + kh, c0 : c0 + kw]
                torch.testing.assert_close(mean[:, :, i, j], window.mean(dim=(2, 3)))
                torch.testing.assert_close(peak[:, :, i, j], window.amax(dim=(2, 3)))
    # a window that spans the input (or none) is the caller's whole-input pool
    assert window_pool(x, 7, "mean") is None and window_pool(x, None, "max") is None
    assert window_cells(None, 16) is None and window_cells(128, 16) == 8
    with pytest.raises(ValueError, match="kind"):
        window_pool(x, 3, "median")


def _image_driven_omniseg() -> OmniSeg:
    """A small Omni-Seg whose heads and gate follow the image strongly (at initialisation the
    controller barely reads the image), so pooling another window shows in the output."""
    torch.manual_seed(0)
    model = build_model("omniseg", width=8, norm="batch", presence=True).eval()
    c = model.backbone.bottleneck_channels
    with torch.no_grad():
        model.controller.weight[:, :c] *= 300
        model.presence.weight.mul_(30)
    return model


def test_omniseg_generates_each_blocks_heads_from_the_training_window_around_it():
    model = _image_driven_omniseg()
    x = torch.rand(2, 3, 64, 96)  # bottleneck 4 x 6 cells of 16 px
    x[:, :, :, :48] = 0.1  # glass on the left: the windows there pool other features
    tissues = [4, 1]
    with torch.no_grad():
        whole = model.heads_logits(x, tissues)
        model.context = 32  # 2 x 2 cells
        local = model.heads_logits(x, tissues)
        features, bottleneck = model.encode(x)
        normed = model.controller_norm(bottleneck)
        for i in range(4):
            for j in range(6):
                r0, c0 = min(max(i - 1, 0), 2), min(max(j - 1, 0), 4)
                window = normed[:, :, r0 : r0 + 2, c0 : c0 + 2]
                block = features[:, :, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16]
                both = torch.cat([window.mean(dim=(2, 3)), window.amax(dim=(2, 3))], dim=1)
                for k, t in enumerate(tissues):
                    ids = torch.full((2,), t)
                    params = model._controller(window.mean(dim=(2, 3)), ids)
                    ref = model.gate(model.dynamic_head(block, params), model.presence(both)[:, t])
                    got = local[:, k, :, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16]
                    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        assert (local - whole).abs().max() > 0.01  # the window, not the whole input, decides
        # predict_proba takes the same path; an input that fits the context pools all of it
        torch.testing.assert_close(model.predict_proba(x, tissues), local.softmax(dim=2)[:, :, 1])
        model.context = 64
        square = x[:, :, :64, :64]
        fits = model.heads_logits(square, tissues)
        model.context = None
        torch.testing.assert_close(fits, model.heads_logits(square, tissues))


def test_deeplab_image_pooling_reads_the_training_window_around_each_position():
    torch.manual_seed(0)
    model = build_model("deeplabv3", depth=18, width=8, output_stride=16).eval()
    x = torch.rand(1, 3, 64, 128)
    tissue = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        whole = model(x, tissue)
        model.context = 32  # 2 x 2 cells of the 4 x 8 feature map
        local = model(x, tissue)
        feat = model.backbone(x)
        aspp = model.aspp
        pooled = aspp.pool[1:](window_pool(feat, 2, "mean"))
        ref = aspp.project(torch.cat([b(feat) for b in aspp.branches] + [pooled], dim=1))
        torch.testing.assert_close(aspp(feat, 2), ref)
        assert not torch.allclose(local, whole)
        model.context = 128  # spans the input: the whole-input pooling of training
        torch.testing.assert_close(model(x, tissue), whole)

"""The DESIGN.md invariants on MLPs and conv chains.

Every training-mode comparison is against the masked full-width reference drawing the same slices.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import fx, nn

import sliceout_fx
from tests.helpers import assert_eval_equal, assert_sliced_matches_mask, train_step_outputs
from tests.models import Conv1d3dChain, ConvChain, DepthwiseChain, FunctionalMLP, mlp

OPTIONS = [
    dict(normalisation=n, placement=pl)
    for n, pl in itertools.product(("flow", "probabilistic"), ("immediate", "delayed"))
]


def _cases():
    torch.manual_seed(0)
    return {
        "mlp": (mlp(), (torch.randn(8, 12),)),
        "mlp-gelu": (mlp(act=nn.GELU, depth=2), (torch.randn(8, 12),)),
        "functional-mlp": (FunctionalMLP(), (torch.randn(6, 10),)),
        "conv-chain": (ConvChain(), (torch.randn(4, 3, 8, 8),)),
        "conv-chain-cumulative-bn": (ConvChain(momentum=None), (torch.randn(4, 3, 8, 8),)),
        "depthwise": (DepthwiseChain(), (torch.randn(4, 4, 6, 6),)),
        "conv1d-conv3d": (Conv1d3dChain(), (torch.randn(4, 3, 10), torch.randn(4, 2, 4, 4, 4))),
    }


CASES = _cases()


def _convert(model, inputs, **options):
    return sliceout_fx.convert(model, example_inputs=inputs, **options)


@pytest.mark.parametrize("case", CASES)
def test_eval_output_equals_original(case):
    model, inputs = CASES[case]
    assert_eval_equal(copy.deepcopy(model), inputs, p=0.5, example_inputs=inputs)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: f"{o['normalisation']}-{o['placement']}")
@pytest.mark.parametrize("case", CASES)
def test_sliced_forward_and_gradients_equal_masked_reference(case, options):
    model, inputs = CASES[case]
    assert_sliced_matches_mask(model, inputs, p=0.5, example_inputs=inputs, **options)


def test_every_dropout_of_the_mlp_is_a_site_and_training_graph_has_no_dropout():
    converted = _convert(mlp(), (torch.randn(2, 12),), p=0.5)
    assert [s.name for s in converted.report.sites] == ["drop1", "drop2", "drop3"]
    targets = {n.target for n in converted.sliced_graph.graph.nodes if n.op == "call_module"}
    assert not {"drop1", "drop2", "drop3"} & targets
    # ...while the eval and full-width training graphs still hold them
    assert {"drop1", "drop2", "drop3"} <= {n.target for n in converted.full_graph.graph.nodes}


def test_gradients_are_zero_outside_the_slice_and_nonzero_inside():
    converted = _convert(mlp(width=40), (torch.randn(2, 12),), p=0.5, seed=3)
    train_step_outputs(converted, (torch.randn(16, 12),))
    (s1, s2, s3) = converted.sliceout_sampler.last_draws
    w = converted.report.sites[0].width
    assert w == 20
    g1 = converted.fc1.weight.grad
    rows = torch.zeros(40, dtype=torch.bool)
    rows[s1 : s1 + w] = True
    assert g1[~rows].abs().sum() == 0 and g1[rows].abs().sum() > 0
    assert converted.fc1.bias.grad[~rows].abs().sum() == 0
    g2 = converted.fc2.weight.grad  # rows follow site 2, columns site 1
    cols = rows
    rows2 = torch.zeros(40, dtype=torch.bool)
    rows2[s2 : s2 + w] = True
    assert g2[~rows2].abs().sum() == 0 and g2[:, ~cols].abs().sum() == 0
    assert g2[rows2][:, cols].abs().sum() > 0
    head_cols = torch.zeros(40, dtype=torch.bool)
    head_cols[s3 : s3 + w] = True
    assert converted.head.weight.grad[:, ~head_cols].abs().sum() == 0


def test_batchnorm_running_stats_outside_the_slice_are_untouched():
    # bn_stats="sliced": the live channels' statistics move with the sliced tensors, the others
    # keep theirs (the default keeps every statistic downstream of a slice, see
    # test_bn_statistics.py).
    model = ConvChain()
    inputs = (torch.randn(4, 3, 8, 8),)
    converted = _convert(model, inputs, p=0.5, seed=5, bn_stats="sliced")
    before = {k: v.clone() for k, v in converted.state_dict().items() if "running" in k}
    train_step_outputs(converted, inputs)
    site = converted.report.site("drop1")
    start = converted.sliceout_sampler.last_draws[0]
    live = torch.zeros(16, dtype=torch.bool)
    live[start : start + site.width] = True
    for key in ("bn1.running_mean", "bn1.running_var"):
        after = converted.state_dict()[key]
        assert torch.equal(after[~live], before[key][~live])
        assert not torch.equal(after[live], before[key][live])
    assert converted.bn1.num_batches_tracked.item() == 1


def test_shapes_inside_the_training_graph_are_the_same_at_every_step():
    model, inputs = CASES["conv-chain"]
    converted = _convert(copy.deepcopy(model), inputs, p=0.5, seed=0)
    converted.train()

    class ShapeRecorder(fx.Interpreter):
        def run(self, *args):
            self.shapes: dict[str, tuple] = {}
            super().run(*args)
            return self.shapes

        def run_node(self, n):
            result = super().run_node(n)
            if isinstance(result, torch.Tensor):
                self.shapes[n.name] = tuple(result.shape)
            return result

    seen, draws = [], set()
    for _ in range(6):
        seen.append(ShapeRecorder(converted.sliced_graph).run(*inputs))
        draws.add(converted.sliceout_sampler.last_draws)
    assert len(draws) > 1, "the draws never changed: the test would prove nothing"
    assert all(s == seen[0] for s in seen)
    # and the sliced tensors really are narrower than the full-width ones
    assert seen[0]["sliced_conv_module"][1] == 8


def _linear_model(n: int = 10) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, n), nn.Dropout(0.3), nn.Linear(n, 3))


def _mean_over_all_starts(converted, x):
    site = converted.report.sites[0]
    outs = []
    for start in range(site.units - site.width + 1):
        converted.sliceout_sampler.force([start])
        outs.append(converted(x))
    converted.sliceout_sampler.force(None)
    return torch.stack(outs).mean(0)


def test_probabilistic_normalisation_preserves_the_first_moment_exactly():
    model, x = _linear_model(), torch.randn(5, 4)
    converted = _convert(model, (x,), p=0.3, normalisation="probabilistic").train()
    expected = model.eval()(x)
    with torch.no_grad():
        # Every eligible start is equally likely, so this average is the exact expectation.
        torch.testing.assert_close(_mean_over_all_starts(converted, x), expected)


def test_flow_normalisation_is_only_approximately_unbiased():
    # The counterpart of the exact test above: it shows that test can fail.
    model, x = _linear_model(), torch.randn(5, 4)
    converted = _convert(model, (x,), p=0.3, normalisation="flow").train()
    with torch.no_grad():
        gap = (_mean_over_all_starts(converted, x) - model.eval()(x)).abs().max()
    assert gap > 1e-3


def test_first_moment_statistically_over_random_draws():
    model, x = _linear_model(n=12), torch.randn(3, 4)
    converted = _convert(model, (x,), p=0.5, normalisation="probabilistic", seed=7).train()
    with torch.no_grad():
        mean = torch.stack([converted(x) for _ in range(4000)]).mean(0)
        expected = model.eval()(x)
        spread = torch.stack([converted(x) for _ in range(400)]).std(0)
    # 4000 draws: the standard error is spread / sqrt(4000); allow 4.5 standard errors.
    assert ((mean - expected).abs() <= 4.5 * spread / 4000**0.5 + 1e-6).all()


def test_state_dict_keys_and_shapes_equal_the_original_and_load_both_ways():
    model, inputs = copy.deepcopy(CASES["conv-chain"][0]), CASES["conv-chain"][1]
    converted = _convert(model, inputs, p=0.5, seed=0)
    original_sd, converted_sd = model.state_dict(), converted.state_dict()
    assert list(original_sd) == list(converted_sd)
    assert all(original_sd[k].shape == converted_sd[k].shape for k in original_sd)
    # train the converted model, then move its checkpoint into a fresh original and back
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    for _ in range(2):
        train_step_outputs(converted, inputs)
        opt.step()
    fresh = ConvChain()
    fresh.load_state_dict(converted.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(*inputs), converted.eval()(*inputs))
    reconverted = _convert(ConvChain(), inputs, p=0.5)
    reconverted.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        assert torch.equal(reconverted.eval()(*inputs), fresh(*inputs))


def test_the_original_model_is_not_mutated():
    model, inputs = copy.deepcopy(CASES["conv-chain"][0]), CASES["conv-chain"][1]
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    model.train()
    converted = _convert(model, inputs, p=0.5)
    opt = torch.optim.SGD(converted.parameters(), lr=0.5)
    for _ in range(3):
        train_step_outputs(converted, inputs)
        opt.step()
    assert model.training
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    assert not any(p is q for p in model.parameters() for q in converted.parameters())


def test_inplace_conversion_shares_the_given_parameters():
    model = mlp()
    converted = sliceout_fx.convert(model, p=0.5, inplace=True)
    assert converted.fc1.weight is model.fc1.weight
    assert sliceout_fx.to_original(converted) is model


def test_full_width_training_and_to_original():
    model, inputs = copy.deepcopy(CASES["mlp"][0]), CASES["mlp"][1]
    converted = _convert(model, inputs, p=0.5).train()
    assert isinstance(converted, nn.Sequential) and type(converted) is not nn.Sequential
    with converted.full_width():
        torch.manual_seed(0)
        full = converted(*inputs)
        assert converted.sliceout_sampler.last_draws is None  # no slice drawn at full width
    torch.manual_seed(0)
    assert torch.equal(full, model.train()(*inputs))  # the original training computation
    converted(*inputs)
    assert converted.sliceout_sampler.last_draws is not None
    weight = converted.fc1.weight
    plain = converted.to_original()  # in place: the same object, of the original class again
    assert plain is converted and type(plain) is nn.Sequential and plain.fc1.weight is weight
    assert sliceout_fx.explain(plain, p=0.5).sites  # a plain model again: it can be analysed


def test_gather_mode_is_controlled_dropout_on_the_same_analysis():
    model, inputs = copy.deepcopy(CASES["mlp"][0]), CASES["mlp"][1]
    converted = _convert(model, inputs, p=0.5, mode="gather", seed=0)
    out, grads = train_step_outputs(converted, inputs)
    index = converted.sliceout_sampler.last_draws[0]
    assert isinstance(index, torch.Tensor) and index.numel() == 16
    assert torch.all(index[1:] > index[:-1])  # sorted, distinct
    live_rows = grads["fc1.weight"].abs().sum(1) != 0
    assert set(live_rows.nonzero().flatten().tolist()) <= set(index.tolist())


@pytest.mark.parametrize("p", [0.3, 0.5])
def test_patch_scheme_matches_its_masked_reference_and_keeps_eval(p):
    from sliceout_lab.models import WideResNet

    torch.manual_seed(0)
    model = WideResNet(10, 1, p=0.3).double()  # stride-2 windows in stages 2 and 3
    inputs = (torch.randn(4, 3, 16, 16, dtype=torch.float64),)
    options = dict(p=p, scheme="patch", example_inputs=inputs)
    sliced, _ = assert_sliced_matches_mask(model, inputs, atol=1e-9, **options)
    windows = [s.patch.window for s in sliced.report.sites]
    # side sqrt(1 - p) of 16, 16 and 8 positions, multiples of the strides 1, 2, 2
    assert windows == ([(13, 13), (14, 14), (6, 6)] if p == 0.3 else [(11, 11), (12, 12), (6, 6)])
    assert "window 13x13 of 16x16" in str(sliced.report) or p != 0.3
    model.eval()
    assert_eval_equal(copy.deepcopy(model), inputs, **options)
    with pytest.raises(ValueError, match="training resolution"):
        sliced.train()(torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_patch_windows_move_and_keep_their_shape():
    converted = _convert(ConvChain(), (torch.randn(2, 3, 8, 8),), p=0.5, scheme="patch", seed=0)
    converted.train()
    starts = set()
    for _ in range(8):
        out = converted(torch.randn(2, 3, 8, 8))
        assert out.shape == (2, 6)
        starts.add(converted.sliceout_sampler.last_draws[0])
    assert len(starts) > 1 and all(len(s) == 2 for s in starts)


def test_patch_scheme_rejects_options_it_cannot_honour():
    with pytest.raises(sliceout_fx.SliceOutConfigError, match="flow"):
        sliceout_fx.convert(ConvChain(), scheme="patch", normalisation="probabilistic")
    with pytest.raises(sliceout_fx.SliceOutConfigError, match="flow"):
        sliceout_fx.convert(ConvChain(), scheme="patch", mode="gather")
    with pytest.warns(UserWarning, match="found no site"):
        converted = sliceout_fx.convert(mlp(), scheme="patch")
    assert "nn.ConvNd" in converted.report.skipped[0].reason

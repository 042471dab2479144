"""Example inputs the model does not accept: one clear error, and the model as it was.

Before, shape propagation ran the traced graph and a wrong shape surfaced as fx interpreter text
about graph nodes ("ShapeProp error for: node=%fc1 ... While executing ..."), the real cause
buried in a printed traceback. The model's own code now runs first on the example, so the error
names the example's shapes, the module and source line that failed, the underlying message, and
what to pass instead.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_fx.errors import ExampleInputsError, ShapeInferenceError, UntraceableModelError
from tests.models import ConvChain, FunctionalMLP, mlp


def _snapshot(model: nn.Module) -> dict:
    return {
        "classes": [type(m) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "state": copy.deepcopy(model.state_dict()),
    }


def _assert_untouched(model: nn.Module, before: dict) -> None:
    assert [type(m) for m in model.modules()] == before["classes"]
    assert [m.training for m in model.modules()] == before["training"]
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    assert all(torch.equal(state[k], v) for k, v in before["state"].items())
    for module in model.modules():
        assert "_sliceout" not in module.__dict__
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("inplace", [False, True])
def test_a_wrong_feature_count_names_shapes_module_and_cause(inplace, capfd):
    model = mlp()
    before = _snapshot(model)
    with pytest.raises(ExampleInputsError) as info:
        sliceout_fx.convert(model, p=0.5, inplace=inplace, example_inputs=torch.randn(2, 10))
    message = str(info.value)
    assert "example inputs (input: (2, 10) float32)" in message
    assert "module 'fc1' (Linear(in_features=12, out_features=32, bias=True))" in message
    assert "mat1 and mat2 shapes cannot be multiplied (2x10 and 12x32)" in message
    assert "pass example_inputs=" in message
    for fx_text in ("ShapeProp", "While executing", "%fc1"):
        assert fx_text not in message
    assert "ShapeProp" not in capfd.readouterr().err  # no fx traceback printed either
    # what the fx front end raised before, still
    assert isinstance(info.value, ShapeInferenceError)
    _assert_untouched(model, before)
    # the fix the message gives works
    sliceout_fx.convert(model, p=0.5, example_inputs=torch.randn(2, 12))


def test_a_wrong_channel_count_names_the_conv_and_the_models_line():
    model = ConvChain()
    before = _snapshot(model)
    with pytest.raises(ExampleInputsError) as info:
        sliceout_fx.convert(model, p=0.5, example_inputs=(torch.randn(2, 5, 8, 8),))
    message = str(info.value)
    assert "(x: (2, 5, 8, 8) float32)" in message
    assert "module 'conv1' (Conv2d(3, 16" in message
    assert "tests/models.py" in message and "self.conv1(x)" in message
    assert "expected input[2, 5, 8, 8] to have 3 channels, but got 5 channels" in message
    _assert_untouched(model, before)


def test_a_functional_op_in_the_top_level_forward_is_named_by_its_line():
    model = FunctionalMLP()
    with pytest.raises(ExampleInputsError) as info:
        sliceout_fx.convert(model, p=0.5, example_inputs=(torch.randn(3, 7),))
    message = str(info.value)
    assert "(x: (3, 7) float32)" in message
    assert "tests/models.py" in message and "F.linear(x, self.w1, self.b1)" in message


def test_a_wrong_dtype_and_an_unknown_argument_are_named():
    with pytest.raises(ExampleInputsError, match=r"input: \(2, 12\) int64.*'fc1'"):
        sliceout_fx.convert(mlp(), p=0.5, example_inputs=torch.ones(2, 12, dtype=torch.long))
    with pytest.raises(ExampleInputsError, match=r"no_such: \(2, 12\) float32.*no_such"):
        sliceout_fx.convert(mlp(), p=0.5, example_inputs={"no_such": torch.randn(2, 12)})


class WithOptional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop, self.out = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)

    def forward(self, x, mask=None, bias=None):
        h = self.drop(torch.relu(self.fc(x)))
        if mask is not None:
            h = h * mask
        y = self.out(h)
        return y if bias is None else y + bias


def test_keyword_example_inputs_of_a_traced_model_are_taken_by_name():
    model = WithOptional()
    inputs = {"x": torch.randn(3, 4), "bias": torch.randn(3, 2)}
    converted = sliceout_fx.convert(model, p=0.5, seed=0, example_inputs=inputs)
    assert [s.name for s in sliceout_fx.explain(converted).sites] == ["drop"]
    model.eval()
    converted.eval()
    with torch.no_grad():
        assert torch.equal(converted(**inputs), model(**inputs))
    assert converted.train()(**inputs).shape == (3, 2)


def test_a_hf_batch_the_model_rejects_names_the_layer():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=16,
    )
    model = transformers.BertForSequenceClassification(config)
    before = _snapshot(model)
    ids = torch.randint(0, 100, (2, 40))  # longer than the 16 positions
    with pytest.raises(ExampleInputsError) as info:
        sliceout_fx.convert(model, p=0.3, example_inputs={"input_ids": ids})
    message = str(info.value)
    assert "(input_ids: (2, 40) int64)" in message and "'bert.embeddings" in message
    assert "pass example_inputs" in message
    assert isinstance(info.value, UntraceableModelError)  # what the block front end raised
    _assert_untouched(model, before)


class WithFlag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop, self.out = nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2)

    def forward(self, x, double=False):
        y = self.out(self.drop(torch.relu(self.fc(x))))
        return 2 * y if double else y


def test_concrete_args_complete_the_example_call():
    """The example call passes them as tracing specialises on them, not the defaults."""
    model = WithFlag()
    x = torch.randn(3, 4)
    options = dict(p=0.5, example_inputs=(x,), concrete_args={"double": True})
    converted = sliceout_fx.convert(model, **options)
    with torch.no_grad():
        assert torch.equal(converted.eval()(x, True), model.eval()(x, True))
    assert converted.train()(x, True).shape == (3, 2)
    with pytest.raises(ExampleInputsError, match=r"x: \(3, 5\) float32"):
        sliceout_fx.convert(model, **{**options, "example_inputs": (torch.randn(3, 5),)})

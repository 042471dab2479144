"""``convert(hf_model)`` without example inputs: the guess fits the model.

The guess reads the model's main input (token ids, ``pixel_values``, Whisper's
``input_features``), makes floats in the model's dtype, and gives an encoder-decoder its decoder
token ids (T5 and Whisper need them). Each model is the zoo catalogue's small config in float64,
checked as every converted model is: eval equals the original, sliced training equals the mask
reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sliceout_fx
from sliceout_fx.blocks import example_inputs_for
from tests import zoo
from tests.helpers import assert_pair_matches, call, convert_pair, main_output

transformers = pytest.importorskip("transformers")

#: Encoder-decoders of the zoo's catalogue, whose guess needs decoder inputs (and Whisper's
#: ``input_features``).
MODELS = ("t5", "bart", "whisper")


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return zoo.hf_model(name).double()


@pytest.mark.parametrize("name", MODELS)
def test_the_guess_has_the_main_input_in_the_models_dtype_and_decoder_ids(name):
    model = _build(name)
    inputs = example_inputs_for(model)
    assert model.main_input_name in inputs
    assert "decoder_input_ids" in inputs
    for value in inputs.values():
        if value.is_floating_point():
            assert value.dtype == torch.float64
    if name == "whisper":  # (batch, mel bins, two frames per encoder position)
        config = model.config
        expected = (2, config.num_mel_bins, 2 * config.max_source_positions)
        assert inputs["input_features"].shape == expected
    # the global RNG is left alone
    state = torch.random.get_rng_state()
    example_inputs_for(model)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.fixture(scope="module", params=sorted(MODELS))
def converted(request):
    """A model and its sliced and masked conversions, both without example inputs."""
    model = _build(request.param)
    sliced, masked = convert_pair(model, p=0.3)
    return model, sliced, masked


def test_convert_without_example_inputs_finds_sites_in_encoder_and_decoder(converted):
    model, sliced, _ = converted
    assert type(sliced) is type(model)
    names = [s.name for s in sliceout_fx.explain(sliced).sites]
    assert any("encoder" in n for n in names) and any("decoder" in n for n in names), names


def test_eval_is_identical(converted):
    model, sliced, _ = converted
    inputs = example_inputs_for(model)
    model.eval()
    sliced.eval()
    with torch.no_grad():
        assert torch.equal(main_output(call(sliced, inputs)), main_output(call(model, inputs)))


def test_sliced_training_on_the_guess_equals_the_mask_reference(converted):
    model, sliced, masked = converted
    assert_pair_matches(sliced, masked, example_inputs_for(model), steps=2, atol=1e-10)


def test_a_vision_models_guess_follows_its_dtype():
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=8,
    )
    model = transformers.ViTForImageClassification(config).to(torch.bfloat16)
    (pixels,) = example_inputs_for(model).values()
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == torch.bfloat16
    sliceout_fx.convert(model, p=0.3)  # the guess runs through the model

"""The model zoo of the coverage sweep: what is converted, with which inputs, and how it is judged.

Every entry is a model of torchvision (classification and segmentation), timm or HuggingFace
``transformers`` built with random weights, plus a small float64 example input. :func:`check_model`
converts one entry under one site policy and records what happened in a :class:`ZooResult`:

* ``convert`` succeeds, or raises one of the package's documented errors (``SliceOutError``);
  any other exception is a failure of the pass;
* the converted model's eval output is ``torch.equal`` to the original's;
* where the model has sites, a sliced training step equals the masked reference drawing the same
  slices (``mode="slice"`` vs ``mode="mask"``): output, every gradient and every buffer, for two
  steps, in float64.

``tests/test_zoo.py`` turns each (entry, policy) into a test; ``scripts/coverage.py`` runs them all
and writes ``docs/coverage.md``. The catalogue is a plain module so that both can import it without
pytest.

Models that fail today are listed in :data:`KNOWN_FAILURES` only (with the failure measured): the
test suite marks them ``xfail(strict=True)``, so a fix in the pass makes the stale entry an error
that asks for its removal.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import sliceout_fx
from sliceout_fx import SliceOutError
from tests.helpers import Inputs, assert_pair_matches, call, convert_pair, main_output

#: The rate every site is sliced at, and the sampler seed shared by slice and mask conversions.
P = 0.3
SITE_POLICIES = ("auto", "all")
SOURCES = ("torchvision", "torchvision-seg", "timm", "hf")

# float64 tolerances of sliced vs mask. atol is relative to each tensor's largest magnitude (see
# tests.helpers.assert_pair_matches): random-init gradients reach 1e5 in deep CNNs.
ATOL = 1e-9
RTOL = 1e-7
STEPS = 2


@dataclass(frozen=True)
class ZooEntry:
    """One model of the sweep: how to build it (random init) and a small input for it."""

    name: str
    source: str  # one of SOURCES
    build: Callable[[], nn.Module]
    inputs: Callable[[], Inputs]  # float64 example inputs: a tuple or a dict of keyword inputs


def _image(size: int, batch: int = 2, channels: int = 3) -> Callable[[], tuple[torch.Tensor]]:
    def make() -> tuple[torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(batch, channels, size, size, generator=gen, dtype=torch.float64),)

    return make


# --- torchvision ------------------------------------------------------------------------------

#: torchvision classification models left out of the sweep: over ~100 M parameters (millions,
#: with the default 1000 classes). In float64 on a CPU each would take minutes per step.
TORCHVISION_EXCLUDED: dict[str, float] = {
    "convnext_large": 197.8,
    "efficientnet_v2_l": 118.5,
    "regnet_x_32gf": 107.8,
    "regnet_y_32gf": 145.0,
    "regnet_y_128gf": 644.8,
    "vgg11": 132.9,
    "vgg11_bn": 132.9,
    "vgg13": 133.0,
    "vgg13_bn": 133.1,
    "vgg16": 138.4,
    "vgg16_bn": 138.4,
    "vgg19": 143.7,
    "vgg19_bn": 143.7,
    "vit_h_14": 632.0,
    "vit_l_16": 304.3,
    "vit_l_32": 306.5,
    "wide_resnet101_2": 126.9,
}

# The smallest input each model accepts, where 64x64 is too small (MaxViT's 7x7 windows after a
# stride of 32; Inception-v3's 75x75 minimum).
_TV_SIZES = {"maxvit_t": 224, "inception_v3": 80}
# Inception-v3's auxiliary classifier needs 299x299 inputs in training: it is left out.
_TV_OPTIONS: dict[str, dict[str, Any]] = {
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "googlenet": {"init_weights": False},
}


def _torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _torchvision(name: str) -> ZooEntry:
    def build() -> nn.Module:
        import torchvision

        options = dict(_TV_OPTIONS.get(name, {}))
        if name.startswith("vit_"):
            options["image_size"] = 64  # its positional embedding is sized for the input
        return torchvision.models.get_model(name, weights=None, num_classes=10, **options)

    return ZooEntry(name, "torchvision", build, _image(_TV_SIZES.get(name, 64)))


def _segmentation_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))


def _segmentation(name: str) -> ZooEntry:
    def build() -> nn.Module:
        import torchvision

        # No auxiliary head: the sweep judges the "out" map only (see tests.helpers.main_output).
        return torchvision.models.get_model(
            name, weights=None, weights_backbone=None, num_classes=5
        )

    return ZooEntry(name, "torchvision-seg", build, _image(64))


# --- timm ---------------------------------------------------------------------------------------

# One small variant per family: (model name, create_model options, input size).
_TIMM_MODELS: list[tuple[str, dict[str, Any], int]] = [
    ("resnet18", {}, 64),
    ("resnetv2_50", {}, 64),
    ("seresnext26d_32x4d", {}, 64),
    ("skresnet18", {}, 64),
    ("res2net50_14w_8s", {}, 64),
    ("resnest14d", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("mobilenetv3_small_100", {}, 64),
    ("mobilenetv4_conv_small", {}, 64),
    ("ghostnet_100", {}, 64),
    ("lcnet_050", {}, 64),
    ("mixnet_s", {}, 64),
    ("rexnet_100", {}, 64),
    ("regnetx_002", {}, 64),
    ("regnety_002", {}, 64),
    ("densenet121", {}, 64),
    ("dla46_c", {}, 64),
    ("dpn48b", {}, 64),
    ("hrnet_w18_small", {}, 64),
    ("cspresnet50", {}, 64),
    ("ese_vovnet19b_dw", {}, 64),
    ("repvgg_a0", {}, 64),
    ("mobileone_s0", {}, 64),
    ("hgnetv2_b0", {}, 64),
    ("convnext_atto", {}, 64),
    ("convnextv2_atto", {}, 64),
    ("edgenext_xx_small", {}, 64),
    ("poolformer_s12", {}, 64),
    ("mobilevit_xxs", {}, 64),
    ("fastvit_t8", {}, 64),
    ("efficientvit_b0", {}, 64),
    ("levit_128s", {"img_size": 64}, 64),
    ("vit_tiny_patch16_224", {"img_size": 64}, 64),
    ("deit_tiny_patch16_224", {"img_size": 64}, 64),
    ("pit_ti_224", {"img_size": 64}, 64),
    ("xcit_nano_12_p16_224", {"img_size": 64}, 64),
    ("coat_lite_tiny", {"img_size": 64}, 64),
    ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4}, 64),
    ("maxvit_pico_rw_256", {"img_size": 64}, 64),
    ("efficientformer_l1", {}, 224),  # attention biases sized for a 7x7 map at 224
]


def _timm(name: str, options: dict[str, Any], size: int) -> ZooEntry:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **options)

    return ZooEntry(name, "timm", build, _image(size))


# --- HuggingFace ----------------------------------------------------------------------------

VOCAB = 100
SEQ = 8
_ENCODER = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
_DECODER = dict(_ENCODER, num_key_value_heads=2, pad_token_id=0)
_VISION = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    image_size=32,
    patch_size=8,
    num_labels=3,
)
_SEQ2SEQ = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    pad_token_id=0,
    decoder_start_token_id=2,
)

# family: (config class, model class, config options, input kind)
_HF_MODELS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "bert": ("BertConfig", "BertForSequenceClassification", _ENCODER, "text"),
    "roberta": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        dict(_ENCODER, pad_token_id=1),
        "text",
    ),
    "xlm-roberta": (
        "XLMRobertaConfig",
        "XLMRobertaForSequenceClassification",
        dict(_ENCODER, pad_token_id=1),
        "text",
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=VOCAB),
        "text",
    ),
    "albert": (
        "AlbertConfig",
        "AlbertForSequenceClassification",
        dict(_ENCODER, embedding_size=32),
        "text",
    ),
    "electra": (
        "ElectraConfig",
        "ElectraForSequenceClassification",
        dict(_ENCODER, embedding_size=32),
        "text",
    ),
    "deberta": ("DebertaConfig", "DebertaForSequenceClassification", _ENCODER, "text"),
    "deberta-v2": (  # DeBERTa-v3's layout: relative position buckets, shared keys
        "DebertaV2Config",
        "DebertaV2ForSequenceClassification",
        dict(
            _ENCODER,
            relative_attention=True,
            position_buckets=16,
            max_relative_positions=-1,
            pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm",
            share_att_key=True,
        ),
        "text",
    ),
    "mobilebert": (
        "MobileBertConfig",
        "MobileBertForSequenceClassification",
        dict(
            _ENCODER,
            embedding_size=32,
            true_hidden_size=32,
            intra_bottleneck_size=32,
            intermediate_size=64,
            num_feedforward_networks=2,
        ),
        "text",
    ),
    "mpnet": ("MPNetConfig", "MPNetForSequenceClassification", _ENCODER, "text"),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB),
        "text",
    ),
    "gpt-neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            intermediate_size=128,
            attention_types=[[["global", "local"], 1]],
            window_size=4,
            max_position_embeddings=64,
            vocab_size=VOCAB,
        ),
        "text",
    ),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_ENCODER, rotary_pct=0.25), "text"),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=128,
            rotary_dim=8,
            n_positions=64,
            vocab_size=VOCAB,
        ),
        "text",
    ),
    "codegen": (
        "CodeGenConfig",
        "CodeGenForCausalLM",
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=128,
            rotary_dim=8,
            n_positions=64,
            n_ctx=64,
            vocab_size=VOCAB,
        ),
        "text",
    ),
    "gpt-bigcode": (
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_inner=128,
            n_positions=64,
            vocab_size=VOCAB,
            multi_query=True,
        ),
        "text",
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB),
        "text",
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=128,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
            vocab_size=VOCAB,
            pad_token_id=0,
        ),
        "text",
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB),
        "text",
    ),
    "mpt": (
        "MptConfig",
        "MptForCausalLM",
        dict(
            d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64, vocab_size=VOCAB
        ),
        "text",
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _DECODER, "text"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DECODER, sliding_window=4), "text"),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        # The grouped-matmul experts kernel has no float64 form: the eager loop over experts.
        dict(_DECODER, num_local_experts=4, num_experts_per_tok=2, experts_implementation="eager"),
        "text",
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER, "text"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DECODER, head_dim=16), "text"),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_DECODER, partial_rotary_factor=0.5), "text"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _DECODER, "text"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_DECODER, head_dim=16), "text"),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(_DECODER, head_dim=16, sliding_window=4),
        "text",
    ),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", _DECODER, "text"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", _DECODER, "text"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", _DECODER, "text"),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            d_model=64,
            d_ff=128,
            d_kv=16,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
        ),
        "seq2seq",
    ),
    "bart": ("BartConfig", "BartForConditionalGeneration", _SEQ2SEQ, "seq2seq"),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", _SEQ2SEQ, "seq2seq"),
    "whisper": (
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        dict(
            {k: v for k, v in _SEQ2SEQ.items() if k != "max_position_embeddings"},
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=16,
        ),
        "speech",
    ),
    "vit": ("ViTConfig", "ViTForImageClassification", _VISION, "image"),
    "deit": ("DeiTConfig", "DeiTForImageClassification", _VISION, "image"),
    "beit": (
        "BeitConfig",
        "BeitForImageClassification",
        dict(_VISION, use_relative_position_bias=True),
        "image",
    ),
    "dinov2": (
        "Dinov2Config",
        "Dinov2ForImageClassification",
        dict({k: v for k, v in _VISION.items() if k != "intermediate_size"}, mlp_ratio=2),
        "image",
    ),
    "swin": (
        "SwinConfig",
        "SwinForImageClassification",
        dict(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 4],
            window_size=4,
            num_labels=3,
        ),
        "image",
    ),
    "convnext": (
        "ConvNextConfig",
        "ConvNextForImageClassification",
        dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3),
        "image",
    ),
    "convnextv2": (
        "ConvNextV2Config",
        "ConvNextV2ForImageClassification",
        dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3),
        "image",
    ),
    "segformer": (
        "SegformerConfig",
        "SegformerForSemanticSegmentation",
        dict(
            num_encoder_blocks=2,
            depths=[1, 1],
            sr_ratios=[2, 1],
            hidden_sizes=[16, 32],
            patch_sizes=[7, 3],
            strides=[4, 2],
            num_attention_heads=[1, 2],
            mlp_ratios=[2, 2],
            decoder_hidden_size=32,
            num_labels=3,
        ),
        "image",
    ),
    "resnet": (
        "ResNetConfig",
        "ResNetForImageClassification",
        dict(
            embedding_size=16,
            hidden_sizes=[16, 32],
            depths=[1, 1],
            layer_type="bottleneck",
            num_labels=3,
        ),
        "image",
    ),
}


def _is_rate(key: str, value: Any) -> bool:
    """A dropout-like probability of a config: dropout, LayerDrop, stochastic depth."""
    words = ("dropout", "pdrop", "layerdrop", "drop_path", "drop_rate")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return is_number and any(w in key for w in words)


def without_dropout(config: Any) -> Any:
    """``config`` with every dropout probability 0, so that no dropout left in place draws.

    The slice and mask conversions replace different ops; a dropout the pass keeps would draw
    from the global RNG in a different order in the two, and the reference would prove nothing.
    """
    for key, value in list(vars(config).items()):
        if _is_rate(key, value):
            setattr(config, key, 0.0)
    return config


def hf_model(family: str) -> nn.Module:
    """A catalogue HuggingFace model (random init, every dropout probability 0), for tests that
    need one of the sweep's small configs without its example inputs."""
    return _hf(family, *_HF_MODELS[family]).build()


def _hf(family: str, config_cls: str, model_cls: str, options: dict, kind: str) -> ZooEntry:
    def build() -> nn.Module:
        import transformers

        config = without_dropout(getattr(transformers, config_cls)(**options))
        return getattr(transformers, model_cls)(config)

    return ZooEntry(family, "hf", build, _hf_inputs(kind, options))


def _hf_inputs(kind: str, options: Mapping[str, Any]) -> Callable[[], dict[str, torch.Tensor]]:
    def make() -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(0)
        if kind == "image":
            size = options.get("image_size", 32)
            return {"pixel_values": torch.randn(2, 3, size, size, generator=gen).double()}
        # Token 0 is padding in most configs, 1 in RoBERTa's: draw from 2 up.
        decoder = torch.randint(2, VOCAB, (2, SEQ), generator=gen)
        if kind == "speech":
            frames = 2 * options["max_source_positions"]  # Whisper checks the exact length
            features = torch.randn(2, options["num_mel_bins"], frames, generator=gen).double()
            return {"input_features": features, "decoder_input_ids": decoder}
        ids = torch.randint(2, VOCAB, (2, SEQ), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # a padded row: attention masks must keep working
        batch = {"input_ids": ids, "attention_mask": mask}
        if kind == "seq2seq":
            batch["decoder_input_ids"] = decoder
        return batch

    return make


# --- the catalogue ------------------------------------------------------------------------------


def catalogue() -> list[ZooEntry]:
    """Every entry of the sweep, torchvision first, then segmentation, timm and HuggingFace."""
    entries = [_torchvision(n) for n in _torchvision_names() if n not in TORCHVISION_EXCLUDED]
    entries += [_segmentation(n) for n in _segmentation_names()]
    entries += [_timm(*spec) for spec in _TIMM_MODELS]
    entries += [_hf(family, *spec) for family, spec in _HF_MODELS.items()]
    names = [e.name for e in entries]
    duplicates = {n for n in names if names.count(n) > 1}
    # timm and torchvision share names (resnet18, densenet121...): the timm ones get a prefix.
    return [
        ZooEntry(f"timm-{e.name}", e.source, e.build, e.inputs)
        if e.name in duplicates and e.source == "timm"
        else e
        for e in entries
    ]


#: A fast, varied subset for the default test run: residual, depthwise, squeeze-excite, fire
#: modules, a segmentation head, a vision transformer, an encoder, decoders, an encoder-decoder,
#: heads folded into the batch axis (BLOOM, DeBERTa-v2) and heads taken by index (Falcon).
FAST = (
    "resnet18",
    "mobilenet_v3_small",
    "squeezenet1_1",
    "shufflenet_v2_x0_5",
    "lraspp_mobilenet_v3_large",
    "mixnet_s",
    "levit_128s",
    "bert",
    "gpt2",
    "llama",
    "whisper",
    "bloom",
    "deberta-v2",
    "falcon",
)

#: Failures measured by the sweep: (model, site policy) -> what fails. The tests mark these
#: ``xfail(strict=True)``; remove an entry once its model passes.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


# --- the check ------------------------------------------------------------------------------


@dataclass
class ZooResult:
    """What one (model, site policy) did: conversion, sites, and the reference checks."""

    name: str
    source: str
    sites: str  # the site policy
    params_m: float = 0.0  # parameters, millions
    status: str = "not run"  # convert: "ok", "documented" (a SliceOutError) or "failed"
    stage: str = ""  # where an exception arose: build, convert, report, eval, train (or process)
    error: str = ""  # the exception, one line
    where: str = ""  # the innermost sliceout_fx frame of the traceback
    trace: str = ""  # the last lines of the traceback
    n_sites: int = 0
    n_skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    flops_ratio: float | None = None
    class_kept: bool | None = None
    has_attention: bool | None = None  # whether the captured graphs compute attention at all
    heads_sliced: bool | None = None
    head_blockers: list[str] = field(default_factory=list)  # of attention groups left whole
    eval_exact: bool | None = None
    sliced_matches_mask: bool | None = None  # None: not checked (no site, or an earlier failure)
    mismatch: str = ""
    seconds: float = 0.0

    def problems(self) -> list[str]:
        """What the sweep counts as wrong; empty when the model passes."""
        found = []
        if self.stage and self.status != "documented":
            found.append(f"{self.stage} raised {self.error} (at {self.where or 'outside'})")
        if self.class_kept is False:
            found.append("the converted model is not an instance of the original class")
        if self.eval_exact is False:
            found.append("eval output differs from the original's")
        if self.sliced_matches_mask is False:
            found.append(f"sliced != mask reference: {self.mismatch}")
        if self.source == "hf" and self.heads_sliced is False and not heads_cannot_be_cut(self):
            found.append("attention heads left whole: " + "; ".join(self.head_blockers[:2]))
        return found


def _describe(exc: BaseException) -> tuple[str, str, str]:
    """(one-line error, innermost sliceout_fx frame, last traceback lines) of an exception."""
    message = str(exc).strip().splitlines()
    error = f"{type(exc).__name__}: {message[0] if message else ''}"[:300]
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename.replace("\\", "/")
        if "/sliceout_fx/" in path:  # keep the innermost
            where = f"sliceout_fx/{path.split('/sliceout_fx/')[-1]}:{frame.lineno} ({frame.name})"
    trace = "".join(traceback.format_exception(exc)[-6:])[-1500:]
    return error, where, trace


def _is_comparison(exc: AssertionError) -> bool:
    """Whether an ``AssertionError`` is the reference comparison's, not one raised in the pass."""
    frames = traceback.extract_tb(exc.__traceback__)
    last = frames[-1].filename.replace("\\", "/") if frames else ""
    return last.endswith("tests/helpers.py") or "/torch/testing/" in last


def _is_attention(node: Any) -> bool:
    """Whether an fx node is attention: its rule says so (fused SDPA, eager matmul-softmax)."""
    from sliceout_fx.rules import rule_for

    try:
        rule = rule_for(node, node.graph.owning_module)
    except Exception:  # a rule lookup that needs more than the node: judge by the name
        rule = None
    return getattr(rule, "is_attention", False) or "scaled_dot_product" in str(node.target)


def _record_report(result: ZooResult, converted: nn.Module) -> None:
    report = sliceout_fx.explain(converted)
    result.n_sites = len(report.sites)
    result.n_skipped = len(report.skipped)
    result.skip_reasons = [k.reason for k in report.skipped]
    result.flops_ratio = float(report.flops_ratio)
    # A site cuts heads when its group passes through attention; a model has heads to cut when
    # any captured graph (the whole model, or each exported layer) computes attention.
    result.heads_sliced = any(s.group.attention for s in report.sites)
    graphs = {n.graph for g in report.groups for n in g.nodes}
    result.has_attention = any(_is_attention(n) for graph in graphs for n in graph.nodes)
    # Why heads were not cut: the blockers of the attention groups no site took (group ids are
    # per exported layer, so groups are told apart by identity).
    taken = {id(s.group) for s in report.sites}
    blockers = (
        b for g in report.groups if id(g) not in taken and _feeds_attention(g) for b in g.blockers
    )
    result.head_blockers = list(dict.fromkeys(blockers))


_STATISTICS = ("reduces over this axis", "normalises over this axis")


def heads_cannot_be_cut(r: ZooResult) -> bool:
    """Heads left whole because a statistic spans all of them (OLMo-2's q/k RMSNorm over the
    whole projection): cutting them would change what the model computes."""
    return bool(r.head_blockers) and all(any(s in b for s in _STATISTICS) for b in r.head_blockers)


def _feeds_attention(group: Any) -> bool:
    """Whether a group computes attention or feeds it without passing a layer: a Q/K/V width
    blocked before the attention op (BLOOM merges its heads into the batch axis first)."""
    from sliceout_fx.rules import rule_for

    if group.attention:
        return True
    frontier, seen = [a.node for a in group.axes], set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_attention(node):
            return True
        try:
            layer = rule_for(node, node.graph.owning_module).is_layer
        except Exception:  # a rule lookup that needs more than the node (see _is_attention)
            layer = False
        if not layer:
            frontier.extend(node.users)
    return False


def _fail(result: ZooResult, stage: str, exc: BaseException) -> ZooResult:
    """Record an exception; before conversion completes it is also a failed conversion."""
    if stage in ("build", "convert"):
        result.status = "failed"
    result.stage = stage
    result.error, result.where, result.trace = _describe(exc)
    return result


def check_model(entry: ZooEntry, sites: str, p: float = P, steps: int = STEPS) -> ZooResult:
    """Convert ``entry`` under ``sites`` in float64 and check it against the original and mask.

    Never raises for a failure of the model or the pass: everything goes into the result.
    """
    start = time.perf_counter()
    result = ZooResult(entry.name, entry.source, sites)
    try:
        torch.manual_seed(0)
        model = entry.build().double().eval()
        inputs = entry.inputs()
        result.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        with torch.no_grad():
            expected = main_output(call(model, inputs))
    except Exception as exc:  # the model itself does not run: a catalogue error
        return _fail(result, "build", exc)
    try:
        _check_converted(result, model, inputs, expected, sites, p, steps)
    finally:
        result.seconds = time.perf_counter() - start
    return result


def _check_converted(
    result: ZooResult,
    model: nn.Module,
    inputs: Inputs,
    expected: torch.Tensor,
    sites: str,
    p: float,
    steps: int,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "found no site" and the libraries' own warnings
        try:
            sliced, masked = convert_pair(model, p=p, sites=sites, example_inputs=inputs)
        except SliceOutError as exc:
            _fail(result, "convert", exc)
            result.status = "documented"
            return
        except Exception as exc:
            _fail(result, "convert", exc)
            return
        result.status = "ok"
        result.class_kept = isinstance(sliced, type(model))
        try:
            _record_report(result, sliced)
        except Exception as exc:
            _fail(result, "report", exc)
            return
        try:
            with torch.no_grad():
                got = main_output(call(sliced.eval(), inputs))
            result.eval_exact = bool(torch.equal(got, expected))
        except Exception as exc:
            _fail(result, "eval", exc)
            return
        if not result.n_sites:
            return
        try:
            assert_pair_matches(
                sliced, masked, inputs, steps=steps, atol=ATOL, rtol=RTOL, relative_atol=True
            )
            result.sliced_matches_mask = True
        except AssertionError as exc:
            if not _is_comparison(exc):  # an assert inside the pass: a crash, not a mismatch
                _fail(result, "train", exc)
                return
            result.sliced_matches_mask = False
            lines = str(exc).strip().splitlines()
            result.mismatch = " ".join(line.strip() for line in lines[:4])[:400]
            result.error, result.where, result.trace = _describe(exc)
        except Exception as exc:
            _fail(result, "train", exc)

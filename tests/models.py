"""Small models shared by the tests: the paper's MLP shape in miniature and conv chains."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def mlp(
    width: int = 32,
    depth: int = 3,
    p: float = 0.5,
    in_features: int = 12,
    classes: int = 5,
    act: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """Linear -> act -> Dropout, ``depth`` times, then a classifier (the paper's MLP layout)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    fan_in = in_features
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(fan_in, width)
        layers[f"act{i}"] = act()
        layers[f"drop{i}"] = nn.Dropout(p)
        fan_in = width
    layers["head"] = nn.Linear(fan_in, classes)
    return nn.Sequential(layers)


class FunctionalMLP(nn.Module):
    """The same MLP written with ``F.linear`` / ``F.dropout(..., self.training)``."""

    def __init__(self, width: int = 24, p: float = 0.4) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(width, 10) / 4)
        self.b1 = nn.Parameter(torch.randn(width) / 4)
        self.w2 = nn.Parameter(torch.randn(3, width) / 4)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.gelu(F.linear(x, self.w1, self.b1)), self.p, self.training)
        return F.linear(h, self.w2)


class ConvChain(nn.Module):
    """conv-BN-ReLU-Dropout2d, conv-BN-ReLU, grouped conv-BN-SiLU-Dropout, then a 1x1 conv."""

    def __init__(self, groups: int = 4, momentum: float | None = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16, momentum=momentum)
        self.drop1 = nn.Dropout2d(0.5)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(24, momentum=momentum)
        self.conv3 = nn.Conv2d(24, 24, 3, padding=1, groups=groups)
        self.bn3 = nn.BatchNorm2d(24, momentum=momentum)
        self.drop3 = nn.Dropout(0.25)
        self.conv4 = nn.Conv2d(24, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.drop3(F.silu(self.bn3(self.conv3(x))))
        return self.conv4(x).mean((2, 3))


class DepthwiseChain(nn.Module):
    """1x1 expand -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> Dropout -> 1x1 project."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(4, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.act1 = nn.ReLU6()
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.act2 = nn.ReLU6()
        self.drop = nn.Dropout(0.3)
        self.project = nn.Conv2d(24, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.bn2(self.dw(self.act1(self.bn1(self.expand(x))))))
        return self.project(self.drop(x)).flatten(1)


class Conv1d3dChain(nn.Module):
    """Conv1d and Conv3d chains with BatchNorm1d/3d and channel dropouts."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 12, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(12)
        self.d1 = nn.Dropout1d(0.5)
        self.c2 = nn.Conv1d(12, 4, 3, padding=1)
        self.v1 = nn.Conv3d(2, 10, 3, padding=1)
        self.bnv = nn.BatchNorm3d(10)
        self.dv = nn.Dropout3d(0.4)
        self.v2 = nn.Conv3d(10, 4, 1)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a = self.c2(self.d1(F.relu(self.bn1(self.c1(x))))).mean(2)
        b = self.v2(self.dv(torch.tanh(self.bnv(self.v1(v))))).mean((2, 3, 4))
        return a + b


def tiny_gpt2(**overrides) -> nn.Module:
    """HuggingFace ``GPT2LMHeadModel``, small config: width 64, 2 layers, 4 heads, no dropout."""
    import transformers

    config = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **overrides,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def tiny_llama(**overrides) -> nn.Module:
    """HuggingFace ``LlamaForCausalLM`` from a small config: width 64, 2 layers, 4/2 heads (GQA)."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=100, max_position_embeddings=64, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, **overrides,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def tiny_vit(num_classes: int = 10, drop_rate: float = 0.0) -> nn.Module:
    """A randomly initialised two-block timm ViT on 32x32 images, with FFN dropout."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        num_classes=num_classes,
        proj_drop_rate=0.1,
        drop_rate=drop_rate,
    )


class AttentionStack(nn.Module):
    """Attention blocks built by ``block()`` one after another and a classifier; each block
    returns ``(x, attention weights)``, and the stack returns the logits then every block's
    weights (what ``capture="blocks"`` exports one block at a time)."""

    def __init__(self, block: Callable[[], nn.Module], dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block() for _ in range(depth))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weights = []
        for layer in self.layers:
            x, probs = layer(x)
            weights.append(probs)
        return (self.head(x), *weights)

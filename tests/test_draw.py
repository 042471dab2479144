"""``sliceout_fx.draw``: pictures of the analysis, from Python and from ``sliceout-fx draw``.

The SVGs keep their text as text, so the checks read what a person sees: the site names, the
``live/total`` widths, the legend's reasons, and which palette colours fill the boxes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import sliceout_fx
from sliceout_fx.cli import main
from sliceout_fx.draw import PALETTE, draw
from sliceout_lab.models import WideResNet, paper_mlp
from tests.models import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def _fills(svg: str) -> set[str]:
    return set(re.findall(r"fill: (#[0-9a-f]{6})", svg))


def _texts(svg: str) -> list[str]:
    return re.findall(r"<text[^>]*>([^<]*)</text>", svg)


def _group_fills(svg: str) -> set[str]:
    return _fills(svg) & {fill for fill, _ in PALETTE}


# ------------------------------------------------------------------------------------- python


def test_paper_mlp_svg_names_every_site_and_gives_each_group_one_colour(tmp_path: Path) -> None:
    path = draw(paper_mlp(0.5), tmp_path / "mlp.svg", p=0.5)
    assert path == tmp_path / "mlp.svg"
    svg = path.read_text()
    texts = _texts(svg)
    for name in ("drop1", "drop2", "drop3", "fc1", "fc2", "fc3", "head"):
        assert name in texts, f"no box labelled {name}"
    for i in (1, 2, 3):
        legend = f"drop{i} (dropout site, group {i - 1}): keeps 1024/2048"
        assert any(t.startswith(legend) for t in texts)
    # Three sliced groups: the first three palette fills, each its own, and nothing else.
    assert _group_fills(svg) == {PALETTE[0][0], PALETTE[1][0], PALETTE[2][0]}
    assert sum("1024/2048" in t for t in texts) >= 9  # fc, act, dropout of each hidden layer
    # The logits are observable: the output stops the head's group, and says why.
    assert any("output stops a group" in t for t in texts)
    assert "<pattern" in svg  # the hatch of that blocker


def test_same_analysis_gives_the_same_file_from_a_model_an_analysis_or_a_converted_model(
    tmp_path: Path,
) -> None:
    model = paper_mlp(0.5, hidden=64)
    config = sliceout_fx.SliceOutConfig(p=0.25)
    analysis = sliceout_fx.analyse(model, config)
    a = draw(model, tmp_path / "a.svg", p=0.25).read_text()
    b = draw(analysis, tmp_path / "b.svg").read_text()
    c = draw(sliceout_fx.convert(model, p=0.25), tmp_path / "c.svg").read_text()
    assert a == b == c
    assert any(t.startswith("drop1 (dropout site") and "48/64" in t for t in _texts(a))
    with pytest.raises(TypeError, match="fixed by the analysis"):
        draw(analysis, tmp_path / "d.svg", p=0.5)


def test_wrn_block_with_only_keeps_one_block_and_stubs_its_neighbours(tmp_path: Path) -> None:
    model = WideResNet(depth=10, widen=2, p=0.3)
    svg = draw(
        model,
        tmp_path / "wrn.svg",
        p=0.3,
        only="stage2.0",
        example_inputs=(torch.randn(2, 3, 32, 32),),
    ).read_text()
    texts = _texts(svg)
    for box in ("conv1", "dropout", "bn2", "relu2", "conv2", "shortcut"):
        assert box in texts, f"stage2.0.{box} is missing"
    assert not any(t.startswith("stage1.0") or t.startswith("stage3.0.conv1") for t in texts)
    assert any(t.startswith("from ") for t in texts) and any(t.startswith("to ") for t in texts)
    assert any(t.startswith("stage2.0.dropout (dropout site") and "45/64" in t for t in texts)
    assert _group_fills(svg) == {PALETTE[0][0]}  # one block, one group, the first colour
    assert "WideResNet, stage2.0" in svg


def test_efficientnet_mbconv_block_shows_squeeze_excite_and_its_stochastic_depth(
    tmp_path: Path,
) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.efficientnet_b0(num_classes=10)
    analysis = sliceout_fx.analyse(
        model, sliceout_fx.SliceOutConfig(p=0.3), (torch.randn(2, 3, 64, 64),)
    )
    svg = draw(analysis, tmp_path / "mbconv.svg", only="features.2.1").read_text()
    texts = _texts(svg)
    for box in ("block.0.0", "block.1.0", "block.2.avgpool", "block.2.fc1", "block.2.fc2"):
        assert box in texts
    assert any(t.startswith("features.2.1.block.0.0 (expand site") for t in texts)
    assert sum("101/144" in t for t in texts) >= 9  # expand .. SE gate and multiply
    # stochastic depth drops samples and passes channels: drawn, and stopping nothing
    assert any(t.startswith("stochastic_depth ") for t in texts)
    assert not any("stochastic_depth stops a group" in t for t in texts)
    assert _group_fills(svg) == {PALETTE[0][0]}
    # The whole network is too large for one picture: the error names blocks to draw instead.
    with pytest.raises(ValueError, match=r"only=PREFIX .*features\.2 \(30 ops\)"):
        draw(analysis, tmp_path / "all.svg")
    with pytest.raises(ValueError, match=r"features\.2\.0 \(14 ops\), features\.2\.1"):
        draw(analysis, tmp_path / "none.svg", only="features.2.7")


def test_png_and_pdf_are_real_files_and_other_suffixes_are_refused(tmp_path: Path) -> None:
    model = paper_mlp(0.5, hidden=32)
    png = draw(model, tmp_path / "sub" / "mlp.png", p=0.5)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 600 and height > 900  # a box per op, legend beside them, at 150 dpi
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[:2] == (height, width)
    assert draw(model, tmp_path / "mlp.pdf").read_bytes()[:5] == b"%PDF-"
    with pytest.raises(ValueError, match=r"\.svg, \.png, \.pdf"):
        draw(model, tmp_path / "mlp.jpg")
    assert not (tmp_path / "mlp.jpg").exists()


# ------------------------------------------------------------------------------- transformers


def _llama():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return tiny_llama()


def test_llama_layer_names_its_head_and_ffn_sites_in_two_colours(tmp_path: Path) -> None:
    model = _llama()
    svg = draw(model, tmp_path / "llama.svg", p=0.3).read_text()
    texts = _texts(svg)
    assert "LlamaForCausalLM, model.layers.0 (LlamaDecoderLayer)" in svg  # the first layer
    # Ops that read a module's weights are named after it, relative to the layer.
    for box in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.down_proj",
        "input_layernorm",
    ):
        assert box in texts, f"no box labelled {box}"
    # Whole KV groups: 2 of the 4 query heads (32/64), 1 of the 2 KV heads (16/32).
    assert any(t.startswith("model.layers.0.self_attn.q_proj (group site") for t in texts)
    assert "keeps 32/64 channels in units of 32 channels, p=0.3" in texts
    assert "linear · 12×16/32" in texts and "scaled_dot_product_attention · 2/4×12×16" in texts
    assert any(t.startswith("model.layers.0.mlp.gate_proj (group site") for t in texts)
    assert "linear · 12×90/128" in texts
    assert _group_fills(svg) == {PALETTE[0][0], PALETTE[1][0]}  # heads and FFN, one colour each
    # The layer's inputs are named after its call; weights and shape arithmetic are not drawn.
    assert {"from hidden_states", "from attention_mask", "from position_embeddings[0]"} <= set(
        texts
    )
    assert not any("tensors_" in t or "get_attr" in t or "sym_size" in t for t in texts)
    # An RMSNorm stops the stream: the post-attention one (the input's reads the layer input)
    assert any(re.match(r"mean(_\d+)? stops a group", t) for t in texts)
    assert not any(type(m).__name__.startswith("SliceOut") for m in model.modules())


def test_llama_other_layer_part_of_a_layer_and_a_converted_model(tmp_path: Path) -> None:
    model = _llama()
    svg = draw(model, tmp_path / "l1.svg", p=0.3, only="model.layers.1").read_text()
    assert "model.layers.1 (LlamaDecoderLayer)" in svg
    assert "model.layers.1.mlp.gate_proj (group site" in svg
    mlp = _texts(draw(model, tmp_path / "mlp.svg", p=0.3, only="model.layers.0.mlp").read_text())
    assert {"gate_proj", "up_proj", "down_proj"} <= set(mlp) and "self_attn.q_proj" not in mlp
    with pytest.raises(ValueError, match=r"its layers are: model\.layers\.0, model\.layers\.1"):
        draw(model, tmp_path / "none.svg", only="model.layers.7")

    # A converted model is drawn from a copy of its original with its own options: the same
    # picture, and the model stays converted and trains on slices.
    converted = sliceout_fx.convert(model, p=0.3, seed=0)
    same = draw(converted, tmp_path / "converted.svg", only="model.layers.1").read_text()
    assert same == svg
    assert type(converted.model.layers[0]).__name__ == "SliceOutLlamaDecoderLayer"
    assert len(sliceout_fx.explain(converted).sites) == 4
    converted.train()
    converted(input_ids=torch.randint(1, 100, (2, 6))).logits.sum().backward()
    with pytest.raises(TypeError, match="fixed by its conversion"):
        draw(converted, tmp_path / "x.svg", p=0.5)


def test_pytorch_encoder_layer_with_capture_blocks(tmp_path: Path) -> None:
    """nn.TransformerEncoder: whole heads of nn.MultiheadAttention (captured from its spelt-out
    forward: packed in-projection split into Q, K, V) and the FFN, in two colours."""
    encoder = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(64, 4, 128, dropout=0.2, batch_first=True),
        2,
        enable_nested_tensor=False,
    )
    svg = draw(
        encoder, tmp_path / "enc.svg", p=0.5, capture="blocks",
        example_inputs=(torch.randn(2, 7, 64),),
    ).read_text()  # fmt: skip
    texts = _texts(svg)
    assert "TransformerEncoder, layers.0 (TransformerEncoderLayer)" in svg
    assert any(t.startswith("layers.0.self_attn (group site, group 1): keeps 32/64") for t in texts)
    assert any(t.startswith("layers.0.dropout (dropout site, group 3): keeps") for t in texts)
    assert "linear · 7×64/128" in texts and "from src" in texts
    assert "scaled_dot_product_attention · 2/4×7×16" in texts  # 2 of the 4 heads
    assert _group_fills(svg) == {PALETTE[0][0], PALETTE[1][0]}


# ---------------------------------------------------------------------------------------- CLI


def test_cli_draw_writes_the_picture(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mlp.svg"
    assert main(["draw", "mlp", "-o", str(out), "--p", "0.25", "--hidden", "32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    texts = _texts(out.read_text())
    assert any(t.startswith("drop2 (dropout site") and "24/32" in t for t in texts)


def test_cli_draw_one_wrn_block(tmp_path: Path) -> None:
    out = tmp_path / "wrn.png"
    argv = ["draw", "wrn", "-o", str(out), "--depth", "10", "--widen", "1", "--only", "stage3.0"]
    assert main([*argv, "--image-size", "8"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_cli_draw_one_gpt2_layer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "gpt2.svg"
    argv = ["draw", "gpt2", "-o", str(out), "--p", "0.3", "--hidden", "96", "--depth", "2"]
    assert main([*argv, "--only", "transformer.h.1"]) == 0
    svg = out.read_text()
    texts = _texts(svg)
    assert "GPT2LMHeadModel, transformer.h.1 (GPT2Block)" in svg
    assert "attn.c_attn" in texts and "mlp.c_fc" in texts
    # 12 heads of 8: whole heads are kept (8 of 12), the FFN by units.
    assert "transformer.h.1.attn (group site, group 1): keeps 64/96" in texts
    assert any(t.startswith("transformer.h.1.mlp.c_fc (group site") for t in texts)
    assert _group_fills(svg) == {PALETTE[0][0], PALETTE[1][0]}


def test_cli_draw_unknown_model_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["draw", "resnet9000", "-o", str(tmp_path / "x.svg")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown model 'resnet9000'" in err and "mlp" in err
    assert "timm:NAME" in err and not (tmp_path / "x.svg").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-o", "{tmp}/x.gif"], "give a file name ending in .svg, .png, .pdf"),
        (["-o", "{tmp}/x.svg", "--only", "fc9"], "prefixes there are: fc1 (1 op)"),
        (["-o", "{tmp}/x.svg", "--max-nodes", "3"], "draw one block with only=PREFIX (--only)"),
    ],
)
def test_cli_draw_bad_input_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["draw", "mlp", "--hidden", "16", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sliceout-fx: error: ") and message in err
    assert not list(tmp_path.iterdir())


def test_cli_help_lists_every_command_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "{bench,demo,explain,draw}" in out
    examples = out.split("examples:")[1]
    for command in ("bench", "demo", "explain", "draw"):
        assert f"sliceout-fx {command} " in examples
    with pytest.raises(SystemExit):
        main(["draw", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--only" in out and "--sites" in out


# --------------------------------------------------------------------------------------- docs


@pytest.mark.parametrize(
    ("image", "names"),
    [
        ("draw-mlp.svg", ["drop1 (dropout site", "drop3 (dropout site", "1024/2048"]),
        ("draw-wrn-block.svg", ["stage2.0.dropout (dropout site", "shortcut", "179/256"]),
        ("draw-mbconv.svg", ["features.2.1.block.0.0 (expand site", "block.2.fc1", "stochastic"]),
        (
            "draw-transformer-layer.svg",
            ["transformer.h.0.attn (group site", "attn.c_attn", "mlp.c_fc", "64/96", "hidden_st"],
        ),
    ],
)
def test_the_docs_pictures_exist_and_show_their_sites(image: str, names: list[str]) -> None:
    svg = (ROOT / "docs" / "img" / image).read_text()
    page = (ROOT / "docs" / "drawing.md").read_text()
    assert f"img/{image}" in page, f"docs/drawing.md does not show {image}"
    text = "\n".join(_texts(svg))
    for name in names:
        assert name in text, f"{image} has no {name!r}: regenerate it with the command in the page"

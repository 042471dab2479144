"""The ready-made callbacks in real ``transformers.Trainer`` and ``lightning.Trainer`` runs (CPU).

Every test checks against a reference, not just that training runs: the steps that ran sliced are
counted from the samplers' own draw counters; a resumed run is compared bit for bit with the
uninterrupted run; batch-norm re-estimation is compared with ``recalibrate_batch_norm`` run by hand
on the same batches from the same state.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sliceout_fx
from sliceout_fx.integrations import SAMPLER_FILE
from sliceout_fx.module import conversions_in

STEPS = 20  # optimiser steps of every run
SAVE_AT = 10  # the step of the checkpoint a run resumes from
BATCH = 4


def _draw_counts(model: nn.Module) -> list[int]:
    """How many seeded slice draws each converted object of ``model`` has made so far."""
    return [conv.sampler.host_steps for _, conv in conversions_in(model)]


def _assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    pairs = list(zip(a.named_parameters(), b.named_parameters(), strict=True))
    assert pairs
    for (name, pa), (_, pb) in pairs:
        assert torch.equal(pa, pb), f"{name} differs"


def _parameters_differ(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return any(not torch.equal(pa, pb) for pa, pb in pairs)


def _batch_norm_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": buf.clone()
        for name, bn in model.named_modules()
        if isinstance(bn, nn.modules.batchnorm._BatchNorm)
        for key, buf in (
            ("running_mean", bn.running_mean),
            ("running_var", bn.running_var),
            ("num_batches_tracked", bn.num_batches_tracked),
        )
    }


def _small_cnn() -> nn.Sequential:
    """Conv-BN-ReLU-dropout twice, pooled, a linear head: two dropout sites before batch norm."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(16, 4),
    )


def _images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(count, 3, 8, 8, generator=gen), torch.randint(0, 4, (count,), generator=gen)


class _RecalibrationWitness:
    """Watches a model from the end of training on: a copy of it as training left it, the inputs
    of every later call, and torch's generator state at the first one (dropout still draws)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model)
        self.calls: list = []
        self.rng: torch.Tensor | None = None
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.rng is None:
            self.rng = torch.get_rng_state()
        self.calls.append(kwargs or args)

    def assert_recalibrated(self, trained: nn.Module, batches: list) -> None:
        """``trained``'s statistics are recalibrate_batch_norm's on ``batches``, by hand."""
        self._handle.remove()
        assert len(self.calls) == len(batches)
        for seen, batch in zip(self.calls, batches, strict=True):
            seen, batch = _values(seen), _values(batch)
            assert all(torch.equal(a, b) for a, b in zip(seen, batch, strict=True))
        before = _batch_norm_stats(self.model)
        torch.set_rng_state(self.rng)
        assert sliceout_fx.recalibrate_batch_norm(self.model, batches) == len(batches)
        got, want = _batch_norm_stats(trained), _batch_norm_stats(self.model)
        assert got.keys() == want.keys() and got
        for key in want:
            assert torch.equal(got[key], want[key]), key
        counts = [int(v) for k, v in got.items() if k.endswith("num_batches_tracked")]
        assert counts == [len(batches)] * len(counts)
        # and the recalibration changed what training had left
        assert all(not torch.equal(before[k], got[k]) for k in got if k.endswith("running_var"))


def _values(batch) -> list[torch.Tensor]:
    if isinstance(batch, dict):
        return [batch[k] for k in sorted(batch)]
    return list(batch) if isinstance(batch, tuple) else [batch]


# -- transformers.Trainer ----------------------------------------------------------------------

#: 12 batches per epoch: checkpoint-10 is mid-epoch, so the resume skips batches of a shuffled epoch
HF_ROWS = 48
SEQ = 16


def _tiny_gpt2(seed: int | None) -> nn.Module:
    """A randomly initialised 2-layer GPT-2 (dropout 0.1 as configured), converted block-wise."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    # Exported with the structure of the Trainer's calls (no attention mask, no cache, the token
    # count for the loss): training needs no second export.
    ids = torch.randint(1, 100, (BATCH, SEQ))
    example = {
        "input_ids": ids,
        "labels": ids,
        "use_cache": False,
        "num_items_in_batch": torch.tensor(BATCH * (SEQ - 1)),
    }
    return sliceout_fx.convert(model, p=0.3, seed=seed, example_inputs=example)


def _token_rows() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, 100, (HF_ROWS, SEQ), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": row, "labels": row} for row in ids]


def _hf_train(
    model: nn.Module,
    output_dir: Path,
    callbacks: list,
    data: list | None = None,
    resume: Path | None = None,
    **overrides,
):
    """``Trainer.train`` for STEPS steps (checkpoints every SAVE_AT steps); returns the trainer."""
    import transformers

    options = {
        "max_steps": STEPS,
        "save_steps": SAVE_AT,
        "per_device_train_batch_size": BATCH,
        "logging_steps": 5,
        "learning_rate": 1e-3,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **overrides,
    }
    args = transformers.TrainingArguments(output_dir=str(output_dir), **options)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data if data is not None else _token_rows(),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return trainer


def _checkpoint_copy(checkpoint: Path, output_dir: Path) -> Path:
    """A copy of ``checkpoint`` in a fresh output folder (each run writes its own checkpoints)."""
    target = output_dir / checkpoint.name
    shutil.copytree(checkpoint, target)
    return target


def _step_recorder():
    """A Trainer callback that records, per optimiser step, the draws and the slicing flag."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.enabled: list[list[bool]] = []
            self.draws: list[list[int]] = []

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self._before = _draw_counts(model)
            self.enabled.append([conv.enabled for _, conv in conversions_in(model)])

        def on_step_end(self, args, state, control, model=None, **kwargs):
            after = _draw_counts(model)
            self.draws.append([a - b for a, b in zip(after, self._before, strict=True)])

    return StepRecorder()


@pytest.fixture(scope="module", params=[0, None], ids=["seeded", "global-rng"])
def hf_run(request, tmp_path_factory):
    """The uninterrupted 20-step Trainer run with the default one step in five at full width
    (steps 4, 9, 14) and the last 5, checkpoints at 10, 20."""
    pytest.importorskip("transformers")
    from sliceout_fx.integrations import SliceOutTrainerCallback

    seed = request.param
    output_dir = tmp_path_factory.mktemp("hf-full")
    model = _tiny_gpt2(seed)
    recorder = _step_recorder()
    trainer = _hf_train(
        model, output_dir, [SliceOutTrainerCallback(full_width_last=0.25), recorder]
    )
    assert trainer.state.global_step == STEPS
    return SimpleNamespace(
        seed=seed,
        model=model,
        recorder=recorder,
        checkpoint=output_dir / f"checkpoint-{SAVE_AT}",
    )


@pytest.mark.parametrize("hf_run", [0], indirect=True, ids=["seeded"])
def test_hf_trainer_runs_the_last_quarter_and_one_step_in_five_at_full_width(hf_run):
    """full_width_last=0.25 of 20 steps and the default full_width_every=5: the sliced steps
    (0-14 but 4, 9, 14) draw one slice per block, the full-width ones none."""
    blocks = len(conversions_in(hf_run.model))
    assert blocks == 2
    sliced = [step % 5 != 4 for step in range(15)] + [False] * 5
    assert hf_run.recorder.draws == [[int(s)] * blocks for s in sliced]
    assert hf_run.recorder.enabled == [[s] * blocks for s in sliced]


def test_hf_trainer_interleaves_full_width_steps(tmp_path):
    """full_width_every=3 with the last quarter at full width: steps 2, 5, ... 14 and 15-19."""
    from sliceout_fx.integrations import SliceOutTrainerCallback

    recorder = _step_recorder()
    callback = SliceOutTrainerCallback(full_width_last=0.25, full_width_every=3)
    _hf_train(_tiny_gpt2(0), tmp_path, [callback, recorder])
    pattern = [step % 3 != 2 for step in range(15)] + [False] * 5
    assert [all(e) for e in recorder.enabled] == pattern
    assert [any(e) for e in recorder.enabled] == pattern


def test_hf_trainer_resume_is_bit_identical(hf_run, tmp_path):
    """Resumed at checkpoint-10, a fresh conversion ends with the uninterrupted run's parameters."""
    from sliceout_fx.integrations import SliceOutTrainerCallback

    assert (hf_run.checkpoint / SAMPLER_FILE).is_file()
    resumed = _tiny_gpt2(hf_run.seed)
    start = _checkpoint_copy(hf_run.checkpoint, tmp_path)
    callback = SliceOutTrainerCallback(full_width_last=0.25)
    trainer = _hf_train(resumed, tmp_path, [callback], resume=start)
    assert trainer.state.global_step == STEPS
    _assert_same_parameters(resumed, hf_run.model)
    # the resumed run's sliced steps 10-13 continued the seeded draw counters (8 before)
    if hf_run.seed is not None:
        assert _draw_counts(resumed) == [12, 12]


def test_hf_trainer_resume_without_the_sampler_file(hf_run, tmp_path, caplog):
    """Without sliceout_sampler.pt a seeded run draws steps 0-3's slices again: it ends elsewhere,
    with a warning. Unseeded draws come from torch's generator, which the Trainer restores from
    rng_state.pth itself: that run still ends bit-identical, and nothing is logged.
    """
    from sliceout_fx.integrations import SliceOutTrainerCallback

    model = _tiny_gpt2(hf_run.seed)
    start = _checkpoint_copy(hf_run.checkpoint, tmp_path)
    (start / SAMPLER_FILE).unlink()
    callback = SliceOutTrainerCallback(full_width_last=0.25)
    with caplog.at_level(logging.WARNING, logger="sliceout_fx.integrations.huggingface"):
        _hf_train(model, tmp_path, [callback], resume=start)
    warned = [r for r in caplog.records if SAMPLER_FILE in r.getMessage()]
    if hf_run.seed is None:
        _assert_same_parameters(model, hf_run.model)
        assert not warned
    else:
        assert _draw_counts(model) == [4, 4]
        assert _parameters_differ(model, hf_run.model)
        assert len(warned) == 1


def _checkpointing() -> dict[str, bool]:
    """``gradient_checkpointing=True``, under its newer name where transformers has renamed it."""
    import dataclasses

    import transformers

    names = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    new = "activation_checkpointing" in names
    return {"activation_checkpointing" if new else "gradient_checkpointing": True}


@pytest.mark.parametrize("hf_run", [0], indirect=True, ids=["seeded"])
def test_hf_trainer_gradient_checkpointing(hf_run, tmp_path):
    """Checkpointed blocks train as the uninterrupted plain run does; the result deep-copies."""
    from sliceout_fx.integrations import SliceOutTrainerCallback

    model = _tiny_gpt2(seed=0)
    initial = copy.deepcopy(model)
    calls = [0, 0]
    for i, (_, conv) in enumerate(conversions_in(model)):
        conv.sampler.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    callback = SliceOutTrainerCallback(full_width_last=0.25)
    trainer = _hf_train(model, tmp_path, [callback], save_strategy="no", **_checkpointing())
    # each of the 12 sliced steps ran every block twice (forward, recomputation in backward),
    # drew once
    assert calls == [2 * 12, 2 * 12]
    assert _draw_counts(model) == [12, 12]
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == STEPS // 5 and losses[-1] < losses[0]
    assert _parameters_differ(model, initial)
    # The recomputation reuses the first forward's slices (and dropout masks): the run is the
    # plain run's, bit for bit.
    _assert_same_parameters(model, hf_run.model)

    clone = copy.deepcopy(model)
    ids = torch.randint(1, 100, (2, SEQ), generator=torch.Generator().manual_seed(5))
    clone.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(clone(input_ids=ids).logits, model(input_ids=ids).logits)


class _ImageClassifier(nn.Module):
    """A Trainer-style model (keyword inputs, a loss when labels come) around a converted CNN."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.net(pixel_values)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def test_hf_trainer_recalibrates_batch_norm(tmp_path):
    """recalibrate_batches=3 gives the statistics recalibrate_batch_norm gives on batches 0-2."""
    pytest.importorskip("transformers")
    from transformers import TrainerCallback

    from sliceout_fx.integrations import SliceOutTrainerCallback

    class Witness(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == state.max_steps:
                self.seen = _RecalibrationWitness(model)

    torch.manual_seed(0)
    x, y = _images(40)
    model = _ImageClassifier(
        sliceout_fx.convert(_small_cnn(), p=0.5, seed=0, example_inputs=x[:BATCH])
    )
    rows = [{"pixel_values": xi, "labels": yi} for xi, yi in zip(x, y, strict=True)]
    witness = Witness()  # before the SliceOut callback: its on_step_end runs first
    _hf_train(
        model,
        tmp_path,
        [witness, SliceOutTrainerCallback(recalibrate_batches=3)],
        data=rows,
        save_strategy="no",
        train_sampling_strategy="sequential",  # the first batches are x[0:4], x[4:8], x[8:12]
    )
    batches = [{"pixel_values": x[i : i + BATCH]} for i in range(0, 3 * BATCH, BATCH)]
    witness.seen.assert_recalibrated(model, batches)


def _assert_batch_norm_saved(saved: dict[str, torch.Tensor], model: nn.Module, prefix: str = ""):
    """``saved`` (a checkpoint's state dict) holds ``model``'s batch-norm statistics exactly, and
    they are the re-estimated ones (3 batches tracked, not a training run's count)."""
    stats = _batch_norm_stats(model)
    assert stats
    for key, value in stats.items():
        assert torch.equal(saved[prefix + key], value), key
        if key.endswith("num_batches_tracked"):
            assert int(value) == 3, key


def test_hf_trainer_last_checkpoint_holds_the_recalibrated_batch_norm(tmp_path):
    """The checkpoint of the last step (save_strategy="steps") is written after the batch-norm
    re-estimation: it holds the final model's running statistics, not training's."""
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from sliceout_fx.integrations import SliceOutTrainerCallback

    torch.manual_seed(0)
    x, y = _images(40)
    model = _ImageClassifier(
        sliceout_fx.convert(_small_cnn(), p=0.5, seed=0, example_inputs=x[:BATCH])
    )
    rows = [{"pixel_values": xi, "labels": yi} for xi, yi in zip(x, y, strict=True)]
    callback = SliceOutTrainerCallback(recalibrate_batches=3)
    _hf_train(model, tmp_path, [callback], data=rows, save_strategy="steps")
    last = tmp_path / f"checkpoint-{STEPS}"
    if (last / "model.safetensors").is_file():
        saved = load_file(last / "model.safetensors")
    else:
        saved = torch.load(last / "pytorch_model.bin", weights_only=True)
    _assert_batch_norm_saved(saved, model)


# -- lightning.Trainer -------------------------------------------------------------------------

LIT_ROWS = 40  # 10 batches per epoch: the step-10 checkpoint is an end-of-epoch one (see below)


def _lit_module(net: nn.Module):
    """A LightningModule training ``net`` (the converted CNN) with Adam on cross-entropy."""
    import lightning

    class Classifier(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    return Classifier()


def _lit_setup(seed: int | None):
    """A fresh seeded setup: the converted CNN in its LightningModule, and an unshuffled loader.

    The loader has its own generator, so iterating it does not read torch's global generator;
    only the model does (unseeded slice draws, the dropout the conversion kept, dropout in the
    full-width and batch-norm refresh calls). Lightning does not restore that generator on resume;
    the callback's sampler state records it whenever the conversion reads it.
    """
    import lightning
    from torch.utils.data import DataLoader, TensorDataset

    lightning.seed_everything(0, verbose=False)
    x, y = _images(LIT_ROWS)
    net = sliceout_fx.convert(_small_cnn(), p=0.5, seed=seed, example_inputs=x[:BATCH])
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=BATCH,
        shuffle=False,
        generator=torch.Generator().manual_seed(0),
    )
    return _lit_module(net), loader


def _lit_fit(
    module,
    loader,
    dirpath: Path,
    callbacks: list,
    ckpt_path: Path | None = None,
    **checkpoint_options,
):
    """``fit`` for STEPS steps with a checkpoint every SAVE_AT steps; returns the trainer.

    ``checkpoint_options`` go to the ``ModelCheckpoint`` (``save_last=True``, say).

    ``deterministic=True`` switches torch's deterministic algorithms on for the process; they are
    switched back afterwards, as are the environment variables Lightning sets.
    """
    import os

    import lightning
    from lightning.pytorch.callbacks import ModelCheckpoint

    flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env = dict(os.environ)
    checkpoints = ModelCheckpoint(
        dirpath=dirpath, every_n_train_steps=SAVE_AT, save_top_k=-1, **checkpoint_options
    )
    trainer = lightning.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        default_root_dir=dirpath,
        callbacks=[*callbacks, checkpoints],
    )
    try:
        trainer.fit(module, loader, ckpt_path=str(ckpt_path) if ckpt_path else None)
    finally:
        torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        os.environ.clear()
        os.environ.update(env)
    return trainer


def _lit_step_recorder():
    """A Lightning callback recording, per training batch, the draws and the slicing flag."""
    from lightning.pytorch.callbacks import Callback

    class StepRecorder(Callback):
        def __init__(self) -> None:
            self.enabled: list[bool] = []
            self.draws: list[int] = []
            self.refreshed: list[bool] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            (self._before,) = _draw_counts(pl_module)
            self.enabled.append(pl_module.net.slicing_enabled)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ((_, conv),) = conversions_in(pl_module)
            self.draws.append(conv.sampler.host_steps - self._before)
            self.refreshed.append(conv.refresh_due)

    return StepRecorder()


@pytest.fixture(scope="module", params=[0, None], ids=["seeded", "global-rng"])
def lit_run(request, tmp_path_factory):
    """The uninterrupted 20-step Lightning run: full width for the default one step in five
    (steps 4, 9, 14) and the last 5, checkpoints at 10, 20."""
    pytest.importorskip("lightning")
    from sliceout_fx.integrations import SliceOutLightningCallback

    seed = request.param
    dirpath = tmp_path_factory.mktemp("lit-full")
    module, loader = _lit_setup(seed)
    recorder = _lit_step_recorder()
    trainer = _lit_fit(
        module, loader, dirpath, [SliceOutLightningCallback(full_width_last=0.25), recorder]
    )
    assert trainer.global_step == STEPS
    (checkpoint,) = dirpath.glob(f"*step={SAVE_AT}.ckpt")
    return SimpleNamespace(seed=seed, module=module, recorder=recorder, checkpoint=checkpoint)


@pytest.mark.parametrize("lit_run", [0], indirect=True, ids=["seeded"])
def test_lightning_runs_the_last_quarter_and_one_step_in_five_at_full_width(lit_run):
    """full_width_last=0.25 of 20 steps and the default full_width_every=5: steps 0-14 but 4, 9,
    14 sliced, the others at full width (no draw)."""
    recorder = lit_run.recorder
    sliced = [step % 5 != 4 for step in range(15)] + [False] * 5
    assert recorder.enabled == sliced
    # every sliced step draws once, except the batch-norm refresh calls (full-width graph)
    refreshed = list(zip(sliced, recorder.refreshed, strict=True))
    assert recorder.draws == [int(s and not r) for s, r in refreshed]
    assert 0 < sum(r for s, r in refreshed if s) < 12


def test_lightning_interleaves_full_width_steps(tmp_path):
    """full_width_every=4 with the last quarter at full width: steps 3, 7, 11 and 15-19."""
    from sliceout_fx.integrations import SliceOutLightningCallback

    module, loader = _lit_setup(0)
    recorder = _lit_step_recorder()
    callback = SliceOutLightningCallback(full_width_last=0.25, full_width_every=4)
    _lit_fit(module, loader, tmp_path, [callback, recorder])
    assert recorder.enabled == [step % 4 != 3 for step in range(15)] + [False] * 5


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    """Same parameters and the same batch-norm running statistics, bit for bit."""
    _assert_same_parameters(a, b)
    sa, sb = _batch_norm_stats(a), _batch_norm_stats(b)
    assert sa.keys() == sb.keys() and sa
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_lightning_resume_is_bit_identical(lit_run, tmp_path):
    """fit(ckpt_path=step-10 checkpoint) on a fresh setup ends as the uninterrupted run does.

    The step-10 checkpoint ends epoch 0: from a mid-epoch checkpoint Lightning would feed the
    rest of the epoch with a plain DataLoader's first batches again (it cannot skip batches of a
    loader without state_dict), which no sampler state can make reproducible.
    """
    from sliceout_fx.integrations import SliceOutLightningCallback

    module, loader = _lit_setup(lit_run.seed)
    callback = SliceOutLightningCallback(full_width_last=0.25)
    trainer = _lit_fit(module, loader, tmp_path, [callback], ckpt_path=lit_run.checkpoint)
    assert trainer.global_step == STEPS
    _assert_same_state(module, lit_run.module)


def test_lightning_resume_without_the_callback_state(lit_run, tmp_path, caplog):
    """The same checkpoint with the callback's state removed: the run ends elsewhere, and the
    callback says why (a seeded sampler restarts its draws; an unseeded one reads torch's
    generator, which Lightning does not restore)."""
    from sliceout_fx.integrations import SliceOutLightningCallback

    checkpoint = torch.load(lit_run.checkpoint, weights_only=False)
    removed = [k for k in checkpoint["callbacks"] if "SliceOutLightningCallback" in k]
    assert len(removed) == 1
    del checkpoint["callbacks"][removed[0]]
    stripped = tmp_path / "stripped.ckpt"
    torch.save(checkpoint, stripped)

    module, loader = _lit_setup(lit_run.seed)
    callback = SliceOutLightningCallback(full_width_last=0.25)
    with caplog.at_level(logging.WARNING, logger="sliceout_fx.integrations.lightning"):
        _lit_fit(module, loader, tmp_path / "run", [callback], ckpt_path=stripped)
    assert _parameters_differ(module, lit_run.module)
    assert [r for r in caplog.records if "without the sampler state" in r.getMessage()]


def test_lightning_recalibrates_batch_norm(tmp_path):
    """recalibrate_batches=3 gives the statistics recalibrate_batch_norm gives on batches 0-2."""
    pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import Callback

    from sliceout_fx.integrations import SliceOutLightningCallback

    class Witness(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == STEPS:
                self.seen = _RecalibrationWitness(pl_module.net)

    module, loader = _lit_setup(seed=0)
    witness = Witness()  # before the SliceOut callback: its on_train_batch_end runs first
    callback = SliceOutLightningCallback(recalibrate_batches=3)
    _lit_fit(module, loader, tmp_path, [witness, callback])
    x, _ = _images(LIT_ROWS)
    witness.seen.assert_recalibrated(module.net, [x[i : i + BATCH] for i in range(0, 12, BATCH)])


def test_lightning_last_checkpoint_holds_the_recalibrated_batch_norm(tmp_path):
    """The last checkpoints (save_last=True and the step-20 one) are written after the batch-norm
    re-estimation: they hold the final model's running statistics, not training's."""
    pytest.importorskip("lightning")
    from sliceout_fx.integrations import SliceOutLightningCallback

    module, loader = _lit_setup(seed=0)
    callback = SliceOutLightningCallback(recalibrate_batches=3)
    _lit_fit(module, loader, tmp_path, [callback], save_last=True)
    (at_step,) = tmp_path.glob(f"*step={STEPS}.ckpt")
    for path in (tmp_path / "last.ckpt", at_step):
        saved = torch.load(path, weights_only=False)["state_dict"]
        _assert_batch_norm_saved(saved, module.net, prefix="net.")

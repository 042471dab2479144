"""The lab's A/B harness, table formatter and fine-tuning helpers, against references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sliceout_fx
from sliceout_lab.finetune import (
    batch_indices,
    example_parser,
    example_slice_schedule,
    same_weights,
    warmup_schedule,
)
from sliceout_lab.harness import ABResult, Arm, cross_entropy, run_interleaved
from sliceout_lab.memory import SavedTensorStats, measure_saved_tensors
from sliceout_lab.table import format_bytes, format_table


def _net(seed: int = 0, bn: bool = False) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 12)]
    if bn:
        layers.append(nn.BatchNorm1d(12))
    return nn.Sequential(*layers, nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 3))


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 6, generator=gen), torch.randint(0, 3, (5,), generator=gen))
            for _ in range(n)]  # fmt: skip


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


# ---------------------------------------------------------------------------------------- arm step


def test_arm_step_is_the_hand_written_training_step() -> None:
    model = _net(bn=True)
    twin = copy.deepcopy(model)
    opt, twin_opt = _sgd(model), _sgd(twin)
    lr, twin_lr = (torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5) for o in (opt, twin_opt))
    arm = Arm("a", model, opt, schedulers=[lr], clip_grad_norm=0.05)
    for x, y in _batches(3):
        torch.manual_seed(7)
        loss = arm.step((x, y))
        torch.manual_seed(7)  # the same dropout mask
        twin_opt.zero_grad(set_to_none=True)
        ref = F.cross_entropy(twin(x), y)
        ref.backward()
        nn.utils.clip_grad_norm_(twin.parameters(), 0.05)
        twin_opt.step()
        twin_lr.step()
        assert torch.equal(loss, ref.detach()) and not loss.requires_grad
    assert same_weights(model, twin)  # weights and batch-norm statistics alike
    assert opt.param_groups[0]["lr"] == twin_opt.param_groups[0]["lr"] == 0.1 * 0.5**3


def test_saved_tensors_counts_one_step_and_trains_nothing() -> None:
    model = _net(bn=True)
    before = copy.deepcopy(model.state_dict())
    arm = Arm("a", model, _sgd(model))
    batch = _batches(1)[0]
    stats = arm.saved_tensors(batch)
    ref = _net(bn=True)
    reference = measure_saved_tensors(
        lambda: F.cross_entropy(ref(batch[0]), batch[1]).backward(), ref.parameters()
    )
    assert stats == reference and stats.bytes > 0
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats put back


# ----------------------------------------------------------------------------------------- loop


def test_every_arm_sees_the_same_batches_in_a_rotating_order() -> None:
    seen: list[tuple[str, int]] = []

    def recording(name: str):
        def loss(model, batch):
            seen.append((name, batch[2]))
            return cross_entropy(model, batch[:2])

        return loss

    batches = [(*b, i) for i, b in enumerate(_batches(4))]
    arms = [Arm(n, m, _sgd(m), loss=recording(n)) for n, m in (("A", _net()), ("B", _net()))]
    run = run_interleaved(arms, iter(batches), rounds=4, warmup=1, measure_saved=False)
    assert seen == [("A", 0), ("B", 0), ("B", 1), ("A", 1), ("A", 2), ("B", 2), ("B", 3), ("A", 3)]
    assert run.baseline == "A" and run.names == ["A", "B"]
    assert [len(run.step_times[n]) for n in "AB"] == [3, 3]  # the warm-up round is not timed
    assert [len(run.losses[n]) for n in "AB"] == [4, 4]
    assert run.saved == {} and run.cuda_peak_bytes == {}  # not asked / not on CUDA


def test_losses_are_those_of_the_steps_and_timed_selects_rounds() -> None:
    model = _net()
    twin = copy.deepcopy(model)
    arms = [Arm("base", model, _sgd(model))]
    batches = _batches(5)
    torch.manual_seed(3)
    run = run_interleaved(arms, batches, rounds=5, timed=lambda r: r % 2 == 0)
    assert len(run.step_times["base"]) == 3  # rounds 0, 2 and 4
    torch.manual_seed(3)
    arm = Arm("twin", twin, _sgd(twin))
    arm.saved_tensors(batches[0])  # the harness's measurement draws a mask too
    expected = [arm.step(b).item() for b in batches]
    assert run.losses["base"] == pytest.approx(expected, rel=0, abs=0)
    assert run.saved["base"].bytes == arm.saved_tensors(batches[0]).bytes


def test_schedules_step_with_the_optimizer_and_full_width_tail_is_untimed() -> None:
    model = sliceout_fx.convert(_net(), p=0.5, seed=0)
    base = _net()
    slicing = sliceout_fx.SliceSchedule(model, 6, full_width_last=2 / 6)
    arms = [Arm("dropout", base, _sgd(base)), Arm("sliceout", model, _sgd(model),
                                                  schedulers=[slicing])]  # fmt: skip
    run = run_interleaved(arms, _batches(6), rounds=6, timed=slicing.slices_at)
    assert slicing.step_count == 6 and not slicing.slicing
    assert len(run.step_times["sliceout"]) == 4  # the two full-width steps are not timed


def test_bad_runs_are_refused_with_the_reason() -> None:
    a, b = _net(), _net()
    arms = [Arm("x", a, _sgd(a)), Arm("x", b, _sgd(b))]
    with pytest.raises(ValueError, match="names must differ"):
        run_interleaved(arms, _batches(1), rounds=1)
    with pytest.raises(ValueError, match="ran out after 2 of 3 rounds"):
        run_interleaved(arms[:1], _batches(2), rounds=3)
    with pytest.raises(ValueError, match="warmup must be in"):
        run_interleaved(arms[:1], _batches(2), rounds=2, warmup=2)
    with pytest.raises(ValueError, match="no batches"):
        run_interleaved(arms[:1], [], rounds=1)


def test_result_figures_are_paired_ratios() -> None:
    run = ABResult(
        baseline="a",
        names=["a", "b"],
        step_times={"a": [1.0, 2.0, 4.0, 4.0], "b": [0.5, 1.0, 3.0, 1.0]},
        losses={"a": [3.0, 2.0, 1.0], "b": [4.0, 3.0, 2.0]},
        saved={"a": SavedTensorStats(400, 4, 4, 0), "b": SavedTensorStats(100, 2, 2, 1)},
    )
    assert run.time_ratios("b") == [0.5, 0.5, 0.75, 0.25]
    assert run.time_ratio("b") == 0.5 and run.time_ratio("a") == 1.0
    assert run.time_ratio_quartiles("b") == (0.4375, 0.5625)
    assert run.total_time_ratio("b") == 5.5 / 11.0
    assert run.memory_ratio("b") == 0.25 and run.cuda_peak_ratio("b") is None
    assert run.mean_loss("b", 2) == 2.5 and run.median_ms("a") == 3000.0
    stats = run.stats("b")
    assert stats["time_ratio"] == 0.5 and stats["saved_parameter_views"] == 1
    assert stats["samples_s"] == [0.5, 1.0, 3.0, 1.0] and "cuda_step_peak_bytes" not in stats


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_arms_get_a_step_peak_each() -> None:
    arms = []
    for name in ("a", "b"):
        m = _net().cuda()
        arms.append(Arm(name, m, _sgd(m)))
    batches = [(x.cuda(), y.cuda()) for x, y in _batches(3)]
    run = run_interleaved(arms, batches, rounds=3)
    assert run.cuda_peak_bytes["a"] > 0 and run.cuda_peak_ratio("a") == 1.0


# ---------------------------------------------------------------------------------------- table


def test_table_aligns_groups_and_writes_markdown() -> None:
    header = ["name", "ratio"]
    rows = [["a", "1.000"], ["bb", "0.5"], ["c", "12.25"]]
    text = format_table(header, rows, groups=[1, 1, 2]).splitlines()
    assert text == ["name  ratio", "----  -----", "a     1.000", "bb      0.5", "", "c     12.25"]
    md = format_table(header, rows, markdown=True).splitlines()
    assert md[:2] == ["| name | ratio |", "| --- | ---: |"] and md[3] == "| bb | 0.5 |"
    with pytest.raises(ValueError, match="row 1 has 1 cells for 2 columns"):
        format_table(header, [["a", "b"], ["c"]])
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(12) == "12 B"
    assert format_bytes(None) == "n/a"


# -------------------------------------------------------------------------------------- finetune


def _lrs(scheduler, optimizer, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_warmup_schedules_follow_their_formulas() -> None:
    model = _net()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 1.0},
                           {"params": model[-1].parameters(), "lr": 10.0}])  # fmt: skip
    steps, warm = 20, 2
    linear = _lrs(warmup_schedule(opt, steps, warmup_fraction=0.1, decay="linear"), opt, steps)
    for t, (lr_a, lr_b) in enumerate(linear):
        factor = (t + 1) / warm if t < warm else (steps - t) / (steps - warm)
        assert lr_a == pytest.approx(factor) and lr_b == pytest.approx(10 * factor)
    single = torch.optim.SGD(model.parameters(), lr=1.0)
    cosine = _lrs(
        warmup_schedule(single, steps, warmup_fraction=0.1, decay="cosine", floor=0.1),
        single,
        steps,
    )
    for t, (lr,) in enumerate(cosine[warm:], start=warm):
        progress = (t - warm) / (steps - warm)
        assert lr == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    assert cosine[-1][0] > 0.1  # never below the floor
    with pytest.raises(ValueError, match="leave none"):
        warmup_schedule(single, 1, warmup_fraction=0.5, decay="linear")


def test_batch_indices_cover_each_epoch_once_and_draw_eagerly() -> None:
    gen = torch.Generator().manual_seed(0)
    batches = batch_indices(10, 4, 5, gen)  # 20 indices: two shuffled epochs
    drawn_now = gen.get_state()
    order = torch.cat(list(batches))
    assert torch.equal(gen.get_state(), drawn_now)
    assert sorted(order[:10].tolist()) == list(range(10))
    assert sorted(order[10:].tolist()) == list(range(10))


def test_example_slice_schedule_keeps_at_least_one_last_step_and_the_every_option() -> None:
    model = sliceout_fx.convert(
        nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2)), p=0.5
    )
    short = example_parser(
        "doc", steps=10, batch_size=2, p=0.5, p_help="", eval_batch_size=2, out=None,
        full_width_last=0.01,
    ).parse_args([])  # fmt: skip
    schedule = example_slice_schedule(model, short)
    # 1% of 10 steps rounds up to one; one step in five (the library's default) as well
    assert [schedule.slices_at(t) for t in range(10)] == [t not in (4, 9) for t in range(10)]
    every_3rd = example_parser(
        "doc", steps=10, batch_size=2, p=0.5, p_help="", eval_batch_size=2, out=None,
        full_width_last=0.01, full_width_every=3,
    ).parse_args([])  # fmt: skip
    schedule = example_slice_schedule(model, every_3rd)  # an example's own measured default
    assert [schedule.slices_at(t) for t in range(10)] == [t not in (2, 5, 8, 9) for t in range(10)]
    short.full_width_every, short.full_width_last, short.steps = 0, 0.2, 200
    schedule = example_slice_schedule(model, short)
    assert schedule.total_steps - schedule.full_width_from == 40
    assert [schedule.slices_at(t) for t in (159, 160)] == [True, False]


def test_examples_choose_slices_or_controlled_dropout() -> None:
    parser = example_parser(
        "doc", steps=10, batch_size=2, p=0.5, p_help="", eval_batch_size=2, out=None
    )
    assert parser.parse_args([]).mode == "slice"
    assert parser.parse_args(["--mode", "gather"]).mode == "gather"
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "mask"])  # the full-width reference: no saving to compare

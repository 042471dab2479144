"""Converted models and the rest of PyTorch: deepcopy, checkpoints on disk, ``torch.compile``,
DistributedDataParallel, bf16 autocast and float64.

Every test checks behaviour against a reference (the source model, the original model, the eager
model or the masked full-width reference), not merely that the call runs.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sliceout_fx
from sliceout_fx import SliceOutModule
from tests.helpers import convert_pair, free_port, train_step_outputs
from tests.models import ConvChain, mlp

GRAPHS = ("sliced_graph", "full_graph")


def _mlp(width: int = 32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return mlp(width=width)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _storages(model: nn.Module) -> set[int]:
    tensors = [*model.parameters(), *model.buffers()]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def _live(size: int, start: int, width: int) -> torch.Tensor:
    live = torch.zeros(size, dtype=torch.bool)
    live[start : start + width] = True
    return live


# -- copy.deepcopy ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,shape", [(mlp, (8, 12)), (ConvChain, (4, 3, 8, 8))], ids=["mlp", "conv-chain"]
)
def test_deepcopy_is_independent_and_computes_the_same(make, shape):
    torch.manual_seed(0)
    source = sliceout_fx.convert(make(), p=0.5, seed=11)
    x = torch.randn(shape)
    train_step_outputs(source, (x,))  # give it some state (BN statistics, last draws)
    clone = copy.deepcopy(source)
    assert isinstance(clone, SliceOutModule)

    # no shared storage, same values
    assert not _storages(source) & _storages(clone)
    clone_state = clone.state_dict()
    assert list(clone_state) == list(source.state_dict())
    for name, value in source.state_dict().items():
        assert torch.equal(value, clone_state[name]), name

    # every graph of the copy runs on the copy's own modules, and so does the original structure
    for graph in GRAPHS:
        gm = getattr(clone, graph)
        for name, child in clone.named_children():
            if hasattr(gm, name):
                assert getattr(gm, name) is child, f"{graph}.{name}"
        assert not any(p is q for p in gm.parameters() for q in source.parameters())
    assert clone.sliced_graph.sliceout_sampler is clone.sliceout_sampler
    first = next(n for n, _ in clone.named_children())
    assert getattr(clone.sliced_graph, first) is getattr(clone, first)

    # eval output equal
    with torch.no_grad():
        assert torch.equal(source.eval()(x), clone.eval()(x))

    # train output and gradients equal under the same forced draws
    draws = [s.units - s.width for s in source.report.sites]  # the last eligible start
    source.sliceout_sampler.force(draws)
    clone.sliceout_sampler.force(draws)
    out_s, grads_s = train_step_outputs(source, (x,))
    out_c, grads_c = train_step_outputs(clone, (x,))
    assert torch.equal(out_s, out_c)
    assert grads_s.keys() == grads_c.keys()
    assert all(torch.equal(grads_s[k], grads_c[k]) for k in grads_s)

    # the seeded generator was copied with its state: both continue with identical draws
    source.sliceout_sampler.force(None)
    clone.sliceout_sampler.force(None)
    assert source.sliceout_sampler.generator is not clone.sliceout_sampler.generator
    seen = set()
    with torch.no_grad():
        for _ in range(5):
            source(x)
            clone(x)
            assert source.sliceout_sampler.last_draws == clone.sliceout_sampler.last_draws
            seen.add(source.sliceout_sampler.last_draws)
    assert len(seen) > 1

    # training the copy leaves the source alone (parameters, buffers and mode)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    source.eval()
    opt = torch.optim.SGD(clone.parameters(), lr=0.5, momentum=0.9)
    for _ in range(2):
        train_step_outputs(clone, (x,))
        opt.step()
    assert not source.training and not any(m.training for m in source.modules())
    assert any(not torch.equal(v, clone.state_dict()[k]) for k, v in before.items())
    for k, v in source.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sliced_graph_follows_replaced_parameters():
    # `load_state_dict(assign=True)` and parametrizations replace the parameter objects: the
    # sliced training graph must read the module's current weights, not the ones at conversion.
    converted = sliceout_fx.convert(_mlp(), p=0.5, mode="mask", seed=0)
    fresh = {k: torch.randn_like(v) for k, v in converted.state_dict().items()}
    converted.load_state_dict(fresh, assign=True)
    reference = sliceout_fx.convert(_mlp(seed=1), p=0.5, mode="mask", seed=0)
    reference.load_state_dict(fresh)
    x = torch.randn(6, 12)
    for m in (converted, reference):
        m.sliceout_sampler.force([3, 0, 16])
    assert torch.equal(converted.train()(x), reference.train()(x))

    class Doubled(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(converted.fc1, "weight", Doubled())
    with torch.no_grad():
        reference.fc1.weight.mul_(2)
    torch.testing.assert_close(converted(x), reference(x))


# -- state_dict through files -------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,shape", [(mlp, (8, 12)), (ConvChain, (4, 3, 8, 8))], ids=["mlp", "conv-chain"]
)
def test_state_dict_file_round_trip_both_ways(make, shape, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(shape)
    converted = sliceout_fx.convert(make(), p=0.5, seed=2)
    opt = torch.optim.Adam(converted.parameters(), lr=1e-2)
    for _ in range(3):
        train_step_outputs(converted, (x,))
        opt.step()

    # converted -> file -> original class
    path = tmp_path / "converted.pt"
    torch.save(converted.state_dict(), path)
    original = make()
    original.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for (k, a), (k2, b) in zip(
        converted.state_dict().items(), original.state_dict().items(), strict=True
    ):
        assert k == k2 and torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(original.eval()(x), converted.eval()(x))

    # original -> file -> a fresh conversion of an untrained model
    with torch.no_grad():
        for param in original.parameters():
            param.add_(0.01)
    path = tmp_path / "original.pt"
    torch.save(original.state_dict(), path)
    torch.manual_seed(123)
    reconverted = sliceout_fx.convert(make(), p=0.5, seed=2)
    result = reconverted.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(reconverted.eval()(x), original.eval()(x))
    # the sliced training graph trains the loaded weights too: it matches the masked reference
    masked = sliceout_fx.convert(make(), p=0.5, seed=2, mode="mask")
    masked.load_state_dict(torch.load(path, weights_only=True), strict=True)
    out_s, grads_s = train_step_outputs(reconverted, (x,))
    out_m, grads_m = train_step_outputs(masked, (x,))
    assert reconverted.sliceout_sampler.last_draws == masked.sliceout_sampler.last_draws
    torch.testing.assert_close(out_s, out_m, atol=1e-5, rtol=1e-4)
    for k in grads_m:
        torch.testing.assert_close(grads_s[k], grads_m[k], atol=1e-5, rtol=1e-4)


# -- torch.compile ------------------------------------------------------------------------------


def _compile_pair(backend: str):
    """A converted MLP, its compiled form and an eager twin with the same weights."""
    torch._dynamo.reset()
    original = _mlp()
    converted = sliceout_fx.convert(original, p=0.5, seed=5)
    eager = copy.deepcopy(converted)
    return original, converted, torch.compile(converted, backend=backend), eager


def _assert_compiled_matches_eager(compiled, converted, eager, x, draw_list):
    for draws in draw_list:
        converted.sliceout_sampler.force(draws)
        eager.sliceout_sampler.force(draws)
        out_c, grads_c = train_step_outputs(compiled, (x,))
        out_e, grads_e = train_step_outputs(eager, (x,))
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        for name, g in grads_e.items():
            compiled_name = f"_orig_mod.{name}"  # the compiled wrapper's parameter names
            torch.testing.assert_close(grads_c[compiled_name], g, atol=1e-5, rtol=1e-5)
    converted.sliceout_sampler.force(None)
    eager.sliceout_sampler.force(None)


def test_compiled_training_does_not_recompile_per_draw_and_matches_eager():
    # aot_eager (dynamo + AOTAutograd, no inductor codegen) keeps this test fast on CPU; the
    # inductor backend is exercised by the slow test below.
    from torch._dynamo.utils import counters

    original, converted, compiled, eager = _compile_pair("aot_eager")
    counters.clear()
    x = torch.randn(8, 12)
    opt = torch.optim.SGD(converted.parameters(), lr=0.05)
    draws, graphs = [], []
    for _ in range(8):
        opt.zero_grad()
        out = compiled(torch.randn(8, 12))
        out.square().mean().backward()
        opt.step()
        draws.append(converted.sliceout_sampler.last_starts())
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0, "dynamo compiled nothing: the count below would prove nothing"
    assert len(set(draws[2:])) > 3, f"the draws did not change: {draws}"
    assert graphs[2:] == [graphs[2]] * 6, f"recompiled after warm-up: {graphs} for draws {draws}"
    # under torch.compile the sampler draws on the device: no graph break at all
    assert not counters["graph_break"], dict(counters["graph_break"])
    # parameters were updated through the compiled module, with zero gradient outside the slice
    assert not torch.equal(converted.fc1.weight, original.fc1.weight)
    start, width = draws[-1][0], converted.report.sites[0].width
    assert converted.fc1.weight.grad[~_live(32, start, width)].abs().sum() == 0

    # same forced draws: compiled train outputs and gradients equal eager ones
    eager.load_state_dict(converted.state_dict())
    _assert_compiled_matches_eager(compiled, converted, eager, x, [(0, 16, 7), (16, 3, 0)])

    # compiled eval computes what the original model computes
    converted.load_state_dict(original.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), original.eval()(x), atol=1e-5, rtol=1e-5)


def test_compiled_graph_count_does_not_grow_with_depth():
    # Eleven linear layers of eleven different shapes: the sliced graph must compile as one graph
    # (the sampler draws on the device under compile), not one graph per layer shape (which
    # would exceed dynamo's recompile limit and silently fall back to eager for the rest).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    widths = [12, 20, 24, 28, 36, 40, 44, 48, 52, 56, 60]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(0.5)]
    converted = sliceout_fx.convert(nn.Sequential(*layers, nn.Linear(60, 3)), p=0.5, seed=0)
    assert len(converted.report.sites) == 10
    compiled = torch.compile(converted, backend="aot_eager")
    counters.clear()
    for _ in range(4):
        train_step_outputs(compiled, (torch.randn(4, 12),))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.slow
def test_compiled_with_inductor_matches_eager_and_original():
    # Inductor codegen takes ~25 s with a cold cache on 2 CPU cores, hence `slow`. Recompile
    # counting is left to the aot_eager test: inductor may add one graph specialised to a start
    # of 0 (storage offset 0), depending on what its on-disk cache already holds.
    original, converted, compiled, eager = _compile_pair("inductor")
    x = torch.randn(8, 12)
    _assert_compiled_matches_eager(
        compiled, converted, eager, x, [(3, 16, 7), (16, 3, 0), (0, 0, 16), (9, 1, 12)]
    )
    # random draws: each compiled step equals the eager model forced to the same draws
    seen = set()
    for _ in range(3):
        eager.load_state_dict(converted.state_dict())
        out_c, grads_c = train_step_outputs(compiled, (x,))
        draws = converted.sliceout_sampler.last_starts()
        seen.add(draws)
        eager.sliceout_sampler.force(draws)
        out_e, grads_e = train_step_outputs(eager, (x,))
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_c[f"_orig_mod.{name}"], g, atol=1e-5, rtol=1e-5)
    assert len(seen) > 1
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(x), original.eval()(x), atol=1e-5, rtol=1e-5)


# -- DistributedDataParallel (gloo, 2 CPU processes) ---------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # A timeout turns a stuck rendezvous or collective into an error instead of a hang.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)  # same init on every rank
        converted = sliceout_fx.convert(mlp(), p=0.5, normalisation="probabilistic")
        initial = torch.cat([p.detach().flatten().clone() for p in converted.parameters()])
        torch.manual_seed(100 + rank)  # unseeded sampler: each rank draws its own slices
        model = nn.parallel.DistributedDataParallel(converted)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        draws = []
        for step in range(3):
            data = torch.Generator().manual_seed(1000 * rank + step)
            x, y = torch.randn(8, 12, generator=data), torch.randint(5, (8,), generator=data)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            draws.append(converted.sliceout_sampler.last_starts())
        final = torch.cat([p.detach().flatten() for p in converted.parameters()])
        gathered = [torch.empty_like(final) for _ in range(world)]
        dist.all_gather(gathered, final)
        gathered_init = [torch.empty_like(initial) for _ in range(world)]
        dist.all_gather(gathered_init, initial)
        torch.save(
            {"final": gathered, "initial": gathered_init, "draws": draws},
            Path(out_dir) / f"rank{rank}.pt",
        )
        # Free DDP (and its reference to the gloo group) while the peer is still connected:
        # tearing it down after the other rank has exited can block in gloo.
        del model, opt
        dist.barrier()
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_ddp_gloo_two_processes_keeps_replicas_identical(tmp_path):
    world, port = 2, free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_ddp_worker, args=(r, world, port, str(tmp_path))) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 150
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = "\n".join(f.read_text() for f in sorted(tmp_path.glob("rank*.err")))
    assert [p.exitcode for p in procs] == [0] * world, errors or "a worker hung or crashed"

    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    final, initial = results[0]["final"], results[0]["initial"]
    assert torch.equal(initial[0], initial[1])  # same init on both ranks
    assert torch.equal(final[0], final[1]), "replicas diverged"
    assert not torch.equal(final[0], initial[0]), "training did not move the parameters"
    assert all(torch.equal(r["final"][0], final[0]) for r in results)
    # each rank drew its own slices (and the allreduced update is still identical)
    assert results[0]["draws"] != results[1]["draws"]


# -- bf16 autocast --------------------------------------------------------------------------------


def test_bf16_autocast_eval_training_and_masked_reference():
    original = _mlp(width=40)
    x = torch.randn(16, 12)
    converted = sliceout_fx.convert(original, p=0.5, seed=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = original.eval()(x)
        got = converted.eval()(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(got, expected)

    sliced, masked = convert_pair(original, p=0.5)
    for step in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_s, grads_s = train_step_outputs(sliced, (x,), seed=step)
            out_m, grads_m = train_step_outputs(masked, (x,), seed=step)
        assert out_s.dtype == out_m.dtype == torch.bfloat16
        assert sliced.sliceout_sampler.last_draws == masked.sliceout_sampler.last_draws
        torch.testing.assert_close(out_s, out_m, atol=5e-2, rtol=2e-2)
        for name, g in grads_s.items():
            assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
            scale = grads_m[name].abs().max().item()
            torch.testing.assert_close(g, grads_m[name], atol=5e-2 * max(scale, 1.0), rtol=2e-2)
        s1, s2, s3 = sliced.sliceout_sampler.last_draws
        width = sliced.report.sites[0].width
        rows, rows2, cols3 = _live(40, s1, width), _live(40, s2, width), _live(40, s3, width)
        assert grads_s["fc1.weight"][~rows].abs().sum() == 0
        assert grads_s["fc1.weight"][rows].abs().sum() > 0
        assert grads_s["fc1.bias"][~rows].abs().sum() == 0
        assert grads_s["fc2.weight"][~rows2].abs().sum() == 0
        assert grads_s["fc2.weight"][:, ~rows].abs().sum() == 0
        assert grads_s["head.weight"][:, ~cols3].abs().sum() == 0


# -- float64 --------------------------------------------------------------------------------------


def test_to_float64_moves_sampler_buffers_and_trains_in_double():
    original = _mlp()
    sliced, masked = convert_pair(original, p=0.5, normalisation="probabilistic")
    scales = {k: v for k, v in sliced.sliceout_sampler.named_buffers() if v.is_floating_point()}
    assert scales, "no normalisation buffer: the dtype check would prove nothing"
    assert not any(k.startswith("sliceout_sampler") for k in sliced.state_dict())
    sliced.to(torch.float64)
    masked.to(torch.float64)
    for model in (sliced, masked):
        assert all(t.dtype == torch.float64 for t in model.parameters())
        floating = [t for t in model.sliceout_sampler.buffers() if t.is_floating_point()]
        assert floating and all(t.dtype == torch.float64 for t in floating)
        # the draw counters and bounds stay integers
        assert model.sliceout_sampler.device_steps.dtype == torch.long
        for graph in GRAPHS:
            assert all(t.dtype == torch.float64 for t in getattr(model, graph).parameters())
    for name, buf in sliced.sliceout_sampler.named_buffers():
        if name in scales:
            torch.testing.assert_close(buf, scales[name].double())  # values survive the move
    x = torch.randn(8, 12, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(sliced.eval()(x), original.double().eval()(x))
    for step in range(3):
        out_s, grads_s = train_step_outputs(sliced, (x,), seed=step)
        out_m, grads_m = train_step_outputs(masked, (x,), seed=step)
        assert out_s.dtype == torch.float64
        assert sliced.sliceout_sampler.last_draws == masked.sliceout_sampler.last_draws
        torch.testing.assert_close(out_s, out_m, atol=1e-10, rtol=1e-10)
        for name, g in grads_m.items():
            assert grads_s[name].dtype == torch.float64
            torch.testing.assert_close(grads_s[name], g, atol=1e-10, rtol=1e-10)
    opt = torch.optim.SGD(sliced.parameters(), lr=0.1)
    before = sliced.fc1.weight.detach().clone()
    train_step_outputs(sliced, (x,))
    opt.step()
    assert sliced.fc1.weight.dtype == torch.float64
    assert not torch.equal(sliced.fc1.weight, before)


@pytest.mark.parametrize("options", [{}, {"capturable": True}, {"mode": "gather"}], ids=str)
@pytest.mark.parametrize("make,shape", [(mlp, (4, 12)), (ConvChain, (2, 3, 8, 8))])
def test_training_on_the_meta_device(make, shape, options):
    # Shape-only runs (FLOP counters, memory planners) train on meta tensors: there is no
    # autocast for that device, so the sliced ops must not ask for it.
    with torch.device("meta"):
        model = make()
    x = torch.empty(shape, device="meta")
    converted = sliceout_fx.convert(model, p=0.5, seed=0, example_inputs=(x,), **options)
    out = converted.train()(x)
    assert out.device.type == "meta" and out.shape == model.train()(x).shape
    out.sum().backward()
    for name, p in converted.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name


# -- double backward -----------------------------------------------------------------------------


def _gradient_penalty_grads(
    model: nn.Module, x: torch.Tensor
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One training call: the parameters' gradients of ``loss``, and of ``loss + |d loss / d
    params|^2`` taken through the first-order gradients' own graph (``create_graph=True``)."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = model(x)
    loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum()
    params = dict(model.named_parameters())
    first = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    (loss + sum(g.pow(2).sum() for g in first)).backward()
    return (
        {n: g.detach().clone() for n, g in zip(params, first, strict=True)},
        {n: p.grad.clone() for n, p in params.items()},
    )


@pytest.mark.parametrize(
    ("make", "shape"), [(_mlp, (6, 12)), (ConvChain, (2, 3, 8, 8))], ids=["mlp", "cnn"]
)
def test_double_backward_matches_the_masked_reference(make, shape):
    """A gradient penalty trains through the sliced graph: the first- and second-order gradients
    equal the masked full-width reference's (same draws), are finite, and the second-order part
    reaches every weight."""
    sliced, masked = convert_pair(make().double(), p=0.5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (first, got), (first_ref, want) = (
        _gradient_penalty_grads(sliced, x),
        _gradient_penalty_grads(masked, x),
    )
    assert sliced.sliceout_sampler.last_starts() == masked.sliceout_sampler.last_starts()
    assert got.keys() == want.keys() == first.keys()
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(first[name], first_ref[name], atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(got[name], want[name], atol=1e-10, rtol=1e-8, msg=name)
    weights = [n for n in got if n.endswith("weight")]
    assert weights and all((got[n] - first[n]).abs().sum() > 0 for n in weights)


@pytest.mark.parametrize(
    ("width", "options"),
    [(512, {}), (32, {"capturable": True})],
    ids=["block-of-65536-weights", "capturable"],
)
def test_double_backward_through_a_custom_backward_is_refused(width, options):
    """The limit README's Status names: a sliced linear whose live block holds 65,536 weights or
    more, and every sliced linear of a capturable conversion, run a backward of their own that
    is differentiable once; a second differentiation is torch's error, not a wrong gradient."""
    model = sliceout_fx.convert(_mlp(width=width), p=0.5, seed=0, **options)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _gradient_penalty_grads(model, x)

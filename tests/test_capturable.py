"""``capturable=True`` and ``torch.compile``: device-side draws, static shapes, no graph break.

The device path (draws as int64 tensors, live channels gathered by index) must compute exactly
what the host path (Python-int starts, narrowed views) computes with the same seed: the seeded
draws are a counter hash that both paths evaluate bit for bit alike. So the CPU tests below cover
the path a CUDA graph replays, without a GPU; the CUDA-only tests capture a real training step.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sliceout_fx
from sliceout_lab.models import WideResNet
from tests.helpers import assert_sliced_matches_mask, train_step_outputs
from tests.models import ConvChain, DepthwiseChain, mlp, tiny_gpt2, tiny_llama

CUDA = torch.cuda.is_available()


def _efficientnet() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    # No stochastic depth and no classifier dropout: they draw from the global RNG, which
    # inductor replaces by its own generator, so compiled and eager steps would drop other units.
    # Without a dropout the sites are the 15 expand convolutions.
    return torchvision.models.efficientnet_b0(
        num_classes=10, stochastic_depth_prob=0.0, dropout=0.0
    )


# name -> (model factory, input shape, convert options)
CASES = {
    "mlp": (mlp, (4, 12), {"p": 0.5}),
    "conv-bn": (ConvChain, (2, 3, 12, 12), {"p": 0.5}),
    "depthwise": (DepthwiseChain, (2, 4, 10, 10), {"p": 0.5, "placement": "delayed"}),
    "wrn": (lambda: WideResNet(10, 2), (2, 3, 16, 16), {"p": 0.5, "placement": "delayed"}),
    "efficientnet_b0": (_efficientnet, (2, 3, 32, 32), {"p": 0.3}),
}


def _case(name: str, dtype: torch.dtype = torch.float64):
    make, shape, options = CASES[name]
    torch.manual_seed(0)
    return make().to(dtype), torch.randn(shape, dtype=dtype), options


def _model_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers of the model itself (the samplers' counters differ by design between paths)."""
    return {k: v for k, v in model.named_buffers() if "sliceout_sampler" not in k}


@pytest.mark.parametrize("normalisation", ["flow", "probabilistic"])
@pytest.mark.parametrize("name", list(CASES))
def test_device_offsets_compute_what_int_starts_compute(name: str, normalisation: str) -> None:
    model, x, options = _case(name)
    kw = {"seed": 3, "example_inputs": (x,), "normalisation": normalisation, **options}
    host = sliceout_fx.convert(copy.deepcopy(model), **kw)
    device = sliceout_fx.convert(copy.deepcopy(model), capturable=True, **kw)
    assert host.report.sites, "no site: the comparison would prove nothing"
    starts = set()
    for step in range(3):
        out_h, grads_h = train_step_outputs(host, (x,), seed=step)
        out_d, grads_d = train_step_outputs(device, (x,), seed=step)
        draws = device.sliceout_sampler.last_draws
        assert all(isinstance(d, torch.Tensor) for d in draws), "capturable drew on the host"
        assert host.sliceout_sampler.last_starts() == device.sliceout_sampler.last_starts()
        starts.add(host.sliceout_sampler.last_starts())
        torch.testing.assert_close(out_d, out_h, atol=1e-12, rtol=1e-12)
        for k, g in grads_h.items():
            torch.testing.assert_close(grads_d[k], g, atol=1e-12, rtol=1e-12, msg=k)
        for (k, b_h), b_d in zip(
            _model_buffers(host).items(), _model_buffers(device).values(), strict=True
        ):
            torch.testing.assert_close(b_d, b_h, atol=1e-12, rtol=1e-12, msg=k)  # BN statistics
    assert len(starts) > 1, "the draws never changed"
    assert device.sliceout_sampler.device_steps.item() == 3
    assert host.sliceout_sampler.host_steps == 3


@pytest.mark.parametrize("name", ["mlp", "conv-bn", "depthwise"])
def test_capturable_sliced_training_matches_the_masked_reference(name: str) -> None:
    model, x, options = _case(name)
    assert_sliced_matches_mask(model, (x,), atol=1e-10, capturable=True, **options)


class _HostSyncs(TorchDispatchMode):
    """Counts ops that read a tensor back to the host (``.item()``, ``.tolist()``, ``int(t)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("seed", [None, 5])
def test_a_capturable_step_reads_nothing_back_to_the_host(seed: int | None) -> None:
    model, x, options = _case("conv-bn", torch.float32)
    converted = sliceout_fx.convert(model, seed=seed, capturable=True, **options).train()
    converted(x).sum().backward()  # warm-up outside the count
    with _HostSyncs() as syncs:
        converted(x).sum().backward()
    assert not syncs.ops, f"host syncs in a capturable step: {dict(syncs.ops)}"
    # ...while the default path reads its draws as Python ints (unseeded: one .tolist())
    plain = sliceout_fx.convert(copy.deepcopy(model), seed=seed, **options).train()
    assert all(isinstance(d, int) for d in plain.sliceout_sampler())


def test_capturable_is_refused_where_draws_live_on_the_host() -> None:
    with pytest.raises(sliceout_fx.SliceOutConfigError, match="capturable"):
        sliceout_fx.convert(mlp(), p=0.5, mode="gather", capturable=True)
    with pytest.raises(sliceout_fx.SliceOutConfigError, match="capturable"):
        sliceout_fx.convert(mlp(), p=0.5, capturable="yes")


def test_seeded_draws_are_a_pure_function_of_the_step_count() -> None:
    a = sliceout_fx.convert(mlp(), p=0.5, seed=9).train()
    b = sliceout_fx.convert(mlp(), p=0.5, seed=9, capturable=True).train()
    x = torch.randn(4, 12)
    seq_a, seq_b = [], []
    for _ in range(6):
        a(x), b(x)
        seq_a.append(a.sliceout_sampler.last_starts())
        seq_b.append(b.sliceout_sampler.last_starts())
    assert seq_a == seq_b and len(set(seq_a)) > 1
    # a copy continues the same sequence from the same step
    c = copy.deepcopy(b)
    b(x), c(x)
    assert b.sliceout_sampler.last_starts() == c.sliceout_sampler.last_starts()
    # other seeds give other sequences
    d = sliceout_fx.convert(mlp(), p=0.5, seed=10).train()
    seq_d = []
    for _ in range(6):
        d(x)
        seq_d.append(d.sliceout_sampler.last_starts())
    assert seq_d != seq_a


def test_unseeded_device_draws_follow_the_global_rng() -> None:
    converted = sliceout_fx.convert(mlp(), p=0.5, capturable=True).train()
    x = torch.randn(4, 12)
    torch.manual_seed(4)
    converted(x)
    first = converted.sliceout_sampler.last_starts()
    torch.manual_seed(4)
    converted(x)
    assert converted.sliceout_sampler.last_starts() == first


def test_seeded_starts_are_uniform_over_the_eligible_positions() -> None:
    from sliceout_fx.sampling import DrawSpec, SliceSampler

    sampler = SliceSampler([DrawSpec(units=10, width=6, mode="slice")], seed=0, capturable=True)
    starts = torch.stack([sampler()[0] for _ in range(5000)])
    assert starts.min() == 0 and starts.max() == 4
    freq = torch.bincount(starts, minlength=5).double() / 5000
    assert (freq - 0.2).abs().max() < 0.025


# -- torch.compile --------------------------------------------------------------------------------


def _train_compiled(model: nn.Module, compiled: nn.Module, shape, steps: int):
    """``steps`` SGD steps through ``compiled``; the graph count after each and the draws."""
    from torch._dynamo.utils import counters

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    graphs, draws = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        compiled(torch.randn(shape)).square().mean().backward()
        opt.step()
        graphs.append(counters["stats"]["unique_graphs"])
        draws.append(model.sliceout_sampler.last_starts())
    return graphs, draws


@pytest.mark.parametrize("capturable", [True, False])
@pytest.mark.parametrize("name", ["mlp", "conv-bn"])
def test_compiled_fullgraph_training_never_recompiles(name: str, capturable: bool) -> None:
    from torch._dynamo.utils import counters

    model, _, options = _case(name, torch.float32)
    shape = CASES[name][1]
    converted = sliceout_fx.convert(model, seed=1, capturable=capturable, **options)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(converted, fullgraph=True, backend="aot_eager")
    graphs, draws = _train_compiled(converted, compiled, shape, 100)
    assert graphs[0] >= 1, "dynamo compiled nothing: the count would prove nothing"
    # Warm-up: the first call compiles the sliced step; with batch norms after the slices, the
    # first batch-norm refresh call (call `every`) compiles the full-width variant once.
    refresh = converted.bn_refresh
    warmup = refresh.every if refresh is not None else 1
    assert (name == "conv-bn") == (refresh is not None)
    expected = graphs[0] + (1 if refresh is not None else 0)
    assert graphs[warmup - 1 :] == [expected] * (101 - warmup), f"recompiled: {graphs}"
    assert not counters["graph_break"], dict(counters["graph_break"])
    changes = sum(a != b for a, b in zip(draws, draws[1:], strict=False))
    assert changes > 50, f"fresh slices were not drawn at every step: {draws}"


def test_compiled_steps_equal_eager_steps_with_the_same_seed() -> None:
    torch.manual_seed(0)
    model = mlp()
    compiled_model = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=2)
    eager = sliceout_fx.convert(copy.deepcopy(model), p=0.5, seed=2)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    x = torch.randn(8, 12)
    for step in range(4):
        out_c, grads_c = train_step_outputs(compiled, (x,), seed=step)
        out_e, grads_e = train_step_outputs(eager, (x,), seed=step)
        assert compiled_model.sliceout_sampler.last_starts() == eager.sliceout_sampler.last_starts()
        torch.testing.assert_close(out_c, out_e, atol=1e-6, rtol=1e-5)
        for k, g in grads_e.items():
            torch.testing.assert_close(grads_c[f"_orig_mod.{k}"], g, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wrn", "efficientnet_b0"])
def test_inductor_fullgraph_on_cnns(name: str) -> None:
    from torch._dynamo.utils import counters

    model, _, options = _case(name, torch.float32)
    # Big enough that the last batch norms see more than a couple of values per channel: with
    # 1x1 maps and batch 2 they amplify float32 reordering noise to O(1).
    x = torch.randn(4, 3, 64, 64)
    converted = sliceout_fx.convert(model, seed=1, capturable=True, example_inputs=(x,), **options)
    eager = copy.deepcopy(converted)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(converted, fullgraph=True)
    for step in range(3):
        out_c, grads_c = train_step_outputs(compiled, (x,), seed=step)
        out_e, grads_e = train_step_outputs(eager, (x,), seed=step)
        assert converted.sliceout_sampler.last_starts() == eager.sliceout_sampler.last_starts()
        torch.testing.assert_close(out_c, out_e, atol=1e-3, rtol=1e-3)
        # float32 reordering noise, which batch norms amplify, measured against the size of the
        # gradient (elementwise tolerances trip on entries near zero, e.g. the bias of a batch
        # norm that another batch norm follows, whose true gradient is ~0); a wrong slice would be
        # off by the gradient's own size
        floor = 1e-3 * torch.stack([g.norm() for g in grads_e.values()]).mean()
        for k, g in grads_e.items():
            error = (grads_c[f"_orig_mod.{k}"] - g).norm()
            assert error <= 5e-3 * g.norm() + floor, f"gradient of {k}: error {error:.2e}"
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


# -- CUDA graphs (need a GPU) ---------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("seed", [None, 3])
def test_a_whole_training_step_replays_in_a_cuda_graph_with_new_slices(seed) -> None:
    torch.manual_seed(0)
    model = sliceout_fx.convert(mlp(width=64).cuda(), p=0.5, seed=seed, capturable=True).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    x = torch.randn(16, 12, device="cuda")
    y = torch.randint(0, 5, (16,), device="cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    draws = model.sliceout_sampler.last_draws  # tensors the replays overwrite
    seen = []
    for _ in range(8):
        before = model.fc1.weight.detach().clone()
        graph.replay()
        torch.cuda.synchronize()
        seen.append(tuple(int(d) for d in draws))
        assert not torch.equal(before, model.fc1.weight)
        start, width = seen[-1][0], model.report.sites[0].width
        grad = model.fc1.weight.grad
        outside = torch.ones(grad.shape[0], dtype=torch.bool, device="cuda")
        outside[start : start + width] = False
        assert grad[outside].abs().sum() == 0  # only the replay's slice got gradient
    assert len(set(seen)) > 1, f"every replay drew the same slices: {seen}"


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_reduce_overhead_compile_trains_with_new_slices() -> None:
    torch.manual_seed(0)
    model = sliceout_fx.convert(mlp(width=64).cuda(), p=0.5, seed=1, capturable=True).train()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    seen = set()
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        compiled(torch.randn(16, 12, device="cuda")).square().mean().backward()
        opt.step()
        seen.add(model.sliceout_sampler.last_starts())
    assert len(seen) > 3


# -- HuggingFace models under torch.compile ------------------------------------------------------


def _hf_model(kind: str) -> tuple[nn.Module, dict]:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_gpt2(use_cache=False) if kind == "gpt2" else tiny_llama(use_cache=False)
    ids = torch.randint(1, 100, (2, 12))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _graphs_and_breaks(model: nn.Module, batch: dict) -> tuple[int, int]:
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**batch)
    return explanation.graph_count, explanation.graph_break_count


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compiled_hf_model_has_the_original_graph_breaks_and_no_recompiles(kind: str) -> None:
    from torch._dynamo.utils import counters

    original, batch = _hf_model(kind)
    example = {k: v for k, v in batch.items() if k != "labels"}
    converted = sliceout_fx.convert(copy.deepcopy(original), p=0.3, seed=0, example_inputs=example)
    eager = copy.deepcopy(converted)
    original.train(), converted.train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(converted, backend="aot_eager")
    # Warm-up: under dynamo HuggingFace builds its masks differently (a tensor where eager
    # passes None), a call structure the first compiled step exports and rewrites once.
    compiled(**batch).loss.backward()
    eager(**batch).loss.backward()  # keeps the seeded draws of both in step
    seen, graphs = [], []
    for _ in range(12):
        converted.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        loss_c = compiled(**batch).loss
        loss_e = eager(**batch).loss
        loss_c.backward()
        loss_e.backward()
        torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
        for (k, p_c), p_e in zip(converted.named_parameters(), eager.parameters(), strict=True):
            if p_e.grad is not None:
                torch.testing.assert_close(p_c.grad, p_e.grad, atol=1e-5, rtol=1e-4, msg=k)
        graphs.append(counters["stats"]["unique_graphs"])
        layer = converted.transformer.h[0] if kind == "gpt2" else converted.model.layers[0]
        seen.append(layer.sliceout_sampler.last_starts())
    assert graphs[1:] == [graphs[1]] * 11, f"recompiled after warm-up: {graphs}"
    assert len(set(seen)) > 3, "the compiled layers did not draw fresh slices"
    # after warm-up the converted model compiles into as many graphs as the original
    assert _graphs_and_breaks(converted, batch) == _graphs_and_breaks(original, batch)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_capturable_hf_layers_compute_what_the_int_path_computes(kind: str) -> None:
    original, batch = _hf_model(kind)
    original = original.double()
    example = {k: v for k, v in batch.items() if k != "labels"}
    kw = {"p": 0.3, "seed": 4, "example_inputs": example}
    host = sliceout_fx.convert(copy.deepcopy(original), **kw).train()
    device = sliceout_fx.convert(copy.deepcopy(original), capturable=True, **kw).train()
    for _ in range(3):
        host.zero_grad(set_to_none=True)
        device.zero_grad(set_to_none=True)
        loss_h, loss_d = host(**batch).loss, device(**batch).loss
        loss_h.backward()
        loss_d.backward()
        torch.testing.assert_close(loss_d, loss_h, atol=1e-12, rtol=1e-12)
        for (k, p_h), p_d in zip(host.named_parameters(), device.parameters(), strict=True):
            if p_h.grad is not None:
                torch.testing.assert_close(p_d.grad, p_h.grad, atol=1e-12, rtol=1e-10, msg=k)
    layers = host.transformer.h if kind == "gpt2" else host.model.layers
    assert all(isinstance(d, int) for d in layers[0].sliceout_sampler.last_draws)
    layers = device.transformer.h if kind == "gpt2" else device.model.layers
    assert all(isinstance(d, torch.Tensor) for d in layers[0].sliceout_sampler.last_draws)

"""FSDP2 (``torch.distributed.fsdp.fully_shard``) on converted models: two CPU processes, gloo.

Each rank builds the same model, converts it with the same seed, shards it with ``fully_shard``
and trains a few steps on the same batches. The reference is a single-process run of the same
converted model with the same seed, batches and optimizer: averaging identical gradients over two
ranks gives the single-process gradient, so the trained parameters (gathered with
``DTensor.full_tensor()``) must equal the reference's up to float rounding, and every rank must
draw the reference's slices.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sliceout_fx
from sliceout_fx.module import conversions_in
from tests.helpers import free_port
from tests.models import mlp, tiny_llama

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)
try:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
except ImportError as exc:  # torch without FSDP2
    pytest.skip(f"FSDP2 is not available: {exc}", allow_module_level=True)

WORLD = 2
STEPS = 3
ATOL = 1e-6


# -- what both the ranks and the reference run -----------------------------------------------------


def _converted_mlp() -> nn.Module:
    torch.manual_seed(0)  # same initial weights on every rank and in the reference
    return sliceout_fx.convert(mlp(), p=0.5, seed=0)


def _mlp_batch(step: int) -> dict[str, torch.Tensor]:
    data = torch.Generator().manual_seed(step)  # same batches on every rank
    return {"x": torch.randn(8, 12, generator=data), "y": torch.randint(5, (8,), generator=data)}


def _mlp_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"])


def _converted_llama() -> nn.Module:
    torch.manual_seed(0)
    # Exported from a call shaped like the padded training batches: training with them needs no
    # second export of the layers (see the new-call-structure test for what one does under FSDP).
    return sliceout_fx.convert(tiny_llama(), p=0.5, seed=0, example_inputs=_llama_batch(0))


def _llama_batch(step: int, padded: bool = True) -> dict[str, Any]:
    data = torch.Generator().manual_seed(step)
    ids = torch.randint(100, (2, 12), generator=data)
    batch: dict[str, Any] = {"input_ids": ids, "labels": ids, "use_cache": False}
    if padded:  # a padded mask reaches the layers as a tensor (an all-ones one as None)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0
        batch["attention_mask"] = mask
    return batch


def _llama_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    return model(**batch).loss


def _samplers(model: nn.Module) -> list[Any]:
    return [m.sliceout_sampler for m, _ in conversions_in(model)]


def _train(
    model: nn.Module, batches: list[dict[str, Any]], loss_fn: Callable
) -> tuple[list[tuple], list[float]]:
    """SGD with momentum on ``batches``; returns every step's draws (all samplers) and losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    draws, losses = [], []
    model.train()
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        draws.append(tuple(s.last_starts() for s in _samplers(model)))
        losses.append(loss.item())
    return draws, losses


def _full(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# -- the layouts ----------------------------------------------------------------------------------


def _shard_root(model: nn.Module, mesh: Any) -> None:
    fully_shard(model, mesh=mesh)


def _shard_linears_then_root(model: nn.Module, mesh: Any) -> None:
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _shard_decoder_layers_then_root(model: nn.Module, mesh: Any) -> None:
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


CASES: dict[str, tuple[Callable, Callable, Callable, Callable]] = {
    # name: (build, shard, batch(step), loss)
    "mlp-root": (_converted_mlp, _shard_root, _mlp_batch, _mlp_loss),
    "mlp-linears": (_converted_mlp, _shard_linears_then_root, _mlp_batch, _mlp_loss),
    "llama-layers": (_converted_llama, _shard_decoder_layers_then_root, _llama_batch, _llama_loss),
    "llama-layers-new-call": (
        _converted_llama,
        _shard_decoder_layers_then_root,
        lambda step: _llama_batch(step, padded=False),
        _llama_loss,
    ),
}


def _run_case(name: str, mesh: Any) -> dict[str, Any]:
    build, shard, batch, loss_fn = CASES[name]
    model = build()
    keys = list(model.state_dict())
    shard(model, mesh)
    assert conversions_in(model), "the model has no converted module left"
    batches = [batch(step) for step in range(STEPS)]
    draws, losses = _train(model, batches, loss_fn)
    params = {n: _full(p) for n, p in model.named_parameters()}
    model.eval()
    with torch.no_grad():
        evaluated = loss_fn(model, batches[0])
    return {
        "params": params,
        "draws": draws,
        "losses": losses,
        "eval": evaluated,
        "keys": keys,
        "sharded_keys": list(model.state_dict()),
        "dtensors": sorted(n for n, p in model.named_parameters() if hasattr(p, "full_tensor")),
    }


def _reference(name: str) -> dict[str, Any]:
    build, _, batch, loss_fn = CASES[name]
    model = build()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = [batch(step) for step in range(STEPS)]
    draws, losses = _train(model, batches, loss_fn)
    model.eval()
    with torch.no_grad():
        evaluated = loss_fn(model, batches[0])
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {
        "params": params,
        "initial": initial,
        "draws": draws,
        "losses": losses,
        "eval": evaluated,
    }


# -- two processes ---------------------------------------------------------------------------------


def _worker(rank: int, port: int, out_dir: str, cases: list[str]) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # A timeout turns a stuck rendezvous or collective into an error instead of a hang.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        for name in cases:
            # Both ranks run the same code on the same data: a failure is raised on both, at the
            # same point, so the next case still starts in step.
            try:
                result = _run_case(name, mesh)
            except Exception:  # noqa: BLE001 - recorded for the test to report
                result = {"error": traceback.format_exc()}
            torch.save(result, Path(out_dir) / f"{name}.rank{rank}.pt")
            dist.barrier()
    except BaseException:
        (Path(out_dir) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(out_dir: Path, cases: list[str], timeout: float) -> list[int | None]:
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(out_dir), cases)) for r in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def _results(
    out_dir: Path, name: str, exitcodes: list[int | None], allow_errors: bool = False
) -> list[dict[str, Any]]:
    """Both ranks' results of case ``name``, or an assertion saying why there are none."""
    files = [out_dir / f"{name}.rank{r}.pt" for r in range(WORLD)]
    if not all(f.is_file() for f in files):  # a case run after this one may crash: not our case
        errors = "\n".join(f.read_text() for f in sorted(out_dir.glob("rank*.err")))
        raise AssertionError(
            f"{name}: no result from every rank; exit codes {exitcodes} "
            f"(-11: SIGSEGV, None: hung and killed)\n{errors}"
        )
    results = [torch.load(f, weights_only=True) for f in files]
    for rank, result in enumerate(results):
        assert allow_errors or "error" not in result, f"{name}, rank {rank}:\n{result['error']}"
    return results


def _assert_matches_reference(results: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    initial = reference["initial"]
    assert results[0]["draws"] == results[1]["draws"], "the ranks drew different slices"
    for rank, got in enumerate(results):
        # FSDP2 really sharded the parameters, and the state_dict keys are the model's
        assert got["dtensors"] == sorted(reference["params"]), f"rank {rank}"
        assert got["sharded_keys"] == got["keys"], f"rank {rank}"
        # same slices as the single-process run, on every rank, and the draws did change
        assert got["draws"] == reference["draws"], f"rank {rank}"
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(reference["losses"]), atol=ATOL, rtol=0
        )
        assert got["params"].keys() == reference["params"].keys()
        for name, value in reference["params"].items():
            torch.testing.assert_close(
                got["params"][name], value, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
            )
        # eval (full width, the model's own forward) through FSDP equals the reference's eval
        torch.testing.assert_close(got["eval"], reference["eval"], atol=ATOL, rtol=0)
    assert len(set(reference["draws"])) > 1, "the draws never changed: the test proves little"
    moved = [n for n, v in reference["params"].items() if not torch.equal(v, initial[n])]
    assert moved, "training did not move the parameters"


# -- the tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_runs(tmp_path_factory) -> tuple[Path, list[int | None]]:
    """Both MLP layouts in one pair of processes (the spawn and imports dominate the time)."""
    out_dir = tmp_path_factory.mktemp("fsdp_mlp")
    return out_dir, _spawn(out_dir, ["mlp-root", "mlp-linears"], timeout=150)


def test_fsdp2_sharded_root_trains_like_one_process(mlp_runs):
    out_dir, exitcodes = mlp_runs
    results = _results(out_dir, "mlp-root", exitcodes)
    _assert_matches_reference(results, _reference("mlp-root"))


def test_fsdp2_sharding_a_sliced_linear_on_its_own_trains_like_one_process(mlp_runs):
    # The sliced fx graph replaces the Linear modules' calls by sliced functional ops; the ops
    # standing for a module with hooks run through that module's own call (FSDP2's per-module
    # unshard and reshard included) and read its weight after the pre-hooks, so a Linear
    # sharded on its own trains as in one process.
    out_dir, exitcodes = mlp_runs
    results = _results(out_dir, "mlp-linears", exitcodes)
    _assert_matches_reference(results, _reference("mlp-linears"))


@pytest.mark.slow
def test_fsdp2_sharded_hf_layers_train_like_one_process(tmp_path):
    # capture="blocks": each decoder layer is converted and called through its own __call__, so
    # per-layer fully_shard (the usual FSDP layout) unshards before the sliced layer graph runs.
    exitcodes = _spawn(tmp_path, ["llama-layers"], timeout=240)
    results = _results(tmp_path, "llama-layers", exitcodes)
    _assert_matches_reference(results, _reference("llama-layers"))


@pytest.mark.slow
def test_fsdp2_sharded_hf_layers_with_a_new_call_structure(tmp_path):
    # A training call with a new structure (attention_mask=None) is exported inside the
    # FSDP2-wrapped layer's forward; the export must not run FSDP2's hooks (a reshard there
    # freed the gathered weights the rest of the step reads).
    exitcodes = _spawn(tmp_path, ["llama-layers-new-call"], timeout=240)
    results = _results(tmp_path, "llama-layers-new-call", exitcodes)
    _assert_matches_reference(results, _reference("llama-layers-new-call"))

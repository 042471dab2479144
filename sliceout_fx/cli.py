"""Command-line entry point: ``sliceout-fx {bench,demo,explain,draw}``.

Heavy or optional pieces (torch, the core transformation, the demo) are imported only by the
subcommand that needs them, so ``--help`` is fast and one broken piece does not take down the rest.
Errors are reported as one line on stderr with exit status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = ["CLIError", "build_parser", "main"]

PROG = "sliceout-fx"


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the fix, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's example layout; appends a default only where it says something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" not in text
            and default is not None
            and default is not False
            and default != argparse.SUPPRESS
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"dropout rate must be in [0, 1), got {text}")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _lab(module: str) -> Any:
    """A module of ``sliceout_lab`` (benchmarks, demo), or a one-line error naming the extra."""
    import importlib

    try:
        return importlib.import_module(f"sliceout_lab.{module}")
    except ImportError as exc:
        raise CLIError(
            f"the experiments are not installed ({exc}); pip install 'sliceout-fx[lab]'"
        ) from exc


def _workload_names() -> list[str]:
    """The built-in workloads; none when the ``lab`` extra is missing (``explain`` and ``draw``
    still take the user's own model then)."""
    try:
        return _lab("bench.workloads").workload_names()
    except CLIError:
        return []


BENCH_EPILOG = f"""\
Each variant starts from the same weights and sees the same batches; variants run round-robin
(order rotated every round) in one process and each step is compared with the baseline step of the
same round. Report the ratios: absolute milliseconds depend on the machine and its load.
Outputs: a table on stdout, <out>/results.json (raw samples, settings, machine) and
<out>/ratios.png.

examples:
  {PROG} bench mlp                              # p = 0.1 ... 0.9, 30 rounds each
  {PROG} bench mlp --p 0.1 0.5 --repeats 20
  {PROG} bench mlp --p 0.5 --fused-adam --threads 2 --out /tmp/mlp-fused
  {PROG} bench mlp --p 0.5 --hidden 256 --repeats 5 --warmup 1   # quick smoke run
  {PROG} bench wrn --p 0.3 0.5 --repeats 10     # WRN-16-8, SGD; p = 0.1 ... 0.5 by default
  {PROG} bench wrn --p 0.5 --depth 10 --widen 1 --image-size 8 --repeats 3   # tiny WRN
  {PROG} bench efficientnet_b0 --p 0.3          # needs torchvision
  {PROG} bench torchvision.models:resnet18 --input-shape 3,64,64 --p 0.3   # your model
  {PROG} bench ./my-finetuned-bert --input-shape 128 --sites all           # token ids, 128
  {PROG} bench wrn --p 0.3 0.5 --device cuda    # on the GPU: adds a CUDA step-peak memory column
  {PROG} bench mlp --p 0.5 --compile            # both variants torch.compile'd (inductor)
  {PROG} bench mlp --p 0.5 --capturable         # SliceOut with device-side slice offsets
  {PROG} bench overhead                         # ATen ops and host time per tiny step (mlp, gpt2)
  {PROG} bench gpu --device cuda                # the prepared GPU suite (<= --budget seconds)
  {PROG} bench gpu --device cpu --entries mlp-b256 --modes eager compiled   # small, on the CPU
"""

EXPLAIN_EPILOG = f"""\
Prints what convert() would do with the model: the alignment groups it found, which are sliced
(and their widths at rate p), and why the others are left full width.

MODEL is a built-in workload or your own model: package.module:factory (a callable that builds
it with no arguments), timm:NAME, or a local HuggingFace folder (save_pretrained output). Weights
are random (seeded by --seed); --input-shape gives one sample's shape, else convert() guesses a
small batch from the model.

examples:
  {PROG} explain mlp
  {PROG} explain mlp --p 0.3 --hidden 512
  {PROG} explain wrn --p 0.5
  {PROG} explain efficientnet_b0 --p 0.3
  {PROG} explain torchvision.models:resnet50 --input-shape 3,224,224 --sites all
  {PROG} explain timm:convnext_tiny --p 0.2
  {PROG} explain ./my-finetuned-bert       # a save_pretrained() folder, loaded offline
"""

DRAW_EPILOG = f"""\
Draws the model's traced graph with what convert() would slice: each site's alignment group in its
own colour (the ops that share one slice), the site starred, ops that stop a group hatched, and a
legend with each site's kept/total channels and each blocker's reason. The format follows the
suffix of --out (.svg, .png, .pdf). Large models: draw one block with --only. Transformers (gpt2,
bert) are drawn one layer at a time, as convert() exports it: the first layer, or the one --only
names.

examples:
  {PROG} draw mlp -o mlp.svg
  {PROG} draw wrn -o wrn-block.svg --p 0.3 --only stage2.0
  {PROG} draw efficientnet_b0 -o mbconv.png --p 0.3 --only features.2.1
  {PROG} draw efficientnet_b0 -o se.svg --sites all --only features.1
  {PROG} draw gpt2 -o gpt2-layer.svg --p 0.3 --hidden 96 --depth 2   # one layer, 12 heads
  {PROG} draw bert -o bert-attn.png --only bert.encoder.layer.3.attention
  {PROG} draw torchvision.models:resnet18 -o block.svg --input-shape 3,64,64 --only layer1.0
"""

DEMO_EPILOG = f"""\
All arguments after 'demo' are passed to the demo unchanged; see '{PROG} demo --help'.
"""

MAIN_EPILOG = f"""\
examples:
  {PROG} bench mlp --p 0.1 0.5 --repeats 20   # SliceOut vs dropout vs controlled dropout
  {PROG} demo --help                          # the demo's own options
  {PROG} explain mlp --p 0.5                  # what convert() slices in the paper's MLP
  {PROG} draw wrn -o wrn.svg --only stage2.0  # picture: which ops share a slice, one block
"""


def _add_shape_options(parser: argparse.ArgumentParser) -> None:
    """Model-shape overrides; each workload uses those that apply to it and rejects the rest."""
    parser.add_argument(
        "--hidden", type=_positive_int, default=None, help="MLP hidden width override (quick runs)"
    )
    parser.add_argument(
        "--depth",
        type=_positive_int,
        default=None,
        help="MLP hidden layers, or WRN depth 6n+4 (default: 3 for mlp, 16 for wrn)",
    )
    parser.add_argument(
        "--widen", type=_positive_int, default=None, help="WRN widening factor (default: 8)"
    )
    parser.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        help="side of the square synthetic images (default: 32 for wrn, 96 for efficientnet_b0)",
    )


def _add_input_shape_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        type=_input_shape,
        default=None,
        metavar="SHAPE",
        help="your model's input, one sample (3,224,224); default: guessed from the model",
    )


def _input_shape(text: str) -> tuple[int, ...]:
    """``3,224,224`` or ``3x224x224``: one sample's shape."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (e.g. 3,224,224)") from None
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape of positive sizes, got {text!r}")
    return shape


def _model_help(names: Sequence[str]) -> str:
    return (
        f"a built-in workload ({', '.join(names)}) or your model: package.module:factory, "
        "timm:NAME, or a local HuggingFace folder"
    )


def _add_sites_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sites",
        choices=("auto", "dropout", "expand", "all"),
        default="auto",
        help="site policy, as convert(sites=...)",
    )


def _shape_options(args: argparse.Namespace) -> dict[str, Any]:
    extra = {
        key: value
        for key, value in (("widen", args.widen), ("image_size", args.image_size))
        if value is not None
    }
    return {"hidden": args.hidden, "depth": args.depth, "extra": extra}


def _version() -> str:
    """The installed distribution's version (the package's own when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sliceout-fx")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    """The full parser (``demo`` arguments are forwarded verbatim, see :func:`main`)."""
    parser = _Parser(
        prog=PROG,
        description="SliceOut as a torch.fx transformation: benchmarks, demo, model reports and "
        "pictures.",
        epilog=MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks instead of one-line errors"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(
        dest="command", metavar="{bench,demo,explain,draw}", parser_class=_Parser
    )
    sub.required = True
    names = _workload_names()

    bench = sub.add_parser(
        "bench",
        help="time and memory ratios of SliceOut variants vs standard dropout",
        description="Benchmark SliceOut against standard and controlled dropout on a workload.",
        epilog=BENCH_EPILOG,
        formatter_class=_Formatter,
    )
    bench.add_argument(
        "workload",
        metavar="WORKLOAD",
        help=f"a built-in workload ({', '.join(names)}), your model (package.module:factory, "
        "timm:NAME, a local HuggingFace folder: dropout as built vs SliceOut on synthetic "
        "batches), or a suite of its own: 'overhead', 'gpu' (see below)",
    )
    _add_sites_option(bench)
    _add_input_shape_option(bench)
    bench.add_argument(
        "--p",
        type=_rate,
        nargs="+",
        default=None,
        metavar="P",
        help="dropout rates to run (default: the workload's list: 0.1 ... 0.9 for mlp, "
        "0.1 ... 0.5 for wrn and efficientnet_b0)",
    )
    bench.add_argument(
        "--repeats", type=_positive_int, default=30, help="timed interleaved rounds per p"
    )
    bench.add_argument(
        "--warmup", type=_non_negative_int, default=5, help="untimed rounds before timing"
    )
    bench.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads (default: torch's)",
    )
    bench.add_argument(
        "--out",
        default=None,
        help="output folder (default: bench-results/<workload>/, or <workload>-cuda/ on CUDA)",
    )
    adam = bench.add_mutually_exclusive_group()
    adam.add_argument(
        "--fused-adam",
        action="store_true",
        help="fused optimizer for all variants (Adam for mlp, SGD for the CNN workloads)",
    )
    adam.add_argument(
        "--foreach",
        action="store_true",
        help="foreach optimizer for all variants (Adam for mlp, SGD for the CNN workloads)",
    )
    bench.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="NAME",
        help="run only these variants (the baseline always runs)",
    )
    bench.add_argument(
        "--batch-size", type=_positive_int, default=None, help="batch size (default: the paper's)"
    )
    _add_shape_options(bench)
    bench.add_argument("--seed", type=int, default=0, help="seed for weights, data and slices")
    bench.add_argument(
        "--rss",
        action="store_true",
        help="also measure each variant's peak-RSS growth in a fresh subprocess (informational)",
    )
    bench.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="where models, batches and steps run (auto: cuda if available; default: cpu, and "
        "cuda for the gpu suite); the device's name goes into the table and results.json",
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every variant, the baseline too (inductor)",
    )
    bench.add_argument(
        "--compile-mode",
        default=None,
        choices=("default", "reduce-overhead", "max-autotune"),
        help="torch.compile mode (implies --compile); reduce-overhead uses CUDA graphs",
    )
    bench.add_argument(
        "--capturable",
        action="store_true",
        help="convert the SliceOut variants with capturable=True (device-side slice offsets)",
    )
    suite = bench.add_argument_group("compiling and suites (bench overhead / bench gpu)")
    suite.add_argument(
        "--budget",
        type=float,
        default=360.0,
        help="gpu: seconds for the whole suite; entries that would start later are skipped",
    )
    suite.add_argument(
        "--modes",
        nargs="+",
        default=None,
        choices=("eager", "compiled", "cudagraph"),
        help="gpu: modes to run (default: all three; cudagraph needs CUDA)",
    )
    suite.add_argument(
        "--entries", nargs="+", default=None, metavar="NAME", help="gpu/overhead: run only these"
    )
    suite.add_argument(
        "--backend", default="inductor", help="torch.compile backend (aot_eager: a smoke run)"
    )
    bench.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")

    sub.add_parser(
        "demo",
        help="run the demo (arguments are passed through to it)",
        description="Run sliceout_lab.demo with the remaining arguments.",
        epilog=DEMO_EPILOG,
        formatter_class=_Formatter,
        add_help=False,
    )

    explain = sub.add_parser(
        "explain",
        help="report what convert() slices in a workload's model",
        description="Build a workload's (untransformed) model and print sliceout_fx.explain().",
        epilog=EXPLAIN_EPILOG,
        formatter_class=_Formatter,
    )
    explain.add_argument("model", metavar="MODEL", help=_model_help(names))
    explain.add_argument("--p", type=_rate, default=0.5, help="dropout rate")
    _add_sites_option(explain)
    _add_shape_options(explain)
    _add_input_shape_option(explain)
    explain.add_argument(
        "--batch-size", type=_positive_int, default=None, help="batch size of the example input"
    )
    explain.add_argument("--seed", type=int, default=0, help="seed for the model's weights")

    draw = sub.add_parser(
        "draw",
        help="picture of what convert() slices in a workload's model (SVG, PNG or PDF)",
        description="Build a workload's (untransformed) model and draw its alignment groups and "
        "SliceOut sites with sliceout_fx.draw.draw().",
        epilog=DRAW_EPILOG,
        formatter_class=_Formatter,
    )
    draw.add_argument("model", metavar="MODEL", help=_model_help(names))
    draw.add_argument(
        "-o", "--out", required=True, help="output file: .svg, .png or .pdf (picks the format)"
    )
    draw.add_argument("--p", type=_rate, default=0.5, help="dropout rate")
    _add_sites_option(draw)
    draw.add_argument(
        "--only",
        default=None,
        metavar="PREFIX",
        help="draw only the ops under this module path (one block, e.g. features.2.1; for "
        "gpt2 and bert a layer or a part of one, e.g. transformer.h.3)",
    )
    draw.add_argument(
        "--max-nodes",
        type=_positive_int,
        default=120,
        help="refuse to draw more ops than this (use --only for large models)",
    )
    draw.add_argument("--title", default=None, help="figure title (default: model, p, sites)")
    _add_shape_options(draw)
    _add_input_shape_option(draw)
    draw.add_argument(
        "--batch-size",
        type=_positive_int,
        default=2,
        help="batch size of the example input (only shapes matter)",
    )
    draw.add_argument("--seed", type=int, default=0, help="seed for the model's weights")
    return parser


SUITES = ("overhead", "gpu")


def _cmd_bench(args: argparse.Namespace) -> int:
    run_benchmark = _lab("bench.runner").run_benchmark
    workloads = _lab("bench.workloads")
    BenchOptions, resolve_device = workloads.BenchOptions, workloads.resolve_device

    if args.workload == "overhead":
        run_overhead = _lab("bench.overhead").run_overhead
        run_overhead(
            args.entries,
            repeats=args.repeats,
            warmup=args.warmup,
            seed=args.seed,
            threads=args.threads or 1,
            out=args.out,
        )
        return 0
    if args.workload == "gpu":
        suite = _lab("bench.gpu_suite")
        MODES, run_gpu_suite = suite.MODES, suite.run_gpu_suite
        run_gpu_suite(
            device=resolve_device(args.device or "cuda"),
            modes=tuple(args.modes or MODES),
            entries=args.entries,
            budget_s=args.budget,
            repeats=args.repeats,
            warmup=args.warmup,
            backend=args.backend,
            out=args.out,
        )
        return 0
    from .model_specs import is_model_spec

    name = args.workload
    if is_model_spec(name):
        _refuse_workload_options(args)
        name = _lab("bench.user_workloads").register_user_model(
            name, args.input_shape, args.sites
        )
    elif name not in _workload_names():
        raise CLIError(
            f"unknown workload {name!r}: choose from {', '.join([*_workload_names(), *SUITES])}, "
            "or pass your model (package.module:factory, timm:NAME, a local HuggingFace folder)"
        )
    elif args.input_shape is not None or args.sites != "auto":
        raise CLIError("--input-shape and --sites are for your own model; workloads fix theirs")
    options = BenchOptions(
        batch_size=args.batch_size,
        **_shape_options(args),
        fused_adam=args.fused_adam,
        foreach=args.foreach,
        seed=args.seed,
        device=args.device or "cpu",
        compile=args.compile or args.compile_mode is not None,
        compile_mode=None if args.compile_mode in (None, "default") else args.compile_mode,
        compile_backend=args.backend,
        capturable=args.capturable,
    )
    run_benchmark(
        name,
        args.p,
        options=options,
        repeats=args.repeats,
        warmup=args.warmup,
        variants=args.variants,
        threads=args.threads,
        out=args.out,
        plot=not args.no_plot,
        rss=args.rss,
        progress=not args.no_progress,
    )
    return 0


def _core() -> Any:
    """The core package, or a one-line error saying the transformation is not available."""
    try:
        import sliceout_fx
    except ImportError as exc:
        raise CLIError(f"cannot import sliceout_fx: {exc}") from exc
    if not hasattr(sliceout_fx, "explain"):
        raise CLIError("this sliceout_fx build has no explain(); the core package is incomplete")
    return sliceout_fx


def _example_model(args: argparse.Namespace) -> tuple[Any, tuple[Any, ...] | None]:
    """The untransformed model and example inputs (``explain`` and ``draw``): the user's model
    a spec names, or a workload's."""
    from .model_specs import example_batch, is_model_spec, load_model

    if is_model_spec(args.model):
        _refuse_workload_options(args)
        model = load_model(args.model, seed=args.seed)
        shape = args.input_shape
        return model, None if shape is None else example_batch(shape, args.batch_size or 2)
    names = _workload_names()
    if args.model not in names:
        raise CLIError(
            f"unknown model {args.model!r}: pass a workload ({', '.join(names)}), "
            "package.module:factory, timm:NAME or a local HuggingFace folder"
        )
    if args.input_shape is not None:
        raise CLIError("--input-shape is for your own model; workloads take --image-size etc.")
    workloads = _lab("bench.workloads")
    spec = workloads.get_workload(args.model)
    if spec.example_model is None:
        raise CLIError(f"workload {args.model!r} has no example model to {args.command}")
    options = workloads.BenchOptions(
        batch_size=args.batch_size, seed=args.seed, **_shape_options(args)
    )
    return spec.example_model(args.p, options)


def _refuse_workload_options(args: argparse.Namespace) -> None:
    """The shape options of built-in workloads mean nothing to the user's own model."""
    names = ("hidden", "depth", "widen", "image_size")
    given = [f"--{k.replace('_', '-')}" for k in names if getattr(args, k)]
    if given:
        raise CLIError(
            f"{', '.join(given)} shape a built-in workload; for your model use --input-shape"
        )


def _cmd_explain(args: argparse.Namespace) -> int:
    core = _core()
    model, example_inputs = _example_model(args)
    report = core.explain(model, p=args.p, sites=args.sites, example_inputs=example_inputs)
    print(report)
    return 0


def _cmd_draw(args: argparse.Namespace) -> int:
    _core()
    try:
        from .draw import draw, output_format
    except ImportError as exc:
        raise CLIError(
            f"drawing is not available: {exc} (pip install 'sliceout-fx[draw]')"
        ) from exc
    output_format(args.out)  # a bad suffix fails before the model is built
    model, example_inputs = _example_model(args)
    path = draw(
        model,
        args.out,
        p=args.p,
        sites=args.sites,
        example_inputs=example_inputs,
        only=args.only,
        title=args.title,
        max_nodes=args.max_nodes,
    )
    print(f"wrote {path}")
    return 0


def _cmd_demo(rest: list[str]) -> int:
    status = _lab("demo").main(rest)
    return status if isinstance(status, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # 'demo' forwards everything after it (including --help) to the demo's own parser.
    debug = False
    head = argv
    rest: list[str] = []
    if "demo" in argv:
        i = argv.index("demo")
        if all(a.startswith("-") for a in argv[:i]):
            head, rest = argv[: i + 1], argv[i + 1 :]
    args = parser.parse_args(head)
    debug = args.debug
    try:
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "explain":
            return _cmd_explain(args)
        if args.command == "draw":
            return _cmd_draw(args)
        if args.command == "demo":
            return _cmd_demo(rest)
        raise CLIError(f"unknown command {args.command!r}")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, CLIError | ValueError):
            message = f"{type(exc).__name__}: {message}"
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Run the zoo sweep (tests/zoo.py) over the whole catalogue and write docs/coverage.md.

    .venv/bin/python scripts/coverage.py                      # every model -> docs/coverage.md
    .venv/bin/python scripts/coverage.py --source timm        # one source, table to stdout
    .venv/bin/python scripts/coverage.py --only resnet --json /tmp/resnet.json

Each model runs in a forked child process with a time limit, so that a crash, a hang or a
memory blow-up of one model is recorded as its failure and the sweep goes on. A filtered run
(``--only``/``--source``) prints its table and leaves docs/coverage.md alone unless ``--output``
names a file.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import multiprocessing
import re
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The repository root, for `tests.zoo`; and not this script's folder, where this file would
# shadow the `coverage` package for any library that imports it.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "scripts"]

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tests import zoo  # noqa: E402

DEFAULT_OUTPUT = ROOT / "docs" / "coverage.md"
COMMAND = ".venv/bin/python scripts/coverage.py"
TITLES = {
    "torchvision": "torchvision classification",
    "torchvision-seg": "torchvision segmentation",
    "timm": "timm",
    "hf": "HuggingFace transformers",
}


# --- running ------------------------------------------------------------------------------


def _child(entry: zoo.ZooEntry, conn: Connection) -> None:
    """Check one entry under every site policy and send the results back to the parent."""
    torch.set_num_threads(1)
    _quiet()
    try:
        results = [zoo.check_model(entry, sites) for sites in zoo.SITE_POLICIES]
        conn.send([dataclasses.asdict(r) for r in results])
    except BaseException as exc:  # check_model records failures; this is a bug of the sweep
        conn.send(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}")
    finally:
        conn.close()


def _lost(entry: zoo.ZooEntry, why: str, seconds: float) -> list[zoo.ZooResult]:
    """The results of a child that did not report: it crashed, hung or ran out of time."""
    return [
        zoo.ZooResult(
            entry.name,
            entry.source,
            sites,
            status="failed",
            stage="process",
            error=why,
            seconds=seconds,
        )
        for sites in zoo.SITE_POLICIES
    ]


def run_entry(entry: zoo.ZooEntry, timeout: float) -> list[zoo.ZooResult]:
    """One entry's results, from a forked child that cannot take the sweep down with it."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(entry, send), daemon=True)
    start = time.perf_counter()
    process.start()
    send.close()
    payload = None
    if receive.poll(timeout):
        try:
            payload = receive.recv()
        except EOFError:  # the child died before it could send
            payload = None
    process.join(5)
    seconds = time.perf_counter() - start
    if process.is_alive():
        process.kill()
        process.join()
        if payload is None:
            return _lost(entry, f"timed out after {timeout:.0f} s", seconds)
    if payload is None:
        return _lost(entry, f"the process died (exit code {process.exitcode})", seconds)
    if isinstance(payload, str):
        return _lost(entry, payload.splitlines()[0], seconds)
    return [zoo.ZooResult(**fields) for fields in payload]


def _quiet() -> None:
    """Silence the libraries' advice (config checks, init notes): the table is the output."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    logging.getLogger("timm").setLevel(logging.ERROR)


def select(entries: Iterable[zoo.ZooEntry], only: str | None, source: str | None):
    """Entries whose name contains ``only`` and whose source starts with ``source``."""
    return [
        e
        for e in entries
        if (only is None or only.lower() in e.name.lower())
        and (source is None or e.source == source or e.source.startswith(f"{source}-"))
    ]


# --- the table ------------------------------------------------------------------------------

_CLAUSES = [
    (re.compile(r"^\S+ is (?:produced|used) by \S+ \((?P<rule>[^)]*)\): (?P<why>.*)$"), None),
    (re.compile(r"^\S+ is a model input or attribute.*$"), "a model input or attribute"),
    (re.compile(r"^\S+ reaches the model output.*$"), "reaches the model output"),
    (re.compile(r"^\S+ would be cut along \d+ axes at once$"), "cut along several axes at once"),
]
INTRO = """\
Every model is built with random weights and converted in float64 at `p=0.3` with the default
capture (`fx` for torchvision and timm, `blocks` for HuggingFace) under `sites="auto"` and
`sites="all"`. *converts*: `convert` returned (an *error* is a documented `SliceOutError`);
*eval exact*: eval output `torch.equal` to the original's; *sliced == mask*: two training steps
of `mode="slice"` equal `mode="mask"` drawing the same slices (output, every gradient, every
buffer, float64; *crash*: the training step raised); *FLOP ratio*: the report's expected
multiply-accumulates of a sliced step over full width. Vision inputs are 2 images of 64x64
(MaxViT and EfficientFormer 224, Inception-v3 80); HuggingFace models are small configs (2
layers, width 64) with every dropout probability 0, on 2 sequences of 8 tokens. The tests are
`tests/test_zoo.py`: a plain `pytest` run checks a fast subset, `pytest -m zoo` (or
`SLICEOUT_ZOO=1 pytest`) every model; the catalogue, with the torchvision models left out for
size and the failures expected today, is `tests/zoo.py`."""
_NO_NARROWER = "no linear or convolution layer makes the tensor it drops narrower: "


def short_reasons(reason: str, width: int = 80) -> list[str]:
    """The clauses of a skip reason without node names, so that equal causes count together."""
    prefix = ""
    if reason.startswith(_NO_NARROWER):
        prefix, reason = "nothing narrows it: ", reason[len(_NO_NARROWER) :]
    found = []
    for clause in reason.split("; "):
        text = clause.strip()
        for pattern, fixed in _CLAUSES:
            match = pattern.match(text)
            if match:
                if fixed is not None:
                    text = fixed
                else:
                    rule, why = match["rule"], match["why"]
                    text = why if rule in why else f"{rule}: {why}"
                break
        text = prefix + text
        found.append(text if len(text) <= width else text[: width - 1] + "…")
    return list(dict.fromkeys(found))


def reason_counts(results: Sequence[zoo.ZooResult]) -> list[tuple[str, int]]:
    """Shortened skip reasons of one model, most common first (the larger count of the policies)."""
    counts: collections.Counter[str] = collections.Counter()
    for result in results:
        mine = collections.Counter(c for r in result.skip_reasons for c in short_reasons(r))
        counts |= mine
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _markdown(text: str) -> str:
    """``text`` with Markdown's active characters escaped (error messages hold ``[..](..)``)."""
    return re.sub(r"([\\`*_\[\]<>|])", r"\\\1", text)


def _code(text: str) -> str:
    """``text`` fit for an inline code span: no backticks inside."""
    return text.replace("`", "'")


def _yes(value: bool | None) -> str:
    return "–" if value is None else ("yes" if value else "**no**")


def _per_policy(results: Sequence[zoo.ZooResult], cell) -> str:
    cells = [cell(r) for r in results]
    return cells[0] if len(set(cells)) == 1 else " / ".join(cells)


def _convert_cell(r: zoo.ZooResult) -> str:
    if r.status == "ok":
        return "yes"
    if r.status == "documented":
        return f"error: {r.error.split(':')[0]}"
    return f"**no** ({r.stage})"


def _sites_cell(r: zoo.ZooResult) -> str:
    return str(r.n_sites) if r.status == "ok" else "–"


def _eval_cell(r: zoo.ZooResult) -> str:
    return "**crash**" if r.stage == "eval" else _yes(r.eval_exact)


def _match_cell(r: zoo.ZooResult) -> str:
    if r.status == "ok" and r.stage == "train":
        return "**crash**"
    if r.status == "ok" and r.n_sites == 0:
        return "no site"
    return _yes(r.sliced_matches_mask)


def _flops_cell(r: zoo.ZooResult) -> str:
    return "–" if r.flops_ratio is None else f"{r.flops_ratio:.2f}"


#: Blockers that say slicing would be wrong: a statistic over the full width of the heads.
def _heads_cell(r: zoo.ZooResult) -> str:
    if r.has_attention is False:
        return "no attention"
    if r.heads_sliced is False and zoo.heads_cannot_be_cut(r):
        return "cannot be cut: " + _markdown(short_reasons(r.head_blockers[0])[0])
    if r.heads_sliced is False and r.head_blockers:
        reasons = collections.Counter(c for b in r.head_blockers for c in short_reasons(b))
        return "**no**: " + _markdown("; ".join(text for text, _ in reasons.most_common(2)))
    return _yes(r.heads_sliced)


def _reasons_cell(results: Sequence[zoo.ZooResult], keep: int = 3) -> str:
    counts = reason_counts(results)
    shown = [f"{text} (×{n})" for text, n in counts[:keep]]
    if len(counts) > keep:
        shown.append(f"+{len(counts) - keep} more")
    return _markdown("; ".join(shown)) or "–"


def _table(by_model: dict[str, list[zoo.ZooResult]], hf: bool) -> list[str]:
    head = ["model", "params (M)", "converts", "sites auto", "sites all", "eval exact"]
    head += ["sliced == mask (auto / all)", "FLOP ratio (auto / all)"]
    if hf:
        head += ["class kept", "heads sliced"]
    head.append("skip reasons (most common first)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, results in by_model.items():
        auto, every = (next(r for r in results if r.sites == s) for s in zoo.SITE_POLICIES)
        row = [
            f"`{name}`",
            f"{results[0].params_m:.1f}" if results[0].params_m else "–",
            _per_policy(results, _convert_cell),
            _sites_cell(auto),
            _sites_cell(every),
            _per_policy(results, _eval_cell),
            f"{_match_cell(auto)} / {_match_cell(every)}",
            f"{_flops_cell(auto)} / {_flops_cell(every)}",
        ]
        if hf:
            row += [_per_policy(results, lambda r: _yes(r.class_kept))]
            row += [_per_policy(results, _heads_cell)]
        row.append(_reasons_cell(results))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _percent(part: int, whole: int) -> str:
    return f"{part} of {whole} ({100 * part / whole:.0f}%)" if whole else "none"


def summary(results: Sequence[zoo.ZooResult]) -> list[str]:
    """The figures issue 12 asks for, computed from the sweep's own results."""
    lines = []
    groups = {
        "torchvision + timm": [r for r in results if r.source != "hf"],
        "HuggingFace": [r for r in results if r.source == "hf"],
    }
    for title, rs in groups.items():
        if not rs:
            continue
        models: dict[str, list[zoo.ZooResult]] = collections.defaultdict(list)
        for r in rs:
            models[r.name].append(r)
        converts = [n for n, m in models.items() if all(r.status == "ok" for r in m)]
        converted = [r for r in rs if r.status == "ok"]
        with_sites = [r for r in converted if r.n_sites]
        by_policy = {
            s: [r for r in converted if r.sites == s and r.name in converts]
            for s in zoo.SITE_POLICIES
        }
        lines += [f"**{title}** ({len(models)} models):", ""]
        lines.append(
            f"- convert (under both site policies): {_percent(len(converts), len(models))}"
        )
        for policy, prs in by_policy.items():
            sited = sum(1 for r in prs if r.n_sites)
            lines.append(
                f'- at least one site under `sites="{policy}"`: {_percent(sited, len(converts))} '
                "of those that convert"
            )
        evaluated = [r for r in converted if r.eval_exact is not None or r.stage == "eval"]
        exact = sum(1 for r in evaluated if r.eval_exact)
        lines.append(f"- eval output exact: {_percent(exact, len(evaluated))} model/policy pairs")
        checked = [r for r in with_sites if r.sliced_matches_mask is not None or r.stage]
        matched = sum(1 for r in checked if r.sliced_matches_mask)
        lines.append(
            f"- sliced == mask in float64: {_percent(matched, len(checked))} model/policy pairs "
            "with sites"
        )
        if title == "HuggingFace":
            kept = [n for n in converts if all(r.class_kept for r in models[n])]
            attending = [n for n in converts if any(r.has_attention for r in models[n])]
            heads = [n for n in attending if any(r.heads_sliced for r in models[n])]
            whole = [
                n
                for n in attending
                if n not in heads and all(zoo.heads_cannot_be_cut(r) for r in models[n])
            ]
            cuttable = len(attending) - len(whole)
            lines.append(f"- convert and keep their class: {_percent(len(kept), len(models))}")
            lines.append(
                f"- attention heads sliced: {_percent(len(heads), cuttable)} of the families "
                "that convert and compute attention with heads that can be cut"
                + (f" (cannot be cut: {', '.join(f'`{n}`' for n in whole)})" if whole else "")
            )
        lines.append("")
    return lines


def failures(results: Sequence[zoo.ZooResult], documented: bool = False) -> list[str]:
    """Every model with a problem (or, ``documented``, refused with a ``SliceOutError``), with
    the error and the innermost sliceout_fx frame it came from; policies that fail alike merge."""
    merged: dict[tuple[str, str, str, str], list[str]] = {}
    for r in results:
        if (r.status == "documented") != documented or not (documented or r.problems()):
            continue
        what = r.mismatch if r.sliced_matches_mask is False else r.error
        stage = "mismatch" if r.sliced_matches_mask is False else r.stage
        merged.setdefault((r.name, stage, r.where, what), []).append(f'`sites="{r.sites}"`')
    lines = []
    for (name, stage, where, what), policies in merged.items():
        at = f" at `{where}`" if where else ""
        lines.append(f"- `{name}` ({', '.join(policies)}; {stage}){at}: `{_code(what)}`")
    return lines or ["None."]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def render(results: Sequence[zoo.ZooResult], seconds: float, command: str) -> str:
    """The whole coverage page."""
    import timm
    import torchvision
    import transformers

    today = datetime.date.today().isoformat()
    out = [
        "# Model coverage",
        "",
        "Generated by the zoo sweep; regenerate with:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"Measured {today} with torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"timm {timm.__version__}, transformers {transformers.__version__}; the sweep took "
        f"{_duration(seconds)} on one CPU thread per model.",
        "",
        *INTRO.splitlines(),
        "",
        "## Summary",
        "",
        *summary(results),
        "## Failures",
        "",
        *failures(results),
        "",
        "## Documented errors",
        "",
        "Models that `convert` refuses with a `SliceOutError` saying why (they pass the tests).",
        "",
        *failures(results, documented=True),
        "",
    ]
    for source in zoo.SOURCES:
        by_model: dict[str, list[zoo.ZooResult]] = {}
        for r in results:
            if r.source == source:
                by_model.setdefault(r.name, []).append(r)
        if not by_model:
            continue
        out += [f"## {TITLES[source]}", "", *_table(by_model, hf=source == "hf"), ""]
    excluded = ", ".join(f"`{n}` ({c:.0f} M)" for n, c in zoo.TORCHVISION_EXCLUDED.items())
    out += [
        "## Left out",
        "",
        f"torchvision classification models over ~100 M parameters: {excluded}.",
        "",
    ]
    return "\n".join(out)


# --- main ---------------------------------------------------------------------------------


def sweep(
    entries: Sequence[zoo.ZooEntry], timeout: float, save: Path | None
) -> tuple[list[zoo.ZooResult], float]:
    """Every entry's results, one child process at a time, and the seconds the sweep took."""
    start = time.perf_counter()
    results: list[zoo.ZooResult] = []
    bar = tqdm(entries, unit="model", dynamic_ncols=True)
    for entry in bar:
        bar.set_postfix_str(entry.name)
        mine = run_entry(entry, timeout)
        results += mine
        for r in mine:
            if r.problems():
                tqdm.write(f"{entry.name} {r.sites}: {r.problems()[0][:160]}")
        if save:  # kept up to date, so that a long sweep cut short still leaves its results
            save.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return results, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="only models whose name contains this substring")
    parser.add_argument("--source", choices=["torchvision", "torchvision-seg", "timm", "hf"])
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--output", type=Path, help=f"the page to write (default {DEFAULT_OUTPUT}")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument(
        "--results", type=Path, help="render the page from a --json file instead of running"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    _quiet()
    entries = select(zoo.catalogue(), args.only, args.source)
    if not entries:
        parser.error("no catalogue model matches the filters")
    filtered = args.only is not None or args.source is not None
    output = args.output or (None if filtered else DEFAULT_OUTPUT)

    if args.results:
        wanted = {e.name for e in entries}
        saved = json.loads(args.results.read_text())
        results = [zoo.ZooResult(**fields) for fields in saved if fields["name"] in wanted]
        seconds = sum(r.seconds for r in results)
    else:
        results, seconds = sweep(entries, args.timeout, args.json)

    shown = [f"--only {args.only}"] if args.only else []
    shown += [f"--source {args.source}"] if args.source else []
    command = " ".join([COMMAND, *shown])
    page = render(results, seconds, command)
    if output is None:
        print(page)
    else:
        output.write_text(page, encoding="utf-8")
        print(f"wrote {output} ({len(entries)} models, {seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

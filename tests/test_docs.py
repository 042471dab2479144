"""The documentation site builds cleanly, and every Python example in it runs as written.

Two kinds of check keep the docs from rotting:

* **The site builds with warnings as errors.** ``mkdocs build --strict`` on ``mkdocs.yml``
  (Material theme, mkdocstrings API pages) fails on a broken link or anchor, a page missing from
  the nav, or an API object that no longer exists.
* **Every Python block runs.** Each fenced block whose info string starts with ``python`` in
  ``README.md`` and in every ``.md`` file under ``docs/`` (a recursive glob, so pages added later
  are picked up without touching this file) is executed. There is one test per page: the page's
  blocks run in order in one shared namespace, as if a reader pasted them one after another into
  a single Python session, with the repository root as the working directory. The blocks carry
  their own ``assert`` statements (eval output equals the original's, the sites found, ...), so
  running them checks what the prose claims.

Opting a block out: put the HTML comment ``<!-- no-exec -->`` on the line directly above its
opening fence. The comment does not show on the rendered page. Use it only for code that cannot
run here (it needs a GPU, or trains for minutes); everything else must run. Blocks in other
languages (``bash``, ``text``, ...) are never executed.

A page whose blocks need an optional dependency that is not installed (torchvision, timm,
transformers: the ``vision`` and ``hf`` extras) or the Fashion-MNIST files is skipped with the
reason, so the suite still passes on a minimal install.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
HOW = DOCS / "how-it-works.md"

NO_EXEC = "<!-- no-exec -->"
OPTIONAL_MODULES = {"torchvision", "timm", "transformers", "efficientnet_lite_pytorch"}

# An opening fence (possibly indented, e.g. inside an admonition), its info string and body, up to
# a closing fence with the same indentation. ``python`` must be the whole language word.
_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})python(?:[ \t][^\n]*)?\n"
    r"(?P<body>.*?)"
    r"^(?P=indent)(?P=ticks)[ \t]*$",
    re.M | re.S,
)


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    code: str
    executed: bool


def _display(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def python_blocks(path: Path) -> list[Block]:
    """The ``python`` blocks of one Markdown file, in order, flagged by the no-exec convention."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").splitlines()
        skipped = bool(before) and before[-1].strip() == NO_EXEC
        lines = match.group("body").splitlines(keepends=True)
        indent = match.group("indent")
        body = "".join(line[len(indent) :] if line.startswith(indent) else line for line in lines)
        blocks.append(
            Block(
                page=_display(path),
                line=text.count("\n", 0, match.start()) + 1,
                code=textwrap.dedent(body),
                executed=not skipped,
            )
        )
    return blocks


PAGES = [README, *sorted(DOCS.rglob("*.md"))]
PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def run_page(path: Path) -> None:
    """Run the executable blocks of ``path`` in one namespace; skip on a missing optional extra."""
    import torch

    from sliceout_lab.data import FashionMNISTNotFoundError

    namespace: dict = {"__name__": "__docs__"}
    with torch.random.fork_rng(devices=[]):
        for block in python_blocks(path):
            if not block.executed:
                continue
            where = f"{block.page}, block at line {block.line}"
            try:
                exec(compile(block.code, where, "exec"), namespace)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.split(".")[0] in OPTIONAL_MODULES:
                    pytest.skip(f"{where} needs the optional package {exc.name}")
                raise
            except FashionMNISTNotFoundError as exc:
                pytest.skip(f"{where} needs the Fashion-MNIST files: {exc}")


# -- the site -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site, built once with warnings as errors (``mkdocs build --strict``)."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean"]
        + ["--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr}"
    return out


def test_site_builds_with_warnings_as_errors(site: Path) -> None:
    assert (site / "index.html").is_file()
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    import sliceout_fx

    for name in sliceout_fx.__all__:  # every public name, and what a report hands out
        assert f'id="sliceout_fx.{name}"' in api, f"the API page documents no {name}"
    for name in ("sites.Site", "sites.SkippedSite", "Report.site", "SliceOutModule.full_width"):
        assert f'id="sliceout_fx.{name}"' in api, f"the API page documents no {name}"
    roles = re.findall(r":(?:class|func|meth|attr|mod|data|exc):<code>", api)
    assert not roles, f"{len(roles)} Sphinx roles are shown raw (scripts/mkdocs_sphinx_roles.py)"
    assert api.count('class="autorefs" href="#sliceout_fx') >= 10  # cross-references are links


MATHJAX = Path(
    os.environ.get("SLICEOUT_FX_MATHJAX", "~/.cache/sliceout_fx/mathjax-3.2.2")
).expanduser()
_FORMULA = re.compile(
    r'<(span|div) class="arithmatex">(\\\(.*?\\\)|\\\[.*?\\\])</\1>', re.DOTALL
)
_LOADED = re.compile(r'<(?:script|img)\b[^>]*\bsrc="([^"]+)"')


def test_the_site_loads_nothing_from_the_network_and_every_picture_exists(site: Path) -> None:
    """Offline: every script and picture a page loads is a file of the site itself."""
    import shutil

    if not (site / "javascripts" / "vendor" / "mathjax" / "tex-svg.js").is_file():
        if shutil.which("npm") is None:
            pytest.skip("MathJax is vendored from npm, not installed here (apt-get install npm)")
        pytest.fail("MathJax is not vendored: run scripts/fetch_mathjax.sh (the setup script does)")
    pictures = 0
    for page in site.rglob("*.html"):
        for src in _LOADED.findall(page.read_text(encoding="utf-8")):
            assert not re.match(r"(https?:)?//", src), f"{page.relative_to(site)} loads {src}"
            path = src.split("?")[0]
            base = site if path.startswith("/") else page.parent  # 404.html is site-absolute
            target = (base / path.lstrip("/")).resolve()
            assert target.is_file() and target.stat().st_size > 0, f"{page}: {src} is missing"
            pictures += src.endswith((".png", ".svg"))
    assert pictures >= 5, "the pages show fewer pictures than the docs have"


def test_every_formula_of_the_site_renders(site: Path) -> None:
    """Each TeX formula of the built pages, rendered by the vendored MathJax's node entry point
    with TeX errors reported (the page would show them in red): none fails."""
    import html
    import json
    import shutil

    if shutil.which("node") is None or not (MATHJAX / "es5" / "node-main.js").is_file():
        pytest.skip("needs node and MathJax in the cache: run scripts/fetch_mathjax.sh")
    formulas = [  # each formula, and the page it is on
        {"tex": html.unescape(body)[2:-2], "display": kind == "div", "where": str(page)}
        for page in sorted(site.rglob("*.html"))
        for kind, body in _FORMULA.findall(page.read_text(encoding="utf-8"))
    ]
    assert len(formulas) >= 20, f"only {len(formulas)} formulas found in the site"
    result = subprocess.run(
        ["node", str(ROOT / "tests" / "render_maths.js"), str(MATHJAX)],
        input=json.dumps(formulas),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.rglob("*.md"):
        assert page.relative_to(DOCS).as_posix() in nav, f"{page} is not in mkdocs.yml's nav"


# -- the examples -------------------------------------------------------------------------------


def test_the_docs_have_python_examples():
    blocks = {_display(p): python_blocks(p) for p in PAGES}
    assert len(blocks["README.md"]) >= 2
    for page in ("quickstart.md", "tutorials/mlp-fashion-mnist.md", "tutorials/cnn.md"):
        assert any(b.executed for b in blocks[f"docs/{page}"]), f"docs/{page} runs no code"


def test_readme_blocks_each_assert_something():
    # The front page's examples must check what they claim, not only run.
    for block in python_blocks(README):
        assert block.executed and "assert " in block.code, f"README block at line {block.line}"


def test_readme_status_states_the_limits_the_code_has():
    """The Status section's limits are the ones the tests find: ``torch.save(model)`` of a
    converted model works (test_user_model.py's round trip) and double backward works except
    through the pass's once-differentiable backward functions, above the block size the code
    uses (test_pytorch_interop.py's double backward tests)."""
    from sliceout_fx.ops import NATIVE_BLOCK_LIMIT

    status = " ".join(README.read_text(encoding="utf-8").split("## Status", 1)[1].split())
    assert "`torch.save` of a whole converted module is not supported" not in status
    assert "does not support double backward" not in status
    assert "Double backward (`create_graph=True`" in status
    assert f"live weight block holds {NATIVE_BLOCK_LIMIT:,} weights or more" in status
    assert "`capturable=True` conversion" in status


def test_the_block_extractor_follows_the_convention(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```python\na = 1\n```\n\n<!-- no-exec -->\n```python\nraise SystemExit\n```\n\n"
        "!!! note\n    ```python\n    b = a + 1\n    ```\n\n```pycon\n>>> 1\n```\n"
        "```bash\nexit 1\n```\n"
    )
    blocks = python_blocks(page)
    assert [(b.code, b.executed) for b in blocks] == [
        ("a = 1\n", True),
        ("raise SystemExit\n", False),
        ("b = a + 1\n", True),
    ]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_display)
def test_page_examples_run(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_page(page)


# -- how-it-works.md shows what the pass really does ---------------------------------------------


def test_how_it_works_shows_the_graphs_the_pass_really_produces():
    from collections import OrderedDict

    import torch
    from torch import nn

    import sliceout_fx

    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(fc1=nn.Linear(8, 16), act=nn.ReLU(), drop=nn.Dropout(0.5), fc2=nn.Linear(16, 4))
    )
    converted = sliceout_fx.convert(model, p=0.5, seed=0)
    text = HOW.read_text()
    assert converted.full_graph.code.strip() in text
    assert converted.sliced_graph.code.strip() in text
    assert str(converted.explain()) in text


def test_how_it_works_rule_example_registers_a_working_rule():
    from torch import nn

    import sliceout_fx

    (block,) = [b for b in python_blocks(HOW) if "register_rule" in b.code]
    namespace: dict = {}
    exec(compile(block.code, "how-it-works.md", "exec"), namespace)
    assert len(sliceout_fx.explain(namespace["converted"]).sites) == 1  # the rules= conversion
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Dropout2d(0.5), namespace["MyFilter"](), nn.Conv2d(8, 4, 1)
    )
    report = sliceout_fx.explain(model, p=0.5, leaf_modules=[namespace["MyFilter"]])
    assert len(report.sites) == 1 and "_2" in report.sites[0].group.describe()

"""MkDocs hook: Sphinx roles in docstrings become links on the rendered page.

The package's docstrings cross-reference with Sphinx roles (``:class:`SliceOutConfig```), which
read well in ``help()`` and in editors; mkdocstrings renders them as text (``:class:`` followed
by the name in code). This hook turns each into a link to the object's heading when the page
documents it (``sliceout_fx.SliceOutConfig``, or a member ending in the name), else into plain
code. ``~a.b.C`` shows ``C``, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):<code>(~?)([\w.]+)</code>")
_ANCHOR = re.compile(r'id="(sliceout_fx[\w.]*)"')


def _target(name: str, anchors: set[str]) -> str | None:
    for candidate in (name, f"sliceout_fx.{name}"):
        if candidate in anchors:
            return candidate
    tail = name.rsplit(".", 1)[-1]
    found = sorted(a for a in anchors if a.endswith(f".{tail}"))
    return found[0] if len(found) == 1 else None


def on_page_content(html: str, **kwargs: Any) -> str:
    anchors = set(_ANCHOR.findall(html))

    def link(match: re.Match[str]) -> str:
        short, name = match.group(1), match.group(2)
        text = name.rsplit(".", 1)[-1] if short else name
        target = _target(name, anchors)
        if target is None:
            return f"<code>{text}</code>"
        return f'<a class="autorefs" href="#{target}"><code>{text}</code></a>'

    return _ROLE.sub(link, html)

"""One table formatter for every printed or written comparison (bench, demo, examples).

Cells are strings, formatted by the caller (who knows whether a figure is a ratio, a percentage
or bytes); this module only lays them out: aligned text for the terminal, or a Markdown table for
the docs. Rows can be grouped (one dropout rate, one model...) with a blank line between groups.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

__all__ = ["format_bytes", "format_table"]


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    left: Iterable[int] = (0,),
    groups: Sequence[Hashable] | None = None,
    markdown: bool = False,
) -> str:
    """Lay ``rows`` out under ``header``; columns in ``left`` are left-aligned, the rest right.

    ``groups`` (one key per row) puts a blank line wherever the key changes (text only: a
    Markdown table cannot hold blank lines).
    """
    header = list(header)
    rows = [list(r) for r in rows]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells for {len(header)} columns: {row}")
    if groups is not None and len(groups) != len(rows):
        raise ValueError(f"{len(groups)} group keys for {len(rows)} rows")
    left = set(left)
    if markdown:
        rule = ["---" if i in left else "---:" for i in range(len(header))]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    lines = [line(header), line(["-" * w for w in widths])]
    for i, row in enumerate(rows):
        if groups is not None and i and groups[i] != groups[i - 1]:
            lines.append("")
        lines.append(line(row))
    return "\n".join(lines)


def format_bytes(n: int | None) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``None`` (not measured) -> ``"n/a"``."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")

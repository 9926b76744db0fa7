"""Tables of results as text: aligned columns for the terminal, or markdown for RESULTS.md."""

from __future__ import annotations

from collections.abc import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False) -> str:
    """``header`` and ``rows`` (cells already formatted) as one string.

    >>> print(table(("a", "bb"), [("1", "2"), ("333", "4")]))
    a    bb
    ---  --
    1    2
    333  4
    >>> print(table(("a", "bb"), [("1", "2")], markdown=True))
    | a | bb |
    |---|---|
    | 1 | 2 |
    """
    if markdown:
        line = lambda cells: "| " + " | ".join(cells) + " |"
        return "\n".join([line(header), "|---" * len(header) + "|", *map(line, rows)])
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header).rstrip(), rule, *(line(r).rstrip() for r in rows)])


if __name__ == "__main__":
    from experiments import not_a_program

    not_a_program(__spec__, "python -m experiments.reproduce", "the programs' tables as text")

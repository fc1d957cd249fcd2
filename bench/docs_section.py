"""Write a generated section of docs/benchmarks.md: the text between ``<!-- NAME:begin ... -->`` and
``<!-- NAME:end -->`` is replaced; everything else in the file stays as written by hand."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def write_section(name: str, text: str, writer: str) -> None:
    bench = DOCS / "benchmarks.md"
    begin, end = f"<!-- {name}:begin ({writer} writes this part) -->", f"<!-- {name}:end -->"
    doc = bench.read_text()
    if begin not in doc or end not in doc:
        print(f"{bench} has no {name} markers; tables printed only")
        return
    head, rest = doc.split(begin, 1)
    bench.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])
    print(f"updated the {name} section of {bench}")

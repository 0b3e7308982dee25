#!/usr/bin/env python
"""Every figure the docs take from a results JSON is rendered from it here, so no claim outlives its data.

    python benchmarks/render_docs.py            # rewrite every rendered block in README.md and docs/*.md
    python benchmarks/render_docs.py --check    # exit 1, with a diff, when a committed block is stale

A rendered block in a markdown file is

    <!-- rendered by benchmarks/render_docs.py: NAME -->
    ...
    <!-- end NAME -->

and BLOCKS maps NAME to its results JSON and the function, beside each script's own report code, that renders
that JSON as markdown. Rendering reads only the JSON: nothing is measured here.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# NAME -> (results JSON relative to the repository root, "module:function" in benchmarks/)
BLOCKS = {
    "benchmarks": ("docs/benchmarks.json", "report:render_markdown"),
    "speed_summary": ("docs/benchmarks.json", "report:speed_summary"),
    "quantize_choices": ("docs/benchmarks.json", "report:quantize_choices"),
    "quantization": ("docs/quantization.json", "quant_sweep:render_markdown"),
    "serving_summary": ("docs/serving_load.json", "serve_report:serving_summary"),
    "serving_load": ("docs/serving_load.json", "serve_report:serving_load"),
    "serving_chunks": ("docs/serving_load_chunks.json", "serve_report:chunk_sweep"),
    "http_edge": ("docs/http_edge.json", "http_edge:render_markdown"),
}
BLOCK = re.compile(r"(<!-- rendered by benchmarks/render_docs\.py: ([\w-]+) -->\n)(.*?)(<!-- end \2 -->)", re.DOTALL)


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(name: str, root: Path = ROOT) -> str:
    """The markdown of block NAME, from its results JSON; always ends with a newline."""
    if name not in BLOCKS:
        raise KeyError(f"unknown rendered block {name!r}: known are {', '.join(BLOCKS)}")
    json_path, target = BLOCKS[name]
    module, function = target.split(":")
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # benchmarks/ is a folder of scripts, not a package
    text = getattr(importlib.import_module(module), function)(json.loads((root / json_path).read_text()))
    return text if text.endswith("\n") else text + "\n"


def wrap(name: str, text: str) -> str:
    """`text` as block NAME, for scripts that write a whole rendered file."""
    return f"<!-- rendered by benchmarks/render_docs.py: {name} -->\n{text}<!-- end {name} -->\n"


def rewrite(text: str, root: Path = ROOT) -> str:
    """`text` with every rendered block replaced by what its JSON renders now."""
    return BLOCK.sub(lambda m: m.group(1) + render(m.group(2), root) + m.group(4), text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff when a block is stale")
    a = p.parse_args(argv)
    stale = 0
    for path in documents(ROOT):
        old = path.read_text()
        new = rewrite(old, ROOT)
        if new == old:
            continue
        name = str(path.relative_to(ROOT))
        if a.check:
            stale += 1
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       f"{name} (committed)", f"{name} (rendered)"))
        else:
            path.write_text(new)
            print(f"rewrote {name}")
    if stale:
        print(f"\n{stale} file(s) stale: run python benchmarks/render_docs.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())

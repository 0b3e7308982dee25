"""The figures in README.md and docs/*.md are rendered from the committed results JSON (benchmarks/render_docs.py):
a block that differs from what its JSON renders fails here. Rendering only, nothing is measured."""

from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import render_docs


@pytest.mark.parametrize("path", render_docs.documents(), ids=lambda p: p.name)
def test_committed_docs_match_what_their_json_renders(path):
    text = path.read_text()
    rendered = render_docs.rewrite(text)
    diff = "".join(difflib.unified_diff(text.splitlines(True), rendered.splitlines(True), "committed", "rendered"))
    assert rendered == text, f"{path.name} is stale: run python benchmarks/render_docs.py\n{diff}"


def test_the_generated_reports_are_one_block_each():
    for name, doc in (("benchmarks", "docs/benchmarks.md"), ("quantization", "docs/quantization.md")):
        text = (ROOT / doc).read_text()
        assert text.startswith(f"<!-- rendered by benchmarks/render_docs.py: {name} -->\n")
        assert text.endswith(f"<!-- end {name} -->\n")


def test_a_stale_block_is_rewritten_from_its_json_and_the_rest_kept(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.json").write_text(json.dumps({
        "started": "then", "settings": {"prefill_len": 512},
        "quality": {"shakespeare": {"gptx ORT int8": {"top1_agreement": 0.99, "perplexity_ratio": 1.001}}},
        "decode": {"results": {"gptx ORT int8": {"rate": 50.0}}},
        "prefill": {"results": {"gptx ORT int8": {"rate": 100.0}}}}))
    doc = ("# Title\n\nhand-written 1.0x\n\n<!-- rendered by benchmarks/render_docs.py: quantize_choices -->\n"
           "stale 99.5%\n<!-- end quantize_choices -->\n\ntail\n")
    out = render_docs.rewrite(doc, tmp_path)
    assert out.startswith("# Title\n\nhand-written 1.0x\n\n<!-- rendered by benchmarks/render_docs.py: quantize")
    assert out.endswith("\n<!-- end quantize_choices -->\n\ntail\n") and "stale" not in out
    assert "| `int8` | 99.00% | 1.0010 | 50.0 | 100 |" in out  # the numbers given above, nothing else
    assert "int4" not in out and "(run then;" in out
    assert render_docs.rewrite(out, tmp_path) == out


def test_an_unregistered_block_is_an_error():
    with pytest.raises(KeyError, match="nope"):
        render_docs.rewrite("<!-- rendered by benchmarks/render_docs.py: nope -->\n<!-- end nope -->\n")


def test_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("<!-- rendered by benchmarks/render_docs.py: speed_summary -->\nold\n"
                                        "<!-- end speed_summary -->\n")
    (tmp_path / "docs" / "benchmarks.json").write_text((ROOT / "docs" / "benchmarks.json").read_text())
    monkeypatch.setattr(render_docs, "ROOT", tmp_path)
    assert render_docs.main(["--check"]) == 1
    assert "-old" in capsys.readouterr().out
    assert (tmp_path / "README.md").read_text().count("old") == 1  # --check changes nothing
    assert render_docs.main([]) == 0 and render_docs.main(["--check"]) == 0

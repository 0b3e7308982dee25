"""The clients people point at OpenAI-compatible servers, unmodified, against a real `gptx serve` process:
LangChain's ChatOpenAI and OpenAI (invoke, stream, batch), and a short guidellm load run (vLLM's load tester, which
sends stream_options.continuous_usage_stats, ignore_eos and max_completion_tokens). Offline: guidellm reads the
GPT-2 tokenizer from a local Hugging Face directory written from the bundled vocabulary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from server_process import ServerProcess

KEY = "test-key"
TIMEOUT = 60


@pytest.fixture(scope="module")
def server(shakespeare_dir, tmp_path_factory):
    proc = ServerProcess([shakespeare_dir, "--api-key", KEY, "--model-name", "bard", "--max-batch", "4"],
                         tmp_path_factory.mktemp("clients") / "serve.log")
    yield proc
    assert proc.stop() == 0, proc.output()
    assert "Traceback" not in proc.output() and "ignored unknown fields" not in proc.output(), proc.output()


def test_langchain_chat_openai_invoke_stream_and_batch(server, shakespeare):
    langchain_openai = pytest.importorskip("langchain_openai")
    chat = langchain_openai.ChatOpenAI(base_url=f"{server.url}/v1", api_key=KEY, model="bard", max_tokens=12,
                                       temperature=0, max_retries=0, timeout=TIMEOUT)
    prompt = "User: Who goes there?\nAssistant:"
    expected = shakespeare.generate(prompt, 12, temperature=0, stop=["\nUser:"]).lstrip()
    reply = chat.invoke("Who goes there?")
    assert reply.content == expected
    assert reply.usage_metadata["input_tokens"] == len(shakespeare.tokenizer.encode(prompt))
    assert "".join(chunk.content for chunk in chat.stream("Who goes there?")) == expected
    assert [m.content for m in chat.batch(["Who goes there?", "Who goes there?"])] == [expected, expected]


def test_langchain_openai_completions_invoke_stream_and_batch(server, shakespeare):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, model="bard", max_tokens=12,
                                  temperature=0, max_retries=0, timeout=TIMEOUT)
    expected = {p: shakespeare.generate(p, 12, temperature=0) for p in ("ROMEO:", "JULIET:")}
    assert llm.invoke("ROMEO:") == expected["ROMEO:"]
    assert "".join(llm.stream("ROMEO:")) == expected["ROMEO:"]
    assert llm.batch(["ROMEO:", "JULIET:"]) == [expected["ROMEO:"], expected["JULIET:"]]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """GPT-2's tokenizer as a Hugging Face directory (vocab.json, merges.txt, tokenizer_config.json), from the
    vocabulary gptx ships: what guidellm's hf_auto tokenizer loads without the Hub."""
    from transformers import GPT2Tokenizer

    from gptx.runtime.tokenizer import Tokenizer, save_hf_vocab

    path = tmp_path_factory.mktemp("hf-tokenizer")
    save_hf_vocab(Tokenizer(), path)
    GPT2Tokenizer.from_pretrained(str(path)).save_pretrained(path)
    return path


@pytest.mark.slow
def test_guidellm_concurrent_run_has_no_errors(server, hf_tokenizer_dir, tmp_path):
    """guidellm's default chat format: max_completion_tokens, ignore_eos, stop: null and
    stream_options.continuous_usage_stats on every request (its completions format sends the same extensions with
    max_tokens; one run is enough here: most of a run is guidellm starting)."""
    pytest.importorskip("guidellm")
    report = tmp_path / "guidellm.json"
    backend = f"kind=openai_http,target={server.url},model=bard,api_key={KEY}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "guidellm", "run", "--backend", backend,
                          "--tokenizer", f"kind=hf_auto,model={hf_tokenizer_dir}",
                          "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
                          "--profile", "kind=concurrent,streams=4", "--constraint", "kind=max_requests,count=24",
                          "--output", f"kind=json,path={report}", "--disable-console"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    totals = json.loads(report.read_text())["benchmarks"][0]["metrics"]["request_totals"]
    assert totals["errored"] == 0 and totals["incomplete"] == 0 and totals["successful"] == 24, totals

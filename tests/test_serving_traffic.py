"""`gptx serve` on real traffic shapes: a shared system prompt is served from the prefix cache (and /metrics says
so) with the text of a cold run, and one request may hold only half the queue. A real server process."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from server_process import ServerProcess

TIMEOUT = 60


@pytest.fixture(scope="module")
def server(shakespeare_dir, tmp_path_factory):
    proc = ServerProcess([shakespeare_dir, "--max-batch", "2", "--max-queue", "8", "--prefill-chunk", "16",
                          "--prefix-cache-mb", "8", "--model-name", "bard"],
                         tmp_path_factory.mktemp("traffic") / "serve.log")
    yield proc
    assert proc.stop() == 0, proc.output()


def cached_tokens(server) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=TIMEOUT).text
    return float(re.search(r"^gptx_prompt_tokens_cached_total (\S+)$", text, re.M).group(1))


def test_a_shared_system_prompt_is_reused_with_a_cold_runs_text(server, shakespeare):
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    system = ("You are a player in a tragedy. Speak in verse, as the Bard would, of kings, of love and of war; "
              "of crowns won and lost, of daggers in the dark, of lovers parted, and of the fools who see it all.")
    turns = ["Who goes there?", "What news from Verona?"]
    before = cached_tokens(server)
    replies = [api.chat.completions.create(model="bard", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": turn}]).choices[0].message.content
        for turn in turns]
    assert cached_tokens(server) - before >= 32  # the second request took at least one block of the first's
    prompt = f"{system}\n\nUser: {turns[1]}\nAssistant:"
    assert replies[1] == shakespeare.generate(prompt, 12, temperature=0, stop=["\nUser:"]).lstrip()


def test_one_request_holds_at_most_half_the_queue(server):
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="at most 4 prompts"):
        api.completions.create(model="bard", prompt=["ROMEO:"] * 5, max_tokens=2)
    done = api.completions.create(model="bard", prompt=["ROMEO:"] * 4, max_tokens=2, temperature=0)
    assert len(done.choices) == 4 and len({c.text for c in done.choices}) == 1

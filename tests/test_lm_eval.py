"""lm-evaluation-harness against `gptx serve` (`local-completions`: echo + logprobs for loglikelihoods, plain
completions for generate_until) and against its own `hf` model on the same local weights: each item's
loglikelihood agrees within 2e-3 (fp32). Local task files (`dataset_path: json`), no Hub."""

from __future__ import annotations

import json
import shutil

import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.slow

MC = [
    {"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "answer": 0},
    {"question": "One, two,", "choices": [" three", " four"], "answer": 0},
    {"question": "To be or not to be, that is the", "choices": [" question", " answer", " problem"], "answer": 0},
]
GEN = [{"question": "Once upon a time", "answer": " there"}]
TASKS = {
    "gptx_mc": ("mc.jsonl", MC, ("output_type: multiple_choice\ndoc_to_choice: \"{{choices}}\"\n"
                                 "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")),
    "gptx_gen": ("gen.jsonl", GEN, ("output_type: generate_until\ndoc_to_target: \"{{answer}}\"\n"
                                    "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
                                    "metric_list:\n  - metric: exact_match\n")),
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, (file, rows, rest) in TASKS.items():
        (directory / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / file}\n"
            f"test_split: test\ndoc_to_text: \"{{{{question}}}}\"\n{rest}")
    return directory


@pytest.fixture(scope="module")
def hf_with_vocab(hf_dir, tmp_path_factory):
    """The tiny HF model of conftest with GPT-2's vocab.json / merges.txt beside it, so `--model hf` and the
    local-completions tokenizer load offline."""
    from gptx.runtime.tokenizer import Tokenizer, save_hf_vocab

    path = tmp_path_factory.mktemp("hf_vocab") / "tiny-gpt2"
    shutil.copytree(hf_dir, path)
    save_hf_vocab(Tokenizer(), path)
    return path


def evaluate(model: str, model_args: str, task_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    # only our task files: indexing lm-eval's thousands of built-in task YAMLs took ~25 s per call
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), log_samples=True, task_manager=tasks,
                          random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return out["samples"]


def test_lm_eval_through_the_server_matches_its_hf_model(export_dir, hf_with_vocab, task_dir, tmp_path,
                                                         monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    reference = evaluate("hf", f"pretrained={hf_with_vocab},dtype=float32,device=cpu", task_dir)
    server = ServerProcess([export_dir, "--model-name", "tiny"], tmp_path / "serve.log")
    try:
        served = evaluate("local-completions", f"model=tiny,base_url={server.url}/v1/completions,"
                          f"tokenizer_backend=huggingface,tokenizer={hf_with_vocab},tokenized_requests=True,"
                          "num_concurrent=1,max_retries=1,max_length=64", task_dir)
    finally:
        server.stop()

    diffs = []
    for ref, got in zip(reference["gptx_mc"], served["gptx_mc"], strict=True):
        assert ref["doc_id"] == got["doc_id"]
        for ref_resp, resp in zip(ref["resps"], got["resps"], strict=True):  # one per choice: [(ll, is_greedy)]
            (ref_ll, ref_greedy), (ll, greedy) = ref_resp[0], resp[0]
            diffs.append(abs(ref_ll - ll))
            assert abs(ref_ll - ll) < 2e-3, (ref["doc_id"], ref_ll, ll)
            assert ref_greedy == greedy
    assert len(diffs) == sum(len(item["choices"]) for item in MC)
    print(f"max |loglikelihood difference| over {len(diffs)} choices: {max(diffs):.2e}")
    (ref_gen,), (gen,) = reference["gptx_gen"], served["gptx_gen"]
    assert gen["resps"] == ref_gen["resps"]  # greedy continuations agree too
    assert "/v1/completions 200" in server.output()

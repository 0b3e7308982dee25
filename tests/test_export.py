import json
import os

import numpy as np
import onnx
import pytest
import torch

from gptx.export.convert import ExportError, export
from gptx.export.validate import teacher_forced
from gptx.runtime.backends import create_backend
from gptx.runtime.manifest import ManifestError, load_manifest


def test_export_dir_is_self_describing(export_dir):
    names = sorted(os.listdir(export_dir))
    assert names == ["manifest.json", "model.onnx", "model.onnx.data", "tokenizer.tiktoken"]
    m = load_manifest(export_dir)
    assert m["config"]["n_layer"] == 2 and m["dtype"] == "float32" and m["opset"] == 17
    assert {"torch", "onnx"} <= set(m["versions"])
    assert m["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    assert [o["name"] for o in m["outputs"]][:3] == ["logits", "present.0.key", "present.0.value"]
    assert m["tokenizer"] == {"file": "tokenizer.tiktoken", "type": "tiktoken-bpe", "vocab_size": 50257, "eot_token": 50256}
    assert m["validation"]["greedy_identical"] is True
    onnx.checker.check_model(str(export_dir / "model.onnx"))


def test_graph_io_matches_manifest_and_is_dynamic(export_dir):
    graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph
    m = load_manifest(export_dir)
    assert [i.name for i in graph.input] == [i["name"] for i in m["inputs"]]
    assert [o.name for o in graph.output] == [o["name"] for o in m["outputs"]]
    past = next(i for i in graph.input if i.name == "past_key_values.0.key")
    dims = past.type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[2].dim_param  # batch and past length are symbolic
    assert dims[1].dim_value == 2 and dims[3].dim_value == 16
    ops = {n.op_type for n in graph.node}
    assert not ops & {"If", "Loop", "Scan"}  # no control flow (TensorRT-friendly)


def test_the_mask_is_one_additive_bias_for_every_layer(export_dir):
    """ONNX Runtime's broadcast Where is single-threaded: the graph builds the mask bias once (one Where, on a
    single head's worth of slots) and each layer adds it to its scores."""
    graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph
    wheres = [n for n in graph.node if n.op_type == "Where"]
    softmax_inputs = {n.input[0] for n in graph.node if n.op_type == "Softmax"}
    adds_into_softmax = [n for n in graph.node if n.op_type == "Add" and n.output[0] in softmax_inputs]
    assert len(wheres) == 1
    assert len(adds_into_softmax) == len(softmax_inputs) == 2  # one per layer (the fixture has 2)
    assert all(wheres[0].output[0] in n.input for n in adds_into_softmax)


def test_tied_embedding_is_stored_once(export_dir):
    graph = onnx.load(str(export_dir / "model.onnx"), load_external_data=False).graph
    big = [t for t in graph.initializer if 50257 in t.dims]
    assert len(big) == 1


def positions(mask):
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_ort_matches_pytorch_for_past_lengths_0_to_many(export_dir, gpt, batch):
    """Left-padded prompts, then 12 decode steps: every step's logits vs the full-sequence GPT forward."""
    manifest = load_manifest(export_dir)
    ort_backend = create_backend("onnxruntime", manifest, export_dir)
    torch_backend = create_backend("torch", manifest, export_dir)
    rng = np.random.default_rng(batch)
    lengths = [5 + 3 * i for i in range(batch)]
    prompts = [rng.integers(0, 50257, n).tolist() for n in lengths]
    cont = rng.integers(0, 50257, (batch, 12))
    ort_out = list(teacher_forced(ort_backend, prompts, cont, pad_id=50256))
    torch_out = list(teacher_forced(torch_backend, prompts, cont, pad_id=50256))
    for row, prompt in enumerate(prompts):
        full = torch.tensor([prompt + cont[row].tolist()])
        with torch.no_grad():
            ref = gpt(full)[0][0].numpy()  # (T, V), no cache at all
        for step, (o, t) in enumerate(zip(ort_out, torch_out)):
            pos = len(prompt) - 1 + step
            assert np.abs(o[row] - ref[pos]).max() < 1e-4, (row, step)
            assert np.abs(t[row] - ref[pos]).max() < 1e-4, (row, step)


def test_greedy_matches_our_generate_and_transformers(engine, gpt, hf_model):
    prompt = [464, 2068, 7586, 21831]
    ours = engine.generate_ids(prompt, 20, temperature=0, stop_at_eos=False)
    ref = gpt.generate([prompt], 20, temperature=0)[0, len(prompt):].tolist()
    with torch.no_grad():
        hf = hf_model.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                               pad_token_id=50256)[0, len(prompt):].tolist()
    assert ours == ref == hf
    assert len(set(ours)) > 1  # a real continuation, not one token repeated


def test_batched_prompts_equal_individual(engine):
    prompts = ["Once upon a time", "The", "In a galaxy far, far away, there was a"]
    batched = engine.generate(prompts, 12, temperature=0, stop_at_eos=False)
    alone = [engine.generate(p, 12, temperature=0, stop_at_eos=False) for p in prompts]
    assert batched == alone


def test_export_refuses_to_overwrite_without_force(export_dir):
    with pytest.raises(ExportError, match="--force"):
        export("random:gpt2", export_dir, progress=False)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import gptx.export.convert as exp

    def broken_check(path):
        raise ExportError("simulated failure")

    monkeypatch.setattr(exp, "check", broken_check)
    from gptx.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257))
    with pytest.raises(ExportError, match="simulated"):
        export(model, tmp_path / "out", progress=False)
    assert os.listdir(tmp_path) == []  # no target, no temporary directory


def test_force_replaces_atomically(tmp_path):
    from gptx.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257))
    out = tmp_path / "out"
    first = export(model, out, progress=False, validate=False)
    second = export(model, out, progress=False, force=True, validate=False)
    assert load_manifest(out)["exported_at"] == second["exported_at"]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert first["config"] == second["config"]


def test_fp16_export_keeps_fragile_parts_fp32(hf_dir, tmp_path, gpt):
    manifest = export(str(hf_dir), tmp_path / "fp16", dtype="fp16", progress=False)
    graph = onnx.load(str(tmp_path / "fp16" / "model.onnx"), load_external_data=False).graph
    ln_inputs = {n.input[0] for n in graph.node if n.op_type == "LayerNormalization"}
    softmax_inputs = {n.input[0] for n in graph.node if n.op_type == "Softmax"}
    info = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(
        onnx.load(str(tmp_path / "fp16" / "model.onnx"))).graph.value_info}
    assert all(info.get(n) == onnx.TensorProto.FLOAT for n in ln_inputs | softmax_inputs if n in info)
    assert manifest["outputs"][0]["dtype"] == "float32" and manifest["inputs"][4]["dtype"] == "float16"
    assert manifest["validation"]["max_abs_diff"] < 0.25


def test_bad_options(tmp_path):
    with pytest.raises(ExportError, match="dtype"):
        export("random:gpt2", tmp_path / "a", dtype="int3", progress=False)
    with pytest.raises(ExportError, match="opset"):
        export("random:gpt2", tmp_path / "a", opset=9, progress=False)
    from gptx.model.weights import ModelLoadError

    with pytest.raises(ModelLoadError, match="unknown size"):
        export("random:gpt9", tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()


def test_corrupt_manifest_is_reported(tmp_path, export_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="corrupt"):
        load_manifest(broken)
    (broken / "manifest.json").write_text(json.dumps({**load_manifest(export_dir), "model_file": "gone.onnx"}))
    with pytest.raises(ManifestError, match="incomplete"):
        load_manifest(broken)
    with pytest.raises(ManifestError, match="not a directory"):
        load_manifest(tmp_path / "missing")


def test_random_weights_seed_is_recorded_for_the_reference(tmp_path, monkeypatch):
    """`random:<size>` exports record their seed, so the torch backend redraws the same weights."""
    import gptx.model.weights as weights
    from gptx.model import GPT, GPTConfig

    def tiny_random(spec, seed=0):
        torch.manual_seed(seed)
        return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)).eval()

    monkeypatch.setattr(weights, "random_model", tiny_random)
    out = tmp_path / "r"
    manifest = export("random:gpt2", out, seed=5, progress=False, validate=False)
    assert manifest["seed"] == 5 and manifest["source"] == "random:gpt2"
    from gptx.export.validate import compare

    report = compare(out, decode_steps=2, ppl_tokens=0, batch_sizes=(1,))
    assert report["passed"] and report["max_abs_diff"] < 1e-4

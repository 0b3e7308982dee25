"""A table of bad manifests, checkpoints, configs and options, each run through the CLI.

Every case must end in one `error:` line and exit 1, with no traceback, without echoing the content of any
file, and without touching a single file in its sandbox (the whole tree is compared before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gptx.cli import app

SECRET = "SECRET-MARKER-7f3a"  # written into files a bad manifest points at: must never be printed
runner = CliRunner()


def snapshot(root: Path) -> dict:
    state = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else None
        mtime = None if path.is_dir() else st.st_mtime_ns  # a directory's changes when a temp entry comes and goes
        state[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size,
                                              mtime, digest)
    return state


def assert_one_line_error(result, *needles: str) -> str:
    output = result.output
    assert result.exit_code == 1, output
    assert "Traceback" not in output and "weights_only=False" not in output, output
    assert SECRET not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, output
    others = [line for line in lines if not line.startswith(("error:", "✓", "✗"))]  # ✓/✗: export's step lines
    assert others == [], output
    for needle in needles:
        assert needle in errors[0], output
    return errors[0]


@pytest.fixture
def sandbox(tmp_path):
    root = tmp_path / "sandbox"
    root.mkdir()
    (root / "secret.txt").write_text(f"{SECRET}\npassword=hunter2\n")
    return root


# ---------------------------------------------------------------------------------------------- manifests
def _set(path: str, value):
    def change(m):
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[last] = value
        return m
    return change


def _drop(path: str):
    def change(m):
        *parents, last = path.split(".")
        node = m
        for p in parents:
            node = node[p]
        del node[last]
        return m
    return change


def _layers(n: int):
    """A manifest whose config says n layers while its input/output lists say otherwise."""
    return _set("config.n_layer", n)


MANIFEST_CASES = {
    "list": (lambda m: [1, 2], "holds list"),
    "null": (lambda m: None, "holds null"),
    "string": (lambda m: "gptx", "holds string"),
    "not-gptx": (_drop("format"), "not a gptx manifest"),
    "newer-format": (_set("format_version", 99), "newer gptx"),
    "format-version-str": (_set("format_version", "1"), "'format_version' must be an integer"),
    "config-not-object": (_set("config", [1, 2]), "'config' must be an object"),
    "n_layer-string": (_set("config.n_layer", "2"), "'config.n_layer' must be an integer"),
    "n_layer-bool": (_set("config.n_layer", True), "'config.n_layer' must be an integer"),
    "missing-n_head": (_drop("config.n_head"), "lacks 'config.n_head'"),
    "n_head-zero": (_set("config.n_head", 0), "'config.n_head' must be >= 1"),
    "n_embd-indivisible": (_set("config.n_head", 3), "not divisible"),
    "n_layer-disagrees-with-inputs": (_layers(3), "'config.n_layer' 3"),
    "n_layer-huge": (_layers(10**12), "needs 2000000000004"),  # refused without building 2e12 names
    "empty-inputs": (_set("inputs", []), "'inputs' is empty"),
    "inputs-not-list": (_set("inputs", {"a": 1}), "'inputs' must be a list"),
    "input-without-name": (lambda m: {**m, "inputs": [{"dtype": "int64", "shape": []}, *m["inputs"][1:]]},
                           "lacks 'inputs[0].name'"),
    "bad-dtype": (_set("dtype", "float64"), "'dtype' must be"),
    "eot-out-of-range": (_set("tokenizer.eot_token", 10**9), "eot_token"),
    "tokenizer-etc-shadow": (_set("tokenizer.file", "/etc/shadow"), "'tokenizer.file' points outside"),
    "tokenizer-dotdot": (_set("tokenizer.file", "../../../etc/passwd"), "'tokenizer.file' points outside"),
    "tokenizer-proc-environ": (_set("tokenizer.file", "/proc/self/environ"), "'tokenizer.file' points outside"),
    "tokenizer-sandbox-secret": (_set("tokenizer.file", "../secret.txt"), "'tokenizer.file' points outside"),
    "tokenizer-nul-byte": (_set("tokenizer.file", "tokenizer\x00.tiktoken"), "'tokenizer.file' points outside"),
    "tokenizer-name-too-long": (_set("tokenizer.file", "t" * 5000), "'tokenizer.file' points outside"),
    "model-file-absolute": (_set("model_file", "/etc/passwd"), "'model_file' points outside"),
    "model-file-missing": (_set("model_file", "gone.onnx"), "gone.onnx is missing"),
    "weights-file-escape": (_set("weights_file", "../secret.txt"), "'weights_file' points outside"),
    "engine-escape": (_set("engines", [{"file": "/etc/passwd"}]), "'engines[0].file' points outside"),
    "files-escape": (lambda m: {**m, "files": {"../secret.txt": {"size": 1, "sha256": "0"}}},
                     "'files.../secret.txt' points outside"),
    "files-size-mismatch": (lambda m: {**m, "files": {**m["files"], "model.onnx": {"size": 1, "sha256": "0"}}},
                            "does not match its manifest"),
}


@pytest.fixture
def bad_export(export_dir, sandbox):
    target = sandbox / "export"
    shutil.copytree(export_dir, target)
    return target


@pytest.mark.parametrize("command", ["generate", "info"])
@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_bad_manifest(bad_export, sandbox, case, command):
    change, needle = MANIFEST_CASES[case]
    manifest = json.loads((bad_export / "manifest.json").read_text())
    (bad_export / "manifest.json").write_text(json.dumps(change(manifest)))
    before = snapshot(sandbox)
    args = [command, str(bad_export)] + (["hi", "-n", "2"] if command == "generate" else [])
    assert_one_line_error(runner.invoke(app, args), needle)
    assert snapshot(sandbox) == before


@pytest.mark.parametrize("raw,needle", [
    (b"{not json", "not valid JSON (line 1, column 2)"),
    (b"\xff\xfe" + SECRET.encode(), "not UTF-8"),
    (b"", "not valid JSON"),
])
def test_unreadable_manifest_text(bad_export, sandbox, raw, needle):
    (bad_export / "manifest.json").write_bytes(raw)
    before = snapshot(sandbox)
    assert_one_line_error(runner.invoke(app, ["info", str(bad_export)]), needle)
    assert snapshot(sandbox) == before


def test_a_symlink_out_of_the_export_is_refused(bad_export, sandbox):
    (bad_export / "tokenizer.tiktoken").unlink()
    (bad_export / "tokenizer.tiktoken").symlink_to(sandbox / "secret.txt")
    before = snapshot(sandbox)
    assert_one_line_error(runner.invoke(app, ["generate", str(bad_export), "hi"]), "'tokenizer.file' points outside")
    assert snapshot(sandbox) == before


def test_a_symlink_loop_is_refused(bad_export, sandbox):
    (bad_export / "loop-a").symlink_to("loop-b")
    (bad_export / "loop-b").symlink_to("loop-a")
    manifest = json.loads((bad_export / "manifest.json").read_text())
    manifest["tokenizer"]["file"] = "loop-a"
    (bad_export / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(sandbox)
    assert_one_line_error(runner.invoke(app, ["info", str(bad_export)]), "'tokenizer.file' points outside")
    assert snapshot(sandbox) == before


# ---------------------------------------------------------------------------------------------- graph vs manifest
def _consistent(manifest: dict, **config) -> dict:
    """Change the config and rewrite inputs/outputs to agree with it, so only the graph can tell."""
    cfg = {**manifest["config"], **config}
    head_dim = cfg["n_embd"] // cfg["n_head"]
    manifest["config"] = cfg
    base_in, base_out = manifest["inputs"][:4], manifest["outputs"][:1]  # ids, mask, positions, logits_index
    kv_in = [{"name": f"past_key_values.{i}.{kv}", "dtype": "float32",
              "shape": ["batch", cfg["n_head"], "past_sequence", head_dim]}
             for i in range(cfg["n_layer"]) for kv in ("key", "value")]
    kv_out = [{"name": f"present.{i}.{kv}", "dtype": "float32", "shape": ["batch", cfg["n_head"], "sequence", head_dim]}
              for i in range(cfg["n_layer"]) for kv in ("key", "value")]
    base_out[0] = {**base_out[0], "shape": ["batch", "logits_count", cfg["vocab_size"]]}
    manifest["inputs"], manifest["outputs"] = base_in + kv_in, base_out + kv_out
    return manifest


@pytest.mark.parametrize("config,needle", [
    ({"n_layer": 3}, "n_layer"),
    ({"n_head": 4}, "n_head"),
    ({"block_size": 128}, "block_size"),
    ({"vocab_size": 50304}, "vocab"),
])
def test_manifest_that_disagrees_with_the_graph(bad_export, sandbox, config, needle):
    manifest = json.loads((bad_export / "manifest.json").read_text())
    (bad_export / "manifest.json").write_text(json.dumps(_consistent(manifest, **config)))
    before = snapshot(sandbox)
    error = assert_one_line_error(runner.invoke(app, ["generate", str(bad_export), "hi", "-n", "2"]),
                                  "the manifest does not match")
    assert needle in error
    assert snapshot(sandbox) == before


def test_kv_dtype_that_disagrees_with_the_graph(bad_export, sandbox):
    manifest = json.loads((bad_export / "manifest.json").read_text())
    manifest["dtype"] = "float16"
    for spec in manifest["inputs"][4:] + manifest["outputs"][1:]:
        spec["dtype"] = "float16"
    (bad_export / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(runner.invoke(app, ["generate", str(bad_export), "hi"]), "dtype")


# ---------------------------------------------------------------------------------------------- checkpoints
def _ckpt(payload):
    def make(path: Path):
        torch.save(payload, path)
    return make


GOOD_ARGS = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32, "vocab_size": 50257, "bias": True}


def _bytes(data: bytes):
    def make(path: Path):
        path.write_bytes(data)
    return make


def _truncated(path: Path):
    from gptx.model import GPT, GPTConfig
    from gptx.model.weights import save_checkpoint

    save_checkpoint(GPT(GPTConfig(**GOOD_ARGS)), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _evil(path: Path):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {path.parent / 'pwned'}",))

    torch.save({"model_args": GOOD_ARGS, "model": Evil()}, path)


def _onnx_copy(export_dir):
    def make(path: Path):
        path.write_bytes((export_dir / "model.onnx").read_bytes())
    return make


CHECKPOINT_CASES = {
    "empty": (_bytes(b""), "is empty"),
    "garbage": (_bytes(os.urandom(4096)), "not a readable PyTorch checkpoint"),
    "text-with-secret": (_bytes(f"{SECRET}\n".encode() * 50), "not a readable PyTorch checkpoint"),
    "truncated": (_truncated, "not a readable PyTorch checkpoint"),
    "malicious-pickle": (_evil, "not a readable PyTorch checkpoint"),
    "a-list": (_ckpt([1, 2, 3]), "holds a list"),
    "no-model-args": (_ckpt({"model": {}}), "nanoGPT-style"),
    "model-args-list": (_ckpt({"model_args": [1, 2], "model": {}}), "not a mapping"),
    "model-args-string-int": (_ckpt({"model_args": {**GOOD_ARGS, "n_layer": "1"}, "model": {}}),
                              "'n_layer' must be an integer"),
    "model-args-missing-n_head": (_ckpt({"model_args": {k: v for k, v in GOOD_ARGS.items() if k != "n_head"},
                                         "model": {}}), "lacks 'n_head'"),
    "model-args-n_head-zero": (_ckpt({"model_args": {**GOOD_ARGS, "n_head": 0}, "model": {}}), "'n_head' must be >= 1"),
    "model-args-bias-string": (_ckpt({"model_args": {**GOOD_ARGS, "bias": "yes"}, "model": {}}), "'bias'"),
    "absurd-config": (_ckpt({"model_args": {**GOOD_ARGS, "n_layer": 2000, "n_embd": 4096, "n_head": 32},
                             "model": {}}), "claims a"),
    # padded to the size the config claims, so that the size check passes and the next check speaks
    "model-not-a-dict": (_ckpt({"model_args": GOOD_ARGS, "model": [torch.zeros(3)], "pad": torch.zeros(500_000)}),
                         "not a state dict"),
    "wrong-shapes": (_ckpt({"model_args": GOOD_ARGS, "pad": torch.zeros(500_000),
                            "model": {"transformer.wte.weight": torch.zeros(100, 8)}}), "weights do not fit"),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoint(sandbox, case):
    make, needle = CHECKPOINT_CASES[case]
    source = sandbox / "model.pt"
    make(source)
    before = snapshot(sandbox)
    assert_one_line_error(runner.invoke(app, ["export", str(source), "--out", str(sandbox / "out")]), needle)
    assert snapshot(sandbox) == before  # no out/, no partial directory, nothing else
    assert not (sandbox / "pwned").exists()


def test_an_onnx_model_given_as_checkpoint(export_dir, sandbox):
    source = sandbox / "model.pt"
    _onnx_copy(export_dir)(source)
    before = snapshot(sandbox)
    error = assert_one_line_error(runner.invoke(app, ["export", str(source), "--out", str(sandbox / "out")]),
                                  "looks like an ONNX model")
    assert "weights_only" not in error
    assert snapshot(sandbox) == before


# ---------------------------------------------------------------------------------------------- HF directories
def _hf(config, weights: bytes | None = None, index: str | None = None):
    def make(directory: Path, hf_dir: Path):
        directory.mkdir()
        (directory / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if weights is not None:
            (directory / "model.safetensors").write_bytes(weights)
        elif index is not None:
            (directory / "model.safetensors.index.json").write_text(index)
        else:
            shutil.copyfile(hf_dir / "model.safetensors", directory / "model.safetensors")
    return make


def _hf_config(hf_dir: Path, **changes) -> dict:
    return {**json.loads((hf_dir / "config.json").read_text()), **changes}


HF_CASES = {
    "config-not-json": (lambda hf: _hf('{"n_layer": 2,'), "not valid JSON"),
    "config-list": (lambda hf: _hf("[1, 2]"), "holds a list"),
    "config-missing-n_embd": (lambda hf: _hf({k: v for k, v in _hf_config(hf).items() if k != "n_embd"}),
                              "lacks 'n_embd'"),
    "config-n_layer-string": (lambda hf: _hf(_hf_config(hf, n_layer="2")), "'n_layer' must be an integer"),
    "config-n_head-null": (lambda hf: _hf(_hf_config(hf, n_head=None)), "'n_head' must be an integer"),
    "config-bert": (lambda hf: _hf(_hf_config(hf, model_type="bert")), "GPT-2"),
    "config-absurd": (lambda hf: _hf(_hf_config(hf, n_layer=2000, n_embd=4096, n_head=32)), "claims a"),
    "config-wrong-shapes": (lambda hf: _hf(_hf_config(hf, n_positions=32)), "the config says"),
    # big enough for the parameters the config claims, so that the file itself is what gets refused
    "safetensors-garbage": (lambda hf: _hf(_hf_config(hf), weights=os.urandom(8 << 20)), "not a valid safetensors"),
    "safetensors-secret-text": (lambda hf: _hf(_hf_config(hf), weights=f"{SECRET}".encode() * (1 << 19)),
                                "not a valid safetensors"),
    "index-garbage": (lambda hf: _hf(_hf_config(hf), index="[oops"), "not a valid safetensors index"),
    "index-escapes": (lambda hf: _hf(_hf_config(hf), index=json.dumps({"weight_map": {"a": "../secret.txt"}})),
                      "outside"),
    "index-missing-shard": (lambda hf: _hf(_hf_config(hf), index=json.dumps({"weight_map": {"a": "gone.safetensors"}})),
                            "missing"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_bad_hf_directory(hf_dir, sandbox, case):
    factory, needle = HF_CASES[case]
    source = sandbox / "hf"
    factory(hf_dir)(source, hf_dir)
    before = snapshot(sandbox)
    assert_one_line_error(runner.invoke(app, ["export", str(source), "--out", str(sandbox / "out")]), needle)
    assert snapshot(sandbox) == before


# ---------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("args,needle", [
    (["export", "shakespeare", "--out", "{out}", "--quantize", "int3"], "'--quantize'"),
    (["export", "shakespeare", "--out", "{out}", "--dtype", "fp64"], "'--dtype'"),
    (["export", "shakespeare", "--out", "{out}", "--seed", "-1"], "'--seed'"),
    (["export", "shakespeare", "--out", "{out}", "--opset", "9"], "'--opset'"),
    (["generate", "{export}", "hi", "--seed", "-1"], "'--seed'"),
    (["generate", "{export}", "hi", "--backend", "onnxruntim"], "'--backend'"),
    (["generate", "{export}", "hi", "--device", "tpu"], "'--device'"),
    (["generate", "{export}", "hi", "--top-p", "0"], "'--top-p'"),
    (["generate", "{export}", "hi", "-n", "3", "--max-length", "9"], "not both"),
    (["verify", "{export}", "--json", "{sandbox}"], "is a directory"),
    (["verify", "{export}", "--json", "/dev/full"], "not a regular file"),
    (["verify", "{export}", "--json", "{sandbox}/no/such/dir/r.json"], "does not exist"),
    (["bench", "{export}", "--json", "{sandbox}"], "is a directory"),
    (["bench", "{export}", "--json", "/dev/full"], "not a regular file"),
    (["bench", "{export}", "--plot", "{sandbox}"], "is a directory"),
    (["bench", "{export}", "--batch-size", "1,x"], "--batch-size"),
    (["build", "{export}", "--precision", "int8"], "'--precision'"),
])
def test_bad_options_fail_before_any_work(bad_export, sandbox, args, needle):
    args = [a.format(export=bad_export, sandbox=sandbox, out=sandbox / "out") for a in args]
    before = snapshot(sandbox)
    assert_one_line_error(runner.invoke(app, args), needle)
    assert snapshot(sandbox) == before


def test_export_to_a_full_disk(hf_dir, sandbox, tmp_path):
    """A file-size limit makes every write past 64 KiB fail like a full disk: one line, nothing left behind."""
    import subprocess
    import sys

    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
            "sys.argv = ['gptx', 'export', sys.argv[1], '--out', sys.argv[2]]\n"
            "from gptx.cli import main\nmain()\n")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p))
    before = snapshot(sandbox)
    proc = subprocess.run([sys.executable, "-c", code, str(hf_dir), str(sandbox / "out")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(sandbox) == before

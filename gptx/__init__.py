"""gptx: GPT-2 from PyTorch to fast, verified inference.

    gptx.runtime   load an export and generate, serve or benchmark it (numpy + ONNX Runtime, no PyTorch)
    gptx.model     the nanoGPT-style PyTorch model, its weights and the classifier head
    gptx.train     training and fine-tuning, with TensorBoard / W&B / MLflow reporting
    gptx.export    PyTorch -> ONNX with a KV cache, ORT optimization and quantization, TensorRT builds, validation
    gptx.cli       the `gptx` command

Importing `gptx` imports nothing else, so a runtime-only install never touches PyTorch.
"""

__version__ = "0.1.0"

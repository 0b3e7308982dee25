"""PyTorch -> ONNX with KV-cache inputs (config -> convert -> validate), ORT optimization and quantization,
TensorRT engine builds, and the PyTorch reference backend the runtime checks against. Needs torch and onnx."""

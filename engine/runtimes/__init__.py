"""The runtimes that run a model, and the export that feeds them. Imports nothing heavy at package import.

* `backend`          -- the `Backend` protocol and `open_backend`, the one way to get a runtime;
* `torch_runtime`    -- `TorchRuntime`, the PyTorch reference (CPU or CUDA);
* `ort`              -- `OrtRuntime`, ONNX Runtime over an export directory (the CPU default);
* `tensorrt_runtime` -- `TrtRuntime`, TensorRT engines on NVIDIA GPUs;
* `export`           -- ONNX export and TensorRT engine builds (`marionette export`);
* `opcheck`          -- checks, without a GPU, that exported graphs use only ops TensorRT's parser takes.
"""

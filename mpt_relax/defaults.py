"""Defaults shared by the Python API and the CLI (one place, so the two never disagree)."""

TARGET = "auto"  # a CUDA GPU if present, else Metal on macOS, else the CPU (llvm)
QUANTIZATION = "q4f16_1"  # int4 weights, group 32, fp16 scales: MLC-LLM's default
DEVICE = "auto"
DIST = "dist"  # artifacts in dist/<model>-<quant>, checkpoints in dist/models/<name>

"""Side tools: the benchmark, the ONNX Runtime baseline, synthetic checkpoints, qemu for aarch64."""

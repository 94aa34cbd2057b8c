"""QEMU helpers shared by the agent and the tests: accelerator choice, command lines, kernels."""

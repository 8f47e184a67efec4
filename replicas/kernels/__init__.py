"""Kernels: our C kernels for CPU (csrc/), Triton's and vLLM's for GPU, and which of them
run. They import no model code."""

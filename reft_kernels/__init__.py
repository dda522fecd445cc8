"""reft_kernels."""

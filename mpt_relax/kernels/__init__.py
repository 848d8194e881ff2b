"""TIR kernels and schedule rules: ALiBi attention (CPU / GPU) and the CPU schedule rules."""

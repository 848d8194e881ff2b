"""Run time: engine, KV state, generation, sampling, tokenizer. Never imports the compiler or the kernels."""

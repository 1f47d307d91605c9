"""TPI runtime: a plain-PyTorch tensor-parallel Llama server that every rank pod runs."""

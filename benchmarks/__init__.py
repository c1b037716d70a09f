"""Benchmarks: fastalign vs eager, torch.compile, Liger, TRL's kernel and CCE (time, memory)."""

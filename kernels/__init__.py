"""Triton device code for fastalign (installed as ``fastalign.kernels``)."""

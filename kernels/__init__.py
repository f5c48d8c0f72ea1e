"""Triton kernels of csd-fast, installed as csd_fast.kernels."""

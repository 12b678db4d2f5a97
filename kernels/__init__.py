"""Triton kernels (installed as attnctl.kernels). No diffusers, no policy."""

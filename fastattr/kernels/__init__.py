"""Fused Triton kernels for fastattr's hot paths, each beside its plain-torch reference.

Installed as ``fastattr.kernels``. Importing works without Triton; the Triton launchers then
raise when called.
"""

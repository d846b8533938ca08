"""Bitserial compute definitions (TE), written once and scheduled per target in ``bnncc.targets``."""

# PrimFunc attribute naming the kernel, so that a target's schedule rules recognise their input.
KERNEL_ATTR = "bnncc.kernel"

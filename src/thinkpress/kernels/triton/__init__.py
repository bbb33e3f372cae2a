"""Triton kernels and their launchers, one module per op (Liger-Kernel style: private ``@triton.jit``
kernel + launcher). Imported on first use by the ops in :mod:`thinkpress.kernels.ops`, so that tests can
set ``TRITON_INTERPRET=1`` first and run these kernels on CPU tensors through the interpreter. Every
kernel reads its input once per pass, accumulates in fp32 and keeps O(1) state per row or key."""

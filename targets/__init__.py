"""Lowering to TVM: bitserial kernels (``kernels``), one schedule module per target (``x86_64``),
and ``tvm_compat``, the only module that calls TVM's Python API."""

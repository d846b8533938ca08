"""Lowering to TVM: bitserial kernels (``kernels``), the CPU schedules (``cpu_schedule``) with each
CPU target's vector parameters (``x86_64``, ``arm64``), ``cuda``, the ``registry`` of targets, and
``tvm_compat``, the only module that calls TVM's Python API."""

"""Triton kernels of dllm-kernels. Import as ``dllm_kernels.triton_kernels``, never top-level."""

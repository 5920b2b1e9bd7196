"""Custom GPU kernels, each beside a pure-PyTorch reference that is the CPU fallback."""

"""Triton kernels of protonorm (imported as ``protonorm.kernels``); each module holds one op and its launcher."""

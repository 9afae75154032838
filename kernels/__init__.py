"""Triton kernels of protonorm (imported as ``protonorm.kernels``); each module holds one op and its launcher.

``moments`` (batch moments as split partials), ``merge`` (reduce partials and fold them into the running
statistics, or combine only), ``normalize`` (normalize / un-normalize / scale), ``normalize_moments``
(normalize and moments in one read) and ``reward`` (discounted-return update and its moments). A record is
two launches (moments, merge), a normalize one. :mod:`protonorm.backends.triton_backend` registers them as
torch custom ops.
"""

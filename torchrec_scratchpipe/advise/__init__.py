"""Capacity advisor: how many scratchpad slots each table needs, measured on a data sample.

For each table: the minimum scratchpad lookahead L needs (largest working set of L+1
consecutive batches), the load factor meeting a traffic target (rows moved per step, or
miss ratio) on the ScratchPipe miss-ratio curve, ready-to-paste ``ParameterConstraints``,
and a TorchRec ``CacheStatistics`` built from the curve.

Example::

    >>> import torch
    >>> from torchrec_scratchpipe.sim import BatchStream
    >>> s = BatchStream.from_flat([torch.tensor([i % 7, 7 + i]) for i in range(30)], 40)
    >>> [a.min_scratchpad for a in advise(s, Target("rows_per_step", 1.5), lookahead=1, horizon=4)]
    [4]
"""

from torchrec_scratchpipe.advise.render import constraints_text, format_advice
from torchrec_scratchpipe.advise.search import TableAdvice, Target, advise, advise_table, load_factor_for
from torchrec_scratchpipe.advise.stats import MeasuredCacheStatistics
from torchrec_scratchpipe.advise.working_set import WorkingSet, window_distinct, working_set

__all__ = [
    "MeasuredCacheStatistics", "TableAdvice", "Target", "WorkingSet", "advise", "advise_table",
    "constraints_text", "format_advice", "load_factor_for", "window_distinct", "working_set",
]

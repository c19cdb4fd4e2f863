"""Data sources for ScratchPipe training and cache simulation.

- :class:`SyntheticClickLog` / :class:`SyntheticConfig`: deterministic Zipf / uniform /
  drifting synthetic click logs (TorchRec ``Batch`` or sparse-only KJT per step).
- :class:`RequestTrace`, :func:`read_request_trace`, :func:`write_request_trace`: FBGEMM
  request-trace files ``(indices, offsets, lengths)``, optionally gzipped.
- :class:`CriteoTsvReader`: Criteo Kaggle / 1TB TSV files hashed into table sizes.

See ``docs/data.md`` for examples.
"""

from torchrec_scratchpipe.data.criteo import CriteoTsvReader, dense_transform, hash_categorical, parse_criteo_line
from torchrec_scratchpipe.data.synthetic import SyntheticClickLog, SyntheticConfig, synthetic_kjts
from torchrec_scratchpipe.data.trace import RequestTrace, read_request_trace, write_request_trace

__all__ = [
    "CriteoTsvReader",
    "RequestTrace",
    "SyntheticClickLog",
    "SyntheticConfig",
    "dense_transform",
    "hash_categorical",
    "parse_criteo_line",
    "read_request_trace",
    "synthetic_kjts",
    "write_request_trace",
]

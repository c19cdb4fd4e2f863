"""Fused params the ScratchPipe kernel accepts because a scratchpad does what they ask anyway,
and the cache precision check (``distributed/kernel.py`` ``engine_config``)."""

from __future__ import annotations

import pytest
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import CacheAlgorithm

from torchrec_scratchpipe.distributed.kernel import engine_config


def test_uvm_cache_params_that_mean_what_a_scratchpad_does_are_accepted() -> None:
    cfg = engine_config({"cache_load_factor": 0.3, "cache_algorithm": CacheAlgorithm.LRU, "cache_reserved_memory": 0.0,
                         "prefetch_pipeline": True, "enforce_hbm": True, "output_dtype": SparseType.FP32})
    assert cfg.tbe_options == ()  # nothing of them reaches the TBE


def test_cache_precision_must_be_the_tables_own() -> None:
    engine_config({"cache_precision": SparseType.FP16}, "['t0']", weights_precision=SparseType.FP16)  # the same: fine
    with pytest.raises(ValueError, match=r"ScratchPipe tables \['t0'\]: fused param cache_precision=.*differs from the tables' weights"):
        engine_config({"cache_precision": SparseType.FP16}, "['t0']", weights_precision=SparseType.FP32)


def test_a_bad_setting_is_refused_naming_the_tables() -> None:
    from torchrec_scratchpipe.distributed.types import FUSED_PARAMS_KEY, ScratchPipeTableParams

    with pytest.raises(ValueError, match=r"^ScratchPipe tables \[.t0.\]: load_factor must be a fraction"):
        engine_config({FUSED_PARAMS_KEY: ScratchPipeTableParams(-1.0)}, "['t0']")

"""Which TorchRec table groups the ScratchPipe lookup builds ScratchPipe kernels for: those
planned as ScratchPipe (the customized kernel carrying ScratchPipe's params), and no other,
so another out-of-tree customized kernel or a fused group is left to TorchRec."""

from __future__ import annotations

from typing import Any, Dict, Optional

import pytest
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, GroupedEmbeddingConfig
from torchrec.modules.embedding_configs import DataType, PoolingType

from torchrec_scratchpipe.distributed.lookup import is_scratchpipe_group
from torchrec_scratchpipe.distributed.types import FUSED_PARAMS_KEY, ScratchPipeTableParams

SP = {FUSED_PARAMS_KEY: ScratchPipeTableParams(0.1), "learning_rate": 0.1}


def _group(kernel: EmbeddingComputeKernel, fused_params: Optional[Dict[str, Any]]) -> GroupedEmbeddingConfig:
    return GroupedEmbeddingConfig(DataType.FP32, PoolingType.SUM, False, False, kernel, [], fused_params)


@pytest.mark.parametrize("kernel, fused_params, expected", [
    (EmbeddingComputeKernel.CUSTOMIZED_KERNEL, SP, True),
    (EmbeddingComputeKernel.CUSTOMIZED_KERNEL, {"learning_rate": 0.1}, False),  # someone else's customized kernel
    (EmbeddingComputeKernel.CUSTOMIZED_KERNEL, None, False),
    (EmbeddingComputeKernel.CUSTOMIZED_KERNEL, {}, False),
    (EmbeddingComputeKernel.FUSED, SP, False),  # ScratchPipe params alone do not make a ScratchPipe group
])
def test_only_scratchpipe_planned_groups_are_scratchpipe(kernel: Any, fused_params: Any, expected: bool) -> None:
    assert is_scratchpipe_group(_group(kernel, fused_params)) is expected

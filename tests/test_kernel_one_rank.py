"""The ScratchPipe kernel under DMP on one rank, in process: what it tells and yields as
TorchRec's ``fused`` kernel does, and the errors it names its shards in."""

from __future__ import annotations

from typing import Dict

import pytest
import torch

from dist_utils import build_dmp, constraints_for, make_tables
from one_rank import one_rank  # noqa: F401  (fixture)
from test_fused_optimizer_state import _pair


def _named_weights(kernels: list) -> Dict[str, torch.Tensor]:
    return {name: w.detach().clone() for k in kernels for name, w in k.named_split_embedding_weights()}


def test_named_split_embedding_weights_match_fused(one_rank: None) -> None:
    import torchrec_scratchpipe.distributed as tsp

    sp, ref, _ = _pair()
    fused = [k for lookup in ref.module._lookups for k in lookup._emb_modules]
    mine = tsp.scratchpipe_kernels(sp)
    want = {n: w for n, w in _named_weights(fused).items() if n.split(".")[0] in {t for k in mine for t in k.table_names}}
    got = _named_weights(mine)
    assert sorted(got) == sorted(want) and len(got) == 3, (sorted(got), sorted(want))
    for name in got:
        assert torch.equal(got[name], want[name]), name


def test_capacity_error_names_the_shard_and_its_load_factor(one_rank: None) -> None:
    from torchrec import EmbeddingBagCollection, KeyedJaggedTensor

    import torchrec_scratchpipe.distributed as tsp

    tables = make_tables()
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    model = build_dmp(ebc, constraints_for(tables, "table_wise", {"t_big": 0.005}), tsp.get_sharders(), 1)
    lengths = torch.zeros(len(tables) * 8, dtype=torch.long)
    lengths[0] = 30  # one bag of t_big with 30 distinct rows; the scratchpad has 10 slots
    kjt = KeyedJaggedTensor.from_lengths_sync([t.feature_names[0] for t in tables], torch.arange(30), lengths)
    with pytest.raises(ValueError) as e:
        model(kjt)
    msg = str(e.value)
    assert "rank 0, table_wise shard rows {'t_big': 2000}" in msg and "CacheParams.load_factor=0.005" in msg, msg
    assert "30 distinct rows" in msg and "10 slots" in msg, msg


def test_a_bad_table_is_refused_naming_the_kernel_s_tables(one_rank: None) -> None:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    import torchrec_scratchpipe.distributed as tsp

    tables = [EmbeddingBagConfig(name="t_odd", num_embeddings=100, embedding_dim=6, feature_names=["f"])]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^ScratchPipe tables \['t_odd'\]: table 't_odd': embedding_dim 6 must be a multiple of 4"):
        build_dmp(ebc, constraints_for(tables, "table_wise", {"t_odd": 0.5}), tsp.get_sharders(), 1)


def test_hyper_parameter_updates_reach_the_engine_or_are_refused_by_name(one_rank: None) -> None:
    import torchrec_scratchpipe.distributed as tsp

    sp, _, _ = _pair()
    for kernel in tsp.scratchpipe_kernels(sp):
        assert kernel.config.embedding_tables[0].name in kernel.table_names
        kernel.fused_optimizer.update_hyper_parameters({"learning_rate": 0.25})
        assert abs(kernel.engine.get_learning_rate() - 0.25) < 1e-7
        kernel.fused_optimizer.update_hyper_parameters({"lr": 0.125})
        assert abs(kernel.engine.get_learning_rate() - 0.125) < 1e-7
        with pytest.raises(ValueError, match=r"can only update the learning rate, got \['eps', 'lr'\]"):
            kernel.fused_optimizer.update_hyper_parameters({"lr": 0.5, "eps": 0.1})
        assert abs(kernel.engine.get_learning_rate() - 0.125) < 1e-7  # refused before any change


def test_parameters_and_stats_by_table_as_fused_names_them(one_rank: None) -> None:
    import torchrec_scratchpipe.distributed as tsp

    sp, ref, _ = _pair()
    fused = [k for lookup in ref.module._lookups for k in lookup._emb_modules]
    for kernel in tsp.scratchpipe_kernels(sp):
        names = {f"{t}.weight" for t in kernel.table_names}
        want = {n for k in fused for n, _ in k.named_parameters() if n in names}
        assert {n for n, _ in kernel.named_parameters()} == want == names
        stats = kernel.stats()
        assert set(stats) == set(kernel.engine.groups)
        for group, s in stats.items():
            g = kernel.engine.groups[group]
            assert s["tables"] == [t.name for t in g.tables] and s["rows"] == g.store.num_rows, group

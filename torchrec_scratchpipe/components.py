"""torchx component: launch ``examples/train_dlrm.py`` on one or more processes.

Run from the repository root (the local_cwd scheduler runs in the current folder)::

    torchx run -s local_cwd torchrec_scratchpipe/components.py:train --nproc_per_node 2 -- \\
        --kernel scratchpipe --sharding-type row_wise --lookahead 2 --steps 100

Everything after ``--`` goes to the training script. ``torchrun`` must be on ``PATH``
(activate ``.venv`` or prefix ``PATH=.venv/bin:$PATH``).
"""


from typing import Dict, Optional

import torchx.specs as specs
from torchx.components.dist import ddp

DEFAULT_SCRIPT = "examples/train_dlrm.py"


def train(
    *script_args: str,
    nproc_per_node: int = 1,
    nnodes: int = 1,
    script: str = DEFAULT_SCRIPT,
    name: str = "scratchpipe-dlrm",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 4096,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
    image: str = "ghcr.io/pytorch/torchx:0.7.0",
) -> specs.AppDef:
    """DLRM training with ScratchPipe, as a distributed torchx app.

    Args:
        script_args: arguments of the training script (after ``--``).
        nproc_per_node: processes per node (one per GPU on CUDA machines).
        nnodes: nodes.
        script: the training script.
        name: job name.
        cpu, gpu, memMB: resources per replica (used by cluster schedulers).
        rdzv_port: rendezvous port on the first node.
        env: extra environment variables. ``OMP_NUM_THREADS`` defaults to 1 per process
            (torchrun's own choice, set here so that it does not print a banner about it).
        image: container image (cluster schedulers only).

    Example::

        >>> app = train("--steps", "5", nproc_per_node=2)
        >>> app.roles[0].entrypoint
        'bash'
    """
    if nproc_per_node <= 0 or nnodes <= 0:
        raise ValueError(f"nproc_per_node and nnodes must be positive, got {nproc_per_node} and {nnodes}.")
    return ddp(
        *script_args,
        script=script,
        name=name,
        j=f"{nnodes}x{nproc_per_node}",
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        rdzv_port=rdzv_port,
        env={"OMP_NUM_THREADS": "1", **(env or {})},
        image=image,
    )

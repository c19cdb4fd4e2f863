"""Collection of the package's doctests: a module whose optional launcher is missing is left out.

``components.py`` is a torchx component (its signature names ``torchx.specs.AppDef``, which
torchx reads); where torchx is not installed, e.g. a GPU host that carries only torch and
the offline kit (scripts/rehearse_gpu_host.sh), its doctest cannot import it.
"""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("torchx") else ["torchrec_scratchpipe/components.py"]

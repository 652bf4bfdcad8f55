"""unif2ace.kernels: the public ops, each a ``torch.library`` custom op with a reference backend.

Families (one module each; reference oracles under ``reference/``, Triton kernels under
``triton/``, C++ kernels in ``csrc/cpu``, CUDA kernels in ``csrc/cuda``):

- D3Diff loss: :func:`d3diff_loss` (fused with the LM head), :func:`d3diff_loss_from_logits`.
- Grouped MoE: :func:`moe_gating`, :func:`moe_align`, :func:`moe_expert_mlp`, ...
- Masked sampling: :func:`masked_sample_step`, :func:`ar_sample`.

Backends are picked per call from the tensors' device and what was built; force one with the
``backend=`` argument, :func:`use_backend`, or ``UNIF2ACE_BACKEND`` (see ``_dispatch``).
"""

from ._dispatch import (  # noqa: F401
    BACKENDS,
    BackendUnavailableError,
    backend_usable,
    registered_ops,
    use_backend,
)
from ._validate import set_value_checks  # noqa: F401
from .d3diff import *  # noqa: F401,F403
from .moe import *  # noqa: F401,F403
from .sampling import *  # noqa: F401,F403

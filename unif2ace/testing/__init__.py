"""Test utilities shipped with the package (parity helpers, the Triton interpreter bf16 patch)."""

from .parity import (  # noqa: F401
    ODD_SIZES,
    ODD_VOCABS,
    TOLERANCES,
    assert_all_written,
    assert_close,
    fwd_bwd_parity,
    poison_,
    poisoned_empty,
    randn,
    tolerance,
)
from .stats import chi2_pvalue, chi2_sf  # noqa: F401
from .triton_interp import patch_interpreter_bf16  # noqa: F401

"""Make Triton's CPU interpreter (``TRITON_INTERPRET=1``) faithful for bf16.

The interpreter (triton 3.6-3.9) stores bf16 as raw uint16 and runs numpy arithmetic on those
integers, so bf16 ``tl.dot``, bf16 arithmetic and fp32->bf16 casts give garbage or truncate.
:func:`patch_interpreter_bf16` wraps the interpreter builder's ``create_dot``, ``cast_impl``,
``create_fp_to_fp`` and ``binary_op``: bf16 operands are widened to fp32, the operation runs in
fp32, and bf16 results are rounded back to nearest-even -- what the GPU does. Test-only.
"""

from __future__ import annotations

import numpy as np

_PATCHED = False


def bf16_to_f32(a) -> np.ndarray:
    return (np.asarray(a).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16_rtne(x) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[np.isnan(x)] = 0x7FC0
    return r


def patch_interpreter_bf16() -> bool:
    """Install the patch (idempotent). Returns False when triton's interpreter is not importable."""
    global _PATCHED
    if _PATCHED:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except Exception:
        return False
    B = interp.InterpreterBuilder
    TensorHandle = interp.TensorHandle

    def is_bf16(h):
        return getattr(h.dtype, "scalar", h.dtype) == tl.bfloat16

    def as_f32(h):
        return bf16_to_f32(h.data) if is_bf16(h) else h.data

    orig_dot = B.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if is_bf16(a) or is_bf16(b):
            out = np.matmul(as_f32(a).astype(np.float32), as_f32(b).astype(np.float32))
            return TensorHandle((out + d.data).astype(d.data.dtype), d.dtype.scalar)
        return orig_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    orig_cast = B.cast_impl

    def cast_impl(self, src, dst_type):
        dst = dst_type.scalar
        if is_bf16(src) or dst == tl.bfloat16:
            vals = as_f32(src)
            if dst == tl.bfloat16:
                return TensorHandle(f32_to_bf16_rtne(vals.astype(np.float32)), tl.bfloat16)
            return TensorHandle(vals.astype(interp._get_np_dtype(dst_type)), dst)
        return orig_cast(self, src, dst_type)

    orig_fp_to_fp = B.create_fp_to_fp

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if is_bf16(src) or dst_type.scalar == tl.bfloat16:
            return cast_impl(self, src, dst_type)
        return orig_fp_to_fp(self, src, dst_type, rounding_mode)

    orig_binary = B.binary_op

    def binary_op(self, lhs, rhs, op):
        if is_bf16(lhs) or is_bf16(rhs):
            out = op(as_f32(lhs), as_f32(rhs))
            if out.dtype == np.bool_:
                return TensorHandle(out, lhs.dtype.scalar)
            return TensorHandle(f32_to_bf16_rtne(out.astype(np.float32)), tl.bfloat16)
        return orig_binary(self, lhs, rhs, op)

    B.create_dot = create_dot
    B.cast_impl = cast_impl
    # the create_*_to_* lambdas call self.cast_impl, so they pick up the patch
    B.create_fp_to_fp = create_fp_to_fp
    B.binary_op = binary_op
    _PATCHED = True
    return True

"""Vector steps of the compiled lattice quantizers
(:mod:`lib_gguf.families.lattice_search_numba`), written as LLVM vector operations
because numba leaves LLVM's SLP vectorizer off and its loop vectorizer does not take
loops of four or eight.

Each lane does the scalar code's float32 operations in the scalar code's order
(no reassociation, no fused multiply-add), so every value is the one the scalar
code computes, bit for bit:

* :func:`round4` / :func:`round8`: round a group of 4 or 8 magnitudes to lattice
  levels (ggml's ``nearest_int``, its magic-number trick itself, then the clamp).
* :func:`block_min` / :func:`block_min_shifted`: the weighted distances of eight
  candidate grid points at once (a block of a neighbour list, stored transposed),
  and the first smallest of them.
"""
from __future__ import annotations

import numpy as np

from ..numba_support import F_MAGIC, numba


if numba is not None:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    _F32 = ir.FloatType()
    _I32 = ir.IntType(32)

    def _data(context, builder, ty, value):
        return context.make_array(ty)(context, builder, value).data

    def _splat(builder, value, n):
        vec = ir.VectorType(value.type, n)
        undef = ir.Constant(vec, ir.Undefined)
        one = builder.insert_element(undef, value, ir.Constant(_I32, 0))
        return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(_I32, n), [0] * n))

    def _load(builder, ptr, offset, n):
        """``n`` float32 at ``ptr + offset`` (elements), as one vector."""
        return builder.load(builder.bitcast(builder.gep(ptr, [offset]), ir.VectorType(_F32, n).as_pointer()), align=4)

    def _make_round(n):
        @intrinsic
        def round_lanes(typingctx, xv, o, idv, lmax, bits, q):
            """The levels ``l_i = clamp(nearest_int(0.5 * (idv * xv[o+i] - 1)), 0, lmax)``
            of ``n`` weights: ``q[o+i] = 2 l_i + 1`` (float32); returns the packed code
            ``sum_i l_i << (bits * i)``."""
            sig = types.int64(xv, o, idv, lmax, bits, q)

            def codegen(context, builder, signature, args):
                xv_a, o_v, idv_v, lmax_v, bits_v, q_a = args
                ivec = ir.VectorType(_I32, n)
                x = _load(builder, _data(context, builder, signature.args[0], xv_a), o_v, n)
                y = builder.fsub(builder.fmul(_splat(builder, idv_v, n), x), _splat(builder, ir.Constant(_F32, 1.0), n))
                y = builder.fmul(_splat(builder, ir.Constant(_F32, 0.5), n), y)
                t = builder.bitcast(builder.fadd(y, _splat(builder, ir.Constant(_F32, float(F_MAGIC)), n)), ivec)
                lv = builder.sub(builder.and_(t, ir.Constant(ivec, [0x7FFFFF] * n)), ir.Constant(ivec, [0x400000] * n))
                hi = _splat(builder, builder.trunc(lmax_v, _I32), n)
                lv = builder.select(builder.icmp_signed(">", lv, hi), hi, lv)
                zero = ir.Constant(ivec, [0] * n)
                lv = builder.select(builder.icmp_signed("<", lv, zero), zero, lv)
                ones = ir.Constant(ivec, [1] * n)
                qv = builder.sitofp(builder.add(builder.shl(lv, ones), ones), ir.VectorType(_F32, n))
                qp = builder.gep(_data(context, builder, signature.args[5], q_a), [o_v])
                builder.store(qv, builder.bitcast(qp, ir.VectorType(_F32, n).as_pointer()), align=4)
                shifts = builder.mul(_splat(builder, builder.trunc(bits_v, _I32), n), ir.Constant(ivec, list(range(n))))
                packed = builder.shl(lv, shifts)
                u = builder.extract_element(packed, ir.Constant(_I32, 0))
                for i in range(1, n):
                    u = builder.or_(u, builder.extract_element(packed, ir.Constant(_I32, i)))
                return builder.zext(u, ir.IntType(64))

            return sig, codegen

        return round_lanes

    def _make_block_min(shifted):
        @intrinsic
        def block_min(typingctx, vals, base, delta, scale, x, w, o, ow, dim):
            """For the eight candidates of the block at ``vals[base:]`` (``dim`` rows of 8
            lanes), ``d2 = sum_i w[ow+i] * (scale * v_i - x[o+i])**2`` summed in ``i``
            order, where ``v_i`` is the stored value (plus ``delta`` if shifted); returns
            (the smallest d2, the first lane that has it). A NaN distance counts as
            +inf, which the caller never takes (as the scalar ``d2 < best``)."""
            sig = types.Tuple((types.float32, types.int64))(vals, base, delta, scale, x, w, o, ow, dim)

            def codegen(context, builder, signature, args):
                vals_a, base_v, delta_v, scale_v, x_a, w_a, o_v, ow_v, dim_v = args
                vec = ir.VectorType(_F32, 8)
                vp = _data(context, builder, signature.args[0], vals_a)
                xp = _data(context, builder, signature.args[4], x_a)
                wp = _data(context, builder, signature.args[5], w_a)
                acc = cgutils.alloca_once_value(builder, ir.Constant(vec, [0.0] * 8))
                sv = _splat(builder, scale_v, 8)
                dv = _splat(builder, delta_v, 8)
                with cgutils.for_range(builder, dim_v) as loop:
                    i = loop.index
                    v = _load(builder, vp, builder.add(base_v, builder.mul(i, ir.Constant(i.type, 8))), 8)
                    if shifted:
                        v = builder.fadd(v, dv)
                    xi = _splat(builder, builder.load(builder.gep(xp, [builder.add(o_v, i)])), 8)
                    wi = _splat(builder, builder.load(builder.gep(wp, [builder.add(ow_v, i)])), 8)
                    diff = builder.fsub(builder.fmul(sv, v), xi)
                    builder.store(builder.fadd(builder.load(acc), builder.fmul(builder.fmul(wi, diff), diff)), acc)
                d = builder.load(acc)
                inf = _splat(builder, ir.Constant(_F32, float("inf")), 8)
                d = builder.select(builder.fcmp_unordered("uno", d, d), inf, d)
                m = d
                for k in (4, 2, 1):  # every lane ends with the minimum
                    turn = ir.Constant(ir.VectorType(_I32, 8), [(j + k) % 8 for j in range(8)])
                    rot = builder.shuffle_vector(m, m, turn)
                    m = builder.select(builder.fcmp_ordered("<", rot, m), rot, m)
                eq = builder.bitcast(builder.fcmp_ordered("==", d, m), ir.IntType(8))
                i8 = ir.IntType(8)
                cttz = builder.module.declare_intrinsic("llvm.cttz", [i8], ir.FunctionType(i8, [i8, ir.IntType(1)]))
                lane = builder.zext(builder.call(cttz, [eq, ir.Constant(ir.IntType(1), 0)]), ir.IntType(64))
                m0 = builder.extract_element(m, ir.Constant(_I32, 0))
                return context.make_tuple(builder, signature.return_type, [m0, lane])

            return sig, codegen

        return block_min

    round4 = _make_round(4)
    round8 = _make_round(8)
    block_min = _make_block_min(False)
    block_min_shifted = _make_block_min(True)

else:  # pragma: no cover - without numba no compiled kernel runs; the scalar meaning, for reading
    def _round(n, xv, o, idv, lmax, bits, q):
        u = 0
        for i in range(n):
            y = np.float32(0.5) * (np.float32(idv * xv[o + i]) - np.float32(1))
            l = max(0, min(lmax, int(np.rint(y))))
            q[o + i] = np.float32(2 * l + 1)
            u |= l << (bits * i)
        return u

    def round4(xv, o, idv, lmax, bits, q):
        return _round(4, xv, o, idv, lmax, bits, q)

    def round8(xv, o, idv, lmax, bits, q):
        return _round(8, xv, o, idv, lmax, bits, q)

    def _block_min(vals, base, delta, scale, x, w, o, ow, dim):
        d = np.zeros(8, np.float32)
        for i in range(dim):
            diff = scale * (vals[base + 8 * i: base + 8 * i + 8] + delta) - x[o + i]
            d = d + (w[ow + i] * diff) * diff
        d = np.where(np.isnan(d), np.float32(np.inf), d)
        return d.min(), int(np.argmin(d))

    def block_min(vals, base, delta, scale, x, w, o, ow, dim):
        return _block_min(vals, base, np.float32(0), scale, x, w, o, ow, dim)

    block_min_shifted = _block_min

"""Every format family, one module each: its block layouts (named fields), its torch
dequantizers and quantizers (the reference path), and which compiled kernels it has;
each registers all of that in :mod:`lib_gguf.formats` as it is imported, here.

==============  =====================================  ====================================
module          formats                                compiled kernels (``*_numba``/``*_triton``)
==============  =====================================  ====================================
plain           F32 F16 BF16 F64 I8 I16 I32 I64        none needed
legacy          Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 Q1_0    numba dequantizers (not Q1_0), quan-
                                                       tizers (not Q8_1, Q1_0); Triton
kquant          Q2_K Q3_K Q4_K Q5_K Q6_K Q8_K          numba dequantizers and quantizers
                                                       (not Q8_K); Triton
iq4             IQ4_NL IQ4_XS                          numba dequantizers and quantizers; Triton
lattice         IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S     numba dequantizers and quantizer fits;
                IQ1_S IQ1_M                            Triton
ternary         TQ1_0 TQ2_0                            numba dequantizers and quantizers; Triton
fp4             MXFP4 NVFP4                            numba dequantizers and quantizer; Triton
==============  =====================================  ====================================

Shared pieces: :mod:`.torch_ops` (torch), :mod:`lib_gguf.numba_support` and
:mod:`lib_gguf.triton_support` (compiled). :mod:`lib_gguf.numba_kernels` and
:mod:`lib_gguf.dequant_triton` collect the compiled kernels, imported only when one
may run (so a model without such formats never imports numba or triton).
"""
from . import fp4, iq4, kquant, lattice, legacy, plain, ternary

FAMILIES = (plain, legacy, kquant, iq4, lattice, ternary, fp4)  # each registered its formats as it was imported

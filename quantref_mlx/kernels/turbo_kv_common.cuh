/* turbo_kv_common.cuh: the turbo_kv kernels' shared helpers, for CUDA (NVRTC) and Metal.

TK_* are the backend's spelling of one correctly rounded float32 operation each (never
contracted into a fused multiply-add, never approximated) and of bit casts: quant.cpp's format
fixes every rounding (shared/docs/turbo_kv_format.md), and these kernels must give its bytes.
tk_f16_trunc is the block header's truncating fp16 (the low 13 mantissa bits dropped, no
subnormals, overflow and NaN to infinity); tk_f16_decode reads it back, subnormals flushed to 0.
The kind's constant TK_CMAX (CENT_MAX, a float32 literal) is #defined before this file. */
#if defined(__CUDACC__)
#define TK_FN __device__ __forceinline__
#define TK_ADD(a, b) __fadd_rn((a), (b))
#define TK_SUB(a, b) __fsub_rn((a), (b))
#define TK_MUL(a, b) __fmul_rn((a), (b))
#define TK_DIV(a, b) __fdiv_rn((a), (b))
#define TK_SQRT(a) __fsqrt_rn(a)
#define TK_ABS(a) fabsf(a)
#define TK_AS_UINT(f) __float_as_uint(f)
#define TK_AS_FLOAT(u) __uint_as_float(u)
#else /* Metal: MLX compiles custom kernels with safe math; contraction is switched off
         explicitly and the division and square root are the precise (correctly rounded) ones */
#pragma METAL fp math_mode(safe)
#pragma METAL fp contract(off)
#define TK_FN inline
#define TK_ADD(a, b) ((a) + (b))
#define TK_SUB(a, b) ((a) - (b))
#define TK_MUL(a, b) ((a) * (b))
#define TK_DIV(a, b) metal::precise::divide((a), (b))
#define TK_SQRT(a) metal::precise::sqrt(a)
#define TK_ABS(a) metal::abs(a)
#define TK_AS_UINT(f) as_type<unsigned int>(f)
#define TK_AS_FLOAT(u) as_type<float>(u)
#endif

TK_FN unsigned int tk_f16_trunc(float f) {
    unsigned int u = TK_AS_UINT(f);
    unsigned int sign = (u >> 16) & 0x8000u;
    int e = (int)((u >> 23) & 0xFFu) - 112;
    unsigned int mant = (u >> 13) & 0x3FFu;
    if (e <= 0) return sign;
    if (e >= 31) return sign | 0x7C00u;
    return sign | ((unsigned int)e << 10) | mant;
}

TK_FN float tk_f16_decode(unsigned int h) {
    unsigned int sign = (h & 0x8000u) << 16;
    unsigned int e = (h >> 10) & 0x1Fu;
    unsigned int mant = h & 0x3FFu;
    unsigned int u;
    if (e == 0u) u = sign;
    else if (e == 31u) u = sign | 0x7F800000u | (mant << 13);
    else u = sign | ((e + 112u) << 23) | (mant << 13);
    return TK_AS_FLOAT(u);
}

// Reconstruction of decoded levels into the output arrays, exactly as gpucabac/codec.py does it
// on the CPU (docs/format.md §3):
//   float32, float16, bfloat16 tensors: float32(level) * float32(step), rounded to nearest-even
//     into the tensor's dtype;
//   float64 tensors: float64(level) * float64(float32(step));
// then, when decode(..., dtype=...) asks for another float dtype, the CPU path's `astype` of that
// value: NumPy converts float64 -> float16 directly, ml_dtypes converts float64 -> bfloat16 through
// float32, every other cast is exact or a single rounding from float32.
// The roundings are integer code on the bits (no cuda_fp16.h: NVRTC has no system headers), so the
// g++ build in tests/test_kernels.py checks them against NumPy and ml_dtypes.
#ifndef GPUCABAC_DEQUANT_CUH
#define GPUCABAC_DEQUANT_CUH

#include "compat.cuh"
#include "tables.cuh"

GC_HD unsigned int gc_f32_bits(float f) {
    union {
        float f;
        unsigned int u;
    } x;
    x.f = f;
    return x.u;
}
GC_HD float gc_f32_from_bits(unsigned int u) {
    union {
        float f;
        unsigned int u;
    } x;
    x.u = u;
    return x.f;
}
GC_HD unsigned long long gc_f64_bits(double d) {
    union {
        double d;
        unsigned long long u;
    } x;
    x.d = d;
    return x.u;
}

// Round sign * 1.mant * 2^e (mant has `frac` fraction bits, the implicit 1 included in `mant`) to
// IEEE binary16, ties to even. Handles overflow to infinity, subnormal and zero results.
GC_HD unsigned short gc_round_to_f16(unsigned int sign, int e, unsigned long long mant, int frac) {
    if (e >= 16) return (unsigned short)(sign | 0x7C00u);  // >= 65536: beyond 65504 + half an ulp
    if (e < -25) return (unsigned short)sign;              // < 2^-25: below half the least subnormal
    // drop bits so that one unit is the result's ulp: 2^(e-10) for a normal, 2^-24 for a subnormal
    int shift = frac - 10 + (e < -14 ? -14 - e : 0);
    unsigned long long q = mant >> shift;
    unsigned long long rem = mant & ((1ULL << shift) - 1);
    unsigned long long half = 1ULL << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q += 1;
    // normal: q in [1024, 2048], exponent field e + 15 (a carry to 2048 bumps it; 0x7C00 = inf);
    // subnormal: q in [0, 1024] is the bit pattern itself (1024 = the least normal).
    unsigned int h = e < -14 ? (unsigned int)q : (unsigned int)((e + 14) << 10) + (unsigned int)q;
    return (unsigned short)(sign | h);
}

GC_HD unsigned short gc_f32_to_f16(float f) {
    unsigned int u = gc_f32_bits(f);
    unsigned int sign = (u >> 16) & 0x8000u;
    unsigned int ex = (u >> 23) & 0xFFu;
    unsigned int man = u & 0x7FFFFFu;
    if (ex == 0xFFu) return (unsigned short)(sign | 0x7C00u | (man ? 0x200u | (man >> 13) : 0u));
    if (ex == 0) return (unsigned short)sign;  // float32 subnormals are far below 2^-25
    return gc_round_to_f16(sign, (int)ex - 127, (unsigned long long)(man | 0x800000u), 23);
}

GC_HD unsigned short gc_f64_to_f16(double d) {
    unsigned long long u = gc_f64_bits(d);
    unsigned int sign = (unsigned int)(u >> 48) & 0x8000u;
    unsigned int ex = (unsigned int)(u >> 52) & 0x7FFu;
    unsigned long long man = u & 0xFFFFFFFFFFFFFULL;
    if (ex == 0x7FFu) return (unsigned short)(sign | 0x7C00u | (man ? 0x200u | (unsigned int)(man >> 42) : 0u));
    if (ex == 0) return (unsigned short)sign;
    return gc_round_to_f16(sign, (int)ex - 1023, man | (1ULL << 52), 52);
}

GC_HD float gc_f16_to_f32(unsigned short h) {
    unsigned int sign = ((unsigned int)h & 0x8000u) << 16;
    unsigned int ex = ((unsigned int)h >> 10) & 0x1Fu;
    unsigned int man = (unsigned int)h & 0x3FFu;
    if (ex == 0x1Fu) return gc_f32_from_bits(sign | 0x7F800000u | (man << 13));
    if (ex == 0) {
        if (man == 0) return gc_f32_from_bits(sign);
        int e = -14;  // subnormal: normalise
        while (!(man & 0x400u)) {
            man <<= 1;
            e -= 1;
        }
        return gc_f32_from_bits(sign | ((unsigned int)(e + 127) << 23) | ((man & 0x3FFu) << 13));
    }
    return gc_f32_from_bits(sign | ((ex + 112u) << 23) | (man << 13));
}

GC_HD unsigned short gc_f32_to_bf16(float f) {
    unsigned int u = gc_f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

GC_HD float gc_bf16_to_f32(unsigned short b) { return gc_f32_from_bits((unsigned int)b << 16); }

// Store level (or its reconstruction) at out[idx]. work: the tensor's dtype code; out_code: the
// array's (GC_DTYPE_INT32 stores the level itself, for integer tensors).
GC_HD void gc_store(void* out, long long idx, long long level, float step, int work, int out_code) {
    if (out_code == GC_DTYPE_INT32) {
        ((int*)out)[idx] = (int)level;
        return;
    }
    if (work == GC_DTYPE_FLOAT64) {
        double d = (double)level * (double)step;
        if (out_code == GC_DTYPE_FLOAT64)
            ((double*)out)[idx] = d;
        else if (out_code == GC_DTYPE_FLOAT32)
            ((float*)out)[idx] = (float)d;
        else if (out_code == GC_DTYPE_FLOAT16)
            ((unsigned short*)out)[idx] = gc_f64_to_f16(d);
        else
            ((unsigned short*)out)[idx] = gc_f32_to_bf16((float)d);
        return;
    }
    float v = (float)(int)level * step;
    if (work == GC_DTYPE_FLOAT16)
        v = gc_f16_to_f32(gc_f32_to_f16(v));
    else if (work == GC_DTYPE_BFLOAT16)
        v = gc_bf16_to_f32(gc_f32_to_bf16(v));
    if (out_code == GC_DTYPE_FLOAT32)
        ((float*)out)[idx] = v;
    else if (out_code == GC_DTYPE_FLOAT16)
        ((unsigned short*)out)[idx] = gc_f32_to_f16(v);
    else if (out_code == GC_DTYPE_BFLOAT16)
        ((unsigned short*)out)[idx] = gc_f32_to_bf16(v);
    else
        ((double*)out)[idx] = (double)v;
}

#endif  // GPUCABAC_DEQUANT_CUH

// Lets the __host__ __device__ sources compile as plain C++ (g++ in tests/test_kernels.py) as well
// as under nvcc and NVRTC. No system headers anywhere: NVRTC (CuPy's RawModule) has none.
#ifndef GPUCABAC_COMPAT_CUH
#define GPUCABAC_COMPAT_CUH

#if !defined(__CUDACC__)
#define __host__
#define __device__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#endif

#define GC_HD __host__ __device__ __forceinline__

#endif  // GPUCABAC_COMPAT_CUH

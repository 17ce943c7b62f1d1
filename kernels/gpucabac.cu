// gpucabac's CUDA kernels (docs/design.md §2), loaded by gpucabac/engines/gpu.py with CuPy's RawModule
// after gpucabac.engines.kernel_source.assemble() has inlined the headers below.
//
// One thread per slice. Each thread keeps its slice's context states in dynamic shared memory
// (GC_MAX_CONTEXTS words per thread, interleaved so a warp's threads never share a bank); the
// small tables are copied from constant memory into shared memory at block start, because the
// threads of a warp index them at different places (constant memory would serialise that).
//
// Launch contract (gpucabac/engines/gpu.py owns it): block size = any multiple of 32 up to 1024 for the
// decode and encode kernels, with dynamic shared memory = blockDim.x * GC_MAX_CONTEXTS * 4 bytes;
// any grid (the kernels loop over their items with a grid stride).
#include "compat.cuh"
#include "tables.cuh"
#include "slice_coder.cuh"
#include "dequant.cuh"
#include "jobs.cuh"

struct GcSharedTables {
    unsigned char rlps[256];
    unsigned char renorm[512];
    unsigned char dq_next[GC_DQ_NEXT_SIZE];
    int curve[32];
    int preset_states[4 * GC_NUM_PRESETS];
    unsigned int crc32[256];
};

extern __shared__ unsigned int gc_ctx_smem[];

__device__ __forceinline__ GcTables gc_load_tables(GcSharedTables& s) {
    for (int i = threadIdx.x; i < 512; i += blockDim.x) {
        s.renorm[i] = gc_renorm_dev[i];
        if (i < 256) {
            s.rlps[i] = gc_rlps_dev[i];
            s.crc32[i] = gc_crc32_dev[i];
        }
        if (i < 4 * GC_NUM_PRESETS) s.preset_states[i] = gc_preset_states_dev[i];
        if (i < 32) s.curve[i] = gc_curve_dev[i];
    }
    for (int i = threadIdx.x; i < GC_DQ_NEXT_SIZE; i += blockDim.x) s.dq_next[i] = gc_dq_next_dev[i];
    __syncthreads();
    GcTables t = {s.rlps, s.curve, s.renorm, s.dq_next, s.preset_states, s.crc32};
    return t;
}

__device__ __forceinline__ GcCtxArray gc_thread_contexts() {
    GcCtxArray ctx = {gc_ctx_smem + threadIdx.x, (int)blockDim.x};
    return ctx;
}

__device__ __forceinline__ long long gc_thread_index() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long gc_thread_count() { return (long long)gridDim.x * blockDim.x; }

// Decode every slice of the flat table (jobs.cuh, GcDecodeTable) into the tensors' arrays.
extern "C" __global__ void gc_decode_kernel(
    long long num_slices, const unsigned char* payload, const long long* slice_offset,
    const unsigned int* slice_length, const unsigned int* slice_crc, const int* slice_tensor,
    const long long* slice_first, const long long* slice_count, const int* tensor_params,
    const float* tensor_step, const unsigned long long* tensor_out, const unsigned char* tensor_init,
    int* errors) {
    __shared__ GcSharedTables shared;
    GcTables t = gc_load_tables(shared);
    GcDecodeTable d = {payload, slice_offset, slice_length, slice_crc, slice_tensor, slice_first,
                       slice_count, tensor_params, tensor_step, tensor_out, tensor_init, errors};
    GcCtxArray ctx = gc_thread_contexts();
    for (long long s = gc_thread_index(); s < num_slices; s += gc_thread_count()) gc_decode_job(s, d, ctx, t);
}

// Per slice of one tensor: the bound on its coded bytes, and its first invalid level or -1.
extern "C" __global__ void gc_bound_kernel(
    const int* levels, long long n, long long slice_size, long long num_slices, int dq, int num_gt_flags, int runs,
    long long* bound, long long* bad) {
    __shared__ GcSharedTables shared;
    GcTables t = gc_load_tables(shared);
    for (long long s = gc_thread_index(); s < num_slices; s += gc_thread_count())
        gc_bound_job(s, levels, n, slice_size, dq, num_gt_flags, runs, t, bound, bad);
}

// Encode every slice of one tensor into scratch[scratch_offset[s] : + bound[s]].
extern "C" __global__ void gc_encode_kernel(
    const int* levels, long long n, long long slice_size, long long num_slices, int dq, int num_gt_flags, int runs,
    const unsigned char* init, unsigned char* scratch, const long long* scratch_offset, const long long* bound,
    long long* lengths) {
    __shared__ GcSharedTables shared;
    GcTables t = gc_load_tables(shared);
    GcEncodeTable e = {levels, n, slice_size, dq, num_gt_flags, runs, init, scratch, scratch_offset, bound, lengths};
    GcCtxArray ctx = gc_thread_contexts();
    for (long long s = gc_thread_index(); s < num_slices; s += gc_thread_count()) gc_encode_job(s, e, ctx, t);
}

// Compaction: slice s from scratch[src_offset[s]:] to out[dst_offset[s]:], one block per slice.
extern "C" __global__ void gc_gather_kernel(
    const unsigned char* scratch, const long long* src_offset, const long long* lengths,
    const long long* dst_offset, long long num_slices, unsigned char* out) {
    for (long long s = blockIdx.x; s < num_slices; s += gridDim.x) {
        const unsigned char* src = scratch + src_offset[s];
        unsigned char* dst = out + dst_offset[s];
        long long len = lengths[s];
        for (long long j = threadIdx.x; j < len; j += blockDim.x) dst[j] = src[j];
    }
}

// CRC-32 of every slice data[offset[s] : offset[s] + length[s]].
extern "C" __global__ void gc_crc_kernel(
    const unsigned char* data, const long long* offset, const long long* length, long long num_slices,
    unsigned int* crc) {
    __shared__ GcSharedTables shared;
    GcTables t = gc_load_tables(shared);
    for (long long s = gc_thread_index(); s < num_slices; s += gc_thread_count()) gc_crc_job(s, data, offset, length, t, crc);
}

// Host-only C entry points over the CUDA sources' __host__ __device__ functions, so that
// tests/test_kernels.py can run the kernel logic on the CPU (ctypes) against the numba reference.
// Built by the tests with: g++ -x c++ -std=c++17 -O2 -shared -fPIC -I kernels tests/kernel_shim.cpp
// The *_table functions run the kernels' per-thread jobs in a loop over the thread index.
#include "jobs.cuh"

namespace {

struct LevelSink {
    int* out;
    void operator()(long long i, long long level) const { out[i] = (int)level; }
};

GcCtxArray private_contexts(unsigned int* words) {
    GcCtxArray ctx = {words, 1};
    return ctx;
}

}  // namespace

extern "C" {

int gc_shim_max_contexts() { return GC_MAX_CONTEXTS; }

unsigned int gc_shim_ctx_pack(int s0, int s1, int sh0, int sh1) { return gc_ctx_pack(s0, s1, sh0, sh1); }

unsigned int gc_shim_ctx_update(unsigned int w, int b) { return gc_ctx_update(w, b, gc_host_tables().curve); }

int gc_shim_ctx_p(unsigned int w) { return gc_ctx_p(w); }

long long gc_shim_encode_slice(const int* levels, long long count, int dq, int num_gt_flags, int runs,
                               const unsigned char* init, unsigned char* out, long long cap) {
    unsigned int words[GC_MAX_CONTEXTS];
    GcTables t = gc_host_tables();
    return gc_encode_slice(levels, count, dq, num_gt_flags, runs, init, private_contexts(words), t, out, cap);
}

int gc_shim_decode_slice(const unsigned char* data, long long len, long long count, int dq, int num_gt_flags,
                         int runs, const unsigned char* init, int* out) {
    unsigned int words[GC_MAX_CONTEXTS];
    GcTables t = gc_host_tables();
    LevelSink sink = {out};
    return gc_decode_slice(data, len, count, dq, num_gt_flags, runs, init, private_contexts(words), t, sink);
}

unsigned int gc_shim_crc32(const unsigned char* data, long long len) {
    return gc_crc32(data, len, gc_host_tables().crc32);
}

void gc_shim_bound_table(const int* levels, long long n, long long slice_size, long long num_slices, int dq,
                         int num_gt_flags, int runs, long long* bound, long long* bad) {
    GcTables t = gc_host_tables();
    for (long long s = 0; s < num_slices; ++s)
        gc_bound_job(s, levels, n, slice_size, dq, num_gt_flags, runs, t, bound, bad);
}

void gc_shim_encode_table(const int* levels, long long n, long long slice_size, long long num_slices, int dq,
                          int num_gt_flags, int runs, const unsigned char* init, unsigned char* scratch,
                          const long long* scratch_offset, const long long* bound, long long* lengths) {
    unsigned int words[GC_MAX_CONTEXTS];
    GcTables t = gc_host_tables();
    GcEncodeTable e = {levels, n, slice_size, dq, num_gt_flags, runs, init, scratch, scratch_offset, bound, lengths};
    for (long long s = 0; s < num_slices; ++s) gc_encode_job(s, e, private_contexts(words), t);
}

void gc_shim_gather(const unsigned char* scratch, const long long* src_offset, const long long* lengths,
                    const long long* dst_offset, long long num_slices, unsigned char* out) {
    for (long long s = 0; s < num_slices; ++s)
        for (long long j = 0; j < lengths[s]; ++j) out[dst_offset[s] + j] = scratch[src_offset[s] + j];
}

void gc_shim_crc_table(const unsigned char* data, const long long* offset, const long long* length,
                       long long num_slices, unsigned int* crc) {
    GcTables t = gc_host_tables();
    for (long long s = 0; s < num_slices; ++s) gc_crc_job(s, data, offset, length, t, crc);
}

void gc_shim_decode_table(long long num_slices, const unsigned char* payload, const long long* slice_offset,
                          const unsigned int* slice_length, const unsigned int* slice_crc, const int* slice_tensor,
                          const long long* slice_first, const long long* slice_count, const int* tensor_params,
                          const float* tensor_step, const unsigned long long* tensor_out,
                          const unsigned char* tensor_init, int* errors) {
    unsigned int words[GC_MAX_CONTEXTS];
    GcTables t = gc_host_tables();
    GcDecodeTable d = {payload, slice_offset, slice_length, slice_crc, slice_tensor, slice_first,
                       slice_count, tensor_params, tensor_step, tensor_out, tensor_init, errors};
    for (long long s = 0; s < num_slices; ++s) gc_decode_job(s, d, private_contexts(words), t);
}

void gc_shim_f32_to_f16(const float* in, long long n, unsigned short* out) {
    for (long long i = 0; i < n; ++i) out[i] = gc_f32_to_f16(in[i]);
}

void gc_shim_f64_to_f16(const double* in, long long n, unsigned short* out) {
    for (long long i = 0; i < n; ++i) out[i] = gc_f64_to_f16(in[i]);
}

void gc_shim_f32_to_bf16(const float* in, long long n, unsigned short* out) {
    for (long long i = 0; i < n; ++i) out[i] = gc_f32_to_bf16(in[i]);
}

void gc_shim_f16_to_f32(const unsigned short* in, long long n, float* out) {
    for (long long i = 0; i < n; ++i) out[i] = gc_f16_to_f32(in[i]);
}

void gc_shim_store(const int* levels, long long n, float step, int work, int out_code, void* out) {
    for (long long i = 0; i < n; ++i) gc_store(out, i, levels[i], step, work, out_code);
}

}  // extern "C"

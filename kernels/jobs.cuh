// The work of one GPU thread, as __host__ __device__ functions over flat tables: the kernels of
// gpucabac.cu call them with their thread index, tests/test_kernels.py calls them in a loop on the
// CPU with the very tables gpucabac/engines/gpu.py builds. Everything a kernel adds on top is the
// thread index and shared-memory copies of the tables.
#ifndef GPUCABAC_JOBS_CUH
#define GPUCABAC_JOBS_CUH

#include "compat.cuh"
#include "tables.cuh"
#include "slice_coder.cuh"
#include "dequant.cuh"

// ---------------------------------------------------------------------------------------------
// Decoding: one flat table of all slices of all tensors of a container.

struct GcDecodeTable {
    const unsigned char* payload;    // the coded tensors' payloads
    const long long* slice_offset;   // [num_slices] byte offset of the slice in payload
    const unsigned int* slice_length;  // [num_slices] bytes
    const unsigned int* slice_crc;   // [num_slices] CRC-32 from the container header
    const int* slice_tensor;         // [num_slices] tensor index t
    const long long* slice_first;    // [num_slices] index of its first value in the tensor
    const long long* slice_count;    // [num_slices] number of values
    const int* tensor_params;        // [GC_TENSOR_PARAMS t + k] k = 0: dq, 1: num_gt_flags, 2: work dtype, 3: out dtype, 4: runs
    const float* tensor_step;        // [t] float32 step
    const unsigned long long* tensor_out;  // [t] address of the output array
    const unsigned char* tensor_init;  // [GC_MAX_CONTEXTS t + c] preset index of context c
    int* errors;                     // [num_slices] GC_DECODE_* code
};

struct GcStoreSink {
    void* out;
    long long first;
    float step;
    int work;
    int out_code;
    GC_HD void operator()(long long i, long long level) const { gc_store(out, first + i, level, step, work, out_code); }
};

// Check slice s against its CRC (a corrupt slice is never decoded), then decode it straight into
// its tensor's output array.
GC_HD void gc_decode_job(long long s, const GcDecodeTable& d, GcCtxArray ctx, const GcTables& t) {
    const unsigned char* data = d.payload + d.slice_offset[s];
    long long len = (long long)d.slice_length[s];
    if (gc_crc32(data, len, t.crc32) != d.slice_crc[s]) {
        d.errors[s] = GC_DECODE_CRC;
        return;
    }
    int tn = d.slice_tensor[s];
    const int* prm = d.tensor_params + GC_TENSOR_PARAMS * tn;
    GcStoreSink sink;
    sink.out = (void*)d.tensor_out[tn];
    sink.first = d.slice_first[s];
    sink.step = d.tensor_step[tn];
    sink.work = prm[2];
    sink.out_code = prm[3];
    d.errors[s] = gc_decode_slice(data, len, d.slice_count[s], prm[0], prm[1], prm[4],
                                  d.tensor_init + (long long)GC_MAX_CONTEXTS * tn, ctx, t, sink);
}

// ---------------------------------------------------------------------------------------------
// Encoding one tensor: bound every slice, encode each into its scratch region, gather, CRC.

struct GcEncodeTable {
    const int* levels;          // [n] reconstruction indices in scan order
    long long n;
    long long slice_size;
    int dq;
    int num_gt_flags;
    int runs;                   // zeros coded as runs
    const unsigned char* init;  // [GC_MAX_CONTEXTS]
    unsigned char* scratch;
    const long long* scratch_offset;  // [num_slices] exclusive prefix sum of bound
    const long long* bound;     // [num_slices] from gc_bound_job
    long long* lengths;         // [num_slices] bytes written, -1 if the bound was exceeded
};

GC_HD void gc_bound_job(long long s, const int* levels, long long n, long long slice_size, int dq, int num_gt_flags,
                        int runs, const GcTables& t, long long* bound, long long* bad) {
    long long start = s * slice_size;
    long long count = n - start < slice_size ? n - start : slice_size;
    long long b;
    bound[s] = gc_slice_bound(levels + start, count, dq, num_gt_flags, runs, t, &b);
    bad[s] = b < 0 ? -1 : start + b;
}

GC_HD void gc_encode_job(long long s, const GcEncodeTable& e, GcCtxArray ctx, const GcTables& t) {
    long long start = s * e.slice_size;
    long long count = e.n - start < e.slice_size ? e.n - start : e.slice_size;
    e.lengths[s] = gc_encode_slice(e.levels + start, count, e.dq, e.num_gt_flags, e.runs, e.init, ctx, t,
                                   e.scratch + e.scratch_offset[s], e.bound[s]);
}

GC_HD void gc_crc_job(long long s, const unsigned char* data, const long long* offset, const long long* length,
                      const GcTables& t, unsigned int* crc) {
    crc[s] = gc_crc32(data + offset[s], length[s], t.crc32);
}

#endif  // GPUCABAC_JOBS_CUH

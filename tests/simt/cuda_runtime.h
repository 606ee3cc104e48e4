/* tests/simt/cuda_runtime.h - the CUDA that native/src/*.cu uses, for a CPU:
 * the SIMT emulator's header (tests/simt.py builds the library with it; see
 * simt.cpp). Kernels compile as plain C++ functions; every GPU thread of a
 * launch runs the kernel on its own fiber, and __syncthreads and warp
 * shuffles switch fibers, so the kernels' own code - indexing, shared
 * memory, barriers, reductions - runs as written. The runtime API keeps a
 * registry of "device" allocations and refuses what a GPU would refuse
 * (a host pointer copied as device memory or handed to a kernel, a launch
 * over the block or shared-memory limits, a barrier not every thread
 * reaches). Test-only: never part of the library users get. */
#ifndef SIMT_CUDA_RUNTIME_H
#define SIMT_CUDA_RUNTIME_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#define CUDART_VERSION 13000

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
/* shared memory: one block runs at a time (launches hold a lock) */
#define __shared__ static

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDeviceFunction = 98,
    cudaErrorNoDevice = 100,
    cudaErrorInsufficientDriver = 35,
    cudaErrorNoKernelImageForDevice = 209,
    cudaErrorIllegalAddress = 700,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
    cudaErrorStreamCaptureUnsupported = 900,
    cudaErrorStreamCaptureInvalidated = 901,
    cudaErrorStreamCaptureImplicit = 906,
    cudaErrorGraphExecUpdateFailure = 910,
} cudaError_t;

typedef struct CUstream_st *cudaStream_t;
typedef struct CUgraph_st *cudaGraph_t;
typedef struct CUgraphExec_st *cudaGraphExec_t;

enum cudaStreamCaptureMode {
    cudaStreamCaptureModeGlobal = 0,
    cudaStreamCaptureModeThreadLocal = 1,
    cudaStreamCaptureModeRelaxed = 2,
};

typedef struct cudaGraphExecUpdateResultInfo_st {
    int result;
    void *errorNode, *errorFromNode;
} cudaGraphExecUpdateResultInfo;

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
};

enum cudaDeviceAttr {
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute {
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct cudaDeviceProp {
    char name[256];
    int major, minor;
    int multiProcessorCount;
};

/* ---- the runtime API ------------------------------------------------------- */

cudaError_t cudaMalloc(void **ptr, size_t bytes);
template <class T> cudaError_t cudaMalloc(T **ptr, size_t bytes) { return cudaMalloc((void **)ptr, bytes); }
cudaError_t cudaMallocHost(void **ptr, size_t bytes);
template <class T> cudaError_t cudaMallocHost(T **ptr, size_t bytes) { return cudaMallocHost((void **)ptr, bytes); }
cudaError_t cudaFree(void *ptr);
cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = 0);
cudaError_t cudaGetLastError(void);
const char *cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetDeviceCount(int *count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int *device);
cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device);
cudaError_t cudaDriverGetVersion(int *version);
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaFreeHost(void *ptr);
cudaError_t cudaStreamCreate(cudaStream_t *s);
cudaError_t cudaStreamDestroy(cudaStream_t s);
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags = 0);
cudaError_t cudaGraphExecUpdate(cudaGraphExec_t exec, cudaGraph_t graph, cudaGraphExecUpdateResultInfo *info);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);

/* ---- the emulator ------------------------------------------------------------ */

namespace simt {

/* What the running GPU thread sees (set by the scheduler before it resumes a fiber). */
struct Self {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
};
extern Self self;

cudaError_t set_max_dynamic_smem(const void *kernel, int bytes);

/* A launch with its own copy of the arguments: run at once, or recorded
 * while its stream is captured and run when the graph is launched. */
struct KernelNode {
    const void *kernel;
    dim3 grid, block;
    size_t smem;
    virtual ~KernelNode() {}
    virtual void run_thread() = 0; /* one GPU thread's call of the kernel */
};
/* Runs the node now (every thread, checked limits) or records it (taking
 * ownership either way). */
void submit(cudaStream_t stream, KernelNode *node);
/* Records a failed check of a launch's pointer argument. */
void check_pointer(const void *kernel, int index, const void *p);
void *dynamic_smem(void);
void syncthreads(void);
void shuffle_xor(unsigned mask, void *value, size_t bytes, int lane_mask);
float f16_to_f32(unsigned short h);
unsigned short f32_to_f16(float f);

template <class... P> struct Kernel : KernelNode {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> params;
    template <class T> Kernel(void (*k_)(P...), T &&p) : k(k_), params(std::forward<T>(p)) {}
    void run_thread() override {
        std::tuple<std::decay_t<P>...> mine = params; /* each thread its own copy, as on a GPU */
        std::apply(k, mine);
    }
};

/* kernel<<<grid, block, smem, stream>>>(args...) becomes
 * simt::Launch(grid, block, smem, stream).run(kernel, args...) (simt.py). */
struct Launch {
    dim3 grid, block;
    size_t smem;
    cudaStream_t stream;
    Launch(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = 0) : grid(g), block(b), smem(s), stream(st) {}

    template <class... P, class... A> void run(void (*kernel)(P...), A &&...args) {
        std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
        check_params(kernel, params, std::index_sequence_for<P...>{});
        Kernel<P...> *node = new Kernel<P...>(kernel, std::move(params));
        node->kernel = (const void *)kernel, node->grid = grid, node->block = block, node->smem = smem;
        submit(stream, node);
    }

  private:
    template <class K, class T, size_t... I> static void check_params(K kernel, const T &params, std::index_sequence<I...>) {
        (check_one((const void *)kernel, (int)I, std::get<I>(params)), ...);
    }
    template <class V> static void check_one(const void *kernel, int index, const V &v) {
        if constexpr (std::is_pointer_v<V>) check_pointer(kernel, index, (const void *)v);
    }
};

/* asm("cvt...") in the sources becomes simt::ptx("cvt...", in) (simt.py) */
inline float ptx(const char *op, unsigned short h) {
    (void)op;
    return f16_to_f32(h);
}
inline unsigned short ptx(const char *op, float f) {
    (void)op;
    return f32_to_f16(f);
}

} // namespace simt

template <class K> cudaError_t cudaFuncSetAttribute(K *kernel, cudaFuncAttribute attr, int value) {
    return attr == cudaFuncAttributeMaxDynamicSharedMemorySize ? simt::set_max_dynamic_smem((const void *)kernel, value)
                                                                 : cudaErrorInvalidValue;
}

#define threadIdx (simt::self.thread_idx)
#define blockIdx (simt::self.block_idx)
#define blockDim (simt::self.block_dim)
#define gridDim (simt::self.grid_dim)

/* ---- device functions ------------------------------------------------------------
 * Compiled with -ffp-contract=off: a * b + c rounds twice, as __fmul_rn /
 * __fadd_rn do on a GPU; fmaf is a true fused multiply-add on both. */
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}
inline float __uint_as_float(unsigned i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}
inline void __syncthreads(void) { simt::syncthreads(); }
template <class T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
    (void)width;
    simt::shuffle_xor(mask, &v, sizeof v, lane_mask);
    return v;
}

#endif

/* tests/simt/selftest.cu - the SIMT emulator checked on small kernels with
 * known answers and known faults (test_cuda_simt.py runs one case per
 * process: a fault is sticky, as on a GPU). Prints "<case> <result>". */
#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

#define N 64

/* thread t writes s[t], then reads its neighbour's: right only with the barrier */
__global__ void neighbour_kernel(float *out, int with_barrier) {
    __shared__ float s[N];
    const int t = threadIdx.x;
    s[t] = (float)(t + 1) * (float)(blockIdx.x + 1);
    if (with_barrier) __syncthreads();
    out[blockIdx.x * N + t] = s[(t + 1) % N];
}

__global__ void divergent_barrier_kernel(float *out) {
    if (threadIdx.x < 16) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

__global__ void warp_sum_kernel(float *out) {
    float v = (float)(threadIdx.x + 1);
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    out[threadIdx.x] = v;
}

__global__ void dynamic_smem_kernel(float *out) {
    extern __shared__ float big[];
    big[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = big[blockDim.x - 1 - threadIdx.x];
}

__global__ void fill_kernel(float *out) { out[threadIdx.x] = 2.0f; }

__global__ void add_kernel(float *x, float y) { x[threadIdx.x] += y; }

static float host[4 * N]; /* pageable host memory */

/* A step captured once, then replayed with new input (a pinned buffer the
 * graph copies from) and new kernel arguments (an updated graph). */
static const char *graph_case(float *dev, const char *name) {
    cudaStream_t s;
    float *pinned = NULL;
    cudaGraphExec_t exec = NULL;
    if (cudaStreamCreate(&s) != cudaSuccess || cudaMallocHost(&pinned, N * sizeof(float)) != cudaSuccess) {
        return "setup failed";
    }
    for (int step = 0; step < 3; step++) {
        for (int i = 0; i < N; i++) pinned[i] = (float)(i + 100 * step);
        cudaError_t e = cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
        if (e != cudaSuccess) return cudaGetErrorString(e);
        if (!strcmp(name, "sync_in_capture")) {
            e = cudaMemcpy(dev, host, N * sizeof(float), cudaMemcpyHostToDevice);
            if (e == cudaSuccess) return "a synchronous copy was allowed during a capture";
        } else {
            e = cudaMemcpyAsync(dev, !strcmp(name, "pageable_in_capture") ? host : pinned, N * sizeof(float),
                                cudaMemcpyHostToDevice, s);
        }
        add_kernel<<<1, N, 0, s>>>(dev, (float)step);
        cudaMemcpyAsync(pinned, dev, N * sizeof(float), cudaMemcpyDeviceToHost, s);
        cudaGraph_t graph = NULL;
        const cudaError_t ended = cudaStreamEndCapture(s, &graph);
        if (e != cudaSuccess) return cudaGetErrorString(e);
        if (ended != cudaSuccess) return cudaGetErrorString(ended);
        cudaGraphExecUpdateResultInfo info;
        if (!exec || cudaGraphExecUpdate(exec, graph, &info) != cudaSuccess) cudaGraphInstantiate(&exec, graph, 0);
        cudaGraphDestroy(graph);
        cudaGraphLaunch(exec, s);
        cudaStreamSynchronize(s);
    }
    static char values[4096];
    int at = 0;
    for (int i = 0; i < N; i++) at += snprintf(values + at, sizeof values - at, "%g,", pinned[i]);
    return values;
}

static const char *run(const char *name) {
    float *dev = NULL;
    if (cudaMalloc(&dev, sizeof host) != cudaSuccess) return "cudaMalloc failed";
    if (!strcmp(name, "race") || !strcmp(name, "barrier")) {
        neighbour_kernel<<<4, N>>>(dev, !strcmp(name, "barrier"));
    } else if (!strcmp(name, "divergent")) {
        divergent_barrier_kernel<<<1, 32>>>(dev);
    } else if (!strcmp(name, "shuffle")) {
        warp_sum_kernel<<<1, 64>>>(dev);
    } else if (!strcmp(name, "smem_without_opt_in") || !strcmp(name, "smem_opted_in")) {
        const int bytes = 64 * 1024;
        if (!strcmp(name, "smem_opted_in")) {
            cudaError_t e = cudaFuncSetAttribute(dynamic_smem_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
            if (e != cudaSuccess) return cudaGetErrorString(e);
        }
        dynamic_smem_kernel<<<1, N, bytes>>>(dev);
    } else if (!strcmp(name, "host_pointer")) {
        fill_kernel<<<1, N>>>(host);
    } else if (!strcmp(name, "huge_block")) {
        fill_kernel<<<1, 2048>>>(dev);
    } else if (!strncmp(name, "graph", 5) || strstr(name, "_in_capture")) {
        return graph_case(dev, name);
    } else if (!strcmp(name, "copy_direction")) {
        static float other[N];
        return cudaGetErrorString(cudaMemcpy(other, host, sizeof other, cudaMemcpyHostToDevice));
    } else {
        return "unknown case";
    }
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) e = cudaDeviceSynchronize();
    if (e == cudaSuccess) e = cudaMemcpy(host, dev, sizeof host, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) return cudaGetErrorString(e);
    static char values[4096];
    int at = 0;
    const int n = !strcmp(name, "race") || !strcmp(name, "barrier") ? 4 * N : N;
    for (int i = 0; i < n && at < (int)sizeof values - 32; i++) at += snprintf(values + at, sizeof values - at, "%g,", host[i]);
    return values;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    printf("%s %s\n", argv[1], run(argv[1]));
    return 0;
}

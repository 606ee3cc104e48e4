/* cuda_graph.cu - CUDA graphs for C callers (cuda_memory.h): one decode
 * step's ~500 launches recorded once and replayed with one launch. Each
 * step is captured again (the host calls the same launchers, which only
 * record) and the instantiated graph is updated in place when only
 * parameters changed (positions, segment counts, grid sizes): llama.cpp's
 * way, cheaper than instantiating per step and simpler than keeping every
 * per-step scalar in device memory. */
#include <cuda_runtime.h>
#include <stdlib.h>

#include "cuda_memory.h"
#include "kernels_cuda.h"

extern "C" {
#include "status.h"
}

struct kvs_cuda_graph {
    cudaGraphExec_t exec;
};

/* A graph call failed: the caller runs the step launch by launch, so the
 * error must not stay behind as the runtime's last error (the next launch's
 * check would report it as its own). */
static kvs_status graph_fail(cudaError_t e, const char *what) {
    cudaGetLastError();
    return kvs_cuda_fail(e, what);
}

kvs_status kvs_cuda_capture_begin(void *stream) {
    /* thread-local: another thread's unrelated CUDA calls do not break it */
    const cudaError_t e = cudaStreamBeginCapture((cudaStream_t)stream, cudaStreamCaptureModeThreadLocal);
    return e == cudaSuccess ? KVS_OK : graph_fail(e, "cudaStreamBeginCapture");
}

kvs_status kvs_cuda_capture_end(void *stream, kvs_cuda_graph **exec) {
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture((cudaStream_t)stream, &graph);
    if (e != cudaSuccess) {
        if (graph) cudaGraphDestroy(graph);
        return graph_fail(e, "cudaStreamEndCapture");
    }
    kvs_cuda_graph *g = *exec;
    if (!g) {
        g = (kvs_cuda_graph *)calloc(1, sizeof *g);
        if (!g) {
            cudaGraphDestroy(graph);
            return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate a CUDA graph");
        }
        *exec = g;
    }
    if (g->exec) {
        cudaGraphExecUpdateResultInfo info;
        if (cudaGraphExecUpdate(g->exec, graph, &info) == cudaSuccess) {
            cudaGraphDestroy(graph);
            return KVS_OK;
        }
        cudaGetLastError(); /* another shape of step: instantiate it afresh */
        cudaGraphExecDestroy(g->exec);
        g->exec = NULL;
    }
    e = cudaGraphInstantiate(&g->exec, graph, 0);
    cudaGraphDestroy(graph);
    if (e != cudaSuccess) {
        g->exec = NULL;
        return graph_fail(e, "cudaGraphInstantiate");
    }
    return KVS_OK;
}

kvs_status kvs_cuda_graph_launch(kvs_cuda_graph *exec, void *stream) {
    if (!exec || !exec->exec) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "no instantiated CUDA graph to launch");
    const cudaError_t e = cudaGraphLaunch(exec->exec, (cudaStream_t)stream);
    return e == cudaSuccess ? KVS_OK : graph_fail(e, "cudaGraphLaunch");
}

void kvs_cuda_graph_free(kvs_cuda_graph *exec) {
    if (!exec) return;
    if (exec->exec) cudaGraphExecDestroy(exec->exec);
    free(exec);
}

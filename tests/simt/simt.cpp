/* tests/simt/simt.cpp - the SIMT emulator's runtime (cuda_runtime.h): the
 * CUDA runtime calls native/src/*.cu makes, over host memory, and kernel
 * launches run thread by thread on fibers.
 *
 * A launch runs its blocks one after another (in the order SIMT_ORDER asks).
 * Within a block every thread is a fiber with its own stack; a fiber runs
 * until it finishes, reaches __syncthreads (it waits until every thread of
 * the block has arrived) or shuffles within its warp (it waits for the
 * warp's 32 lanes). Threads that do not all reach the same barrier, or a
 * warp whose lanes do not all shuffle, stop the launch with an error
 * instead of hanging. Between two barriers the threads run in the order
 * SIMT_ORDER says - forward, reverse, or shuffled by a seed - so a race on
 * shared memory (a thread reading what another writes in the same phase)
 * gives different results under different orders.
 *
 * Checks a GPU would make (or fault on): device pointers are what cudaMalloc
 * returned (the registry), copies go the direction they say, kernel pointer
 * arguments are device memory, a block has at most 1024 threads, dynamic
 * shared memory stays within 48 KiB unless the kernel opted in (and within
 * the device's 227 KiB). New device memory and dynamic shared memory are
 * filled with NaN bytes, as a GPU gives garbage. A failed check prints
 * "simt: ..." on stderr and becomes the CUDA error a GPU would return. */
#include <immintrin.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <vector>

#include "cuda_runtime.h"

#if !defined(__x86_64__)
#error "the SIMT emulator switches fibers with x86-64 code (tests/simt.py skips elsewhere)"
#endif

namespace simt {

Self self;

/* ---- errors ------------------------------------------------------------------- */

static std::mutex lock;
static cudaError_t last_error = cudaSuccess;   /* cleared by cudaGetLastError */
static cudaError_t sticky_error = cudaSuccess; /* a kernel's fault: every later call returns it */

static cudaError_t fail(cudaError_t e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static cudaError_t fail(cudaError_t e, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "simt: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    if (last_error == cudaSuccess) last_error = e;
    return e;
}

static void fault(cudaError_t e, const char *fmt, const char *detail) {
    fprintf(stderr, "simt: ");
    fprintf(stderr, fmt, detail);
    fprintf(stderr, "\n");
    if (sticky_error == cudaSuccess) sticky_error = e;
}

/* ---- device memory -------------------------------------------------------------- */

static std::map<uintptr_t, size_t> allocations; /* start -> bytes: cudaMalloc's */
static std::map<uintptr_t, size_t> pinned;      /* cudaMallocHost's */

/* Whether [p, p + bytes) lies in one allocation of the registry. */
static bool inside(const std::map<uintptr_t, size_t> &registry, const void *p, size_t bytes) {
    std::lock_guard<std::mutex> g(lock);
    const uintptr_t a = (uintptr_t)p;
    auto it = registry.upper_bound(a);
    if (it == registry.begin()) return false;
    --it;
    return a >= it->first && a + bytes <= it->first + it->second;
}
static bool is_device(const void *p, size_t bytes) { return inside(allocations, p, bytes); }
static bool is_pinned(const void *p, size_t bytes) { return inside(pinned, p, bytes); }

static const char *where(const void *p) { return is_device(p, 1) ? "device" : "host"; }

void check_pointer(const void *kernel, int index, const void *p) {
    if (p && !is_device(p, 1) && !is_pinned(p, 1)) { /* pinned memory is mapped for kernels too */
        char detail[128];
        snprintf(detail, sizeof detail, "argument %d (%p) of kernel %p", index, p, kernel);
        fault(cudaErrorIllegalAddress, "a host pointer is handed to a kernel: %s", detail);
    }
}

/* ---- fibers ---------------------------------------------------------------------- */

enum Wait { RUNNING, AT_BARRIER, AT_SHUFFLE, DONE };

struct Fiber {
    void *sp;
    char *stack;
    int tid;
    int pos; /* its place in the block's order */
    Wait wait;
    uint64_t barrier;  /* the barrier generation it waits at */
    uint64_t shuffles; /* shuffles it has made: its warp's generation */
};

struct Warp {
    uint64_t gen[2];
    int count[2];
    int lanes; /* lanes that exist in this warp */
    unsigned char slot[2][32][8];
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<int> order; /* fibers in the order they take turns */
    const char *what;
    int n;
    int live;
    int at_barrier;
    uint64_t barrier_gen;
    void (*body)(void *);
    void *closure;
    bool broken; /* a divergent barrier or shuffle: the rest of the block is abandoned */
    void *scheduler_sp;
};

static const size_t STACK_BYTES = 256 * 1024, GUARD = 4096;
static std::vector<char *> stacks;
static Block *current_block;
static Fiber *current;
static std::vector<unsigned char> smem_buffer;

/* switch(&save_sp, new_sp): push the callee-saved registers, swap stacks, pop. */
extern "C" void simt_switch(void **save_sp, void *new_sp);
extern "C" void simt_trampoline(void);
asm(".text\n"
    ".globl simt_switch\n"
    ".type simt_switch,@function\n"
    "simt_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size simt_switch, .-simt_switch\n"
    ".globl simt_trampoline\n"
    ".type simt_trampoline,@function\n"
    "simt_trampoline:\n"
    "  andq $-16, %rsp\n"
    "  call simt_fiber_main\n"
    "  ud2\n"
    ".size simt_trampoline, .-simt_trampoline\n");

extern "C" void simt_fiber_main(void);

/* ASan follows the stack switches when told (built with -fsanitize=address:
 * device memory is then checked byte for byte by every kernel's accesses). */
#if defined(__SANITIZE_ADDRESS__)
#include <pthread.h>
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
static const void *scheduler_bottom;
static size_t scheduler_size;
static void note_scheduler_stack(void) {
    pthread_attr_t attr;
    void *bottom = NULL;
    size_t size = 0;
    pthread_getattr_np(pthread_self(), &attr);
    pthread_attr_getstack(&attr, &bottom, &size);
    pthread_attr_destroy(&attr);
    scheduler_bottom = bottom, scheduler_size = size;
}
#else
static void note_scheduler_stack(void) {}
#endif

/* Switch stacks to `to` (bottom and size of its stack for ASan; a dying
 * fiber is never switched back to). */
static void switch_stack(void **save_sp, void *to_sp, const void *to_bottom, size_t to_size, bool dying) {
#if defined(__SANITIZE_ADDRESS__)
    void *fake_stack = NULL;
    __sanitizer_start_switch_fiber(dying ? NULL : &fake_stack, to_bottom, to_size);
    simt_switch(save_sp, to_sp);
    __sanitizer_finish_switch_fiber(fake_stack, NULL, NULL);
#else
    (void)to_bottom, (void)to_size, (void)dying;
    simt_switch(save_sp, to_sp);
#endif
}

static bool can_run(const Block *b, const Fiber *f);
static void switch_away(void);
static void fault_block(Block *b, const char *fmt, const char *detail) {
    fault(cudaErrorLaunchFailure, fmt, detail);
    b->broken = true;
}

extern "C" void simt_fiber_main(void) {
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(NULL, NULL, NULL); /* a fresh fiber: its first arrival */
#endif
    Block *b = current_block;
    b->body(b->closure);
    current->wait = DONE;
    b->live--;
    if (b->at_barrier > 0) {
        char detail[96];
        snprintf(detail, sizeof detail, "%s: thread %d exits while %d wait", b->what, current->tid, b->at_barrier);
        fault_block(b, "a __syncthreads that not every thread reaches (%s)", detail);
    }
    switch_away();
    abort(); /* a finished fiber is never resumed */
}

static char *stack_of(size_t i) {
    while (stacks.size() <= i) {
        char *s = (char *)mmap(NULL, STACK_BYTES + GUARD, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (s == MAP_FAILED) {
            perror("simt: mmap of a fiber stack");
            abort();
        }
        mprotect(s, GUARD, PROT_NONE); /* an overflow faults instead of writing over the next stack */
        stacks.push_back(s);
    }
    return stacks[i];
}

static void start_fiber(Fiber *f) {
#if defined(__SANITIZE_ADDRESS__)
    /* the last fiber on this stack never returned from simt_fiber_main:
     * its frame's redzones (at the top, below the stagger) are still poisoned */
    __asan_unpoison_memory_region(f->stack + GUARD + STACK_BYTES - 16384, 16384);
#endif
    /* stacks are a multiple of 4 KiB apart: their tops are staggered, or
     * every fiber's frame would map to the same cache sets */
    const uintptr_t stagger = (uintptr_t)(f->tid * 832) % 4096;
    uintptr_t top = ((uintptr_t)f->stack + GUARD + STACK_BYTES - stagger) & ~(uintptr_t)15;
    uint64_t *sp = (uint64_t *)top;
    *--sp = 0;                          /* alignment */
    *--sp = (uint64_t)simt_trampoline;  /* where simt_switch returns to */
    for (int i = 0; i < 6; i++) *--sp = 0; /* rbp rbx r12..r15 */
    f->sp = sp;
}

/* f becomes the running thread. */
static void enter(Fiber *f) {
    current = f;
    const dim3 bd = self.block_dim;
    self.thread_idx = {(unsigned)(f->tid % bd.x), (unsigned)(f->tid / bd.x % bd.y), (unsigned)(f->tid / bd.x / bd.y)};
    f->wait = RUNNING;
}

/* The running thread blocked or finished: the next thread (in the block's
 * order, after it) that can go on runs - straight from fiber to fiber -
 * or, when none can (all finished, a deadlock, a broken block), the
 * scheduler. Returns when this thread may go on. */
static void switch_away(void) {
    Block *b = current_block;
    Fiber *me = current;
    const bool dying = me->wait == DONE;
    if (!b->broken) {
        for (int k = 1; k <= b->n; k++) {
            Fiber *f = &b->fibers[b->order[(me->pos + k) % b->n]];
            if (!can_run(b, f)) continue;
            enter(f);
            if (f != me) switch_stack(&me->sp, f->sp, f->stack + GUARD, STACK_BYTES, dying);
            return;
        }
    }
#if defined(__SANITIZE_ADDRESS__)
    switch_stack(&me->sp, b->scheduler_sp, scheduler_bottom, scheduler_size, dying);
#else
    switch_stack(&me->sp, b->scheduler_sp, NULL, 0, dying);
#endif
}

/* ---- the order threads and blocks run in -------------------------------------- */

static int order_mode(void) { /* 0 forward, 1 reverse, 2 shuffled */
    const char *o = getenv("SIMT_ORDER");
    if (!o || !strcmp(o, "forward")) return 0;
    if (!strcmp(o, "reverse")) return 1;
    return 2;
}

static std::vector<int> ordering(int n, std::mt19937 &rng) {
    std::vector<int> v(n);
    for (int i = 0; i < n; i++) v[i] = i;
    const int mode = order_mode();
    if (mode == 1) std::reverse(v.begin(), v.end());
    if (mode == 2) std::shuffle(v.begin(), v.end(), rng);
    return v;
}

static unsigned seed(void) {
    const char *o = getenv("SIMT_ORDER");
    return o && !strncmp(o, "shuffle:", 8) ? (unsigned)strtoul(o + 8, NULL, 10) : 1u;
}

/* ---- barriers and shuffles ------------------------------------------------------ */

void syncthreads(void) {
    Block *b = current_block;
    Fiber *f = current;
    f->barrier = b->barrier_gen;
    f->wait = AT_BARRIER;
    if (++b->at_barrier == b->live) { /* the last to arrive: everyone goes on */
        if (b->live != b->n) {         /* some exited before it: undefined on a GPU */
            char detail[96];
            snprintf(detail, sizeof detail, "%s: %d of %d threads exited before it", b->what, b->n - b->live, b->n);
            fault_block(b, "a __syncthreads that not every thread reaches (%s)", detail);
        }
        b->barrier_gen++;
        b->at_barrier = 0;
    }
    switch_away();
}

void shuffle_xor(unsigned mask, void *value, size_t bytes, int lane_mask) {
    Block *b = current_block;
    Fiber *f = current;
    const int lane = f->tid % 32;
    Warp *w = &b->warps[f->tid / 32];
    const unsigned all = w->lanes == 32 ? 0xffffffffu : (1u << w->lanes) - 1;
    if (mask != all || (lane ^ lane_mask) >= w->lanes) {
        char detail[96];
        snprintf(detail, sizeof detail, "mask %#x, lane %d ^ %d, %d lanes", mask, lane, lane_mask, w->lanes);
        fault_block(b, "a shuffle over lanes that do not all take part: %s", detail);
        f->wait = AT_SHUFFLE;
        switch_away(); /* to the scheduler, which abandons the block */
    }
    /* generation g of this warp's shuffles: slots alternate, and no lane can
     * be two generations ahead of another (it waits for all at each) */
    const uint64_t g = f->shuffles + 1;
    const int p = (int)(g & 1);
    if (w->gen[p] != g) {
        w->gen[p] = g;
        w->count[p] = 0;
    }
    memcpy(w->slot[p][lane], value, bytes);
    w->count[p]++;
    f->shuffles = g;
    f->wait = AT_SHUFFLE;
    switch_away();
    memcpy(value, w->slot[p][lane ^ lane_mask], bytes);
}

static bool can_run(const Block *b, const Fiber *f) {
    if (f->wait == DONE) return false;
    if (f->wait == AT_BARRIER) return b->barrier_gen != f->barrier;
    if (f->wait == AT_SHUFFLE) {
        const Warp *w = &b->warps[f->tid / 32];
        const int p = (int)(f->shuffles & 1);
        return w->gen[p] == f->shuffles && w->count[p] == w->lanes;
    }
    return true;
}

/* Run one block to its end; false when it broke (the reason is printed). */
static bool run_block(Block *b, std::mt19937 &rng) {
    const int n = b->n;
    b->order = ordering(n, rng);
    for (int i = 0; i < n; i++) {
        Fiber *f = &b->fibers[i];
        f->tid = i, f->wait = RUNNING, f->barrier = 0, f->shuffles = 0, f->stack = stack_of(i);
        start_fiber(f);
    }
    for (int i = 0; i < n; i++) b->fibers[b->order[i]].pos = i;
    for (size_t w = 0; w < b->warps.size(); w++) {
        b->warps[w] = Warp{};
        b->warps[w].lanes = std::min(32, n - (int)w * 32);
    }
    b->live = n, b->at_barrier = 0, b->barrier_gen = 1, b->broken = false;
    Fiber *first = &b->fibers[b->order[0]];
    enter(first);
    switch_stack(&b->scheduler_sp, first->sp, first->stack + GUARD, STACK_BYTES, false); /* back when none can go on */
    current = NULL;
    if (b->live > 0 && !b->broken) {
        char detail[96];
        snprintf(detail, sizeof detail, "%s: %d threads wait, %d at a barrier", b->what, b->live, b->at_barrier);
        fault_block(b, "threads wait for each other forever (%s)", detail);
    }
    return !b->broken;
}

/* ---- launches --------------------------------------------------------------------- */

static const int SM_COUNT = 4;                /* few: blocks span many work items */
static const int SMEM_OPTIN = 227 * 1024;     /* an H100/H200's per-block limit */
static const int SMEM_DEFAULT = 48 * 1024;
static std::map<const void *, int> max_dynamic_smem;

cudaError_t set_max_dynamic_smem(const void *kernel, int bytes) {
    if (bytes < 0 || bytes > SMEM_OPTIN) {
        return fail(cudaErrorInvalidValue, "cudaFuncSetAttribute: %d bytes of shared memory (limit %d)", bytes,
                    SMEM_OPTIN);
    }
    std::lock_guard<std::mutex> g(lock);
    max_dynamic_smem[kernel] = bytes;
    return cudaSuccess;
}

void *dynamic_smem(void) { return smem_buffer.data(); }

static std::mutex launch_lock; /* one launch at a time: shared memory and `self` are global */

/* The launch's configuration against a GPU's limits; false (the error
 * recorded) where a GPU would refuse it. */
static bool launchable(const KernelNode *n) {
    const dim3 grid = n->grid, block = n->block;
    const uint64_t threads = (uint64_t)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || block.z > 64) {
        fail(cudaErrorInvalidConfiguration, "kernel %p: a block of %ux%ux%u threads", n->kernel, block.x, block.y,
             block.z);
        return false;
    }
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        fail(cudaErrorInvalidConfiguration, "kernel %p: a grid of %ux%ux%u blocks", n->kernel, grid.x, grid.y, grid.z);
        return false;
    }
    int limit = SMEM_DEFAULT;
    {
        std::lock_guard<std::mutex> g(lock);
        auto it = max_dynamic_smem.find(n->kernel);
        if (it != max_dynamic_smem.end()) limit = it->second;
    }
    if (n->smem > (size_t)limit) {
        fail(cudaErrorInvalidValue, "kernel %p: %zu bytes of dynamic shared memory, the kernel may use %d", n->kernel,
             n->smem, limit);
        return false;
    }
    return true;
}

/* Every block of the launch, one after another. */
static void run_kernel(KernelNode *n) {
    std::lock_guard<std::mutex> one_at_a_time(launch_lock);
    if (sticky_error != cudaSuccess) return;
    note_scheduler_stack();
    const dim3 grid = n->grid, block = n->block;
    const uint64_t threads = (uint64_t)block.x * block.y * block.z;
    Block b;
    b.fibers.resize(threads);
    b.warps.resize((threads + 31) / 32);
    b.body = [](void *node) { ((KernelNode *)node)->run_thread(); };
    b.closure = n, b.what = "kernel", b.n = (int)threads;
    std::mt19937 rng(seed());
    const uint64_t n_blocks = (uint64_t)grid.x * grid.y * grid.z;
    std::vector<int> order;
    if (n_blocks <= (1u << 22)) order = ordering((int)n_blocks, rng);
    current_block = &b;
    self.block_dim = block, self.grid_dim = grid;
    for (uint64_t k = 0; k < n_blocks; k++) {
        const uint64_t id = order.empty() ? k : (uint64_t)order[k];
        self.block_idx = {(unsigned)(id % grid.x), (unsigned)(id / grid.x % grid.y), (unsigned)(id / grid.x / grid.y)};
        smem_buffer.assign(n->smem + 16, 0xff); /* NaN floats: what the block has not written is garbage */
        if (!run_block(&b, rng)) break;
    }
    current_block = NULL;
}

/* ---- streams, capture and graphs ---------------------------------------------------
 * Streams run what they are given at once (in order: one stream at a time
 * is all the code needs). A captured stream records kernels and copies
 * instead; what a GPU refuses during a capture - work on the default
 * stream, synchronous copies, waiting, allocating - fails and invalidates
 * the capture, as cudaStreamCaptureModeThreadLocal/Global do. */

struct Node {
    std::shared_ptr<KernelNode> kernel; /* or a copy: */
    void *dst;
    const void *src;
    size_t bytes;
    cudaMemcpyKind kind;
};

} // namespace simt

struct CUstream_st {
    int unused;
};
struct CUgraph_st {
    std::vector<simt::Node> nodes;
};
struct CUgraphExec_st {
    std::vector<simt::Node> nodes;
};

namespace simt {

static cudaStream_t capturing;        /* the stream being captured, or NULL */
static bool capture_broken;           /* something refused during it */
static std::vector<Node> captured;

/* A call a capture forbids: the capture is invalidated, the call fails. */
static cudaError_t refuse_in_capture(cudaError_t e, const char *call) {
    capture_broken = true;
    return fail(e, "%s while a stream is being captured", call);
}

void submit(cudaStream_t stream, KernelNode *node) {
    std::shared_ptr<KernelNode> n(node);
    if (sticky_error != cudaSuccess || !launchable(node)) {
        if (capturing) capture_broken = true;
        return;
    }
    if (capturing && stream == capturing) {
        captured.push_back(Node{n, NULL, NULL, 0, cudaMemcpyHostToHost});
        return;
    }
    if (capturing && stream == NULL) {
        refuse_in_capture(cudaErrorStreamCaptureImplicit, "a launch on the default stream");
        return;
    }
    run_kernel(node);
}

} // namespace simt

using namespace simt;

/* ---- the runtime API --------------------------------------------------------------- */

static cudaError_t result(cudaError_t e) { return sticky_error != cudaSuccess ? sticky_error : e; }

cudaError_t cudaMalloc(void **ptr, size_t bytes) {
    *ptr = NULL;
    if (sticky_error != cudaSuccess) return sticky_error;
    if (capturing) return refuse_in_capture(cudaErrorStreamCaptureUnsupported, "cudaMalloc");
    void *p = NULL;
    if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return cudaErrorMemoryAllocation;
    memset(p, 0xff, bytes); /* fresh device memory is garbage: NaN floats */
    std::lock_guard<std::mutex> g(lock);
    allocations[(uintptr_t)p] = bytes ? bytes : 1;
    *ptr = p;
    return cudaSuccess;
}

cudaError_t cudaFree(void *ptr) {
    if (capturing) return refuse_in_capture(cudaErrorStreamCaptureUnsupported, "cudaFree");
    if (!ptr) return result(cudaSuccess);
    std::lock_guard<std::mutex> g(lock);
    auto it = allocations.find((uintptr_t)ptr);
    if (it == allocations.end()) {
        fprintf(stderr, "simt: cudaFree of %p, which cudaMalloc did not return\n", ptr);
        return cudaErrorInvalidValue;
    }
    allocations.erase(it);
    free(ptr);
    return result(cudaSuccess);
}

/* A copy's pointers are what its kind says; a captured copy's host side
 * must be pinned (a graph cannot stage pageable memory). */
static cudaError_t check_copy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, bool in_graph) {
    const bool dst_dev = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    const bool src_dev = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    if (is_device(dst, bytes) != dst_dev || is_device(src, bytes) != src_dev) {
        return fail(cudaErrorInvalidValue, "cudaMemcpy kind %d of %zu bytes from %s %p to %s %p", (int)kind, bytes,
                    where(src), src, where(dst), dst);
    }
    if (in_graph && ((!dst_dev && !is_pinned(dst, bytes)) || (!src_dev && !is_pinned(src, bytes)))) {
        return fail(cudaErrorStreamCaptureUnsupported, "a captured copy of %zu bytes between the device and pageable "
                    "host memory (%p -> %p): graphs copy from and to pinned memory", bytes, src, dst);
    }
    return cudaSuccess;
}

static cudaError_t copy_now(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return cudaSuccess;
    const cudaError_t e = check_copy(dst, src, bytes, kind, false);
    if (e == cudaSuccess) memmove(dst, src, bytes);
    return e;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind) {
    if (sticky_error != cudaSuccess) return sticky_error;
    if (capturing) return refuse_in_capture(cudaErrorStreamCaptureImplicit, "cudaMemcpy");
    return copy_now(dst, src, bytes, kind);
}

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
    if (sticky_error != cudaSuccess) return sticky_error;
    if (capturing && stream == NULL) return refuse_in_capture(cudaErrorStreamCaptureImplicit, "a copy on the default stream");
    if (capturing && stream == capturing) {
        const cudaError_t e = check_copy(dst, src, bytes, kind, true);
        if (e != cudaSuccess) capture_broken = true;
        else captured.push_back(Node{nullptr, dst, src, bytes, kind});
        return e;
    }
    return copy_now(dst, src, bytes, kind);
}

cudaError_t cudaMallocHost(void **ptr, size_t bytes) {
    *ptr = NULL;
    if (capturing) return refuse_in_capture(cudaErrorStreamCaptureUnsupported, "cudaMallocHost");
    void *p = NULL;
    if (posix_memalign(&p, 256, bytes ? bytes : 1) != 0) return cudaErrorMemoryAllocation;
    memset(p, 0xff, bytes);
    std::lock_guard<std::mutex> g(lock);
    pinned[(uintptr_t)p] = bytes ? bytes : 1;
    *ptr = p;
    return cudaSuccess;
}

cudaError_t cudaFreeHost(void *ptr) {
    if (capturing) return refuse_in_capture(cudaErrorStreamCaptureUnsupported, "cudaFreeHost");
    if (!ptr) return cudaSuccess;
    std::lock_guard<std::mutex> g(lock);
    if (!pinned.erase((uintptr_t)ptr)) {
        fprintf(stderr, "simt: cudaFreeHost of %p, which cudaMallocHost did not return\n", ptr);
        return cudaErrorInvalidValue;
    }
    free(ptr);
    return cudaSuccess;
}

cudaError_t cudaStreamCreate(cudaStream_t *s) {
    *s = new CUstream_st{0};
    return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t s) {
    if (s == capturing) return refuse_in_capture(cudaErrorStreamCaptureUnsupported, "cudaStreamDestroy of it");
    delete s;
    return cudaSuccess;
}

cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
    if (s == NULL) return fail(cudaErrorStreamCaptureUnsupported, "the default stream cannot be captured");
    const char *refuse = getenv("SIMT_REFUSE_CAPTURE"); /* a driver that cannot: the caller's fallback runs */
    if (refuse && strcmp(refuse, "0") != 0) return fail(cudaErrorStreamCaptureUnsupported, "SIMT_REFUSE_CAPTURE is set");
    if (capturing) return fail(cudaErrorStreamCaptureUnsupported, "a capture is already under way");
    capturing = s, capture_broken = false;
    captured.clear();
    return cudaSuccess;
}

cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t *graph) {
    *graph = NULL;
    if (s != capturing) return fail(cudaErrorInvalidValue, "cudaStreamEndCapture of a stream not being captured");
    capturing = NULL;
    if (capture_broken) {
        captured.clear();
        return fail(cudaErrorStreamCaptureInvalidated, "the capture was invalidated");
    }
    *graph = new CUgraph_st{std::move(captured)};
    captured.clear();
    return cudaSuccess;
}

cudaError_t cudaGraphInstantiate(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long) {
    *exec = NULL;
    if (capturing) return refuse_in_capture(cudaErrorStreamCaptureUnsupported, "cudaGraphInstantiate");
    if (!graph) return fail(cudaErrorInvalidValue, "cudaGraphInstantiate of no graph");
    *exec = new CUgraphExec_st{graph->nodes};
    return cudaSuccess;
}

/* Same nodes in the same order (kernels of the same function, copies of
 * the same kind): the parameters are taken over; else it fails. */
cudaError_t cudaGraphExecUpdate(cudaGraphExec_t exec, cudaGraph_t graph, cudaGraphExecUpdateResultInfo *info) {
    if (info) memset(info, 0, sizeof *info);
    bool same = exec && graph && exec->nodes.size() == graph->nodes.size();
    for (size_t i = 0; same && i < graph->nodes.size(); i++) {
        const Node &a = exec->nodes[i], &b = graph->nodes[i];
        same = !a.kernel == !b.kernel && (a.kernel ? a.kernel->kernel == b.kernel->kernel : a.kind == b.kind);
    }
    if (!same) {
        if (info) info->result = 1;
        if (last_error == cudaSuccess) last_error = cudaErrorGraphExecUpdateFailure;
        return cudaErrorGraphExecUpdateFailure;
    }
    exec->nodes = graph->nodes;
    return cudaSuccess;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
    if (sticky_error != cudaSuccess) return sticky_error;
    if (capturing) return refuse_in_capture(cudaErrorStreamCaptureUnsupported, "cudaGraphLaunch");
    if (!exec) return fail(cudaErrorInvalidValue, "cudaGraphLaunch of no graph");
    (void)s;
    for (const Node &n : exec->nodes) {
        if (n.kernel) run_kernel(n.kernel.get());
        else memmove(n.dst, n.src, n.bytes);
    }
    return result(cudaSuccess);
}

cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
    delete graph;
    return cudaSuccess;
}

cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
    delete exec;
    return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
    const cudaError_t e = last_error != cudaSuccess ? last_error : sticky_error;
    last_error = cudaSuccess;
    return e;
}

const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureImplicit: return "operation would make the legacy stream depend on a capturing blocking stream";
    case cudaErrorGraphExecUpdateFailure: return "the graph update was not performed because it included changes which violated constraints specific to instantiated graph update";
    default: return "unknown error";
    }
}

cudaError_t cudaGetDeviceCount(int *count) {
    *count = 1;
    return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? result(cudaSuccess) : cudaErrorInvalidValue; }
cudaError_t cudaGetDevice(int *device) {
    *device = 0;
    return result(cudaSuccess);
}

cudaError_t cudaDeviceGetAttribute(int *value, cudaDeviceAttr attr, int device) {
    if (device != 0) return cudaErrorInvalidValue;
    if (attr == cudaDevAttrMultiProcessorCount) *value = SM_COUNT;
    else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *value = SMEM_OPTIN;
    else return cudaErrorInvalidValue;
    return result(cudaSuccess);
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp *prop, int device) {
    if (device != 0) return cudaErrorInvalidValue;
    memset(prop, 0, sizeof *prop);
    snprintf(prop->name, sizeof prop->name, "SIMT emulator");
    prop->major = 9, prop->minor = 0, prop->multiProcessorCount = SM_COUNT;
    return cudaSuccess;
}

cudaError_t cudaDriverGetVersion(int *version) {
    *version = CUDART_VERSION;
    return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t s) {
    if (capturing && (s == capturing || s == NULL)) {
        return refuse_in_capture(cudaErrorStreamCaptureUnsupported, "cudaStreamSynchronize");
    }
    return result(cudaSuccess);
}

cudaError_t cudaDeviceSynchronize(void) {
    if (capturing) return refuse_in_capture(cudaErrorStreamCaptureUnsupported, "cudaDeviceSynchronize");
    return result(cudaSuccess);
}

/* ---- fp16 ------------------------------------------------------------------------- */

/* The conversions PTX's cvt makes, by the CPU's F16C instructions (round to
 * nearest even): independent of formats.c's bit arithmetic. */
float simt::f16_to_f32(unsigned short h) { return _cvtsh_ss(h); }
unsigned short simt::f32_to_f16(float f) { return (unsigned short)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }

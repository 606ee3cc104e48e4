/* threadpool.c - persistent worker threads for the matrix products.
 *
 * A task is split into parts that the threads claim from a shared counter:
 * on a busy desktop one of our threads is often descheduled for a whole time
 * slice, and a static split would make every other thread wait for its share.
 * Workers spin briefly on the task word before sleeping on a condition
 * variable: a decode step launches hundreds of short tasks, and waking a
 * sleeping thread costs more than most of them.
 *
 * The task word packs the generation (high 32 bits) and the next unclaimed
 * part (low 32 bits). The caller publishes a task in three steps: the word
 * becomes (next generation, CLOSED) so that nothing can be claimed, the task
 * fields are written, then the word becomes (generation, 0) with release
 * order. A worker claims a part by compare-and-swap on the word, so a claim
 * succeeds only for the generation whose fields it read; a worker that wakes
 * after its task ended finds the generation moved on and claims nothing. */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

#define SPIN_ITERATIONS 20000
#define CLOSED 0xffffffffu

typedef struct worker {
    kvs_threadpool *pool;
    pthread_t thread;
    int index;
} worker;

struct kvs_threadpool {
    int n_threads;
    worker *workers;            /* n_threads - 1 of them; the caller is thread 0 */
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    _Atomic uint64_t word;      /* generation << 32 | next part (or CLOSED) */
    atomic_int parts_done;
    atomic_int stop;
    /* the current task, valid while the word is open; atomic because a late
     * worker may read them while the next task is being set up (its claim
     * then fails) */
    _Atomic(kvs_task_fn) task;
    _Atomic(void *) arg;
    atomic_int n_parts;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static uint32_t generation_of(uint64_t word) { return (uint32_t)(word >> 32); }
static uint32_t next_of(uint64_t word) { return (uint32_t)word; }

/* Claim and run parts of the task of generation gen until none is left. */
static void run_parts(kvs_threadpool *pool, uint32_t gen, int thread) {
    const kvs_task_fn task = atomic_load_explicit(&pool->task, memory_order_relaxed);
    void *const arg = atomic_load_explicit(&pool->arg, memory_order_relaxed);
    const uint32_t n_parts = (uint32_t)atomic_load_explicit(&pool->n_parts, memory_order_relaxed);
    atomic_thread_fence(memory_order_acquire); /* fields read before the word that validates them */
    uint64_t word = atomic_load_explicit(&pool->word, memory_order_acquire);
    while (generation_of(word) == gen && next_of(word) < n_parts) {
        if (!atomic_compare_exchange_weak_explicit(&pool->word, &word, word + 1, memory_order_acq_rel,
                                                   memory_order_acquire)) {
            continue; /* word was reloaded */
        }
        task(arg, (int)next_of(word), (int)n_parts, thread);
        atomic_fetch_add_explicit(&pool->parts_done, 1, memory_order_release);
        word = atomic_load_explicit(&pool->word, memory_order_acquire);
    }
}

/* An open task of a generation other than seen, or stop. */
static int has_new_task(kvs_threadpool *pool, uint32_t seen, uint64_t *word) {
    *word = atomic_load_explicit(&pool->word, memory_order_acquire);
    return atomic_load(&pool->stop) || (generation_of(*word) != seen && next_of(*word) != CLOSED);
}

static uint64_t wait_for_task(kvs_threadpool *pool, uint32_t seen) {
    uint64_t word;
    for (int i = 0; i < SPIN_ITERATIONS; i++) {
        if (has_new_task(pool, seen, &word)) return word;
        cpu_relax();
    }
    pthread_mutex_lock(&pool->mutex);
    while (!has_new_task(pool, seen, &word)) pthread_cond_wait(&pool->wake, &pool->mutex);
    pthread_mutex_unlock(&pool->mutex);
    return word;
}

static void *worker_main(void *arg) {
    worker *w = arg;
    kvs_threadpool *pool = w->pool;
    uint32_t seen = 0;
    for (;;) {
        const uint64_t word = wait_for_task(pool, seen);
        if (atomic_load(&pool->stop)) break;
        seen = generation_of(word);
        run_parts(pool, seen, w->index);
    }
    return NULL;
}

kvs_status kvs_threadpool_create(int n_threads, kvs_threadpool **out) {
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "n_threads must be in 1..1024, got %d", n_threads);
    }
    kvs_threadpool *pool = calloc(1, sizeof *pool);
    if (!pool) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the thread pool");
    pool->n_threads = n_threads;
    pthread_mutex_init(&pool->mutex, NULL);
    pthread_cond_init(&pool->wake, NULL);
    atomic_store(&pool->word, (uint64_t)CLOSED); /* generation 0, nothing to claim */
    if (n_threads > 1) {
        pool->workers = calloc((size_t)n_threads - 1, sizeof *pool->workers);
        if (!pool->workers) {
            kvs_threadpool_free(pool);
            return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate %d workers", n_threads - 1);
        }
    }
    for (int i = 1; i < n_threads; i++) {
        worker *w = &pool->workers[i - 1];
        w->pool = pool;
        w->index = i;
        if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
            pool->n_threads = i; /* only the started workers get joined */
            kvs_threadpool_free(pool);
            return kvs_fail(KVS_ERR_INTERNAL, "cannot start worker thread %d of %d", i, n_threads);
        }
    }
    *out = pool;
    return KVS_OK;
}

void kvs_threadpool_free(kvs_threadpool *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mutex);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);
    for (int i = 1; i < pool->n_threads; i++) pthread_join(pool->workers[i - 1].thread, NULL);
    pthread_cond_destroy(&pool->wake);
    pthread_mutex_destroy(&pool->mutex);
    free(pool->workers);
    free(pool);
}

int kvs_threadpool_size(const kvs_threadpool *pool) { return pool->n_threads; }

void kvs_threadpool_run(kvs_threadpool *pool, kvs_task_fn task, void *arg) {
    if (pool->n_threads == 1) {
        task(arg, 0, 1, 0);
        return;
    }
    const uint32_t gen = generation_of(atomic_load(&pool->word)) + 1;
    atomic_store_explicit(&pool->word, (uint64_t)gen << 32 | CLOSED, memory_order_relaxed);
    atomic_thread_fence(memory_order_seq_cst); /* closed before the fields change */
    const int n_parts = KVS_PARTS_PER_THREAD * pool->n_threads;
    atomic_store_explicit(&pool->task, task, memory_order_relaxed);
    atomic_store_explicit(&pool->arg, arg, memory_order_relaxed);
    atomic_store_explicit(&pool->n_parts, n_parts, memory_order_relaxed);
    atomic_store_explicit(&pool->parts_done, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool->mutex);
    atomic_store_explicit(&pool->word, (uint64_t)gen << 32, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);
    run_parts(pool, gen, 0);
    /* every part is claimed; wait for the ones still running: spin first
     * (they finish within microseconds), then yield so a worker that was
     * descheduled mid-part on a busy machine gets the core back */
    for (int spins = 0; atomic_load_explicit(&pool->parts_done, memory_order_acquire) < n_parts; spins++) {
        if (spins < SPIN_ITERATIONS) cpu_relax();
        else sched_yield();
    }
}

void kvs_split_range(int64_t n, int i, int n_parts, int64_t *begin, int64_t *end) {
    int64_t per = (n + n_parts - 1) / n_parts;
    int64_t b = per * i;
    int64_t e = b + per;
    *begin = b < n ? b : n;
    *end = e < n ? e : n;
}

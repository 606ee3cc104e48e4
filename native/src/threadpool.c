/* threadpool.c - persistent worker threads for the matrix products.
 * Workers spin briefly on a generation counter before sleeping on a condition
 * variable: a decode step launches hundreds of short tasks, and waking a
 * sleeping thread costs more than most of them. */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

#define SPIN_ITERATIONS 20000

typedef struct worker {
    kvs_threadpool *pool;
    pthread_t thread;
    int index;
} worker;

struct kvs_threadpool {
    int n_threads;
    worker *workers;          /* n_threads - 1 of them; the caller is thread 0 */
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    atomic_int generation;    /* bumped once per task */
    atomic_int n_done;        /* workers finished with the current task */
    atomic_int stop;
    kvs_task_fn task;
    void *arg;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int wait_for_task(kvs_threadpool *pool, int seen) {
    for (int i = 0; i < SPIN_ITERATIONS; i++) {
        int gen = atomic_load_explicit(&pool->generation, memory_order_acquire);
        if (gen != seen || atomic_load(&pool->stop)) return gen;
        cpu_relax();
    }
    pthread_mutex_lock(&pool->mutex);
    while (atomic_load(&pool->generation) == seen && !atomic_load(&pool->stop)) {
        pthread_cond_wait(&pool->wake, &pool->mutex);
    }
    pthread_mutex_unlock(&pool->mutex);
    return atomic_load(&pool->generation);
}

static void *worker_main(void *arg) {
    worker *w = arg;
    kvs_threadpool *pool = w->pool;
    int seen = 0;
    for (;;) {
        seen = wait_for_task(pool, seen);
        if (atomic_load(&pool->stop)) break;
        pool->task(pool->arg, w->index, pool->n_threads);
        atomic_fetch_add_explicit(&pool->n_done, 1, memory_order_release);
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
        task(arg, 0, 1);
        return;
    }
    pool->task = task;
    pool->arg = arg;
    atomic_store(&pool->n_done, 0);
    pthread_mutex_lock(&pool->mutex);
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);
    task(arg, 0, pool->n_threads);
    /* spin first (workers finish within microseconds), then yield so a worker
     * that was descheduled on a busy machine gets the core back */
    for (int spins = 0; atomic_load_explicit(&pool->n_done, memory_order_acquire) < pool->n_threads - 1; spins++) {
        if (spins < SPIN_ITERATIONS) cpu_relax();
        else sched_yield();
    }
}

void kvs_split_range(int64_t n, int ith, int nth, int64_t *begin, int64_t *end) {
    int64_t per = (n + nth - 1) / nth;
    int64_t b = per * ith;
    int64_t e = b + per;
    *begin = b < n ? b : n;
    *end = e < n ? e : n;
}

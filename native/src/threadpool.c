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
 * after its task ended finds the generation moved on and claims nothing.
 *
 * A part claimed by a thread that is then descheduled still holds up the
 * caller for the rest of that thread's time slice. When the machine is busy
 * that happens on most tasks, and two threads sharing a core with another
 * process end up slower than one thread alone. So the caller watches how long
 * it waits for such stragglers: after repeated stalls it runs the next tasks
 * alone (the workers go to sleep), then tries the pool again, and doubles its
 * time alone while the stalls go on. Measured on 2 cores (README): a quiet
 * machine stalls a few times in 70,000 tasks and never goes alone; with one
 * busy process it stalls every ~200 tasks. */
#include "threadpool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "status.h"

#define SPIN_ITERATIONS 20000
#define CLOSED 0xffffffffu
/* A wait for stragglers longer than this is a stall: a descheduled thread
 * holds its part for a time slice (milliseconds), a quiet wait lasts microseconds. */
#define STALL_NS 1000000
/* Tasks run alone after a stall: doubled while stalls continue, up to the max. */
#define STALL_WINDOW 1024
#define STALLS_TO_GO_SOLO 3
#define SOLO_TASKS_MIN 256
#define SOLO_TASKS_MAX 16384

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
    /* the caller's fallback on a busy machine (used by the caller only) */
    int solo_left;          /* tasks still to run alone                      */
    int solo_length;        /* the next time alone, after another stall      */
    int tasks_since_stall;
    int window_tasks, window_stalls; /* stalls among the last tasks */
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static uint32_t generation_of(uint64_t word) { return (uint32_t)(word >> 32); }
static uint32_t next_of(uint64_t word) { return (uint32_t)word; }

/* Claim and run parts of the task of generation gen until none is left;
 * returns how many this thread ran. */
static int run_parts(kvs_threadpool *pool, uint32_t gen, int thread) {
    int ran = 0;
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
        ran++;
        word = atomic_load_explicit(&pool->word, memory_order_acquire);
    }
    return ran;
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
        (void)run_parts(pool, seen, w->index);
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
    pool->solo_length = SOLO_TASKS_MIN;
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

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* After a wait of waited_ns for stragglers: a stall is a wait longer than
 * STALL_NS and than two of the caller's own parts (a worker merely finishing
 * a long part is none). STALLS_TO_GO_SOLO stalls within STALL_WINDOW tasks
 * mean the machine is busy, not that one thread was interrupted once: the
 * caller then goes alone for a while. */
static void note_wait(kvs_threadpool *pool, int64_t waited_ns, int64_t part_ns) {
    if (++pool->window_tasks >= STALL_WINDOW) pool->window_tasks = pool->window_stalls = 0;
    if (waited_ns < STALL_NS || waited_ns < 2 * part_ns) {
        /* a long quiet stretch: the next stall starts from the shortest time alone */
        if (++pool->tasks_since_stall > 4 * SOLO_TASKS_MAX) pool->solo_length = SOLO_TASKS_MIN;
        return;
    }
    pool->tasks_since_stall = 0;
    if (++pool->window_stalls < STALLS_TO_GO_SOLO) return;
    pool->window_tasks = pool->window_stalls = 0;
    pool->solo_left = pool->solo_length;
    pool->solo_length = pool->solo_length * 2 < SOLO_TASKS_MAX ? pool->solo_length * 2 : SOLO_TASKS_MAX;
}

void kvs_threadpool_run(kvs_threadpool *pool, kvs_task_fn task, void *arg) {
    if (pool->n_threads == 1) {
        task(arg, 0, 1, 0);
        return;
    }
    if (pool->solo_left > 0) {
        pool->solo_left--;
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
    const int64_t t_start = now_ns();
    const int ran = run_parts(pool, gen, 0);
    /* every part is claimed; wait for the ones still running: spin first
     * (they finish within microseconds), then yield so a worker that was
     * descheduled mid-part on a busy machine gets the core back */
    const int64_t t0 = now_ns();
    for (int spins = 0; atomic_load_explicit(&pool->parts_done, memory_order_acquire) < n_parts; spins++) {
        if (spins < SPIN_ITERATIONS) cpu_relax();
        else sched_yield();
    }
    note_wait(pool, now_ns() - t0, ran ? (t0 - t_start) / ran : 0);
}

void kvs_split_range(int64_t n, int i, int n_parts, int64_t *begin, int64_t *end) {
    int64_t per = (n + n_parts - 1) / n_parts;
    int64_t b = per * i;
    int64_t e = b + per;
    *begin = b < n ? b : n;
    *end = e < n ? e : n;
}

/* threadpool.h - private: a persistent pool that runs one task, split into
 * parts, on all threads. */
#ifndef KVS_THREADPOOL_H
#define KVS_THREADPOOL_H

#include "kvsink.h"

typedef struct kvs_threadpool kvs_threadpool;

/* A task is called once per part, part in [0, n_parts), on some thread;
 * `thread` (in [0, n_threads)) indexes that thread's scratch. */
typedef void (*kvs_task_fn)(void *arg, int part, int n_parts, int thread);

/* n_threads counts the caller, which works as thread 0. */
kvs_status kvs_threadpool_create(int n_threads, kvs_threadpool **out);
void kvs_threadpool_free(kvs_threadpool *pool);
int kvs_threadpool_size(const kvs_threadpool *pool);

/* Run every part of task(arg, ...) and return when all have finished. The
 * threads take parts from a shared counter (KVS_PARTS_PER_THREAD per thread),
 * so a thread that runs late, descheduled on a busy machine, leaves its parts
 * to the others instead of stalling them. */
void kvs_threadpool_run(kvs_threadpool *pool, kvs_task_fn task, void *arg);

#define KVS_PARTS_PER_THREAD 4

/* The half-open range [*begin, *end) of n items that part i of n_parts takes. */
void kvs_split_range(int64_t n, int i, int n_parts, int64_t *begin, int64_t *end);

#endif

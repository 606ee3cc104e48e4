/* threadpool.h - private: a persistent pool that runs one task on all threads. */
#ifndef KVS_THREADPOOL_H
#define KVS_THREADPOOL_H

#include "kvsink.h"

typedef struct kvs_threadpool kvs_threadpool;

/* A task is called once per thread with its index ith in [0, nth). */
typedef void (*kvs_task_fn)(void *arg, int ith, int nth);

/* n_threads counts the caller, which works as thread 0. */
kvs_status kvs_threadpool_create(int n_threads, kvs_threadpool **out);
void kvs_threadpool_free(kvs_threadpool *pool);
int kvs_threadpool_size(const kvs_threadpool *pool);

/* Run task(arg, ith, nth) on every thread; returns when all have finished. */
void kvs_threadpool_run(kvs_threadpool *pool, kvs_task_fn task, void *arg);

/* The half-open range [*begin, *end) of n items that thread ith of nth takes. */
void kvs_split_range(int64_t n, int ith, int nth, int64_t *begin, int64_t *end);

#endif

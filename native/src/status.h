/* status.h - private: recording the thread-local last-error message. */
#ifndef KVS_STATUS_H
#define KVS_STATUS_H

#include "kvsink.h"

#if defined(__GNUC__)
#  define KVS_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#  define KVS_PRINTF(f, a)
#endif

#ifdef __cplusplus
extern "C" { /* the CUDA sources (C++) record failures too */
#endif

/* Record the reason for a failure and return `status`, so callers write
 * `return kvs_fail(KVS_ERR_FORMAT, "tensor '%s' ...", name);`. */
kvs_status kvs_fail(kvs_status status, const char *fmt, ...) KVS_PRINTF(2, 3);

/* Forget the previous failure (at the start of public calls). */
void kvs_clear_error(void);

#ifdef __cplusplus
}
#endif

#endif

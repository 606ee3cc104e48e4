/* status.c - one status enum plus a thread-local last-error message. */
#include "status.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char last_error[1024];

kvs_status kvs_fail(kvs_status status, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, args);
    va_end(args);
    return status;
}

void kvs_clear_error(void) { last_error[0] = '\0'; }

const char *kvs_last_error(void) { return last_error; }

int32_t kvs_abi_version(void) { return KVS_ABI_VERSION; }

const char *kvs_status_string(kvs_status status) {
    switch (status) {
    case KVS_OK: return "ok";
    case KVS_ERR_INVALID_ARGUMENT: return "invalid argument";
    case KVS_ERR_IO: return "I/O error";
    case KVS_ERR_FORMAT: return "format error";
    case KVS_ERR_UNSUPPORTED: return "unsupported";
    case KVS_ERR_OUT_OF_MEMORY: return "out of memory";
    case KVS_ERR_CONTEXT_FULL: return "context full";
    case KVS_ERR_INTERNAL: return "internal error";
    case KVS_ERR_CANCELLED: return "cancelled";
    }
    return "unknown status";
}

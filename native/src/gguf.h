/* gguf.h - private: typed metadata and tensor lookups for the model loader.
 *
 * Convention: `get` needs the key (or tensor) to exist with a usable type and
 * fails with KVS_ERR_FORMAT naming it; `find` accepts a missing key and then
 * yields the default, but still fails when the key exists with a bad value.
 * Integer getters accept any integer metadata type whose value fits the
 * target; float getters accept float32 and float64.
 */
#ifndef KVS_GGUF_H
#define KVS_GGUF_H

#include "kvsink.h"

kvs_status kvs_gguf_get_u32(const kvs_gguf *gguf, const char *key, uint32_t *out);
kvs_status kvs_gguf_get_i32(const kvs_gguf *gguf, const char *key, int32_t *out);
kvs_status kvs_gguf_get_u64(const kvs_gguf *gguf, const char *key, uint64_t *out);
kvs_status kvs_gguf_get_f32(const kvs_gguf *gguf, const char *key, float *out);
kvs_status kvs_gguf_get_bool(const kvs_gguf *gguf, const char *key, int *out);
/* The bytes of a STRING value (not NUL-terminated; they live in the mapping). */
kvs_status kvs_gguf_get_string(const kvs_gguf *gguf, const char *key,
                               const char **str, uint64_t *len);
/* An ARRAY whose elements have type elem_type (-1: any element type). */
kvs_status kvs_gguf_get_array(const kvs_gguf *gguf, const char *key, int32_t elem_type,
                              kvs_gguf_kv_info *out);

kvs_status kvs_gguf_find_u32(const kvs_gguf *gguf, const char *key, uint32_t def,
                             uint32_t *out);
kvs_status kvs_gguf_find_f32(const kvs_gguf *gguf, const char *key, float def, float *out);
kvs_status kvs_gguf_find_bool(const kvs_gguf *gguf, const char *key, int def, int *out);

/* A tensor by name; KVS_ERR_FORMAT "missing tensor 'name'" when absent. */
kvs_status kvs_gguf_get_tensor(const kvs_gguf *gguf, const char *name,
                               kvs_gguf_tensor_info *out);

/* Drop the whole pages of bytes [data, data + size) of the mapping from
 * memory; a later read faults them back from the file (the mapping is
 * read-only, so no page holds anything but file contents). A range outside
 * the mapping is left alone. */
void kvs_gguf_drop_pages(const kvs_gguf *gguf, const void *data, uint64_t size);

/* Name of a metadata value type ("uint32"), "unknown" for others. */
const char *kvs_gguf_type_name(int32_t type);

#endif

/* types.h - private: the block layout (elements and bytes per block) of each
 * supported tensor type. Kernels live in formats.h; this is just sizes, so the
 * GGUF reader can validate tensor byte sizes without knowing any kernel. */
#ifndef KVS_TYPES_H
#define KVS_TYPES_H

#include <stdint.h>

typedef struct kvs_type_layout_info {
    int32_t type;        /* kvs_type id */
    const char *name;    /* "Q4_K" */
    int64_t block_elems; /* elements per block */
    int64_t block_bytes; /* bytes per block    */
} kvs_type_layout_info;

/* Layout of a type id, or NULL when we do not support it. */
const kvs_type_layout_info *kvs_type_layout_find(int32_t type);

#endif

/* types.c - sizes and names of the supported tensor types. */
#include "types.h"

#include "blocks.h"
#include "kvsink.h"
#include "status.h"

static const kvs_type_layout_info layouts[] = {
    {KVS_TYPE_F32, "F32", 1, 4},
    {KVS_TYPE_F16, "F16", 1, 2},
    {KVS_TYPE_BF16, "BF16", 1, 2},
    {KVS_TYPE_Q4_0, "Q4_0", QK4_0, sizeof(block_q4_0)},
    {KVS_TYPE_Q4_1, "Q4_1", QK4_1, sizeof(block_q4_1)},
    {KVS_TYPE_Q5_0, "Q5_0", QK5_0, sizeof(block_q5_0)},
    {KVS_TYPE_Q5_1, "Q5_1", QK5_1, sizeof(block_q5_1)},
    {KVS_TYPE_Q8_0, "Q8_0", QK8_0, sizeof(block_q8_0)},
    {KVS_TYPE_Q2_K, "Q2_K", QK_K, sizeof(block_q2_K)},
    {KVS_TYPE_Q3_K, "Q3_K", QK_K, sizeof(block_q3_K)},
    {KVS_TYPE_Q4_K, "Q4_K", QK_K, sizeof(block_q4_K)},
    {KVS_TYPE_Q5_K, "Q5_K", QK_K, sizeof(block_q5_K)},
    {KVS_TYPE_Q6_K, "Q6_K", QK_K, sizeof(block_q6_K)},
};

const kvs_type_layout_info *kvs_type_layout_find(int32_t type) {
    for (size_t i = 0; i < sizeof layouts / sizeof layouts[0]; i++) {
        if (layouts[i].type == type) return &layouts[i];
    }
    return NULL;
}

kvs_status kvs_type_layout(int32_t type, int64_t *block_elems, int64_t *block_bytes) {
    const kvs_type_layout_info *info = kvs_type_layout_find(type);
    if (!info) return kvs_fail(KVS_ERR_UNSUPPORTED, "unsupported tensor type id %d", (int)type);
    if (block_elems) *block_elems = info->block_elems;
    if (block_bytes) *block_bytes = info->block_bytes;
    return KVS_OK;
}

const char *kvs_type_name(int32_t type) {
    const kvs_type_layout_info *info = kvs_type_layout_find(type);
    return info ? info->name : NULL;
}

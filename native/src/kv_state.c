/* kv_state.c - saving and restoring a KV cache as it is: sink rows, quantized
 * blocks and the window, byte for byte, so a restored session continues
 * exactly as the saved one would have (and a q4 cache saves about a third
 * of an f16 one).
 *
 * Layout (host byte order; the GGUF reader assumes little-endian as well):
 *   header   "KVSC", u32 version, u64 payload bytes, u32 CRC-32 of the payload
 *            (zlib's polynomial), u32 zero
 *   payload  geometry: i32 x GEOMETRY_FIELDS (must equal the loading cache's)
 *            counters: i32 x COUNTER_FIELDS
 *            sinks:  n_sinks x (i32 position, f32 score), their K rows, their V rows
 *            blocks, oldest first: n_blocks x (i32 start, u64 sink mask), then each
 *                    block's (layer, head) K and V bytes as the cache holds them for
 *                    the layers of the block ring, then for the local layers (kept
 *                    in a ring of their own) those of the newest n_local blocks
 *            window: n_win x f32 sink score, their K rows, their V rows
 * Loading checks the header, the checksum, the geometry and every invariant the
 * attention code relies on (positions, counts, masks) before it copies anything:
 * a state that is refused leaves the cache as it was.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "kv_cache.h"
#include "kv_cache_internal.h"
#include "status.h"

#define STATE_MAGIC "KVSC"
#define STATE_VERSION 1u
#define HEADER_BYTES 24
#define GEOMETRY_FIELDS 16
#define COUNTER_FIELDS 8
#define BLOCK_HEADER_BYTES 12 /* i32 start + u64 mask */
/* Positions of a restored cache stay far from int32 overflow as it grows. */
#define STATE_MAX_POSITION (1 << 30)

/* ---- CRC-32 (the polynomial of zlib.crc32, so tools can check files) ---- */

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void fill_crc_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_of(const uint8_t *p, size_t n) {
    pthread_once(&crc_once, fill_crc_table);
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) c = crc_table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

/* ---- what a state holds ------------------------------------------------- */

static const char *const GEOMETRY_NAMES[GEOMETRY_FIELDS] = {
    "n_layer", "n_head_kv", "head_dim", "n_rot", "rope_neox", "type_k", "type_v", "kv_block",
    "kv_group", "kv_recent", "kv_key_per_token", "kv_rotate (keys)", "kv_rotate (values)",
    "sliding-window layers keeping only their window (swa_full 0)", "blocks sliding-window layers keep",
    "reserved",
};

static void geometry_of(const kvs_kv_cache *c, int32_t g[GEOMETRY_FIELDS]) {
    const int32_t values[GEOMETRY_FIELDS] = {
        c->n_layer, c->n_kv, c->hd, c->n_rot, c->neox, c->p.type_k, c->p.type_v, c->B,
        c->G, c->p.recent, c->p.key_per_token, c->rot_k, c->rot_v, c->n_loc, c->L, 0,
    };
    memcpy(g, values, sizeof values);
}

typedef struct counters {
    int32_t n_past, win_start, n_evicted, frontier, n_sinks, n_dropped, n_blocks;
    int32_t n_local; /* newest blocks whose local layers' data is saved */
} counters;

/* The newest blocks that still have their local layers' data: a run, since
 * local slots are taken in order (0 without local layers of their own). */
static int32_t blocks_with_local_data(const kvs_kv_cache *c) {
    int32_t n = 0;
    while (c->L > 0 && n < c->n_blocks && kv_block_has_local(c, (c->first_block + c->n_blocks - 1 - n) % c->NB)) n++;
    return n;
}

static counters counters_of(const kvs_kv_cache *c) {
    return (counters){c->n_past, c->win_start, c->n_evicted, c->frontier, c->n_sinks, c->n_dropped, c->n_blocks,
                      blocks_with_local_data(c)};
}

/* Payload bytes of a cache with these (validated) counters. */
static size_t payload_bytes(const kvs_kv_cache *c, const counters *n) {
    const size_t row = kv_token_row_bytes(c), n_win = (size_t)(n->n_past - n->win_start);
    return GEOMETRY_FIELDS * 4 + COUNTER_FIELDS * 4 + (size_t)n->n_sinks * (8 + 2 * row) +
           (size_t)n->n_blocks * (BLOCK_HEADER_BYTES + kv_block_bytes(c, c->n_glob)) +
           (size_t)n->n_local * kv_block_bytes(c, c->n_loc) + n_win * (4 + 2 * row);
}

size_t kvs_kv_cache_state_size(const kvs_kv_cache *c) {
    const counters n = counters_of(c);
    return HEADER_BYTES + payload_bytes(c, &n);
}

/* ---- saving ------------------------------------------------------------- */

static uint8_t *put(uint8_t *dst, const void *src, size_t n) {
    memcpy(dst, src, n);
    return dst + n;
}

/* put() of the cache's data, which may live on a device: the first failure
 * of a copy is kept in *st. */
static uint8_t *put_data(const kvs_kv_cache *c, uint8_t *dst, const void *src, size_t n, kvs_status *st) {
    const kvs_status copied = n > 0 ? kv_data_read(c, dst, src, n) : KVS_OK;
    if (*st == KVS_OK) *st = copied;
    return dst + n;
}

static uint8_t *put_window(const kvs_kv_cache *c, uint8_t *p, kvs_status *st) {
    const size_t row = kv_token_row_bytes(c);
    for (int32_t pos = c->win_start; pos < c->n_past; pos++) p = put(p, &c->win_score[pos % c->Wcap], 4);
    for (int32_t pos = c->win_start; pos < c->n_past; pos++) p = put_data(c, p, c->win_k + (size_t)(pos % c->Wcap) * row, row, st);
    for (int32_t pos = c->win_start; pos < c->n_past; pos++) p = put_data(c, p, c->win_v + (size_t)(pos % c->Wcap) * row, row, st);
    return p;
}

static uint8_t *put_blocks(const kvs_kv_cache *c, uint8_t *p, kvs_status *st) {
    for (int32_t k = 0; k < c->n_blocks; k++) {
        const int32_t slot = (c->first_block + k) % c->NB;
        p = put(p, &c->block_start[slot], 4);
        p = put(p, &c->block_mask[slot], 8);
    }
    const size_t bytes = kv_block_bytes(c, c->n_glob), local = kv_block_bytes(c, c->n_loc);
    for (int32_t k = 0; k < c->n_blocks; k++) {
        p = put_data(c, p, c->blocks + (size_t)((c->first_block + k) % c->NB) * bytes, bytes, st);
    }
    const int32_t n_local = blocks_with_local_data(c);
    for (int32_t k = c->n_blocks - n_local; k < c->n_blocks; k++) {
        p = put_data(c, p, c->lblocks + (size_t)c->lslot[(c->first_block + k) % c->NB] * local, local, st);
    }
    return p;
}

kvs_status kvs_kv_cache_save_state(const kvs_kv_cache *c, void *buf, size_t size, size_t *written) {
    const size_t need = kvs_kv_cache_state_size(c), row = kv_token_row_bytes(c);
    if (size < need) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "the state needs %zu bytes, the buffer has %zu", need, size);
    }
    uint8_t *payload = (uint8_t *)buf + HEADER_BYTES, *p = payload;
    int32_t geometry[GEOMETRY_FIELDS];
    geometry_of(c, geometry);
    const counters n = counters_of(c);
    p = put(p, geometry, sizeof geometry);
    p = put(p, &n, sizeof n);
    for (int32_t i = 0; i < c->n_sinks; i++) {
        p = put(p, &c->sink_pos[i], 4);
        p = put(p, &c->sink_score[i], 4);
    }
    kvs_status st = KVS_OK;
    p = put_data(c, p, c->sink_k, (size_t)c->n_sinks * row, &st);
    p = put_data(c, p, c->sink_v, (size_t)c->n_sinks * row, &st);
    p = put_blocks(c, p, &st);
    p = put_window(c, p, &st);
    if (st != KVS_OK) return st;

    const uint64_t n_payload = (uint64_t)(p - payload);
    const uint32_t crc = crc32_of(payload, (size_t)n_payload), version = STATE_VERSION, zero = 0;
    uint8_t *h = put(buf, STATE_MAGIC, 4);
    h = put(h, &version, 4);
    h = put(h, &n_payload, 8);
    h = put(h, &crc, 4);
    put(h, &zero, 4);
    *written = need;
    return KVS_OK;
}

/* ---- loading: validate everything, then copy ---------------------------- */

static kvs_status check_header(const uint8_t *buf, size_t size) {
    if (size < HEADER_BYTES || memcmp(buf, STATE_MAGIC, 4) != 0) {
        return kvs_fail(KVS_ERR_FORMAT, "not a kvsink_cpp KV state (%s)",
                        size < HEADER_BYTES ? "shorter than its header" : "no KVSC magic");
    }
    uint32_t version, crc, reserved;
    uint64_t n_payload;
    memcpy(&version, buf + 4, 4);
    memcpy(&n_payload, buf + 8, 8);
    memcpy(&crc, buf + 16, 4);
    memcpy(&reserved, buf + 20, 4);
    if (version != STATE_VERSION) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "KV state version %u; this build reads version %u", version, STATE_VERSION);
    }
    if (reserved != 0) {  /* outside the checksum: a damaged header must not pass */
        return kvs_fail(KVS_ERR_FORMAT, "KV state header is corrupted (reserved word %u)", reserved);
    }
    if (n_payload != size - HEADER_BYTES) {
        return kvs_fail(KVS_ERR_FORMAT, "KV state is %s: its header says %llu payload bytes, there are %zu",
                        n_payload > size - HEADER_BYTES ? "truncated" : "followed by extra bytes",
                        (unsigned long long)n_payload, size - HEADER_BYTES);
    }
    if (crc32_of(buf + HEADER_BYTES, size - HEADER_BYTES) != crc) {
        return kvs_fail(KVS_ERR_FORMAT, "KV state is corrupted (checksum mismatch)");
    }
    return KVS_OK;
}

static kvs_status check_geometry(const kvs_kv_cache *c, const uint8_t *p) {
    int32_t mine[GEOMETRY_FIELDS], saved[GEOMETRY_FIELDS];
    geometry_of(c, mine);
    memcpy(saved, p, sizeof saved);
    for (int i = 0; i < GEOMETRY_FIELDS; i++) {
        if (saved[i] != mine[i]) {
            return kvs_fail(KVS_ERR_INVALID_ARGUMENT,
                            "the KV state was saved with %s %d, this context has %d (load it into a context "
                            "with the same model and KV settings)", GEOMETRY_NAMES[i], saved[i], mine[i]);
        }
    }
    return KVS_OK;
}

/* The counters' own invariants, as the cache keeps them (kv_cache.c): blocks
 * run contiguously from the frontier to the window, the window is shorter
 * than recent + block, everything before the frontier is evicted or a sink. */
static kvs_status check_counters(const kvs_kv_cache *c, const counters *n) {
    const int64_t n_win = (int64_t)n->n_past - n->win_start;
    const char *bad = NULL;
    if (n->n_sinks < 0 || n->n_sinks > c->S) bad = "more sink rows than this context's sink table holds";
    else if (n->n_blocks < 0 || n->n_blocks > c->NB) bad = "more quantized blocks than this context holds";
    else if (n->n_past < 0 || n->n_past > STATE_MAX_POSITION || n->win_start < 0) bad = "positions out of range";
    else if (n_win < 0 || n_win >= (int64_t)c->p.recent + c->B) bad = "a window longer than recent + block";
    else if (n->frontier < 0 || (int64_t)n->frontier + (int64_t)n->n_blocks * c->B != n->win_start)
        bad = "blocks that do not end where the window starts";
    else if (n->n_evicted < 0 || n->n_evicted > n->frontier) bad = "more evicted tokens than positions before the frontier";
    else if (n->n_dropped < 0) bad = "bad counters";
    else if (n->n_local < 0 || n->n_local > n->n_blocks || n->n_local > c->L) bad = "more blocks of local layers than they keep";
    else if (c->L > 0 && n->n_local < n->n_blocks &&
             (int64_t)n->frontier + (int64_t)(n->n_blocks - n->n_local) * c->B > (int64_t)n->n_past - c->n_swa + 1)
        bad = "local layers without the blocks their window reaches";
    else if (!c->p.ring && n->n_past > c->n_ctx) bad = "more tokens than n_ctx (and no ring buffer)";
    if (bad) {
        return kvs_fail(KVS_ERR_FORMAT, "KV state is inconsistent: %s (n_past %d, window from %d, %d blocks, "
                        "%d sinks, frontier %d, %d evicted)", bad, n->n_past, n->win_start, n->n_blocks,
                        n->n_sinks, n->frontier, n->n_evicted);
    }
    return KVS_OK;
}

static int32_t get_i32(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

static float get_f32(const uint8_t *p) {
    float v;
    memcpy(&v, p, 4);
    return v;
}

/* Sink rows increase in position, come from committed blocks, have a score
 * (> 0; +inf pins); those before the frontier account for it with the
 * evicted tokens, the others are exactly the masked tokens of the blocks. */
static kvs_status check_sinks_and_masks(const kvs_kv_cache *c, const counters *n, const uint8_t *sinks,
                                        const uint8_t *block_headers) {
    int32_t before_frontier = 0, prev = -1;
    for (int32_t i = 0; i < n->n_sinks; i++) {
        const int32_t pos = get_i32(sinks + 8 * (size_t)i);
        const float score = get_f32(sinks + 8 * (size_t)i + 4);
        if (pos <= prev || pos >= n->win_start || !(score > 0.0f)) {
            return kvs_fail(KVS_ERR_FORMAT, "KV state is inconsistent: sink row %d (position %d, score %g)", i, pos,
                            (double)score);
        }
        prev = pos;
        if (pos < n->frontier) {
            before_frontier++;
            continue;
        }
        const int32_t k = (pos - n->frontier) / c->B;
        uint64_t mask;
        memcpy(&mask, block_headers + (size_t)k * BLOCK_HEADER_BYTES + 4, 8);
        if (!(mask >> ((pos - n->frontier) % c->B) & 1)) {
            return kvs_fail(KVS_ERR_FORMAT, "KV state is inconsistent: sink at position %d is not masked in its block", pos);
        }
    }
    if (n->frontier != n->n_evicted + before_frontier) {
        return kvs_fail(KVS_ERR_FORMAT, "KV state is inconsistent: frontier %d != %d evicted + %d sinks before it",
                        n->frontier, n->n_evicted, before_frontier);
    }
    int64_t masked = 0;
    for (int32_t k = 0; k < n->n_blocks; k++) {
        uint64_t mask;
        memcpy(&mask, block_headers + (size_t)k * BLOCK_HEADER_BYTES + 4, 8);
        if (get_i32(block_headers + (size_t)k * BLOCK_HEADER_BYTES) != n->frontier + k * c->B ||
            (c->B < 64 && mask >> c->B)) {
            return kvs_fail(KVS_ERR_FORMAT, "KV state is inconsistent: block %d (start or mask)", k);
        }
        masked += __builtin_popcountll(mask);
    }
    if (masked != n->n_sinks - before_frontier) {
        return kvs_fail(KVS_ERR_FORMAT, "KV state is inconsistent: %lld masked tokens for %d sink rows in blocks",
                        (long long)masked, n->n_sinks - before_frontier);
    }
    return KVS_OK;
}

static kvs_status check_window_scores(const counters *n, const uint8_t *scores) {
    for (int32_t t = 0; t < n->n_past - n->win_start; t++) {
        const float s = get_f32(scores + 4 * (size_t)t);
        if (!(s >= 0.0f)) {
            return kvs_fail(KVS_ERR_FORMAT, "KV state is inconsistent: window token %d has sink score %g", t, (double)s);
        }
    }
    return KVS_OK;
}

/* memcpy into the cache's data, which may live on a device (first failure kept). */
static void get_data(kvs_kv_cache *c, void *dst, const uint8_t *src, size_t n, kvs_status *st) {
    const kvs_status copied = n > 0 ? kv_data_write(c, dst, src, n) : KVS_OK;
    if (*st == KVS_OK) *st = copied;
}

static kvs_status restore(kvs_kv_cache *c, const counters *n, const uint8_t *p) {
    kvs_status st = KVS_OK;
    const size_t row = kv_token_row_bytes(c), bytes = kv_block_bytes(c, c->n_glob), local = kv_block_bytes(c, c->n_loc);
    for (int32_t i = 0; i < n->n_sinks; i++, p += 8) {
        c->sink_pos[i] = get_i32(p);
        c->sink_score[i] = get_f32(p + 4);
    }
    get_data(c, c->sink_k, p, (size_t)n->n_sinks * row, &st), p += (size_t)n->n_sinks * row;
    get_data(c, c->sink_v, p, (size_t)n->n_sinks * row, &st), p += (size_t)n->n_sinks * row;
    for (int32_t k = 0; k < n->n_blocks; k++, p += BLOCK_HEADER_BYTES) {
        c->block_start[k] = get_i32(p);
        memcpy(&c->block_mask[k], p + 4, 8);
    }
    get_data(c, c->blocks, p, (size_t)n->n_blocks * bytes, &st), p += (size_t)n->n_blocks * bytes;
    for (int32_t k = 0; k < c->NB; k++) c->lslot[k] = -1;
    for (int32_t i = 0; i < c->L; i++) c->lowner[i] = -1;
    for (int32_t i = 0; i < n->n_local; i++, p += local) { /* the newest blocks, in local slots 0.. */
        const int32_t slot = n->n_blocks - n->n_local + i;
        get_data(c, c->lblocks + (size_t)i * local, p, local, &st);
        c->lslot[slot] = i;
        c->lowner[i] = slot;
    }
    c->lnext = c->L > 0 ? n->n_local % c->L : 0;
    const int32_t n_win = n->n_past - n->win_start;
    for (int32_t t = 0; t < n_win; t++, p += 4) c->win_score[(n->win_start + t) % c->Wcap] = get_f32(p);
    for (int32_t t = 0; t < n_win; t++, p += row) get_data(c, c->win_k + (size_t)((n->win_start + t) % c->Wcap) * row, p, row, &st);
    for (int32_t t = 0; t < n_win; t++, p += row) get_data(c, c->win_v + (size_t)((n->win_start + t) % c->Wcap) * row, p, row, &st);
    c->n_past = n->n_past;
    c->n_new = 0;
    c->win_start = n->win_start;
    c->n_evicted = n->n_evicted;
    c->frontier = n->frontier;
    c->n_sinks = n->n_sinks;
    c->n_dropped = n->n_dropped;
    c->first_block = 0;
    c->n_blocks = n->n_blocks;
    if (st != KVS_OK) { /* a device copy failed half way: what the cache holds is no state at all */
        char reason[512];
        snprintf(reason, sizeof reason, "%s", kvs_last_error());
        int32_t kept;
        kvs_kv_cache_truncate(c, 0, &kept);
        return kvs_fail(st, "restoring the KV state into device memory failed, the cache is empty now: %s", reason);
    }
    return KVS_OK;
}

kvs_status kvs_kv_cache_load_state(kvs_kv_cache *c, const void *buf, size_t size) {
    const uint8_t *bytes = buf;
    kvs_status st = check_header(bytes, size);
    if (st != KVS_OK) return st;
    const uint8_t *payload = bytes + HEADER_BYTES;
    const size_t n_payload = size - HEADER_BYTES, fixed = GEOMETRY_FIELDS * 4 + COUNTER_FIELDS * 4;
    if (n_payload < fixed) return kvs_fail(KVS_ERR_FORMAT, "KV state is truncated (no room for its counters)");
    if ((st = check_geometry(c, payload)) != KVS_OK) return st;
    counters n;
    memcpy(&n, payload + GEOMETRY_FIELDS * 4, sizeof n);
    if ((st = check_counters(c, &n)) != KVS_OK) return st;
    if (payload_bytes(c, &n) != n_payload) {
        return kvs_fail(KVS_ERR_FORMAT, "KV state has %zu payload bytes; its counters need %zu", n_payload,
                        payload_bytes(c, &n));
    }
    const size_t row = kv_token_row_bytes(c);
    const uint8_t *sinks = payload + fixed;
    const uint8_t *block_headers = sinks + (size_t)n.n_sinks * (8 + 2 * row);
    const uint8_t *window = block_headers + (size_t)n.n_blocks * (BLOCK_HEADER_BYTES + kv_block_bytes(c, c->n_glob)) +
                            (size_t)n.n_local * kv_block_bytes(c, c->n_loc);
    if ((st = check_sinks_and_masks(c, &n, sinks, block_headers)) != KVS_OK) return st;
    if ((st = check_window_scores(&n, window)) != KVS_OK) return st;
    return restore(c, &n, sinks);
}

/* gguf.c - a GGUF v2/v3 reader over a read-only file mapping.
 *
 * Every count, length, dimension and offset is checked against the file size
 * (with overflow-safe arithmetic) before it is used; entry tables grow with what
 * was actually parsed, and no allocation exceeds what the file could hold.
 * Arrays of arrays are rejected as unsupported.
 */
#if !defined(_GNU_SOURCE) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* POSIX plus madvise: glibc's posix_madvise ignores DONTNEED */
#endif

#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "status.h"
#include "types.h"

#define GGUF_DEFAULT_ALIGNMENT 32
/* The GGUF specification's floor: tensor data then starts aligned for every
 * type's fields (kernels read fp16 scales and f32 values in place). */
#define GGUF_MIN_ALIGNMENT 8
#define GGUF_MAX_DIMS 4
#define GGUF_ALIGNMENT_KEY "general.alignment"
/* Longest name quoted in an error message (names are untrusted bytes). */
#define MSG_NAME_MAX 128
/* Smallest encodings of one entry, to reject absurd counts before parsing. */
#define MIN_KV_BYTES 13     /* key length 8 + type 4 + a 1-byte value */
#define MIN_TENSOR_BYTES 32 /* name length 8 + n_dims 4 + one dim 8 + type 4 + offset 8 */

typedef unsigned long long ull;
typedef long long ll;

typedef struct gguf_kv {
    uint64_t key_off, key_len;
    int32_t type, elem_type;
    uint64_t count;     /* elements; byte length for a STRING; 1 for a scalar */
    uint64_t data_off;  /* first value byte in the file */
    uint64_t *str_offs; /* array of strings: file offset of each element's length */
} gguf_kv;

typedef struct gguf_tensor {
    uint64_t name_off, name_len;
    int32_t type, n_dims;
    int64_t ne[GGUF_MAX_DIMS];
    uint64_t offset, n_bytes;
} gguf_tensor;

/* Open-addressing hash table of entry indices, for O(1) lookups and duplicates. */
typedef struct name_index {
    int64_t *slots; /* entry index, or -1 for an empty slot */
    uint64_t mask;
} name_index;

struct kvs_gguf {
    const uint8_t *base;
    uint64_t size;
    uint32_t version;
    uint64_t alignment, data_offset;
    int64_t n_kv, n_tensors;   /* entries parsed so far (all of them once open) */
    int64_t cap_kv, cap_tensors;
    gguf_kv *kvs;
    gguf_tensor *tensors;
    name_index key_index, tensor_index;
};

/* ---- little-endian reads with a position, failing with the offset ------ */

typedef struct cursor {
    const uint8_t *p;
    uint64_t size, pos;
} cursor;

static uint64_t remaining(const cursor *c) { return c->size - c->pos; }

static uint32_t load_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t load_u64(const uint8_t *p) {
    return (uint64_t)load_u32(p) | (uint64_t)load_u32(p + 4) << 32;
}

static kvs_status vneed(const cursor *c, uint64_t n, const char *fmt, va_list args) {
    if (n <= remaining(c)) return KVS_OK;
    char what[320];
    vsnprintf(what, sizeof what, fmt, args);
    return kvs_fail(KVS_ERR_FORMAT,
                    "truncated file: %s needs %llu bytes at offset %llu but the file has %llu bytes",
                    what, (ull)n, (ull)c->pos, (ull)c->size);
}

static kvs_status need(const cursor *c, uint64_t n, const char *fmt, ...) KVS_PRINTF(3, 4);
static kvs_status need(const cursor *c, uint64_t n, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    kvs_status st = vneed(c, n, fmt, args);
    va_end(args);
    return st;
}

static kvs_status read_u32(cursor *c, uint32_t *v, const char *fmt, ...) KVS_PRINTF(3, 4);
static kvs_status read_u32(cursor *c, uint32_t *v, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    kvs_status st = vneed(c, 4, fmt, args);
    va_end(args);
    if (st != KVS_OK) return st;
    *v = load_u32(c->p + c->pos);
    c->pos += 4;
    return KVS_OK;
}

static kvs_status read_u64(cursor *c, uint64_t *v, const char *fmt, ...) KVS_PRINTF(3, 4);
static kvs_status read_u64(cursor *c, uint64_t *v, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    kvs_status st = vneed(c, 8, fmt, args);
    va_end(args);
    if (st != KVS_OK) return st;
    *v = load_u64(c->p + c->pos);
    c->pos += 8;
    return KVS_OK;
}

/* A u64 length and that many bytes; *off is where the bytes start. */
static kvs_status read_string(cursor *c, uint64_t *off, uint64_t *len, const char *fmt, ...)
    KVS_PRINTF(4, 5);
static kvs_status read_string(cursor *c, uint64_t *off, uint64_t *len, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    kvs_status st = vneed(c, 8, fmt, args);
    va_end(args);
    if (st != KVS_OK) return st;
    uint64_t n = load_u64(c->p + c->pos);
    if (n > remaining(c) - 8) {
        char what[320];
        va_start(args, fmt);
        vsnprintf(what, sizeof what, fmt, args);
        va_end(args);
        return kvs_fail(KVS_ERR_FORMAT,
                        "%s: string of %llu bytes at offset %llu runs past the end of the file "
                        "(%llu bytes)", what, (ull)n, (ull)c->pos, (ull)c->size);
    }
    *off = c->pos + 8;
    *len = n;
    c->pos += 8 + n;
    return KVS_OK;
}

/* ---- small helpers ------------------------------------------------------ */

/* a * b, or 0 (failure) when it overflows uint64. */
static int mul_u64(uint64_t a, uint64_t b, uint64_t *out) {
    if (a != 0 && b > UINT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

/* Bytes of one scalar of a metadata type; 0 for STRING, ARRAY and unknown types. */
static uint64_t scalar_size(int32_t type) {
    switch (type) {
    case KVS_GGUF_UINT8: case KVS_GGUF_INT8: case KVS_GGUF_BOOL: return 1;
    case KVS_GGUF_UINT16: case KVS_GGUF_INT16: return 2;
    case KVS_GGUF_UINT32: case KVS_GGUF_INT32: case KVS_GGUF_FLOAT32: return 4;
    case KVS_GGUF_UINT64: case KVS_GGUF_INT64: case KVS_GGUF_FLOAT64: return 8;
    default: return 0;
    }
}

const char *kvs_gguf_type_name(int32_t type) {
    static const char *const names[] = {"uint8", "int8", "uint16", "int16", "uint32", "int32",
                                        "float32", "bool", "string", "array", "uint64",
                                        "int64", "float64"};
    if (type < 0 || type >= (int32_t)(sizeof names / sizeof names[0])) return "unknown";
    return names[type];
}

/* printf arguments quoting an untrusted name: "%.*s" with a bounded length. */
#define NAME_ARGS(g, off, len) (int)((len) < MSG_NAME_MAX ? (len) : MSG_NAME_MAX), \
                               (const char *)(g)->base + (off)
#define KEY_ARGS(g, kv) NAME_ARGS(g, (kv)->key_off, (kv)->key_len)
#define TNAME_ARGS(g, t) NAME_ARGS(g, (t)->name_off, (t)->name_len)

/* Room for one more entry, doubling up to the (already validated) final count. */
static kvs_status grow(void **arr, int64_t *cap, int64_t used, int64_t limit, size_t elem) {
    if (used < *cap) return KVS_OK;
    int64_t n = *cap ? *cap * 2 : 16;
    if (n > limit) n = limit;
    void *p = (uint64_t)n > SIZE_MAX / elem ? NULL : realloc(*arr, (size_t)n * elem);
    if (!p) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "out of memory for %lld GGUF entries", (ll)n);
    *arr = p;
    *cap = n;
    return KVS_OK;
}

/* ---- name index --------------------------------------------------------- */

typedef void (*name_fn)(const kvs_gguf *g, int64_t i, const uint8_t **s, uint64_t *len);

static void kv_name(const kvs_gguf *g, int64_t i, const uint8_t **s, uint64_t *len) {
    *s = g->base + g->kvs[i].key_off;
    *len = g->kvs[i].key_len;
}

static void tensor_name(const kvs_gguf *g, int64_t i, const uint8_t **s, uint64_t *len) {
    *s = g->base + g->tensors[i].name_off;
    *len = g->tensors[i].name_len;
}

/* FNV-1a: simple and good enough for key and tensor names. */
static uint64_t hash_bytes(const uint8_t *s, uint64_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (uint64_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ULL;
    return h;
}

/* The slot holding name s, or the empty slot where it would go. */
static uint64_t index_probe(const name_index *ix, const kvs_gguf *g, name_fn fn,
                            const uint8_t *s, uint64_t len) {
    uint64_t slot = hash_bytes(s, len) & ix->mask;
    for (;;) {
        int64_t i = ix->slots[slot];
        if (i < 0) return slot;
        const uint8_t *name;
        uint64_t name_len;
        fn(g, i, &name, &name_len);
        if (name_len == len && memcmp(name, s, len) == 0) return slot;
        slot = (slot + 1) & ix->mask;
    }
}

static kvs_status index_build(name_index *ix, const kvs_gguf *g, int64_t n, name_fn fn,
                              const char *what) {
    uint64_t cap = 8;
    while (cap < (uint64_t)n * 2) cap *= 2;
    ix->slots = cap > SIZE_MAX / sizeof *ix->slots ? NULL : malloc(cap * sizeof *ix->slots);
    if (!ix->slots) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "out of memory for the %s index", what);
    memset(ix->slots, 0xff, cap * sizeof *ix->slots); /* all -1 */
    ix->mask = cap - 1;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *s;
        uint64_t len;
        fn(g, i, &s, &len);
        uint64_t slot = index_probe(ix, g, fn, s, len);
        if (ix->slots[slot] >= 0) {
            return kvs_fail(KVS_ERR_FORMAT, "duplicate %s '%.*s' (entries %lld and %lld)", what,
                            (int)(len < MSG_NAME_MAX ? len : MSG_NAME_MAX), (const char *)s,
                            (ll)ix->slots[slot], (ll)i);
        }
        ix->slots[slot] = i;
    }
    return KVS_OK;
}

static int64_t index_find(const name_index *ix, const kvs_gguf *g, name_fn fn, const char *name) {
    if (!g || !name || !ix->slots) return -1;
    uint64_t len = strlen(name);
    return ix->slots[index_probe(ix, g, fn, (const uint8_t *)name, len)];
}

/* ---- header ------------------------------------------------------------- */

static kvs_status parse_header(cursor *c, kvs_gguf *g, uint64_t *n_tensors, uint64_t *n_kv) {
    if (c->size < 4) {
        return kvs_fail(KVS_ERR_FORMAT, "truncated file: %llu bytes is too short for the GGUF magic",
                        (ull)c->size);
    }
    const uint8_t *m = c->p;
    if (memcmp(m, "GGUF", 4) != 0) {
        return kvs_fail(KVS_ERR_FORMAT,
                        "not a GGUF file (magic %02x %02x %02x %02x, expected \"GGUF\")",
                        m[0], m[1], m[2], m[3]);
    }
    c->pos = 4;
    kvs_status st = read_u32(c, &g->version, "the GGUF version");
    if (st != KVS_OK) return st;
    uint32_t v = g->version;
    if (v == 1) {
        return kvs_fail(KVS_ERR_UNSUPPORTED,
                        "GGUF version 1 is not supported (only versions 2 and 3); "
                        "re-convert the model with a newer llama.cpp");
    }
    if (v != 2 && v != 3) {
        if ((v & 0xffff) == 0 && (v >> 16) != 0) {
            return kvs_fail(KVS_ERR_UNSUPPORTED,
                            "big-endian GGUF file (version field 0x%08x) is not supported", v);
        }
        return kvs_fail(KVS_ERR_UNSUPPORTED,
                        "GGUF version %u is not supported (only versions 2 and 3)", v);
    }
    if ((st = read_u64(c, n_tensors, "the tensor count")) != KVS_OK) return st;
    if ((st = read_u64(c, n_kv, "the metadata count")) != KVS_OK) return st;

    /* Each entry has a minimum size, so the remaining bytes bound both counts. */
    uint64_t rem = remaining(c);
    if (*n_kv > rem / MIN_KV_BYTES) {
        return kvs_fail(KVS_ERR_FORMAT,
                        "metadata count %llu is impossible: only %llu bytes follow the header "
                        "(truncated or corrupt file)",
                        (ull)*n_kv, (ull)rem);
    }
    if (*n_tensors > rem / MIN_TENSOR_BYTES) {
        return kvs_fail(KVS_ERR_FORMAT,
                        "tensor count %llu is impossible: only %llu bytes follow the header "
                        "(truncated or corrupt file)",
                        (ull)*n_tensors, (ull)rem);
    }
    if (*n_kv * MIN_KV_BYTES > rem - *n_tensors * MIN_TENSOR_BYTES) {
        return kvs_fail(KVS_ERR_FORMAT,
                        "metadata count %llu and tensor count %llu are impossible: only %llu "
                        "bytes follow the header (truncated or corrupt file)",
                        (ull)*n_kv, (ull)*n_tensors, (ull)rem);
    }
    return KVS_OK;
}

/* ---- metadata ----------------------------------------------------------- */

/* The elements of an array of strings, recording where each one starts. */
static kvs_status parse_string_array(cursor *c, kvs_gguf *g, gguf_kv *kv) {
    if (kv->count > remaining(c) / 8) {
        return kvs_fail(KVS_ERR_FORMAT,
                        "metadata '%.*s': array of %llu strings at offset %llu runs past the end "
                        "of the file (%llu bytes)",
                        KEY_ARGS(g, kv), (ull)kv->count, (ull)c->pos, (ull)c->size);
    }
    if (kv->count == 0) return KVS_OK;
    kv->str_offs = malloc((size_t)kv->count * sizeof *kv->str_offs);
    if (!kv->str_offs) {
        return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "out of memory for metadata '%.*s' (%llu strings)",
                        KEY_ARGS(g, kv), (ull)kv->count);
    }
    for (uint64_t j = 0; j < kv->count; j++) {
        uint64_t off, len;
        kv->str_offs[j] = c->pos;
        kvs_status st = read_string(c, &off, &len, "metadata '%.*s' element %llu",
                                    KEY_ARGS(g, kv), (ull)j);
        if (st != KVS_OK) return st;
    }
    return KVS_OK;
}

static kvs_status parse_array(cursor *c, kvs_gguf *g, gguf_kv *kv) {
    uint32_t elem_type;
    kvs_status st = read_u32(c, &elem_type, "the element type of metadata '%.*s'", KEY_ARGS(g, kv));
    if (st != KVS_OK) return st;
    if ((st = read_u64(c, &kv->count, "the length of metadata '%.*s'", KEY_ARGS(g, kv))) != KVS_OK) {
        return st;
    }
    kv->elem_type = (int32_t)elem_type;
    kv->data_off = c->pos;
    if (elem_type == KVS_GGUF_ARRAY) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "metadata '%.*s': arrays of arrays are not supported",
                        KEY_ARGS(g, kv));
    }
    if (elem_type == KVS_GGUF_STRING) return parse_string_array(c, g, kv);
    uint64_t size = scalar_size((int32_t)elem_type);
    if (size == 0) {
        return kvs_fail(KVS_ERR_FORMAT, "metadata '%.*s': unknown array element type %u",
                        KEY_ARGS(g, kv), elem_type);
    }
    if (kv->count > remaining(c) / size) {
        return kvs_fail(KVS_ERR_FORMAT,
                        "metadata '%.*s': array of %llu %s elements at offset %llu runs past the "
                        "end of the file (%llu bytes)", KEY_ARGS(g, kv), (ull)kv->count,
                        kvs_gguf_type_name((int32_t)elem_type), (ull)c->pos, (ull)c->size);
    }
    c->pos += kv->count * size;
    return KVS_OK;
}

static kvs_status parse_value(cursor *c, kvs_gguf *g, gguf_kv *kv) {
    uint32_t type;
    kvs_status st = read_u32(c, &type, "the value type of metadata '%.*s'", KEY_ARGS(g, kv));
    if (st != KVS_OK) return st;
    kv->type = kv->elem_type = (int32_t)type;
    if (type == KVS_GGUF_ARRAY) return parse_array(c, g, kv);
    if (type == KVS_GGUF_STRING) {
        return read_string(c, &kv->data_off, &kv->count, "the value of metadata '%.*s'",
                           KEY_ARGS(g, kv));
    }
    uint64_t size = scalar_size((int32_t)type);
    if (size == 0) {
        return kvs_fail(KVS_ERR_FORMAT, "metadata '%.*s' has an unknown value type %u",
                        KEY_ARGS(g, kv), type);
    }
    if ((st = need(c, size, "the value of metadata '%.*s'", KEY_ARGS(g, kv))) != KVS_OK) return st;
    kv->count = 1;
    kv->data_off = c->pos;
    c->pos += size;
    return KVS_OK;
}

static kvs_status parse_kvs(cursor *c, kvs_gguf *g, uint64_t n_kv) {
    for (uint64_t i = 0; i < n_kv; i++) {
        kvs_status st = grow((void **)&g->kvs, &g->cap_kv, g->n_kv, (int64_t)n_kv, sizeof *g->kvs);
        if (st != KVS_OK) return st;
        gguf_kv *kv = &g->kvs[g->n_kv++]; /* counted now so free() sees its str_offs */
        memset(kv, 0, sizeof *kv);
        st = read_string(c, &kv->key_off, &kv->key_len, "the key of metadata entry %llu", (ull)i);
        if (st != KVS_OK) return st;
        if ((st = parse_value(c, g, kv)) != KVS_OK) return st;
    }
    return index_build(&g->key_index, g, g->n_kv, kv_name, "metadata key");
}

/* general.alignment: a uint32 power of two, at least 8, 32 when absent. */
static kvs_status read_alignment(kvs_gguf *g) {
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t i = kvs_gguf_find_key(g, GGUF_ALIGNMENT_KEY);
    if (i < 0) return KVS_OK;
    const gguf_kv *kv = &g->kvs[i];
    if (kv->type != KVS_GGUF_UINT32) {
        return kvs_fail(KVS_ERR_FORMAT, GGUF_ALIGNMENT_KEY " must be a uint32, not %s",
                        kvs_gguf_type_name(kv->type));
    }
    uint32_t a = load_u32(g->base + kv->data_off);
    if (a == 0 || (a & (a - 1)) != 0) {
        return kvs_fail(KVS_ERR_FORMAT, GGUF_ALIGNMENT_KEY " %u is not a non-zero power of two", a);
    }
    if (a < GGUF_MIN_ALIGNMENT) {
        return kvs_fail(KVS_ERR_FORMAT,
                        GGUF_ALIGNMENT_KEY " %u is not a multiple of %d as GGUF requires (tensor data "
                        "would be misaligned for the weight formats)", a, GGUF_MIN_ALIGNMENT);
    }
    g->alignment = a;
    return KVS_OK;
}

/* ---- tensor infos ------------------------------------------------------- */

static kvs_status parse_dims(cursor *c, const kvs_gguf *g, gguf_tensor *t) {
    uint32_t n_dims;
    kvs_status st = read_u32(c, &n_dims, "the dimension count of tensor '%.*s'", TNAME_ARGS(g, t));
    if (st != KVS_OK) return st;
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS) {
        return kvs_fail(KVS_ERR_FORMAT, "tensor '%.*s' has %u dimensions (n_dims must be 1 to %d)",
                        TNAME_ARGS(g, t), n_dims, GGUF_MAX_DIMS);
    }
    t->n_dims = (int32_t)n_dims;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < n_dims; d++) {
        uint64_t ne;
        st = read_u64(c, &ne, "dimension %u of tensor '%.*s'", d, TNAME_ARGS(g, t));
        if (st != KVS_OK) return st;
        if (ne > (uint64_t)INT64_MAX) {
            return kvs_fail(KVS_ERR_FORMAT, "tensor '%.*s' dimension %u is %lld (negative)",
                            TNAME_ARGS(g, t), d, (ll)ne);
        }
        t->ne[d] = (int64_t)ne;
    }
    return KVS_OK;
}

/* Type, element count and byte size of a parsed tensor. */
static kvs_status check_shape(const kvs_gguf *g, gguf_tensor *t) {
    const kvs_type_layout_info *layout = kvs_type_layout_find(t->type);
    if (!layout) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "tensor '%.*s' has unsupported type id %d",
                        TNAME_ARGS(g, t), (int)t->type);
    }
    /* Checked dimension by dimension, like ggml, so a later 0 cannot hide an overflow. */
    int64_t n = 1;
    for (int d = 0; d < GGUF_MAX_DIMS; d++) {
        if (t->ne[d] != 0 && n > INT64_MAX / t->ne[d]) {
            return kvs_fail(KVS_ERR_FORMAT,
                            "tensor '%.*s' shape [%lld, %lld, %lld, %lld] overflows the element count",
                            TNAME_ARGS(g, t), (ll)t->ne[0], (ll)t->ne[1], (ll)t->ne[2], (ll)t->ne[3]);
        }
        n *= t->ne[d];
    }
    if (t->ne[0] % layout->block_elems != 0) {
        return kvs_fail(KVS_ERR_FORMAT,
                        "tensor '%.*s': ne[0] = %lld is not a multiple of the %s block size %lld",
                        TNAME_ARGS(g, t), (ll)t->ne[0], layout->name, (ll)layout->block_elems);
    }
    uint64_t bytes = (uint64_t)(t->ne[0] / layout->block_elems);
    int ok = mul_u64(bytes, (uint64_t)layout->block_bytes, &bytes);
    for (int d = 1; d < GGUF_MAX_DIMS && ok; d++) ok = mul_u64(bytes, (uint64_t)t->ne[d], &bytes);
    if (!ok) {
        return kvs_fail(KVS_ERR_FORMAT, "tensor '%.*s': byte size overflows 64 bits",
                        TNAME_ARGS(g, t));
    }
    t->n_bytes = bytes;
    return KVS_OK;
}

static kvs_status parse_tensor(cursor *c, const kvs_gguf *g, gguf_tensor *t, uint64_t i) {
    kvs_status st = read_string(c, &t->name_off, &t->name_len, "the name of tensor %llu", (ull)i);
    if (st != KVS_OK) return st;
    if ((st = parse_dims(c, g, t)) != KVS_OK) return st;
    uint32_t type;
    if ((st = read_u32(c, &type, "the type of tensor '%.*s'", TNAME_ARGS(g, t))) != KVS_OK) return st;
    t->type = (int32_t)type;
    if ((st = read_u64(c, &t->offset, "the offset of tensor '%.*s'", TNAME_ARGS(g, t))) != KVS_OK) {
        return st;
    }
    if (type > INT32_MAX) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "tensor '%.*s' has unsupported type id %u",
                        TNAME_ARGS(g, t), type);
    }
    return check_shape(g, t);
}

static kvs_status parse_tensors(cursor *c, kvs_gguf *g, uint64_t n_tensors) {
    for (uint64_t i = 0; i < n_tensors; i++) {
        kvs_status st = grow((void **)&g->tensors, &g->cap_tensors, g->n_tensors,
                             (int64_t)n_tensors, sizeof *g->tensors);
        if (st != KVS_OK) return st;
        gguf_tensor *t = &g->tensors[g->n_tensors++];
        memset(t, 0, sizeof *t);
        if ((st = parse_tensor(c, g, t, i)) != KVS_OK) return st;
    }
    return index_build(&g->tensor_index, g, g->n_tensors, tensor_name, "tensor name");
}

/* Each tensor's data must be aligned and lie inside the file. */
static kvs_status check_tensor_data(const kvs_gguf *g) {
    for (int64_t i = 0; i < g->n_tensors; i++) {
        const gguf_tensor *t = &g->tensors[i];
        if (t->offset % g->alignment != 0) {
            return kvs_fail(KVS_ERR_FORMAT,
                            "tensor '%.*s' offset %llu is not a multiple of the alignment %llu",
                            TNAME_ARGS(g, t), (ull)t->offset, (ull)g->alignment);
        }
        if (g->data_offset > g->size || t->offset > g->size - g->data_offset ||
            t->n_bytes > g->size - g->data_offset - t->offset) {
            /* the end, saturated, only for the message */
            uint64_t start = g->data_offset + t->offset;
            uint64_t end = start < g->data_offset || t->n_bytes > UINT64_MAX - start
                               ? UINT64_MAX : start + t->n_bytes;
            return kvs_fail(KVS_ERR_FORMAT,
                            "tensor '%.*s' data ends at %llu%s but the file has %llu bytes",
                            TNAME_ARGS(g, t), (ull)end, end == UINT64_MAX ? " (overflow)" : "",
                            (ull)g->size);
        }
    }
    return KVS_OK;
}

/* ---- open / free -------------------------------------------------------- */

static kvs_status map_file(const char *path, kvs_gguf *g) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kvs_fail(KVS_ERR_IO, "cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int err = errno;
        close(fd);
        return kvs_fail(KVS_ERR_IO, "cannot stat '%s': %s", path, strerror(err));
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return kvs_fail(KVS_ERR_IO, "cannot read '%s': not a regular file", path);
    }
    if (sb.st_size == 0) {
        close(fd);
        return kvs_fail(KVS_ERR_FORMAT, "'%s' is an empty file, not a GGUF file", path);
    }
    if ((uint64_t)sb.st_size > (uint64_t)SIZE_MAX) {
        close(fd);
        return kvs_fail(KVS_ERR_UNSUPPORTED, "'%s' is too large to map", path);
    }
    void *m = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int err = errno;
    close(fd); /* the mapping keeps the file */
    if (m == MAP_FAILED) return kvs_fail(KVS_ERR_IO, "cannot map '%s': %s", path, strerror(err));
    g->base = m;
    g->size = (uint64_t)sb.st_size;
    return KVS_OK;
}

static kvs_status parse(kvs_gguf *g) {
    cursor c = {g->base, g->size, 0};
    uint64_t n_tensors, n_kv;
    kvs_status st = parse_header(&c, g, &n_tensors, &n_kv);
    if (st == KVS_OK) st = parse_kvs(&c, g, n_kv);
    if (st == KVS_OK) st = read_alignment(g);
    if (st == KVS_OK) st = parse_tensors(&c, g, n_tensors);
    if (st != KVS_OK) return st;
    /* pos <= size < 2^63 and alignment < 2^32: no overflow. The data section may be
     * past the end of a file without tensors. */
    g->data_offset = (c.pos + g->alignment - 1) / g->alignment * g->alignment;
    return check_tensor_data(g);
}

kvs_status kvs_gguf_open(const char *path, kvs_gguf **out) {
    kvs_clear_error();
    if (!out) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_gguf_open: out is NULL");
    *out = NULL;
    if (!path) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_gguf_open: path is NULL");
    kvs_gguf *g = calloc(1, sizeof *g);
    if (!g) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "out of memory opening '%s'", path);
    kvs_status st = map_file(path, g);
    if (st == KVS_OK && (st = parse(g)) != KVS_OK) {
        char reason[1024]; /* copied: kvs_fail would format over its own buffer */
        snprintf(reason, sizeof reason, "%s", kvs_last_error());
        kvs_fail(st, "%s: %s", path, reason);
    }
    if (st != KVS_OK) {
        kvs_gguf_free(g);
        return st;
    }
    *out = g;
    return KVS_OK;
}

void kvs_gguf_free(kvs_gguf *g) {
    if (!g) return;
    for (int64_t i = 0; i < g->n_kv; i++) free(g->kvs[i].str_offs);
    free(g->kvs);
    free(g->tensors);
    free(g->key_index.slots);
    free(g->tensor_index.slots);
    if (g->base) munmap((void *)g->base, (size_t)g->size);
    free(g);
}

void kvs_gguf_drop_pages(const kvs_gguf *g, const void *data, uint64_t size) {
    const uintptr_t base = (uintptr_t)g->base, start = (uintptr_t)data;
    const long page = sysconf(_SC_PAGESIZE);
    if (page <= 0 || start < base || start - base > g->size || size > g->size - (start - base)) return;
    /* only pages wholly inside the range: neighbours may still be in use */
    const uintptr_t first = (start + (uintptr_t)page - 1) / (uintptr_t)page * (uintptr_t)page;
    const uintptr_t end = (start + size) / (uintptr_t)page * (uintptr_t)page;
    if (first < end) madvise((void *)first, end - first, MADV_DONTNEED); /* advice: failure changes nothing */
}

/* ---- accessors ---------------------------------------------------------- */

uint32_t kvs_gguf_version(const kvs_gguf *g) { return g ? g->version : 0; }
uint64_t kvs_gguf_alignment(const kvs_gguf *g) { return g ? g->alignment : 0; }
uint64_t kvs_gguf_data_offset(const kvs_gguf *g) { return g ? g->data_offset : 0; }
uint64_t kvs_gguf_file_size(const kvs_gguf *g) { return g ? g->size : 0; }
int64_t kvs_gguf_n_kv(const kvs_gguf *g) { return g ? g->n_kv : 0; }
int64_t kvs_gguf_n_tensors(const kvs_gguf *g) { return g ? g->n_tensors : 0; }

static kvs_status check_kv_index(const kvs_gguf *g, int64_t index, const void *out) {
    if (!g || !out) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "metadata lookup: NULL argument");
    if (index < 0 || index >= g->n_kv) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "metadata index %lld out of range (0..%lld)",
                        (ll)index, (ll)g->n_kv - 1);
    }
    return KVS_OK;
}

kvs_status kvs_gguf_kv(const kvs_gguf *g, int64_t index, kvs_gguf_kv_info *out) {
    kvs_status st = check_kv_index(g, index, out);
    if (st != KVS_OK) return st;
    const gguf_kv *kv = &g->kvs[index];
    out->key = (const char *)g->base + kv->key_off;
    out->key_len = kv->key_len;
    out->type = kv->type;
    out->elem_type = kv->elem_type;
    out->count = kv->count;
    int string_array = kv->type == KVS_GGUF_ARRAY && kv->elem_type == KVS_GGUF_STRING;
    out->data = string_array ? NULL : g->base + kv->data_off;
    return KVS_OK;
}

kvs_status kvs_gguf_kv_string(const kvs_gguf *g, int64_t index, uint64_t j, const char **str,
                              uint64_t *len) {
    kvs_status st = check_kv_index(g, index, str && len ? str : NULL);
    if (st != KVS_OK) return st;
    const gguf_kv *kv = &g->kvs[index];
    if (kv->type != KVS_GGUF_ARRAY || kv->elem_type != KVS_GGUF_STRING) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "metadata '%.*s' is not an array of strings",
                        KEY_ARGS(g, kv));
    }
    if (j >= kv->count) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT,
                        "element %llu out of range: metadata '%.*s' has %llu strings", (ull)j,
                        KEY_ARGS(g, kv), (ull)kv->count);
    }
    uint64_t at = kv->str_offs[j]; /* validated at open */
    *len = load_u64(g->base + at);
    *str = (const char *)g->base + at + 8;
    return KVS_OK;
}

int64_t kvs_gguf_find_key(const kvs_gguf *g, const char *key) {
    return g ? index_find(&g->key_index, g, kv_name, key) : -1;
}

kvs_status kvs_gguf_tensor(const kvs_gguf *g, int64_t index, kvs_gguf_tensor_info *out) {
    if (!g || !out) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "kvs_gguf_tensor: NULL argument");
    if (index < 0 || index >= g->n_tensors) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "tensor index %lld out of range (0..%lld)",
                        (ll)index, (ll)g->n_tensors - 1);
    }
    const gguf_tensor *t = &g->tensors[index];
    out->name = (const char *)g->base + t->name_off;
    out->name_len = t->name_len;
    out->type = t->type;
    out->n_dims = t->n_dims;
    memcpy(out->ne, t->ne, sizeof out->ne);
    out->offset = t->offset;
    out->n_bytes = t->n_bytes;
    out->data = g->base + g->data_offset + t->offset;
    return KVS_OK;
}

int64_t kvs_gguf_find_tensor(const kvs_gguf *g, const char *name) {
    return g ? index_find(&g->tensor_index, g, tensor_name, name) : -1;
}

/* ---- typed getters (gguf.h) --------------------------------------------- */

/* The entry for a required key. */
static kvs_status require_key(const kvs_gguf *g, const char *key, const gguf_kv **kv) {
    if (!g || !key) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "metadata lookup: NULL argument");
    int64_t i = kvs_gguf_find_key(g, key);
    if (i < 0) return kvs_fail(KVS_ERR_FORMAT, "missing metadata key '%s'", key);
    *kv = &g->kvs[i];
    return KVS_OK;
}

/* An integer value within [min, max], returned as its 64-bit pattern. */
static kvs_status kv_integer(const kvs_gguf *g, const gguf_kv *kv, const char *key, int64_t min,
                             uint64_t max, const char *target, uint64_t *out) {
    const uint8_t *p = g->base + kv->data_off;
    int64_t s = 0;
    uint64_t u = 0;
    int is_signed = 1;
    switch (kv->type) {
    case KVS_GGUF_UINT8: u = p[0]; is_signed = 0; break;
    case KVS_GGUF_UINT16: u = (uint64_t)p[0] | (uint64_t)p[1] << 8; is_signed = 0; break;
    case KVS_GGUF_UINT32: u = load_u32(p); is_signed = 0; break;
    case KVS_GGUF_UINT64: u = load_u64(p); is_signed = 0; break;
    case KVS_GGUF_INT8: s = (int8_t)p[0]; break;
    case KVS_GGUF_INT16: s = (int16_t)(uint16_t)(p[0] | p[1] << 8); break;
    case KVS_GGUF_INT32: s = (int32_t)load_u32(p); break;
    case KVS_GGUF_INT64: s = (int64_t)load_u64(p); break;
    default:
        return kvs_fail(KVS_ERR_FORMAT, "metadata '%s' is a %s, expected an integer", key,
                        kvs_gguf_type_name(kv->type));
    }
    if (is_signed && s < 0) {
        if (s < min) {
            return kvs_fail(KVS_ERR_FORMAT, "metadata '%s' = %lld does not fit a %s", key, (ll)s,
                            target);
        }
        *out = (uint64_t)s;
        return KVS_OK;
    }
    if (is_signed) u = (uint64_t)s;
    if (u > max) {
        return kvs_fail(KVS_ERR_FORMAT, "metadata '%s' = %llu does not fit a %s", key, (ull)u, target);
    }
    *out = u;
    return KVS_OK;
}

kvs_status kvs_gguf_get_u32(const kvs_gguf *g, const char *key, uint32_t *out) {
    const gguf_kv *kv = NULL;
    uint64_t v;
    kvs_status st = require_key(g, key, &kv);
    if (st == KVS_OK) st = kv_integer(g, kv, key, 0, UINT32_MAX, "uint32", &v);
    if (st == KVS_OK) *out = (uint32_t)v;
    return st;
}

kvs_status kvs_gguf_get_i32(const kvs_gguf *g, const char *key, int32_t *out) {
    const gguf_kv *kv = NULL;
    uint64_t v;
    kvs_status st = require_key(g, key, &kv);
    if (st == KVS_OK) st = kv_integer(g, kv, key, INT32_MIN, INT32_MAX, "int32", &v);
    if (st == KVS_OK) *out = (int32_t)(int64_t)v;
    return st;
}

kvs_status kvs_gguf_get_u64(const kvs_gguf *g, const char *key, uint64_t *out) {
    const gguf_kv *kv = NULL;
    kvs_status st = require_key(g, key, &kv);
    if (st == KVS_OK) st = kv_integer(g, kv, key, 0, UINT64_MAX, "uint64", out);
    return st;
}

kvs_status kvs_gguf_get_f32(const kvs_gguf *g, const char *key, float *out) {
    const gguf_kv *kv = NULL;
    kvs_status st = require_key(g, key, &kv);
    if (st != KVS_OK) return st;
    const uint8_t *p = g->base + kv->data_off;
    if (kv->type == KVS_GGUF_FLOAT32) {
        uint32_t bits = load_u32(p);
        memcpy(out, &bits, sizeof *out);
    } else if (kv->type == KVS_GGUF_FLOAT64) {
        uint64_t bits = load_u64(p);
        double d;
        memcpy(&d, &bits, sizeof d);
        *out = (float)d;
    } else {
        return kvs_fail(KVS_ERR_FORMAT, "metadata '%s' is a %s, expected a float", key,
                        kvs_gguf_type_name(kv->type));
    }
    return KVS_OK;
}

/* The entry for a required key of one exact type. */
static kvs_status require_typed(const kvs_gguf *g, const char *key, int32_t type,
                                const gguf_kv **kv) {
    kvs_status st = require_key(g, key, kv);
    if (st == KVS_OK && (*kv)->type != type) {
        return kvs_fail(KVS_ERR_FORMAT, "metadata '%s' is a %s, expected a %s", key,
                        kvs_gguf_type_name((*kv)->type), kvs_gguf_type_name(type));
    }
    return st;
}

kvs_status kvs_gguf_get_bool(const kvs_gguf *g, const char *key, int *out) {
    const gguf_kv *kv = NULL;
    kvs_status st = require_typed(g, key, KVS_GGUF_BOOL, &kv);
    if (st == KVS_OK) *out = g->base[kv->data_off] != 0;
    return st;
}

kvs_status kvs_gguf_get_string(const kvs_gguf *g, const char *key, const char **str,
                               uint64_t *len) {
    const gguf_kv *kv = NULL;
    kvs_status st = require_typed(g, key, KVS_GGUF_STRING, &kv);
    if (st != KVS_OK) return st;
    *str = (const char *)g->base + kv->data_off;
    *len = kv->count;
    return KVS_OK;
}

kvs_status kvs_gguf_get_array(const kvs_gguf *g, const char *key, int32_t elem_type,
                              kvs_gguf_kv_info *out) {
    const gguf_kv *kv = NULL;
    kvs_status st = require_key(g, key, &kv);
    if (st != KVS_OK) return st;
    const char *want = elem_type >= 0 ? kvs_gguf_type_name(elem_type) : "anything";
    if (kv->type != KVS_GGUF_ARRAY) {
        return kvs_fail(KVS_ERR_FORMAT, "metadata '%s' is a %s, expected an array of %s", key,
                        kvs_gguf_type_name(kv->type), want);
    }
    if (elem_type >= 0 && kv->elem_type != elem_type) {
        return kvs_fail(KVS_ERR_FORMAT, "metadata '%s' is an array of %s, expected an array of %s",
                        key, kvs_gguf_type_name(kv->elem_type), want);
    }
    return kvs_gguf_kv(g, kv - g->kvs, out);
}

/* A defaulted lookup uses its default only when the key is missing. */
static int absent(const kvs_gguf *g, const char *key) {
    return g && key && kvs_gguf_find_key(g, key) < 0;
}

kvs_status kvs_gguf_find_u32(const kvs_gguf *g, const char *key, uint32_t def, uint32_t *out) {
    if (!absent(g, key)) return kvs_gguf_get_u32(g, key, out);
    *out = def;
    return KVS_OK;
}

kvs_status kvs_gguf_find_f32(const kvs_gguf *g, const char *key, float def, float *out) {
    if (!absent(g, key)) return kvs_gguf_get_f32(g, key, out);
    *out = def;
    return KVS_OK;
}

kvs_status kvs_gguf_find_bool(const kvs_gguf *g, const char *key, int def, int *out) {
    if (!absent(g, key)) return kvs_gguf_get_bool(g, key, out);
    *out = def;
    return KVS_OK;
}

kvs_status kvs_gguf_get_tensor(const kvs_gguf *g, const char *name, kvs_gguf_tensor_info *out) {
    if (!g || !name) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "tensor lookup: NULL argument");
    int64_t i = kvs_gguf_find_tensor(g, name);
    if (i < 0) return kvs_fail(KVS_ERR_FORMAT, "missing tensor '%s'", name);
    return kvs_gguf_tensor(g, i, out);
}

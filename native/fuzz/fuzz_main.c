/* fuzz_main.c - a driver that feeds files to the GGUF reader, the model loader
 * and the session-state loader, for fuzzing under ASan+UBSan (not part of the
 * library; tests/test_fuzz.py builds it with the library sources and mutates
 * its inputs).
 *
 *   kvs_fuzz gguf FILE...                open each file, read every entry and
 *                                        tensor, load it as a model, evaluate
 *   kvs_fuzz session MODEL.gguf FILE...  load each file as a saved cache state
 *                                        into a context of each KV preset
 *   kvs_fuzz session-seeds MODEL.gguf DIR  write valid states of each preset
 *
 * One line per input with the status; exit 0 unless a sanitizer fires (they
 * abort the process) or the driver itself cannot run.
 *
 * Link with -Wl,--wrap=mmap,--wrap=munmap,--wrap=madvise: the reader's file
 * mapping is then a heap copy of exactly the file's size, so ASan reports a
 * read one byte past the end of the file, not only one past the last page.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "kvsink.h"

/* Everything read goes here, so the compiler cannot drop the reads. */
static volatile uint8_t sink;

/* ---- the reader's mapping as an exactly sized heap block ---------------- */

void *__real_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off);

/* The one mapping the reader makes: read-only, private, whole file. */
static int is_file_mapping(void *addr, int prot, int flags, int fd, off_t off) {
    return !addr && prot == PROT_READ && (flags & MAP_PRIVATE) && fd >= 0 && off == 0;
}

void *__wrap_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off) {
    if (!is_file_mapping(addr, prot, flags, fd, off)) return __real_mmap(addr, len, prot, flags, fd, off);
    void *buf = NULL;
    if (posix_memalign(&buf, 64, len ? len : 1) != 0) {
        errno = ENOMEM;
        return MAP_FAILED;
    }
    for (size_t done = 0; done < len;) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)done);
        if (n <= 0) {
            free(buf);
            errno = n < 0 ? errno : EIO;
            return MAP_FAILED;
        }
        done += (size_t)n;
    }
    return buf;
}

/* Only the reader unmaps, and only what it mapped (ASan also intercepts
 * mmap for its own use, but never through these wrapped references). */
int __wrap_munmap(void *addr, size_t len) {
    (void)len;
    free(addr);
    return 0;
}

/* Dropping pages of a heap block would zero it under ASan's feet: skip the advice. */
int __wrap_madvise(void *addr, size_t len, int advice) {
    (void)addr, (void)len, (void)advice;
    return 0;
}

/* ---- shared: KV presets, one-line errors, state round trips ------------- */

/* KV settings: a model from the gguf mode runs with one of them (chosen by
 * the file's size, so a rerun of one input picks the same); the session mode's
 * seeds are saved with each, and every input is loaded into each, as a state
 * loads only into a cache of its own geometry. */
typedef struct preset {
    const char *name;
    int32_t type_k, type_v, key_per_token, ring, n_ctx, sink_policy, matmul;
} preset;

static const preset PRESETS[] = {
    {"f16", KVS_KV_F16, KVS_KV_F16, 0, 0, 256, KVS_SINKS_KVSINK, KVS_MATMUL_F32},
    {"f32", KVS_KV_F32, KVS_KV_F16, 0, 0, 256, KVS_SINKS_KVSINK, KVS_MATMUL_Q8}, /* f32 window rows */
    {"q8", KVS_KV_Q8, KVS_KV_Q8, 0, 0, 256, KVS_SINKS_KVSINK, KVS_MATMUL_Q8},
    {"q4", KVS_KV_Q4, KVS_KV_Q4, 0, 0, 256, KVS_SINKS_KVSINK, KVS_MATMUL_Q8},    /* 64-token blocks, rotated */
    {"q2q3-ring", KVS_KV_Q2, KVS_KV_Q3, 1, 1, 64, KVS_SINKS_PFN, KVS_MATMUL_Q8}, /* evicts, pinned sinks */
};
#define N_PRESETS (int)(sizeof PRESETS / sizeof PRESETS[0])

static kvs_status create_preset(kvs_model *m, const preset *p, kvs_context **ctx) {
    kvs_context_params cp = kvs_context_default_params();
    cp.n_ctx = p->n_ctx;
    cp.n_batch = 64;
    cp.n_threads = 1;
    cp.matmul = p->matmul;
    cp.type_k = p->type_k;
    cp.type_v = p->type_v;
    cp.kv_key_per_token = p->key_per_token;
    cp.kv_ring = p->ring;
    cp.sink_policy = p->sink_policy;
    cp.sink_pfn = 4;
    return kvs_context_create(m, &cp, ctx);
}

/* The last error on one line: it quotes the input's bytes, and the driver
 * counts lines to tell which input a crash interrupted. */
static const char *error_line(void) {
    static char line[1024];
    snprintf(line, sizeof line, "%s", kvs_last_error());
    for (char *c = line; *c; c++) {
        if ((unsigned char)*c < 0x20 || *c == 0x7f) *c = '?';
    }
    return line;
}

/* A state that loads must save back to the same bytes: nothing was lost or
 * reinterpreted (returns 0 when it does not). */
static int saves_back(const kvs_context *ctx, const uint8_t *buf, size_t size) {
    size_t need = kvs_context_state_size(ctx), written = 0;
    uint8_t *again = malloc(need ? need : 1);
    int same = again && kvs_context_save_state(ctx, again, need, &written) == KVS_OK &&
               written == size && memcmp(again, buf, size) == 0;
    free(again);
    return same;
}

/* Save the cache, load it back, and save again: both saves must be equal. */
static int state_round_trip(kvs_context *ctx) {
    size_t need = kvs_context_state_size(ctx), written = 0;
    uint8_t *buf = malloc(need ? need : 1);
    kvs_status st = buf ? kvs_context_save_state(ctx, buf, need, &written) : KVS_ERR_OUT_OF_MEMORY;
    if (st == KVS_OK) st = kvs_context_load_state(ctx, buf, written);
    int rc = st == KVS_OK ? (saves_back(ctx, buf, written) ? KVS_OK : -1) : -1;
    free(buf);
    return rc;
}

/* ---- gguf mode ---------------------------------------------------------- */

static void touch(const void *p, uint64_t n) {
    const uint8_t *b = p;
    for (uint64_t i = 0; i < n; i++) sink ^= b[i];
}

/* Bytes of one element of a numeric metadata type (0: string/array/unknown). */
static uint64_t elem_size(int32_t type) {
    static const uint8_t sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    return type >= 0 && type < (int32_t)sizeof sizes ? sizes[type] : 0;
}

/* Find a name through the index, as the loader does; names with a NUL cannot be asked for. */
static int64_t lookup(int64_t (*find)(const kvs_gguf *, const char *), const kvs_gguf *g,
                      const char *name, uint64_t len) {
    if (memchr(name, 0, len)) return -2;
    char *z = malloc(len + 1);
    if (!z) return -2;
    memcpy(z, name, len);
    z[len] = '\0';
    int64_t i = find(g, z);
    free(z);
    return i;
}

static int walk_kv(const kvs_gguf *g, int64_t i) {
    kvs_gguf_kv_info kv;
    if (kvs_gguf_kv(g, i, &kv) != KVS_OK) return 0;
    touch(kv.key, kv.key_len);
    int64_t found = lookup(kvs_gguf_find_key, g, kv.key, kv.key_len);
    if (found != -2 && found != i) return 0; /* keys are unique: the index must agree */
    if (kv.type == KVS_GGUF_ARRAY && kv.elem_type == KVS_GGUF_STRING) {
        for (uint64_t j = 0; j < kv.count; j++) {
            const char *s;
            uint64_t len;
            if (kvs_gguf_kv_string(g, i, j, &s, &len) != KVS_OK) return 0;
            touch(s, len);
        }
    } else if (kv.type == KVS_GGUF_STRING) {
        touch(kv.data, kv.count);
    } else {
        touch(kv.data, kv.count * elem_size(kv.elem_type)); /* counts were checked at open */
    }
    return 1;
}

static int walk_tensor(const kvs_gguf *g, int64_t i) {
    kvs_gguf_tensor_info t;
    if (kvs_gguf_tensor(g, i, &t) != KVS_OK) return 0;
    touch(t.name, t.name_len);
    int64_t found = lookup(kvs_gguf_find_tensor, g, t.name, t.name_len);
    if (found != -2 && found != i) return 0;
    if (t.n_bytes > 0) { /* the data's bounds, without reading whole weights */
        touch(t.data, 1);
        touch((const uint8_t *)t.data + t.n_bytes - 1, 1);
    }
    return 1;
}

/* Open and walk; returns the open status, or -1 when an accessor disagreed with open. */
static int walk_gguf(const char *path) {
    kvs_gguf *g = NULL;
    kvs_status st = kvs_gguf_open(path, &g);
    if (st != KVS_OK) return st;
    int ok = 1;
    for (int64_t i = 0; ok && i < kvs_gguf_n_kv(g); i++) ok = walk_kv(g, i);
    for (int64_t i = 0; ok && i < kvs_gguf_n_tensors(g); i++) ok = walk_tensor(g, i);
    kvs_gguf_free(g);
    return ok ? KVS_OK : -1;
}

/* Load as a model, evaluate the first and last token ids, and check that the
 * cache's state survives a save and load (odd shapes meet the state code).
 * Returns a status, or -1 when the state did not round-trip. */
static int run_model(const char *path, const preset *p) {
    kvs_model *m = NULL;
    kvs_model_params mp = kvs_model_default_params();
    kvs_status st = kvs_model_load(path, &mp, &m);
    if (st != KVS_OK) return st;
    kvs_context *ctx = NULL;
    st = create_preset(m, p, &ctx);
    int rc = st;
    if (st == KVS_OK) {
        int32_t tokens[2] = {0, kvs_model_n_vocab(m) - 1};
        rc = st = kvs_context_eval(ctx, tokens, 2, 0, NULL);
    }
    if (st == KVS_OK) rc = state_round_trip(ctx);
    kvs_context_free(ctx);
    kvs_model_free(m);
    return rc;
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    long n = f && fseek(f, 0, SEEK_END) == 0 ? ftell(f) : 0;
    if (f) fclose(f);
    return n < 0 ? 0 : n;
}

static int fuzz_gguf(int n, char **paths) {
    for (int i = 0; i < n; i++) {
        int opened = walk_gguf(paths[i]);
        if (opened == -1) {
            fprintf(stderr, "%s: an accessor failed on an opened file: %s\n", paths[i], kvs_last_error());
            return 1;
        }
        int model = opened == KVS_OK ? run_model(paths[i], &PRESETS[file_size(paths[i]) % N_PRESETS]) : -2;
        if (model == -1) {
            fprintf(stderr, "%s: the model's KV state does not save, load and save back the same: %s\n",
                    paths[i], kvs_last_error());
            return 1;
        }
        printf("%s open=%d model=%d %s\n", paths[i], opened, model, error_line());
    }
    return 0;
}

/* ---- session mode ------------------------------------------------------- */

/* The whole file in a block of exactly its size (NULL on failure). */
static uint8_t *read_file(const char *path, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    uint8_t *buf = NULL;
    long n = fseek(f, 0, SEEK_END) == 0 ? ftell(f) : -1;
    if (n >= 0 && fseek(f, 0, SEEK_SET) == 0 && (buf = malloc(n ? (size_t)n : 1)) &&
        fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

/* Load into one context: a refusal is fine; a loaded cache must round-trip
 * and take one more token. Returns the load status, or -1 on a broken round trip. */
static int load_into(kvs_context *ctx, kvs_model *m, const uint8_t *buf, size_t size) {
    kvs_status st = kvs_context_load_state(ctx, buf, size);
    if (st == KVS_OK) {
        if (!saves_back(ctx, buf, size)) return -1;
        int32_t token = kvs_model_n_vocab(m) - 1;
        kvs_context_eval(ctx, &token, 1, 0, NULL); /* may be CONTEXT_FULL: a full cache is valid */
    }
    kvs_context_set_n_past(ctx, 0); /* the next input starts from an empty cache either way */
    return st;
}

static int load_one(kvs_context **ctxs, kvs_model *m, const char *path) {
    size_t size;
    uint8_t *buf = read_file(path, &size);
    if (!buf) {
        fprintf(stderr, "cannot read %s\n", path);
        return 1;
    }
    char statuses[4 * N_PRESETS + 1] = "", deepest[1024] = "";
    for (int i = 0; i < N_PRESETS; i++) {
        int st = load_into(ctxs[i], m, buf, size);
        if (st == -1) {
            fprintf(stderr, "%s: loaded into '%s' but does not save back to the same bytes\n", path,
                    PRESETS[i].name);
            free(buf);
            return 1;
        }
        snprintf(statuses + strlen(statuses), 5, i ? ",%d" : "%d", st);
        /* the reason from a context of the state's own geometry, past the mismatch */
        if (st == KVS_OK) {
            snprintf(deepest, sizeof deepest, "loaded into '%s'", PRESETS[i].name);
        } else if (st != KVS_ERR_INVALID_ARGUMENT || !deepest[0]) {
            snprintf(deepest, sizeof deepest, "%s", error_line());
        }
    }
    printf("%s load=%s %s\n", path, statuses, deepest);
    free(buf);
    return 0;
}

/* Evaluate tokens from..from+n-1 of a fixed pseudo-random sequence, in batches. */
static kvs_status eval_tokens(kvs_context *ctx, kvs_model *m, int32_t from, int32_t n) {
    const uint32_t n_vocab = (uint32_t)kvs_model_n_vocab(m);
    int32_t tokens[64];
    kvs_status st = KVS_OK;
    for (int32_t done = 0; done < n && st == KVS_OK;) {
        int32_t k = n - done < 64 ? n - done : 64;
        for (int32_t i = 0; i < k; i++) tokens[i] = (int32_t)((uint32_t)(from + done + i) * 2654435761u % n_vocab);
        st = kvs_context_eval(ctx, tokens, k, 0, NULL);
        done += k;
    }
    return st;
}

static int save_seed(const kvs_context *ctx, const char *dir, const char *name, int32_t n_past) {
    size_t need = kvs_context_state_size(ctx), written;
    uint8_t *buf = malloc(need);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s-%d.kvsc", dir, name, n_past);
    FILE *f = buf && kvs_context_save_state(ctx, buf, need, &written) == KVS_OK ? fopen(path, "wb") : NULL;
    int ok = f && fwrite(buf, 1, written, f) == written;
    if (f && fclose(f) != 0) ok = 0;
    free(buf);
    if (!ok) fprintf(stderr, "cannot save %s: %s\n", path, kvs_last_error());
    return ok;
}

/* Seeds: each preset's state at a few lengths: the window alone, then blocks
 * and sink rows, and evictions in the ring. */
static int make_seeds(kvs_context **ctxs, kvs_model *m, const char *dir) {
    static const int32_t lengths[] = {1, 7, 40, 100};
    for (int i = 0; i < N_PRESETS; i++) {
        int32_t done = 0;
        for (size_t k = 0; k < sizeof lengths / sizeof lengths[0]; k++) {
            if (eval_tokens(ctxs[i], m, done, lengths[k] - done) != KVS_OK ||
                !save_seed(ctxs[i], dir, PRESETS[i].name, lengths[k])) {
                fprintf(stderr, "seed '%s': %s\n", PRESETS[i].name, kvs_last_error());
                return 2;
            }
            done = lengths[k];
        }
    }
    return 0;
}

static int fuzz_session(const char *model_path, const char *seed_dir, int n, char **paths) {
    kvs_model *m = NULL;
    kvs_model_params mp = kvs_model_default_params();
    kvs_context *ctxs[N_PRESETS] = {0};
    kvs_status st = kvs_model_load(model_path, &mp, &m);
    for (int i = 0; i < N_PRESETS && st == KVS_OK; i++) st = create_preset(m, &PRESETS[i], &ctxs[i]);
    int rc = 2;
    if (st != KVS_OK) {
        fprintf(stderr, "%s: %s\n", model_path, kvs_last_error());
    } else if (seed_dir) {
        rc = make_seeds(ctxs, m, seed_dir);
    } else {
        rc = 0;
        for (int i = 0; i < n && rc == 0; i++) rc = load_one(ctxs, m, paths[i]);
    }
    for (int i = 0; i < N_PRESETS; i++) kvs_context_free(ctxs[i]);
    kvs_model_free(m);
    return rc;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* the lines before a crash say which input it was */
    if (argc >= 2 && strcmp(argv[1], "gguf") == 0) return fuzz_gguf(argc - 2, argv + 2);
    if (argc >= 3 && strcmp(argv[1], "session") == 0) return fuzz_session(argv[2], NULL, argc - 3, argv + 3);
    if (argc == 4 && strcmp(argv[1], "session-seeds") == 0) return fuzz_session(argv[2], argv[3], 0, NULL);
    fprintf(stderr, "usage: %s gguf FILE... | session MODEL.gguf FILE... | session-seeds MODEL.gguf DIR\n",
            argv[0]);
    return 2;
}

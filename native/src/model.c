/* model.c - loading a llama-family model: hyper-parameters from GGUF metadata,
 * weights bound in place to the file mapping, every shape checked. */
#include "model.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "formats.h"
#include "gguf.h"
#include "repack.h"
#include "status.h"
#include "types.h"

/* ---- hyper-parameters --------------------------------------------------- */

/* An integer key in [lo, hi]: required when def < 0, else def when absent. */
static kvs_status read_int(const kvs_gguf *g, const char *key, int64_t def, int64_t lo, int64_t hi,
                           int32_t *out) {
    uint32_t v;
    kvs_status st = def < 0 ? kvs_gguf_get_u32(g, key, &v) : kvs_gguf_find_u32(g, key, (uint32_t)def, &v);
    if (st != KVS_OK) return st;
    if (v < lo || v > hi) {
        return kvs_fail(KVS_ERR_FORMAT, "metadata '%s' = %u is outside [%lld, %lld]", key, v,
                        (long long)lo, (long long)hi);
    }
    *out = (int32_t)v;
    return KVS_OK;
}

static kvs_status read_float(const kvs_gguf *g, const char *key, float def, float *out) {
    kvs_status st = kvs_gguf_find_f32(g, key, def, out);
    if (st == KVS_OK && !isfinite(*out)) return kvs_fail(KVS_ERR_FORMAT, "metadata '%s' is not finite", key);
    return st;
}

/* Copy a string value into buf ("" when the key is absent). */
static kvs_status read_string(const kvs_gguf *g, const char *key, char *buf, size_t size) {
    const char *str;
    uint64_t len;
    buf[0] = '\0';
    if (kvs_gguf_find_key(g, key) < 0) return KVS_OK;
    kvs_status st = kvs_gguf_get_string(g, key, &str, &len);
    if (st != KVS_OK) return st;
    size_t n = len < size - 1 ? (size_t)len : size - 1;
    memcpy(buf, str, n);
    buf[n] = '\0';
    return KVS_OK;
}

/* The architectures this loader reads, by their general.architecture names. */
static const struct {
    const char *name;
    kvs_arch arch;
} ARCHS[] = {{"llama", KVS_ARCH_LLAMA}, {"qwen2", KVS_ARCH_QWEN2}, {"qwen3", KVS_ARCH_QWEN3},
             {"phi3", KVS_ARCH_PHI3},   {"gemma3", KVS_ARCH_GEMMA3}};
#define N_ARCHS (sizeof ARCHS / sizeof ARCHS[0])

static kvs_status read_arch(kvs_model *m) {
    char arch[64];
    kvs_status st = read_string(m->gguf, "general.architecture", arch, sizeof arch);
    if (st != KVS_OK) return st;
    if (arch[0] == '\0') return kvs_fail(KVS_ERR_FORMAT, "metadata 'general.architecture' is missing");
    for (size_t i = 0; i < N_ARCHS; i++) {
        if (strcmp(arch, ARCHS[i].name) == 0) {
            m->arch = ARCHS[i].arch;
            return KVS_OK;
        }
    }
    char names[128] = "";
    for (size_t i = 0; i < N_ARCHS; i++) {
        strncat(names, i ? ", " : "", sizeof names - strlen(names) - 1);
        strncat(names, ARCHS[i].name, sizeof names - strlen(names) - 1);
    }
    return kvs_fail(KVS_ERR_UNSUPPORTED, "architecture '%s' is not supported (%s are)", arch, names);
}

static const char *arch_name(kvs_arch arch) {
    for (size_t i = 0; i < N_ARCHS; i++) {
        if (ARCHS[i].arch == arch) return ARCHS[i].name;
    }
    return "llama";
}

#define ARCH_KEY(buf, suffix) (snprintf(buf, sizeof buf, "%s.%s", arch, suffix), buf)

/* RoPE scaling: linear (positions divided by the factor), or Llama 3.1's
 * ("llama3"), whose per-frequency factors the converter stores in
 * rope_freqs.weight (its rope.scaling.factor made them: not a linear scale).
 * Others (yarn, longrope and Phi-3's rope_factors_long/short) change the
 * rotation in ways this runtime does not implement: refused, never ignored. */
static kvs_status read_rope_scaling(kvs_model *m, const char *arch) {
    char key[128], type[32];
    kvs_hparams *hp = &m->hp;
    float factor = 0.0f;
    kvs_status st = read_string(m->gguf, ARCH_KEY(key, "rope.scaling.type"), type, sizeof type);
    if (st != KVS_OK) return st;
    if ((st = read_float(m->gguf, ARCH_KEY(key, "rope.scaling.factor"), 0.0f, &factor)) != KVS_OK) return st;
    if (factor == 0.0f) {  /* older files: rope.scale_linear */
        if ((st = read_float(m->gguf, ARCH_KEY(key, "rope.scale_linear"), 0.0f, &factor)) != KVS_OK) return st;
        if (factor != 0.0f && type[0] == '\0') strcpy(type, "linear");
    }
    hp->rope_freq_scale = 1.0f;
    if (type[0] != '\0' && strcmp(type, "none") != 0 && strcmp(type, "linear") != 0 && strcmp(type, "llama3") != 0) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "rope scaling type '%s' is not supported (linear and llama3 are)", type);
    }
    if (kvs_gguf_find_tensor(m->gguf, "rope_factors_long.weight") >= 0 ||
        kvs_gguf_find_tensor(m->gguf, "rope_factors_short.weight") >= 0) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "LongRoPE scaling (tensors 'rope_factors_long.weight' and "
                        "'rope_factors_short.weight', e.g. Phi-3 128k) is not supported");
    }
    if (strcmp(type, "llama3") == 0) {
        if (m->arch != KVS_ARCH_LLAMA) {
            return kvs_fail(KVS_ERR_UNSUPPORTED, "rope scaling type 'llama3' is supported for llama files only, "
                            "not %s", arch);
        }
        if (kvs_gguf_find_tensor(m->gguf, "rope_freqs.weight") < 0) {
            return kvs_fail(KVS_ERR_FORMAT, "rope scaling type 'llama3' needs its frequency factors, "
                            "tensor 'rope_freqs.weight', which the file lacks");
        }
        return KVS_OK;
    }
    if (strcmp(type, "linear") != 0) return KVS_OK;
    if (factor <= 0.0f) return kvs_fail(KVS_ERR_FORMAT, "linear rope scaling needs a positive factor, got %g", factor);
    hp->rope_freq_scale = 1.0f / factor;
    return KVS_OK;
}

/* Longest window a file may declare: far beyond any context, and small enough
 * that window + block arithmetic stays in int32 (windows of 2^18 exist:
 * Phi-4-mini's covers its whole context). */
#define MAX_WINDOW (1 << 30)

/* attention.sliding_window_pattern: a period, or one bool per layer (1:
 * local) as newer converters may write; absent, gemma3's period of 6. */
static kvs_status read_swa_pattern(kvs_model *m, const char *arch) {
    char key[128];
    kvs_gguf_kv_info info;
    const int64_t index = kvs_gguf_find_key(m->gguf, ARCH_KEY(key, "attention.sliding_window_pattern"));
    kvs_status st = index < 0 ? KVS_OK : kvs_gguf_kv(m->gguf, index, &info);
    if (st != KVS_OK) return st;
    if (index < 0 || info.type != KVS_GGUF_ARRAY) return read_int(m->gguf, key, 6, 0, 4096, &m->hp.swa_period);
    if (info.elem_type != KVS_GGUF_BOOL || info.count != (uint64_t)m->hp.n_layer) {
        return kvs_fail(KVS_ERR_FORMAT, "metadata '%s' must be a period or %d bools (one per layer)", key,
                        m->hp.n_layer);
    }
    m->hp.swa_layers = info.data; /* one byte per bool, in the mapping */
    return KVS_OK;
}

/* Gemma 3 as llama.cpp reads it: every 6th layer global, the others local
 * (sliding window, RoPE base 10000 unscaled); queries scaled by
 * 1/sqrt(query_pre_attn_scalar), which the GGUF does not carry: head_dim,
 * except the 27B (62 layers) where it is n_embd / n_head; an optional final
 * logit soft-cap. A file without a window has no local layers. */
static kvs_status read_gemma3(kvs_model *m, const char *arch) {
    const kvs_gguf *g = m->gguf;
    kvs_hparams *hp = &m->hp;
    char key[128];
    kvs_status st;
    if ((st = read_int(g, ARCH_KEY(key, "attention.sliding_window"), 0, 0, MAX_WINDOW, &hp->n_swa))) return st;
    if ((st = read_swa_pattern(m, arch))) return st;
    if ((st = read_float(g, ARCH_KEY(key, "rope.freq_base_swa"), 10000.0f, &hp->rope_freq_base_swa))) return st;
    if (hp->rope_freq_base_swa <= 0.0f) return kvs_fail(KVS_ERR_FORMAT, "rope.freq_base_swa must be positive");
    if ((st = read_float(g, ARCH_KEY(key, "final_logit_softcapping"), 0.0f, &hp->final_softcap))) return st;
    if (hp->final_softcap < 0.0f) return kvs_fail(KVS_ERR_FORMAT, "final_logit_softcapping must be >= 0");
    hp->rope_freq_scale_swa = 1.0f;
    hp->rope_neox = 1;
    hp->ffn_gelu = 1;
    hp->embd_scale = sqrtf((float)hp->n_embd);
    const int32_t query_pre_attn = hp->n_layer == 62 ? hp->n_embd / hp->n_head : hp->head_dim;
    if (query_pre_attn < 1) return kvs_fail(KVS_ERR_FORMAT, "gemma3 needs n_embd >= head_count");
    hp->attn_scale = 1.0f / sqrtf((float)query_pre_attn);
    return KVS_OK;
}

/* Local layers of the other architectures rotate exactly like the global
 * ones. llama (Mistral's convention) and phi3 may declare a window that then
 * applies to every layer: key p is hidden from query m when m - p >= n_swa. */
static kvs_status read_window(kvs_model *m, const char *arch) {
    kvs_hparams *hp = &m->hp;
    char key[128];
    hp->rope_freq_base_swa = hp->rope_freq_base;
    hp->rope_freq_scale_swa = hp->rope_freq_scale;
    hp->rope_factors_swa = 1;
    hp->swa_period = 0;
    if (m->arch != KVS_ARCH_LLAMA && m->arch != KVS_ARCH_PHI3) return KVS_OK;
    return read_int(m->gguf, ARCH_KEY(key, "attention.sliding_window"), 0, 0, MAX_WINDOW, &hp->n_swa);
}

static kvs_status read_hparams(kvs_model *m) {
    const char *arch = arch_name(m->arch);
    const kvs_gguf *g = m->gguf;
    kvs_hparams *hp = &m->hp;
    char key[128];
    kvs_status st;
    const int64_t big = 1 << 20;
    if ((st = read_int(g, ARCH_KEY(key, "context_length"), -1, 1, INT32_MAX, &hp->n_ctx_train))) return st;
    if ((st = read_int(g, ARCH_KEY(key, "embedding_length"), -1, 1, big, &hp->n_embd))) return st;
    if ((st = read_int(g, ARCH_KEY(key, "block_count"), -1, 1, 4096, &hp->n_layer))) return st;
    if ((st = read_int(g, ARCH_KEY(key, "feed_forward_length"), -1, 1, big, &hp->n_ff))) return st;
    if ((st = read_int(g, ARCH_KEY(key, "attention.head_count"), -1, 1, 4096, &hp->n_head))) return st;
    if ((st = read_int(g, ARCH_KEY(key, "attention.head_count_kv"), hp->n_head, 1, hp->n_head, &hp->n_head_kv))) return st;
    if (hp->n_head % hp->n_head_kv != 0) {
        return kvs_fail(KVS_ERR_FORMAT, "head_count %d is not a multiple of head_count_kv %d", hp->n_head, hp->n_head_kv);
    }
    int32_t key_length, value_length;
    if ((st = read_int(g, ARCH_KEY(key, "attention.key_length"), hp->n_embd / hp->n_head, 1, big, &key_length))) return st;
    if ((st = read_int(g, ARCH_KEY(key, "attention.value_length"), key_length, 1, big, &value_length))) return st;
    if (key_length != value_length) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "key_length %d != value_length %d is not supported", key_length, value_length);
    }
    hp->head_dim = key_length;
    if ((st = read_int(g, ARCH_KEY(key, "rope.dimension_count"), hp->head_dim, 2, hp->head_dim, &hp->n_rot))) return st;
    if (hp->n_rot % 2 != 0) return kvs_fail(KVS_ERR_FORMAT, "rope.dimension_count %d is odd", hp->n_rot);
    if ((st = read_float(g, ARCH_KEY(key, "attention.layer_norm_rms_epsilon"), 1e-5f, &hp->rms_eps))) return st;
    if ((st = read_float(g, ARCH_KEY(key, "rope.freq_base"), 10000.0f, &hp->rope_freq_base))) return st;
    if (hp->rope_freq_base <= 0.0f) return kvs_fail(KVS_ERR_FORMAT, "rope.freq_base must be positive");
    hp->rope_neox = m->arch != KVS_ARCH_LLAMA; /* llama.cpp's LLAMA_ROPE_TYPE_NEOX for all the others */
    hp->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
    hp->embd_scale = 1.0f;
    if ((st = read_rope_scaling(m, arch))) return st;
    return m->arch == KVS_ARCH_GEMMA3 ? read_gemma3(m, arch) : read_window(m, arch);
}

/* ---- weights ------------------------------------------------------------ */

static int64_t find_tensor(const kvs_model *m, const char *name, kvs_gguf_tensor_info *info) {
    int64_t index = kvs_gguf_find_tensor(m->gguf, name);
    if (index >= 0 && kvs_gguf_tensor(m->gguf, index, info) != KVS_OK) return -1;
    return index;
}

static kvs_status shape_error(const char *name, const kvs_gguf_tensor_info *info, int64_t n0, int64_t n1) {
    return kvs_fail(KVS_ERR_FORMAT, "tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld]",
                    name, (long long)info->ne[0], (long long)info->ne[1], (long long)info->ne[2],
                    (long long)info->ne[3], (long long)n0, (long long)n1);
}

/* Bind a matrix of n_out rows of n_in elements, used in place from the mapping. */
static kvs_status bind_matrix(kvs_model *m, const char *name, int64_t n_in, int64_t n_out,
                              int required, kvs_tensor *out) {
    kvs_gguf_tensor_info info;
    memset(out, 0, sizeof *out);
    if (find_tensor(m, name, &info) < 0) {
        return required ? kvs_fail(KVS_ERR_FORMAT, "required tensor '%s' is missing", name) : KVS_OK;
    }
    if (info.ne[0] != n_in || info.ne[1] != n_out || info.ne[2] != 1 || info.ne[3] != 1) {
        return shape_error(name, &info, n_in, n_out);
    }
    const kvs_type_layout_info *layout = kvs_type_layout_find(info.type);
    if (!layout || !kvs_type_kernels_find(info.type)) {
        return kvs_fail(KVS_ERR_UNSUPPORTED, "tensor '%s' has unsupported type %d", name, (int)info.type);
    }
    out->data = info.data;
    out->type = info.type;
    memcpy(out->ne, info.ne, sizeof out->ne);
    out->row_bytes = n_in / layout->block_elems * layout->block_bytes;
    return KVS_OK;
}

/* Dequantize a small 1-D tensor (norm weights, biases) into an owned f32 copy. */
static kvs_status bind_vector(kvs_model *m, const char *name, int64_t n, int required, const float **out) {
    kvs_gguf_tensor_info info;
    *out = NULL;
    if (find_tensor(m, name, &info) < 0) {
        return required ? kvs_fail(KVS_ERR_FORMAT, "required tensor '%s' is missing", name) : KVS_OK;
    }
    if (info.ne[0] != n || info.ne[1] != 1 || info.ne[2] != 1 || info.ne[3] != 1) {
        return shape_error(name, &info, n, 1);
    }
    const kvs_type_kernels *kernels = kvs_type_kernels_find(info.type);
    if (!kernels) return kvs_fail(KVS_ERR_UNSUPPORTED, "tensor '%s' has unsupported type %d", name, (int)info.type);
    float **owned = realloc(m->owned, (size_t)(m->n_owned + 1) * sizeof *owned);
    if (!owned) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate tensor table");
    m->owned = owned;
    float *copy = malloc((size_t)n * sizeof *copy);
    if (!copy) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate %lld floats for '%s'", (long long)n, name);
    m->owned[m->n_owned++] = copy;
    kernels->dequantize(info.data, copy, n);
    *out = copy;
    return KVS_OK;
}

/* Rows [r0, r0 + n) of a bound matrix as a matrix of its own: a fused
 * weight's parts are products of their own (packed and multiplied apart). */
static kvs_tensor row_view(const kvs_tensor *whole, int64_t r0, int64_t n) {
    kvs_tensor view = *whole;
    view.data = (const uint8_t *)whole->data + r0 * whole->row_bytes;
    view.ne[1] = n;
    view.packed = NULL;
    return view;
}

/* q, k and v: three matrices, or phi3's fused attn_qkv (q rows, then k, then v;
 * likewise its bias if any) when the file has one. */
static kvs_status bind_qkv(kvs_model *m, int il, int64_t q_dim, int64_t kv_dim, kvs_layer *l) {
    const int64_t n_embd = m->hp.n_embd;
    char name[96];
    kvs_status st;
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d.%s", il, suffix), name)
    if (m->arch == KVS_ARCH_PHI3 && kvs_gguf_find_tensor(m->gguf, NAME("attn_qkv.weight")) >= 0) {
        kvs_tensor qkv;
        if ((st = bind_matrix(m, name, n_embd, q_dim + 2 * kv_dim, 1, &qkv))) return st;
        l->wq = row_view(&qkv, 0, q_dim);
        l->wk = row_view(&qkv, q_dim, kv_dim);
        l->wv = row_view(&qkv, q_dim + kv_dim, kv_dim);
        const float *bias;
        if ((st = bind_vector(m, NAME("attn_qkv.bias"), q_dim + 2 * kv_dim, 0, &bias))) return st;
        if (bias) {
            l->bq = bias;
            l->bk = bias + q_dim;
            l->bv = bias + q_dim + kv_dim;
        }
        return KVS_OK;
    }
    const int bias = m->arch == KVS_ARCH_QWEN2; /* required there; elsewhere added when present */
    if ((st = bind_matrix(m, NAME("attn_q.weight"), n_embd, q_dim, 1, &l->wq))) return st;
    if ((st = bind_matrix(m, NAME("attn_k.weight"), n_embd, kv_dim, 1, &l->wk))) return st;
    if ((st = bind_matrix(m, NAME("attn_v.weight"), n_embd, kv_dim, 1, &l->wv))) return st;
    if ((st = bind_vector(m, NAME("attn_q.bias"), q_dim, bias, &l->bq))) return st;
    if ((st = bind_vector(m, NAME("attn_k.bias"), kv_dim, bias, &l->bk))) return st;
    return bind_vector(m, NAME("attn_v.bias"), kv_dim, bias, &l->bv);
#undef NAME
}

/* gate and up: two matrices, or phi3's fused ffn_up (gate rows, then up:
 * llama.cpp's LLM_FFN_SWIGLU splits it in halves, the first activated). */
static kvs_status bind_gate_up(kvs_model *m, int il, kvs_layer *l) {
    const int64_t n_embd = m->hp.n_embd, n_ff = m->hp.n_ff;
    char name[96];
    kvs_status st;
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d.%s", il, suffix), name)
    if (m->arch == KVS_ARCH_PHI3) {
        kvs_tensor gate_up;
        if ((st = bind_matrix(m, NAME("ffn_up.weight"), n_embd, 2 * n_ff, 1, &gate_up))) return st;
        l->w_gate = row_view(&gate_up, 0, n_ff);
        l->w_up = row_view(&gate_up, n_ff, n_ff);
        return KVS_OK;
    }
    if ((st = bind_matrix(m, NAME("ffn_gate.weight"), n_embd, n_ff, 1, &l->w_gate))) return st;
    return bind_matrix(m, NAME("ffn_up.weight"), n_embd, n_ff, 1, &l->w_up);
#undef NAME
}

static kvs_status bind_layer(kvs_model *m, int il) {
    const kvs_hparams *hp = &m->hp;
    kvs_layer *l = &m->layers[il];
    int64_t q_dim = (int64_t)hp->n_head * hp->head_dim, kv_dim = (int64_t)hp->n_head_kv * hp->head_dim;
    const int gemma = m->arch == KVS_ARCH_GEMMA3;
    const int qk_norm = gemma || m->arch == KVS_ARCH_QWEN3;
    char name[96];
    kvs_status st;
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d.%s", il, suffix), name)
    if ((st = bind_vector(m, NAME("attn_norm.weight"), hp->n_embd, 1, &l->attn_norm))) return st;
    if ((st = bind_qkv(m, il, q_dim, kv_dim, l))) return st;
    if ((st = bind_matrix(m, NAME("attn_output.weight"), q_dim, hp->n_embd, 1, &l->wo))) return st;
    if (qk_norm) { /* only gemma3's and qwen3's graphs read them */
        if ((st = bind_vector(m, NAME("attn_q_norm.weight"), hp->head_dim, 1, &l->q_norm))) return st;
        if ((st = bind_vector(m, NAME("attn_k_norm.weight"), hp->head_dim, 1, &l->k_norm))) return st;
    }
    if (gemma) {
        if ((st = bind_vector(m, NAME("post_attention_norm.weight"), hp->n_embd, 1, &l->attn_post_norm))) return st;
        if ((st = bind_vector(m, NAME("post_ffw_norm.weight"), hp->n_embd, 1, &l->ffn_post_norm))) return st;
    }
    if ((st = bind_vector(m, NAME("ffn_norm.weight"), hp->n_embd, 1, &l->ffn_norm))) return st;
    if ((st = bind_gate_up(m, il, l))) return st;
    if ((st = bind_matrix(m, NAME("ffn_down.weight"), hp->n_ff, hp->n_embd, 1, &l->w_down))) return st;
#undef NAME
    return KVS_OK;
}

static kvs_status bind_weights(kvs_model *m) {
    kvs_hparams *hp = &m->hp;
    kvs_gguf_tensor_info info;
    kvs_status st;
    if (find_tensor(m, "token_embd.weight", &info) < 0) {
        return kvs_fail(KVS_ERR_FORMAT, "required tensor 'token_embd.weight' is missing");
    }
    if (info.ne[1] < 1 || info.ne[1] > INT32_MAX) return kvs_fail(KVS_ERR_FORMAT, "token_embd.weight has a bad vocabulary size");
    hp->n_vocab = (int32_t)info.ne[1];
    if ((st = bind_matrix(m, "token_embd.weight", hp->n_embd, hp->n_vocab, 1, &m->tok_embd))) return st;
    if ((st = bind_vector(m, "output_norm.weight", hp->n_embd, 1, &m->output_norm))) return st;
    if ((st = bind_matrix(m, "output.weight", hp->n_embd, hp->n_vocab, 0, &m->output))) return st;
    if (!m->output.data) m->output = m->tok_embd; /* tied embeddings */
    if (m->arch == KVS_ARCH_LLAMA) { /* Llama 3.1's frequency factors: no other graph reads them */
        if ((st = bind_vector(m, "rope_freqs.weight", hp->n_rot / 2, 0, &m->rope_freqs))) return st;
    }
    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate %d layers", hp->n_layer);
    for (int il = 0; il < hp->n_layer; il++) {
        if ((st = bind_layer(m, il)) != KVS_OK) return st;
    }
    return KVS_OK;
}

/* ---- packed weights for the fast path ---------------------------------- */

/* The layer weights whose products the fast path takes (not the output
 * projection, which stays exact): n_layer x 7 of them. */
#define LAYER_WEIGHTS 7

static kvs_tensor *layer_weight(kvs_layer *l, int k) {
    kvs_tensor *w[LAYER_WEIGHTS] = {&l->wq, &l->wk, &l->wv, &l->wo, &l->w_gate, &l->w_up, &l->w_down};
    return w[k];
}

/* Packed copies start on 64-byte boundaries, so runs load from one cache line. */
static size_t packed_bytes_aligned(const kvs_tensor *w) {
    return (kvs_repack_bytes(w->type, w->ne[1], w->ne[0]) + 63) / 64 * 64;
}

/* Serializes the first packing of a model: contexts may be created from
 * several threads, and packing happens once. */
static pthread_mutex_t pack_lock = PTHREAD_MUTEX_INITIALIZER;

static void forget_packed(kvs_model *m) {
    for (int il = 0; il < m->hp.n_layer; il++) {
        for (int k = 0; k < LAYER_WEIGHTS; k++) layer_weight(&m->layers[il], k)->packed = NULL;
    }
}

static kvs_status pack_all(kvs_model *m) {
    size_t total = 0;
    for (int il = 0; il < m->hp.n_layer; il++) {
        for (int k = 0; k < LAYER_WEIGHTS; k++) total += packed_bytes_aligned(layer_weight(&m->layers[il], k));
    }
    if (total == 0) return KVS_OK;
    void *buf = aligned_alloc(64, total); /* total is a multiple of 64 */
    if (!buf) {
        return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate %zu bytes for the packed weights", total);
    }
    uint8_t *dst = buf;
    for (int il = 0; il < m->hp.n_layer; il++) {
        for (int k = 0; k < LAYER_WEIGHTS; k++) {
            kvs_tensor *w = layer_weight(&m->layers[il], k);
            const size_t bytes = packed_bytes_aligned(w);
            if (!bytes) continue;
            kvs_status st = kvs_repack(w->type, w->data, w->row_bytes, w->ne[1], w->ne[0], dst);
            if (st != KVS_OK) {
                forget_packed(m);
                free(buf);
                return st;
            }
            /* the fast path reads only the packed rows: drop them now, not at
             * the end, so memory never holds the layer weights twice */
            kvs_gguf_drop_pages(m->gguf, w->data, (uint64_t)(w->ne[1] / REPACK_ROWS * REPACK_ROWS * w->row_bytes));
            w->packed = dst;
            dst += bytes;
        }
    }
    m->packed = buf;
    return KVS_OK;
}

kvs_status kvs_model_pack_weights(kvs_model *m) {
    pthread_mutex_lock(&pack_lock);
    kvs_status st = m->packed ? KVS_OK : pack_all(m);
    pthread_mutex_unlock(&pack_lock);
    return st;
}

/* ---- sink profile ------------------------------------------------------- */

/* A profile's layer, channels and threshold must be in range for this model. */
static kvs_status check_sink_profile(const kvs_model *m, int64_t layer, const int32_t *channels, int64_t n,
                                     float threshold, const char *where) {
    if (layer < 0 || layer >= m->hp.n_layer) {
        return kvs_fail(KVS_ERR_FORMAT, "%s: layer %lld is not a layer (the model has %d)", where, (long long)layer,
                        m->hp.n_layer);
    }
    if (n < 1 || n > m->hp.n_embd || !(threshold > 0.0f) || !isfinite(threshold)) {
        return kvs_fail(KVS_ERR_FORMAT, "%s: a sink profile needs 1..n_embd channels and a positive threshold", where);
    }
    for (int64_t i = 0; i < n; i++) {
        if (channels[i] < 0 || channels[i] >= m->hp.n_embd) {
            return kvs_fail(KVS_ERR_FORMAT, "%s: channel %d (index %lld) is not a channel (n_embd %d)", where,
                            channels[i], (long long)i, m->hp.n_embd);
        }
    }
    return KVS_OK;
}

static kvs_status set_sink_profile(kvs_model *m, int32_t layer, const int32_t *channels, int32_t n, float threshold) {
    int32_t *copy = malloc((size_t)n * sizeof *copy);
    if (!copy) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the sink profile");
    memcpy(copy, channels, (size_t)n * sizeof *copy);
    free(m->profile.channels);
    m->profile = (kvs_sink_profile){1, layer, n, copy, threshold};
    return KVS_OK;
}

/* The kvsink.* keys, when present, must be complete and in range. */
static kvs_status read_sink_profile(kvs_model *m) {
    if (kvs_gguf_find_key(m->gguf, "kvsink.layer") < 0) return KVS_OK;
    uint32_t layer;
    float threshold;
    kvs_gguf_kv_info arr;
    kvs_status st = kvs_gguf_get_u32(m->gguf, "kvsink.layer", &layer);
    if (st == KVS_OK) st = kvs_gguf_get_f32(m->gguf, "kvsink.threshold", &threshold);
    if (st == KVS_OK) st = kvs_gguf_get_array(m->gguf, "kvsink.channels", -1, &arr);
    if (st != KVS_OK) return st;
    if (arr.elem_type != KVS_GGUF_UINT32 && arr.elem_type != KVS_GGUF_INT32) {
        return kvs_fail(KVS_ERR_FORMAT, "kvsink.channels must be an array of 32-bit integers");
    }
    if (arr.count < 1 || arr.count > (uint64_t)m->hp.n_embd) {
        return kvs_fail(KVS_ERR_FORMAT, "kvsink profile needs 1..n_embd channels, got %llu",
                        (unsigned long long)arr.count);
    }
    int32_t *channels = malloc(arr.count * sizeof *channels);
    if (!channels) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate the sink profile");
    memcpy(channels, arr.data, arr.count * sizeof *channels); /* little-endian, unaligned in the file */
    st = check_sink_profile(m, layer, channels, (int64_t)arr.count, threshold, "kvsink.* metadata");
    if (st == KVS_OK) st = set_sink_profile(m, (int32_t)layer, channels, (int32_t)arr.count, threshold);
    free(channels);
    return st;
}

/* ---- public API --------------------------------------------------------- */

kvs_model_params kvs_model_default_params(void) {
    kvs_model_params params = {0};
    return params;
}

kvs_status kvs_model_load(const char *path, const kvs_model_params *params, kvs_model **out) {
    if (!out) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "out must not be NULL");
    *out = NULL;
    if (!path) return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "path must not be NULL");
    kvs_model *m = calloc(1, sizeof *m);
    if (!m) return kvs_fail(KVS_ERR_OUT_OF_MEMORY, "cannot allocate a model");
    kvs_status st = kvs_gguf_open(path, &m->gguf);
    if (st == KVS_OK) st = read_arch(m);
    if (st == KVS_OK) st = read_hparams(m);
    if (st == KVS_OK) st = bind_weights(m);
    if (st == KVS_OK) st = read_sink_profile(m);
    if (st != KVS_OK) {
        kvs_model_free(m);
        return st;
    }
    *out = m;
    return KVS_OK;
}

void kvs_model_free(kvs_model *model) {
    if (!model) return;
    for (int32_t i = 0; i < model->n_owned; i++) free(model->owned[i]);
    free(model->owned);
    free(model->layers);
    free(model->packed);
#if defined(KVS_HAVE_CUDA)
    kvs_cuda_weights_free(model->cuda);
#endif
    free(model->profile.channels);
    kvs_gguf_free(model->gguf);
    free(model);
}

const kvs_gguf *kvs_model_gguf(const kvs_model *model) { return model ? model->gguf : NULL; }
int32_t kvs_model_n_vocab(const kvs_model *model) { return model ? model->hp.n_vocab : 0; }
int32_t kvs_model_n_ctx_train(const kvs_model *model) { return model ? model->hp.n_ctx_train : 0; }
int32_t kvs_model_n_embd(const kvs_model *model) { return model ? model->hp.n_embd : 0; }
int32_t kvs_model_n_layer(const kvs_model *model) { return model ? model->hp.n_layer : 0; }
int32_t kvs_model_has_sink_profile(const kvs_model *model) { return model ? model->profile.present : 0; }

kvs_status kvs_model_set_sink_profile(kvs_model *model, int32_t layer, const int32_t *channels, int32_t n_channels,
                                      float threshold) {
    if (!model || (!channels && n_channels > 0)) {
        return kvs_fail(KVS_ERR_INVALID_ARGUMENT, "model and channels must not be NULL");
    }
    kvs_status st = check_sink_profile(model, layer, channels, n_channels, threshold, "sink profile");
    return st == KVS_OK ? set_sink_profile(model, layer, channels, n_channels, threshold) : KVS_ERR_INVALID_ARGUMENT;
}

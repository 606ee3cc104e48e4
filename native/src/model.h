/* model.h - private: hyper-parameters and weights of a loaded model. */
#ifndef KVS_MODEL_H
#define KVS_MODEL_H

#include <stdint.h>

#include "kvsink.h"

typedef enum kvs_arch {
    KVS_ARCH_LLAMA = 0, /* SmolLM2, Llama 2/3, Mistral conventions */
    KVS_ARCH_QWEN2 = 1, /* q/k/v biases, NeoX-style RoPE           */
    KVS_ARCH_GEMMA3 = 2, /* scaled embeddings, QK-norm, sandwich norms, GeGLU,
                            sliding-window layers with their own RoPE base */
    KVS_ARCH_QWEN3 = 3,  /* qwen2 without biases, with QK-norm; head_dim may differ from n_embd / n_head */
    KVS_ARCH_PHI3 = 4    /* fused q|k|v and gate|up weights, NeoX-style RoPE, optional window on every layer */
} kvs_arch;

typedef struct kvs_hparams {
    int32_t n_vocab;
    int32_t n_ctx_train;
    int32_t n_embd;
    int32_t n_layer;
    int32_t n_head;
    int32_t n_head_kv;      /* grouped-query attention: n_head / n_head_kv queries share a KV head */
    int32_t head_dim;
    int32_t n_ff;
    int32_t n_rot;          /* rotated dimensions per head (<= head_dim) */
    int32_t rope_neox;      /* 1: rotate (i, i + n_rot/2); 0: rotate (2i, 2i+1) */
    float rms_eps;
    float rope_freq_base;
    float rope_freq_scale; /* 1 / linear scaling factor */
    float attn_scale;      /* softmax scale of q.k: 1/sqrt(head_dim) unless the architecture says otherwise */
    float embd_scale;      /* token embeddings are multiplied by it (gemma: sqrt(n_embd)), else 1 */
    float final_softcap;   /* > 0: logits = c * tanh(logits / c); 0: none */
    int32_t ffn_gelu;      /* 1: GeGLU, gelu_tanh(gate) * up; 0: SwiGLU */
    int32_t n_swa;         /* local layers see the newest n_swa positions (their own included); 0: none */
    int32_t swa_period;    /* of every swa_period layers the last is global, the others local (0: all local) */
    const uint8_t *swa_layers; /* [n_layer] 1: local, from a per-layer pattern (in the file
                                  mapping); NULL: by swa_period */
    float rope_freq_base_swa, rope_freq_scale_swa; /* RoPE of the local layers */
    int32_t rope_factors_swa; /* 1: local layers take the frequency factors (rope_freqs) too: every
                                 architecture whose local layers rotate like its global ones (not gemma3) */
} kvs_hparams;

/* Whether layer il attends to a sliding window (llama.cpp's set_swa_pattern:
 * the last layer of each period is global). */
static inline int kvs_layer_is_swa(const kvs_hparams *hp, int32_t il) {
    if (hp->n_swa <= 0) return 0;
    if (hp->swa_layers) return hp->swa_layers[il] != 0;
    return hp->swa_period == 0 || il % hp->swa_period < hp->swa_period - 1;
}

/* A weight tensor used in place from the file mapping. */
typedef struct kvs_tensor {
    const void *data;
    int32_t type;           /* kvs_type */
    int64_t ne[4];          /* ne[0] is the row length (input features) */
    int64_t row_bytes;
    const void *packed;     /* the full groups of 8 rows interleaved for the fast path (repack.h),
                               owned by the model; NULL when not packed */
} kvs_tensor;

/* KVSink's sink profile (GGUF kvsink.* metadata): after layer `layer`, a token
 * is a sink when |hidden[c]| > threshold for any c in channels. */
/* The model's weights in GPU memory (backend_cuda.c), NULL until a CUDA
 * context uploads them. */
typedef struct kvs_cuda_weights kvs_cuda_weights;

typedef struct kvs_sink_profile {
    int32_t present;
    int32_t layer;
    int32_t n_channels;
    int32_t *channels;
    float threshold;
} kvs_sink_profile;

typedef struct kvs_layer {
    const float *attn_norm;   /* [n_embd] */
    /* wq, wk, wv: phi3's fused attn_qkv is bound as three views of its rows
     * (q, then k, then v), each packed and multiplied as its own matrix */
    kvs_tensor wq;            /* [n_embd] -> [n_head * head_dim]    */
    kvs_tensor wk;            /* [n_embd] -> [n_head_kv * head_dim] */
    kvs_tensor wv;            /* [n_embd] -> [n_head_kv * head_dim] */
    kvs_tensor wo;            /* [n_head * head_dim] -> [n_embd]    */
    const float *bq, *bk, *bv;/* qwen2 biases, NULL when absent      */
    const float *q_norm;      /* [head_dim] gemma3/qwen3 per-head RMSNorm of q and k before RoPE, */
    const float *k_norm;      /* [head_dim] NULL when absent                                */
    const float *attn_post_norm; /* [n_embd] gemma3 norm of the attention output before the residual, or NULL */
    const float *ffn_norm;    /* [n_embd] */
    kvs_tensor w_gate;        /* [n_embd] -> [n_ff]; phi3: the first n_ff rows of the fused ffn_up */
    kvs_tensor w_up;          /* [n_embd] -> [n_ff]; phi3: its last n_ff rows                       */
    kvs_tensor w_down;        /* [n_ff] -> [n_embd] */
    const float *ffn_post_norm; /* [n_embd] gemma3 norm of the FFN output before the residual, or NULL */
} kvs_layer;

struct kvs_model {
    kvs_gguf *gguf;
    kvs_arch arch;
    kvs_hparams hp;
    kvs_tensor tok_embd;      /* [n_embd] x n_vocab rows               */
    const float *output_norm; /* [n_embd]                              */
    kvs_tensor output;        /* [n_embd] -> [n_vocab]; tok_embd when tied */
    const float *rope_freqs;  /* [n_rot/2] Llama 3.1 frequency factors, or NULL */
    kvs_layer *layers;        /* [n_layer] */
    kvs_sink_profile profile;
    float **owned;            /* f32 copies of small vectors (norms, biases) */
    int32_t n_owned;
    void *packed;             /* every packed layer weight (kvs_tensor.packed points in), or NULL */
    kvs_cuda_weights *cuda;   /* device copies of the weights, or NULL */
};

/* Pack the layer weights the fast path has packed kernels for, once per
 * model (later calls return at once), and drop their original pages from
 * memory: the fast path reads only the packed copy. */
kvs_status kvs_model_pack_weights(kvs_model *model);

#endif

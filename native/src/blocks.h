/* blocks.h - byte layout of every quantized block, as stored in GGUF files.
 * One struct per format; CPU (and later CUDA) kernels include this header.
 * Layouts follow ggml's so that GGUF files are read in place. */
#ifndef KVS_BLOCKS_H
#define KVS_BLOCKS_H

#include <stdint.h>

/* the CUDA sources include this header as C++ */
#ifdef __cplusplus
#  define KVS_STATIC_ASSERT static_assert
#else
#  define KVS_STATIC_ASSERT _Static_assert
#endif

typedef uint16_t kvs_half; /* IEEE fp16 bits */

#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK_K 256         /* super-block size of the k-quants */
#define K_SCALE_SIZE 12  /* packed 6-bit scales/mins of Q4_K and Q5_K */

typedef struct {
    kvs_half d;              /* scale; x = (q - 8) * d              */
    uint8_t qs[QK4_0 / 2];   /* nibbles: low = elements 0..15, high = 16..31 */
} block_q4_0;
KVS_STATIC_ASSERT(sizeof(block_q4_0) == 18, "block_q4_0 size");

typedef struct {
    kvs_half d;              /* scale; x = q * d + m                 */
    kvs_half m;              /* minimum                              */
    uint8_t qs[QK4_1 / 2];   /* nibbles as in Q4_0                   */
} block_q4_1;
KVS_STATIC_ASSERT(sizeof(block_q4_1) == 20, "block_q4_1 size");

typedef struct {
    kvs_half d;              /* scale; x = (q - 16) * d              */
    uint8_t qh[4];           /* 5th bit of each element, bit j = element j */
    uint8_t qs[QK5_0 / 2];   /* low 4 bits, nibbles as in Q4_0       */
} block_q5_0;
KVS_STATIC_ASSERT(sizeof(block_q5_0) == 22, "block_q5_0 size");

typedef struct {
    kvs_half d;              /* scale; x = q * d + m                 */
    kvs_half m;              /* minimum                              */
    uint8_t qh[4];           /* 5th bit of each element              */
    uint8_t qs[QK5_1 / 2];   /* low 4 bits                           */
} block_q5_1;
KVS_STATIC_ASSERT(sizeof(block_q5_1) == 24, "block_q5_1 size");

typedef struct {
    kvs_half d;              /* scale; x = q * d                     */
    int8_t qs[QK8_0];        /* signed quants                        */
} block_q8_0;
KVS_STATIC_ASSERT(sizeof(block_q8_0) == 34, "block_q8_0 size");

typedef struct {
    uint8_t scales[QK_K / 16]; /* per 16 elements: low nibble scale, high nibble min */
    uint8_t qs[QK_K / 4];      /* 2-bit quants                                        */
    kvs_half d;                /* super-block scale for the scales                    */
    kvs_half dmin;             /* super-block scale for the mins                      */
} block_q2_K;
KVS_STATIC_ASSERT(sizeof(block_q2_K) == 84, "block_q2_K size");

typedef struct {
    uint8_t hmask[QK_K / 8];   /* high bit of each 3-bit quant               */
    uint8_t qs[QK_K / 4];      /* low 2 bits                                 */
    uint8_t scales[12];        /* 16 packed 6-bit scales                     */
    kvs_half d;                /* super-block scale                          */
} block_q3_K;
KVS_STATIC_ASSERT(sizeof(block_q3_K) == 110, "block_q3_K size");

typedef struct {
    kvs_half d;                  /* super-block scale for the scales         */
    kvs_half dmin;               /* super-block scale for the mins           */
    uint8_t scales[K_SCALE_SIZE];/* 8 scales and 8 mins, 6 bits each         */
    uint8_t qs[QK_K / 2];        /* 4-bit quants                             */
} block_q4_K;
KVS_STATIC_ASSERT(sizeof(block_q4_K) == 144, "block_q4_K size");

typedef struct {
    kvs_half d;                  /* super-block scale for the scales         */
    kvs_half dmin;               /* super-block scale for the mins           */
    uint8_t scales[K_SCALE_SIZE];/* 8 scales and 8 mins, 6 bits each         */
    uint8_t qh[QK_K / 8];        /* 5th bit of each quant                    */
    uint8_t qs[QK_K / 2];        /* low 4 bits                               */
} block_q5_K;
KVS_STATIC_ASSERT(sizeof(block_q5_K) == 176, "block_q5_K size");

typedef struct {
    uint8_t ql[QK_K / 2];        /* low 4 bits of the 6-bit quants           */
    uint8_t qh[QK_K / 4];        /* high 2 bits                              */
    int8_t scales[QK_K / 16];    /* 8-bit scale per 16 elements              */
    kvs_half d;                  /* super-block scale                        */
} block_q6_K;
KVS_STATIC_ASSERT(sizeof(block_q6_K) == 210, "block_q6_K size");

#endif

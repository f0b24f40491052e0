/* int4 weight-only matmul on the CPU with float32 activations, accumulation and output.
 *
 * PyTorch's CPU int4 kernel (tinygemm) is fast only on bfloat16 activations and rounds its input and output
 * to bfloat16; this kernel keeps float32 throughout, so a float32 model on an int4 base computes what its
 * dequantized weights give (the LoRA parity the tests hold it to), at the speed of reading 4-bit weights.
 *
 * Layout (int4.py packs it): row n of the weight, group g of G columns (G = 128, 64 or 32) is G / 2 bytes at
 * codes[n * K / 2 + g * G / 2]; byte j holds the code of column g * G + j in its low nibble and of column
 * g * G + G / 2 + j in its high one. scale and offset are (N, K / G) bfloat16 bit patterns, and
 *     W[n, k] = (code - 8) * scale[n, g] + offset[n, g]
 * evaluated in float32 once per group into a 16-entry table, so each weight is one table lookup (one vpermps
 * on AVX-512) and each product one fused multiply-add.
 *
 * Built at first use by native.py with -march of the machine it runs on; OpenMP here resolves to the
 * runtime torch already loaded, so the threads are torch's own (`threads` is torch.get_num_threads()).
 */

#include "quant_cpu.h"

#if !defined(__AVX512F__) && !defined(__AVX2__)
static inline void group_table(float table[16], float scale, float offset) {
    for (int code = 0; code < 16; code++) {
        float step = (float)(code - 8) * scale; /* two roundings, as the torch dequantize does */
        table[code] = step + offset;
    }
}
#endif

/* acc[t] (t < tokens) += row n's product with tokens t0.. over one group; `x` points at the group's first
 * column of token t0, `stride` is K. */
#if defined(__AVX512F__)

static const float STEPS[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};

/* The 16 values a group's codes stand for: (code - 8) * scale + offset, rounded twice as torch does. */
static inline __m512 table512(float scale, float offset) {
    return _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(STEPS), _mm512_set1_ps(scale)), _mm512_set1_ps(offset));
}

static inline __attribute__((always_inline)) void group_dot(
    int tokens, vec_t *acc, const uint8_t *p, int64_t half, float scale, float offset, const float *x,
    int64_t stride) {
    const __m512 tab = table512(scale, offset);
    for (int64_t c = 0; c < half; c += 16) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + c)));
        const __m512 low = _mm512_permutexvar_ps(bytes, tab); /* the index is the low 4 bits */
        const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), tab);
        for (int t = 0; t < tokens; t++) {
            const float *xt = x + t * stride + c;
            acc[t] = _mm512_fmadd_ps(low, _mm512_loadu_ps(xt), acc[t]);
            acc[TILE_TOKENS + t] = _mm512_fmadd_ps(high, _mm512_loadu_ps(xt + half), acc[TILE_TOKENS + t]);
        }
    }
}

static inline __attribute__((always_inline)) void group_rows(
    float *out, const uint8_t *p, int64_t half, float scale, float offset) {
    const __m512 tab = table512(scale, offset);
    for (int64_t c = 0; c < half; c += 16) {
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + c)));
        _mm512_storeu_ps(out + c, _mm512_permutexvar_ps(bytes, tab));
        _mm512_storeu_ps(out + half + c, _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), tab));
    }
}
#elif defined(__AVX2__)

/* 16 entries in two registers: the low 3 bits pick within one, bit 3 (moved to the sign) picks the register */
static inline __m256 lookup16(__m256i index, __m256 tab_low, __m256 tab_high) {
    const __m256 from_low = _mm256_permutevar8x32_ps(tab_low, index);
    const __m256 from_high = _mm256_permutevar8x32_ps(tab_high, index);
    return _mm256_blendv_ps(from_low, from_high, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

static const float STEPS[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};

/* The 16 values a group's codes stand for, in two registers (codes 0-7, 8-15). */
static inline void table256(float scale, float offset, __m256 *tab_low, __m256 *tab_high) {
    const __m256 s = _mm256_set1_ps(scale), o = _mm256_set1_ps(offset);
    *tab_low = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(STEPS), s), o);
    *tab_high = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(STEPS + 8), s), o);
}

static inline __attribute__((always_inline)) void group_dot(
    int tokens, vec_t *acc, const uint8_t *p, int64_t half, float scale, float offset, const float *x,
    int64_t stride) {
    __m256 tab_low, tab_high;
    table256(scale, offset, &tab_low, &tab_high);
    for (int64_t c = 0; c < half; c += 8) {
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + c)));
        const __m256 low = lookup16(bytes, tab_low, tab_high);
        const __m256 high = lookup16(_mm256_srli_epi32(bytes, 4), tab_low, tab_high);
        for (int t = 0; t < tokens; t++) {
            const float *xt = x + t * stride + c;
            acc[t] = _mm256_fmadd_ps(low, _mm256_loadu_ps(xt), acc[t]);
            acc[TILE_TOKENS + t] = _mm256_fmadd_ps(high, _mm256_loadu_ps(xt + half), acc[TILE_TOKENS + t]);
        }
    }
}

static inline __attribute__((always_inline)) void group_rows(
    float *out, const uint8_t *p, int64_t half, float scale, float offset) {
    __m256 tab_low, tab_high;
    table256(scale, offset, &tab_low, &tab_high);
    for (int64_t c = 0; c < half; c += 8) {
        const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + c)));
        _mm256_storeu_ps(out + c, lookup16(bytes, tab_low, tab_high));
        _mm256_storeu_ps(out + half + c, lookup16(_mm256_srli_epi32(bytes, 4), tab_low, tab_high));
    }
}
#else

static inline void group_dot(
    int tokens, vec_t *acc, const uint8_t *p, int64_t half, float scale, float offset, const float *x,
    int64_t stride) {
    float table[16];
    group_table(table, scale, offset);
    for (int t = 0; t < tokens; t++) {
        const float *xt = x + t * stride;
        float sum = 0.0f;
        for (int64_t j = 0; j < half; j++)
            sum += table[p[j] & 15] * xt[j] + table[p[j] >> 4] * xt[half + j];
        acc[t] += sum;
    }
}

static inline void group_rows(float *out, const uint8_t *p, int64_t half, float scale, float offset) {
    float table[16];
    group_table(table, scale, offset);
    for (int64_t j = 0; j < half; j++) {
        out[j] = table[p[j] & 15];
        out[half + j] = table[p[j] >> 4];
    }
}
#endif

static inline __attribute__((always_inline)) void row_tile(
    int tokens, float *y, int64_t n, int64_t N, const float *x, int64_t K, const uint8_t *row,
    const uint16_t *scale, const uint16_t *offset, int64_t G) {
    const int64_t groups = K / G, half = G / 2;
    /* acc[t] sums the low nibbles' products of token t, acc[TILE_TOKENS + t] the high ones': two chains of
     * dependent multiply-adds per token instead of one (at one token the chain's latency was the limit) */
    vec_t acc[2 * TILE_TOKENS];
    for (int t = 0; t < tokens; t++) acc[t] = acc[TILE_TOKENS + t] = vec_zero();
    for (int64_t g = 0; g < groups; g++)
        group_dot(tokens, acc, row + g * half, half, bf16_to_float(scale[g]), bf16_to_float(offset[g]), x + g * G, K);
    for (int t = 0; t < tokens; t++) y[t * N + n] = vec_sum(acc[t]) + vec_sum(acc[TILE_TOKENS + t]);
}

/* Which vector path this build took: 512 (AVX-512), 256 (AVX2) or 0 (scalar). */
int openlora_int4_vector_bits(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}

/* y (T, N) = x (T, K) @ W.T, all float32 and contiguous. */
void openlora_int4_mm(const float *x, int64_t T, int64_t K, const uint8_t *codes, const uint16_t *scale,
                      const uint16_t *offset, int64_t N, int64_t G, float *y, int threads) {
    const int64_t groups = K / G;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = codes + n * (K / 2);
        const uint16_t *row_scale = scale + n * groups, *row_offset = offset + n * groups;
        for (int64_t t0 = 0; t0 < T; t0 += TILE_TOKENS) {
            const int64_t left = T - t0;
            const float *xt = x + t0 * K;
            float *yt = y + t0 * N;
            switch (left < TILE_TOKENS ? left : TILE_TOKENS) { /* constant token counts unroll the tile */
            case 1: row_tile(1, yt, n, N, xt, K, row, row_scale, row_offset, G); break;
            case 2: row_tile(2, yt, n, N, xt, K, row, row_scale, row_offset, G); break;
            case 3: row_tile(3, yt, n, N, xt, K, row, row_scale, row_offset, G); break;
            case 4: row_tile(4, yt, n, N, xt, K, row, row_scale, row_offset, G); break;
            case 5: row_tile(5, yt, n, N, xt, K, row, row_scale, row_offset, G); break;
            case 6: row_tile(6, yt, n, N, xt, K, row, row_scale, row_offset, G); break;
            case 7: row_tile(7, yt, n, N, xt, K, row, row_scale, row_offset, G); break;
            default: row_tile(TILE_TOKENS, yt, n, N, xt, K, row, row_scale, row_offset, G); break;
            }
        }
    }
}

/* out (rows, K) float32 = W[start:start + rows] dequantized (for many tokens: then one float32 GEMM). */
void openlora_int4_dequantize(const uint8_t *codes, const uint16_t *scale, const uint16_t *offset, int64_t K,
                              int64_t G, int64_t start, int64_t rows, float *out, int threads) {
    const int64_t groups = K / G, half = G / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t n = start + r;
        for (int64_t g = 0; g < groups; g++)
            group_rows(out + r * K + g * G, codes + n * (K / 2) + g * half, half, bf16_to_float(scale[n * groups + g]),
                       bf16_to_float(offset[n * groups + g]));
    }
}

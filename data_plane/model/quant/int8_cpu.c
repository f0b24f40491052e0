/* int8 weight-only matmul on the CPU with float32 activations, accumulation and output, for few rows of x.
 *
 * Decode reads every weight once per step; PyTorch's int8 CPU kernels either round activations to bfloat16
 * (`_weight_int8pack_mm`) or need a fast int8 product to be exact (int8.py's two-digit `_int_mm` path,
 * slow on CPUs without VNNI or AMX). This kernel widens each code to float32 in registers and multiplies it
 * by the float32 activation: exact products of the dequantized weight, at the speed of reading 8-bit codes.
 *
 *     y[t, n] = scale[n] * sum_k q[n, k] * x[t, k]      q (N, K_pad) int8 row-major, scale (N,) bfloat16
 *
 * Rows of q are K_pad apart (int8.py pads the input dimension to a multiple of 16); only K columns are read.
 * Built and loaded with int4_cpu.c by native.py (same flags, same OpenMP runtime as torch).
 */

#include "quant_cpu.h"

#if defined(__AVX512F__)
static inline vec_t widen(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vec_t vec_fma(vec_t w, const float *x, vec_t acc) { return _mm512_fmadd_ps(w, _mm512_loadu_ps(x), acc); }
#elif defined(__AVX2__)
static inline vec_t widen(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec_t vec_fma(vec_t w, const float *x, vec_t acc) { return _mm256_fmadd_ps(w, _mm256_loadu_ps(x), acc); }
#else
static inline vec_t widen(const int8_t *p) { return (float)*p; }
static inline vec_t vec_fma(vec_t w, const float *x, vec_t acc) { return w * *x + acc; }
#endif

/* y[t * N + n] for tokens t0 .. t0 + tokens of one row; two accumulator chains per token (even and odd
 * vectors), so one token is not bound by the latency of a single chain of multiply-adds. */
static inline __attribute__((always_inline)) void row_tile(
    int tokens, float *y, int64_t n, int64_t N, const float *x, int64_t K, const int8_t *row, float scale) {
    vec_t even[TILE_TOKENS], odd[TILE_TOKENS];
    float tail[TILE_TOKENS];
    for (int t = 0; t < tokens; t++) even[t] = odd[t] = vec_zero(), tail[t] = 0.0f;
    int64_t k = 0;
    for (; k + 2 * LANES <= K; k += 2 * LANES) {
        const vec_t w0 = widen(row + k), w1 = widen(row + k + LANES);
        for (int t = 0; t < tokens; t++) {
            even[t] = vec_fma(w0, x + t * K + k, even[t]);
            odd[t] = vec_fma(w1, x + t * K + k + LANES, odd[t]);
        }
    }
    for (; k < K; k++) /* what is left past the last pair of vectors */
        for (int t = 0; t < tokens; t++) tail[t] += (float)row[k] * x[t * K + k];
    for (int t = 0; t < tokens; t++) y[t * N + n] = scale * (vec_sum(even[t]) + vec_sum(odd[t]) + tail[t]);
}

/* y (T, N) = x (T, K) @ (q[:, :K] * scale[:, None]).T, all float32 and contiguous; q rows K_pad apart. */
void openlora_int8_mm(const float *x, int64_t T, int64_t K, const int8_t *q, int64_t K_pad, const uint16_t *scale,
                      int64_t N, float *y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *row = q + n * K_pad;
        const float s = bf16_to_float(scale[n]);
        for (int64_t t0 = 0; t0 < T; t0 += TILE_TOKENS) {
            const int64_t left = T - t0;
            const float *xt = x + t0 * K;
            float *yt = y + t0 * N;
            switch (left < TILE_TOKENS ? left : TILE_TOKENS) { /* constant token counts unroll the tile */
            case 1: row_tile(1, yt, n, N, xt, K, row, s); break;
            case 2: row_tile(2, yt, n, N, xt, K, row, s); break;
            case 3: row_tile(3, yt, n, N, xt, K, row, s); break;
            case 4: row_tile(4, yt, n, N, xt, K, row, s); break;
            case 5: row_tile(5, yt, n, N, xt, K, row, s); break;
            case 6: row_tile(6, yt, n, N, xt, K, row, s); break;
            case 7: row_tile(7, yt, n, N, xt, K, row, s); break;
            default: row_tile(TILE_TOKENS, yt, n, N, xt, K, row, s); break;
            }
        }
    }
}

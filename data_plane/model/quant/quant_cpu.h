/* What int4_cpu.c and int8_cpu.c share: the bfloat16 scales' conversion and, per instruction set the build
 * targets, the float32 vector they accumulate in (LANES floats; plain C: one). */

#ifndef OPENLORA_QUANT_CPU_H
#define OPENLORA_QUANT_CPU_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define TILE_TOKENS 8 /* tokens per pass over a weight row: their accumulators stay in registers */

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec_t;
static inline vec_t vec_zero(void) { return _mm512_setzero_ps(); }
static inline float vec_sum(vec_t a) { return _mm512_reduce_add_ps(a); }
#elif defined(__AVX2__)
#define LANES 8
typedef __m256 vec_t;
static inline vec_t vec_zero(void) { return _mm256_setzero_ps(); }
static inline float vec_sum(vec_t a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
#define LANES 1
typedef float vec_t;
static inline vec_t vec_zero(void) { return 0.0f; }
static inline float vec_sum(vec_t a) { return a; }
#endif

#endif

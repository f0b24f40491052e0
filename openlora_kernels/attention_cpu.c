/* Paged decode attention on the CPU, float32: one query token per sequence against its cached keys and
 * values, read in place through the sequence's block table.
 *
 * The torch paths of openlora_kernels/paged_attention.py gather each sequence's blocks into a padded copy of K and
 * of V before SDPA reads them back: per layer a copy of every history, written and read again, plus the
 * padding's work. This loop reads each key and value once where it lies and writes nothing but the output.
 *
 *     out[d, h] = sum_j softmax_j(scale * q[d, h] . k[d, j, h / group]) * v[d, j, h / group]
 *
 * over the positions j in [lo, context_lens[d]), lo = max(0, context_lens[d] - window) with a sliding
 * window (window > 0), else 0; k[d, j] = k_cache[block_tables[d, j / block_size], j % block_size]. The
 * caches are (num_blocks, block_size, kv_heads, head_dim) contiguous, q (D, heads, head_dim) with its last
 * dimension contiguous, out (D, heads, head_dim) contiguous. A work item is one (sequence, kv head): the
 * `group` query heads that share it keep their running maximum, sum and accumulator on the stack, one
 * block of positions at a time (an online softmax), so each key and value is read once for the whole
 * group. A sequence with no position in range gets zeros. data_plane/model/quant/native.py builds this
 * with the other CPU kernels and checks every shape, stride and block index before a call.
 */

#include <math.h>
#include <stdint.h>

#define ATTN_MAX_GROUP 16     /* query heads per kv head */
#define ATTN_MAX_HEAD_DIM 256 /* floats per head */
#define ATTN_MAX_BLOCK 64     /* positions per cache block */

/* One (sequence, kv head): the group's queries qs (heads q_hs apart) against positions lo..ctx. */
static void attend_group(const float *qs, int64_t q_hs, const float *k_cache, const float *v_cache,
                         const int64_t *table, int64_t block_size, int64_t pos_stride, int64_t head_dim,
                         int64_t group, float scale, int64_t lo, int64_t ctx, float *os) {
    float acc[ATTN_MAX_GROUP * ATTN_MAX_HEAD_DIM];
    float scores[ATTN_MAX_BLOCK];
    float maxima[ATTN_MAX_GROUP], sums[ATTN_MAX_GROUP];
    for (int64_t g = 0; g < group; g++) {
        maxima[g] = -INFINITY;
        sums[g] = 0.0f;
        for (int64_t i = 0; i < head_dim; i++) acc[g * head_dim + i] = 0.0f;
    }
    const int64_t block_stride = block_size * pos_stride;
    for (int64_t b = lo / block_size; b * block_size < ctx; b++) {
        const int64_t first = b * block_size;
        const int64_t p0 = (lo > first ? lo : first) - first;
        const int64_t p1 = (ctx < first + block_size ? ctx : first + block_size) - first;
        const float *kb = k_cache + table[b] * block_stride;
        const float *vb = v_cache + table[b] * block_stride;
        for (int64_t g = 0; g < group; g++) {
            const float *qg = qs + g * q_hs;
            float top = maxima[g];
            for (int64_t p = p0; p < p1; p++) {
                const float *kp = kb + p * pos_stride;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < head_dim; i++) s += qg[i] * kp[i];
                s *= scale;
                scores[p] = s;
                if (s > top) top = s;
            }
            /* exp(-inf) = 0 on the first block: nothing accumulated yet is kept. */
            const float alpha = expf(maxima[g] - top);
            float *ag = acc + g * head_dim;
            float sum = sums[g] * alpha;
#pragma omp simd
            for (int64_t i = 0; i < head_dim; i++) ag[i] *= alpha;
            for (int64_t p = p0; p < p1; p++) {
                const float e = expf(scores[p] - top);
                const float *vp = vb + p * pos_stride;
                sum += e;
#pragma omp simd
                for (int64_t i = 0; i < head_dim; i++) ag[i] += e * vp[i];
            }
            maxima[g] = top;
            sums[g] = sum;
        }
    }
    for (int64_t g = 0; g < group; g++) {
        const float inv = sums[g] > 0.0f ? 1.0f / sums[g] : 0.0f;
        for (int64_t i = 0; i < head_dim; i++) os[g * head_dim + i] = acc[g * head_dim + i] * inv;
    }
}

void openlora_paged_decode(const float *q, int64_t q_ss, int64_t q_hs, const float *k_cache, const float *v_cache,
                           int64_t block_size, int64_t kv_heads, int64_t head_dim, const int64_t *block_tables,
                           int64_t table_rs, const int64_t *context_lens, int64_t num_seqs, int64_t group,
                           float scale, int64_t window, float *out, int threads) {
    const int64_t pos_stride = kv_heads * head_dim; /* floats from one position to the next */
    const int64_t heads = kv_heads * group;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
    for (int64_t item = 0; item < num_seqs * kv_heads; item++) {
        const int64_t d = item / kv_heads, h = item % kv_heads;
        const int64_t ctx = context_lens[d];
        const int64_t lo = window > 0 && ctx > window ? ctx - window : 0;
        attend_group(q + d * q_ss + h * group * q_hs, q_hs, k_cache + h * head_dim, v_cache + h * head_dim,
                     block_tables + d * table_rs, block_size, pos_stride, head_dim, group, scale, lo, ctx,
                     out + (d * heads + h * group) * head_dim);
    }
}

/* The rotary embedding of a step's rows (the half-rotation layout: out[i] = x[i] * cos[i] - x[i + half] *
 * sin[i] and out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half]) applied in place to each
 * row's query and key heads, then the row's key and value written into the caches at its slot (block *
 * block_size + offset). q (T, heads, head_dim), k and v (T, kv_heads, head_dim) with their heads' last
 * dimension contiguous (any row and head strides: views of the fused projection's output), cos and sin
 * (T, head_dim) contiguous rows. Each product is rounded before the sum, as torch's separate multiplies and
 * add do (no contraction into fused multiply-adds), so the floats are torch's own. */
__attribute__((optimize("fp-contract=off"))) static void rotate(float *x, const float *c, const float *s,
                                                                int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        const float a = x1 * c[i], b = x2 * s[i];
        const float d = x2 * c[i + half], e = x1 * s[i + half];
        x[i] = a - b;
        x[i + half] = d + e;
    }
}

void openlora_rope_kv_write(float *q, int64_t q_rs, int64_t q_hs, float *k, int64_t k_rs, int64_t k_hs,
                            const float *v, int64_t v_rs, int64_t v_hs, const float *cos, const float *sin,
                            int64_t num_rows, int64_t heads, int64_t kv_heads, int64_t head_dim,
                            const int64_t *slot_ids, float *k_cache, float *v_cache, int threads) {
    const int64_t half = head_dim / 2, pos_stride = kv_heads * head_dim;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < num_rows; t++) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < heads; h++) rotate(q + t * q_rs + h * q_hs, c, s, half);
        float *kc = k_cache + slot_ids[t] * pos_stride, *vc = v_cache + slot_ids[t] * pos_stride;
        for (int64_t h = 0; h < kv_heads; h++) {
            float *kh = k + t * k_rs + h * k_hs;
            const float *vh = v + t * v_rs + h * v_hs;
            rotate(kh, c, s, half);
            for (int64_t i = 0; i < head_dim; i++) {
                kc[h * head_dim + i] = kh[i];
                vc[h * head_dim + i] = vh[i];
            }
        }
    }
}

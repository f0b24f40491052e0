/* SGMV shrink and expand on the CPU, float32, every segment of a projection in one call.
 *
 * The torch reference (openlora_kernels/reference.py) runs a many-adapter step as one matmul per segment, or as
 * batched matmuls over gathered or padded entries: each is a dispatch of microseconds for a product of
 * microseconds, and the padded forms read or write more than the product needs. These loops read each
 * segment's factors once and nothing else, on torch's OpenMP thread pool.
 *
 *     shrink: u[t, c] = sum_k x[t, k] * a[slot, c, k]                    c < cols(segment)
 *     expand: y[t, o] += sum_c (scale[slot] * u[t, c]) * b[slot, o, c]   c < cols(segment)
 *
 * for t in [start, end) of each segment. cols(segment) = min(num_cols, rank[segment] * rank_columns): the
 * columns its adapter's rank fills (the rest are zero padding in the pools, never read). Columns of u a
 * segment does not fill are left as the caller set them (zeros). Tensors are passed as base pointers and
 * strides in floats: x, a and y with their last dimension contiguous, u with any strides (a slice of a
 * fused group's rank-interleaved u), b with either its outputs or its columns contiguous (the CPU pools hold
 * outputs contiguous: each column of b is then one vector pass over a tile of outputs). Built and loaded
 * with the quantized linears' kernels by data_plane/model/quant/native.py (same flags, same OpenMP runtime
 * as torch), which checks every shape, stride and index before a call.
 */

#include <stdint.h>

#define SHRINK_ROWS 4   /* rows of x per pass over a block of columns of a, which stays in L1 meanwhile */
#define EXPAND_TILE 64  /* outputs per work item of the expand: a tile of b transposed on the stack */
#define MAX_COLS 512    /* the widest u (rank x slices) the expand's tile holds; native.py checks it */

static inline int64_t segment_cols(int64_t num_cols, const int64_t *ranks, int64_t g, int64_t rank_columns) {
    const int64_t cols = ranks[g] * rank_columns;
    return cols < num_cols ? cols : num_cols;
}

/* u rows 0..rows (x and u pointing at a segment's first row), columns c0..c1 of one segment. */
static void shrink_block(const float *x, int64_t x_rs, int64_t k_len, const float *a, int64_t a_rs, int64_t rows_total,
                         int64_t c0, int64_t c1, float *u, int64_t u_rs) {
    for (int64_t t0 = 0; t0 < rows_total; t0 += SHRINK_ROWS) {
        const int64_t rows = rows_total - t0 < SHRINK_ROWS ? rows_total - t0 : SHRINK_ROWS;
        for (int64_t c = c0; c < c1; c++) {
            const float *w = a + c * a_rs;
            float sums[SHRINK_ROWS] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t r = 0; r < rows; r++) {
                const float *xr = x + (t0 + r) * x_rs;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t k = 0; k < k_len; k++) s += xr[k] * w[k];
                sums[r] = s;
            }
            for (int64_t r = 0; r < rows; r++) u[(t0 + r) * u_rs + c] = sums[r];
        }
    }
}

#define SHRINK_COLS 8 /* columns of a per work item */

/* Work is shared out by segment when there are enough of them (each thread then reads whole adapters, and
 * the schedule hands out few items), else by (segment, block of columns), so that a step of one or two
 * segments still uses every thread. */
static inline int by_segment(int64_t num_segments, int threads) { return num_segments >= 4 * (int64_t)threads; }

void openlora_sgmv_shrink(const float *x, int64_t x_rs, int64_t k_len, const float *a, int64_t a_ss, int64_t a_rs,
                          const int64_t *starts, const int64_t *ends, const int64_t *slots, const int64_t *ranks,
                          int64_t num_segments, int64_t rank_columns, float *u, int64_t u_rs, int64_t num_cols,
                          int threads) {
    if (by_segment(num_segments, threads)) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t g = 0; g < num_segments; g++) {
            const int64_t cols = segment_cols(num_cols, ranks, g, rank_columns);
            for (int64_t c0 = 0; c0 < cols; c0 += SHRINK_COLS)
                shrink_block(x + starts[g] * x_rs, x_rs, k_len, a + slots[g] * a_ss, a_rs, ends[g] - starts[g], c0,
                             c0 + SHRINK_COLS < cols ? c0 + SHRINK_COLS : cols, u + starts[g] * u_rs, u_rs);
        }
        return;
    }
    const int64_t blocks = (num_cols + SHRINK_COLS - 1) / SHRINK_COLS;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)
    for (int64_t g = 0; g < num_segments; g++) {
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t cols = segment_cols(num_cols, ranks, g, rank_columns);
            const int64_t c0 = b * SHRINK_COLS;
            if (c0 >= cols) continue;
            const int64_t c1 = c0 + SHRINK_COLS < cols ? c0 + SHRINK_COLS : cols;
            shrink_block(x + starts[g] * x_rs, x_rs, k_len, a + slots[g] * a_ss, a_rs, ends[g] - starts[g], c0, c1,
                         u + starts[g] * u_rs, u_rs);
        }
    }
}

/* y rows start..end, outputs o0..o0 + width (width <= EXPAND_TILE) of one segment, b with outputs contiguous
 * (b[o, c] at o + c * b_cs: the CPU pools' layout). */
static void expand_tile_direct(const float *u, int64_t u_rs, int64_t u_cs, const float *b, int64_t b_cs, float s, int64_t start,
                               int64_t end, int64_t cols, int64_t o0, int64_t width, float *y, int64_t y_rs) {
    for (int64_t t = start; t < end; t++) {
        float acc[EXPAND_TILE] = {0.0f};
        for (int64_t c = 0; c < cols; c++) {
            const float uc = s * u[t * u_rs + c * u_cs];
            const float *bc = b + c * b_cs + o0;
#pragma omp simd
            for (int64_t j = 0; j < width; j++) acc[j] += uc * bc[j];
        }
        float *yt = y + t * y_rs + o0;
#pragma omp simd
        for (int64_t j = 0; j < width; j++) yt[j] += acc[j];
    }
}

/* The same for any other layout of b (b[o, c] at o * b_os + c * b_cs): the tile of b is transposed once
 * onto the stack and reused by every row of the segment. */
static void expand_tile_transposed(const float *u, int64_t u_rs, int64_t u_cs, const float *b, int64_t b_os, int64_t b_cs, float s,
                                   int64_t start, int64_t end, int64_t cols, int64_t o0, int64_t width, float *y,
                                   int64_t y_rs) {
    float bt[MAX_COLS][EXPAND_TILE]; /* bt[c][j] = b[o0 + j, c] */
    for (int64_t j = 0; j < width; j++)
        for (int64_t c = 0; c < cols; c++) bt[c][j] = b[(o0 + j) * b_os + c * b_cs];
    for (int64_t t = start; t < end; t++) {
        float acc[EXPAND_TILE] = {0.0f};
        for (int64_t c = 0; c < cols; c++) {
            const float uc = s * u[t * u_rs + c * u_cs];
#pragma omp simd
            for (int64_t j = 0; j < width; j++) acc[j] += uc * bt[c][j];
        }
        float *yt = y + t * y_rs + o0;
#pragma omp simd
        for (int64_t j = 0; j < width; j++) yt[j] += acc[j];
    }
}

/* Outputs tile..tile_end (tiles of EXPAND_TILE) of segment g. */
static void expand_tiles(const float *u, int64_t u_rs, int64_t u_cs, const float *b, int64_t b_ss, int64_t b_os,
                         int64_t b_cs, int64_t out_len, const float *scale, int64_t start, int64_t end, int64_t slot,
                         int64_t cols, int64_t tile, int64_t tile_end, float *y, int64_t y_rs) {
    const float *bs = b + slot * b_ss;
    const float s = scale[slot];
    for (; tile < tile_end; tile++) {
        const int64_t o0 = tile * EXPAND_TILE;
        const int64_t width = out_len - o0 < EXPAND_TILE ? out_len - o0 : EXPAND_TILE;
        if (b_os == 1)
            expand_tile_direct(u, u_rs, u_cs, bs, b_cs, s, start, end, cols, o0, width, y, y_rs);
        else
            expand_tile_transposed(u, u_rs, u_cs, bs, b_os, b_cs, s, start, end, cols, o0, width, y, y_rs);
    }
}

void openlora_sgmv_expand(const float *u, int64_t u_rs, int64_t u_cs, const float *b, int64_t b_ss, int64_t b_os,
                          int64_t b_cs, int64_t out_len, const float *scale, const int64_t *starts,
                          const int64_t *ends, const int64_t *slots, const int64_t *ranks, int64_t num_segments,
                          int64_t num_cols, float *y, int64_t y_rs, int threads) {
    const int64_t tiles = (out_len + EXPAND_TILE - 1) / EXPAND_TILE;
    if (by_segment(num_segments, threads)) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t g = 0; g < num_segments; g++)
            expand_tiles(u, u_rs, u_cs, b, b_ss, b_os, b_cs, out_len, scale, starts[g], ends[g], slots[g],
                         segment_cols(num_cols, ranks, g, 1), 0, tiles, y, y_rs);
        return;
    }
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)
    for (int64_t g = 0; g < num_segments; g++)
        for (int64_t tile = 0; tile < tiles; tile++)
            expand_tiles(u, u_rs, u_cs, b, b_ss, b_os, b_cs, out_len, scale, starts[g], ends[g], slots[g],
                         segment_cols(num_cols, ranks, g, 1), tile, tile + 1, y, y_rs);
}

#define FUSED_ROWS 32 /* rows of a segment whose u one work item of the fused path holds at once */

/* A projection's whole LoRA in one call: the shrink, then the expand of each of `num_slices` slices (b, its
 * strides, out_len, the first column of y it writes and scale given per slice, their addresses as int64);
 * slice_ids[i] is the slice's place in a's rank-interleaved columns (of num_slices_all), b_cols[i] its
 * pool's columns. With enough segments each work item takes a whole segment: u stays on its stack, between
 * the reads of its adapter's A and B. Else the shrink fills `u` (T, num_cols, any contents before) and the
 * expands read it, each shared out over columns or tiles as above. */
void openlora_sgmv_lora(const float *x, int64_t x_rs, int64_t k_len, const float *a, int64_t a_ss, int64_t a_rs,
                        int64_t num_cols, int64_t num_slices_all, int64_t num_slices, const int64_t *slice_ids,
                        const int64_t *b_addrs, const int64_t *b_ss, const int64_t *b_os, const int64_t *b_cs,
                        const int64_t *b_cols, const int64_t *out_lens, const int64_t *y_cols,
                        const int64_t *scale_addrs, const int64_t *starts, const int64_t *ends, const int64_t *slots,
                        const int64_t *ranks, int64_t num_segments, float *u, float *y, int64_t y_rs, int threads) {
    if (!by_segment(num_segments, threads)) {
        openlora_sgmv_shrink(x, x_rs, k_len, a, a_ss, a_rs, starts, ends, slots, ranks, num_segments, num_slices_all,
                             u, num_cols, num_cols, threads);
        for (int64_t i = 0; i < num_slices; i++)
            openlora_sgmv_expand(u + slice_ids[i], num_cols, num_slices_all, (const float *)b_addrs[i], b_ss[i], b_os[i],
                                 b_cs[i], out_lens[i], (const float *)scale_addrs[i], starts, ends, slots, ranks,
                                 num_segments, b_cols[i], y + y_cols[i], y_rs, threads);
        return;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t g = 0; g < num_segments; g++) {
        float us[FUSED_ROWS * MAX_COLS];
        const int64_t cols = segment_cols(num_cols, ranks, g, num_slices_all);
        for (int64_t t0 = starts[g]; t0 < ends[g]; t0 += FUSED_ROWS) {
            const int64_t rows = ends[g] - t0 < FUSED_ROWS ? ends[g] - t0 : FUSED_ROWS;
            for (int64_t c0 = 0; c0 < cols; c0 += SHRINK_COLS)
                shrink_block(x + t0 * x_rs, x_rs, k_len, a + slots[g] * a_ss, a_rs, rows, c0,
                             c0 + SHRINK_COLS < cols ? c0 + SHRINK_COLS : cols, us, cols);
            for (int64_t i = 0; i < num_slices; i++) {
                const int64_t tiles = (out_lens[i] + EXPAND_TILE - 1) / EXPAND_TILE;
                expand_tiles(us + slice_ids[i], cols, num_slices_all, (const float *)b_addrs[i], b_ss[i], b_os[i],
                             b_cs[i], out_lens[i], (const float *)scale_addrs[i], 0, rows, slots[g],
                             segment_cols(b_cols[i], ranks, g, 1), 0, tiles, y + t0 * y_rs + y_cols[i], y_rs);
            }
        }
    }
}

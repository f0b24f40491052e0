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
 * strides in elements: x, a and y with their last dimension contiguous, u with any strides (a slice of a
 * fused group's rank-interleaved u), b with either its outputs or its columns contiguous (the CPU pools hold
 * outputs contiguous: each column of b is then one run of addresses over the outputs, read in order).
 *
 * A slot of a and b holds its adapter's factors in one of three element formats, given per segment
 * (`formats`): float32, or the float16 or bfloat16 of a 16-bit adapter file (every such value is a float32
 * exactly, so widening it on load gives the products float32 factors give, bit for bit, with half the bytes
 * read). Slot s of a pool starts at byte 4 * s * slot_stride whatever its format, and its element at offset
 * i (in elements, the strides the same for every format) at that plus i * the format's size: a 16-bit slot
 * fills the first half of the float32 slot it lies in. x, u, y and the scales are float32. Built
 * and loaded with the quantized linears' kernels by data_plane/model/quant/native.py (same flags, same OpenMP
 * runtime as torch), which checks every shape, stride and index before a call: pools once per layer
 * (`NativeKernels.lora_pools`), x, y and the step's segments on every call.
 */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define EXPAND_TILE 64  /* outputs per work item of the expand: a tile of b transposed on the stack */
#define MAX_COLS 512    /* the widest u (rank x slices) the expand's tile holds; native.py checks it */

/* The machine's vector (GCC/Clang vector extensions: AVX-512, AVX2 or SSE under -march=native).
 *
 * A decode step reads each adapter's factors once for a row or a few, from memory: too many adapters to
 * stay in cache. On the machines measured (benchmarks/RESULTS.md) a core streams one sequential run of
 * addresses about half again as fast as a few runs interleaved a couple of KiB apart, so both loops
 * read their factor in address order: the shrink a's columns one after another (each against a block
 * of rows of x at once), the expand b's rows of outputs one after another (each added into a block of
 * rows of sums kept in the thread's scratch, cache-resident, then added into y). The floats are those of
 * a dot product per column and of sums over the columns in order, added into y once. */
#if defined(__AVX512F__)
#define VEC 16
#elif defined(__AVX__)
#define VEC 8
#else
#define VEC 4
#endif
#define ROWS_BLOCK 4 /* rows of x (shrink) or of u (expand) per pass over a factor */
/* How far ahead in a factor's stream of addresses the loops ask for it (`__builtin_prefetch`, a hint that
 * never faults): a step starts a new stream at every adapter's slot, each a few KiB, where the hardware's
 * prefetchers are still learning it. An A/B of 512, 1024 and 2048 against none on a noisy 2-core AVX2 EPYC
 * (benchmarks/RESULTS.md, 2026-12-05) did not separate them; the engine benchmark's figures there were
 * measured with 1024. A build may set it (-DPREFETCH_BYTES=N in CC). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024
#endif

typedef float vfloat __attribute__((vector_size(VEC * sizeof(float))));

static inline vfloat vload(const float *p) {
    vfloat v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vfloat v) { __builtin_memcpy(p, &v, sizeof v); }

/* A factor's element formats (the `formats` codes; native.py's SLOT_FORMATS names the same). The
 * functions below that take a format are inlined into a copy per format (`FOR_EACH_FORMAT`), so its loads
 * are straight-line: for float16 the CPU's conversion (F16C, or AVX-512's) where it has one, else the bit
 * arithmetic of `half_bits`; for bfloat16 a widen and a shift. */
enum { FMT_F32 = 0, FMT_F16 = 1, FMT_BF16 = 2 };
#define INLINE static inline __attribute__((always_inline))

typedef uint16_t vu16 __attribute__((vector_size(VEC * sizeof(uint16_t))));
typedef uint32_t vu32 __attribute__((vector_size(VEC * sizeof(uint32_t))));

static inline int64_t format_size(int fmt) { return fmt == FMT_F32 ? 4 : 2; }

/* The address of element `i` of a factor whose element 0 is at `base`. */
INLINE const void *at(const void *base, int64_t i, int fmt) { return (const char *)base + i * format_size(fmt); }

/* Slot `slot` of a pool whose slots are `slot_stride` float32 elements apart. */
static inline const void *slot_of(const float *pool, int64_t slot, int64_t slot_stride) { return pool + slot * slot_stride; }

/* The float32 bits of float16 values `h` (widened to 32 bits), exactly, infinities, NaNs and subnormals
 * included: exponent and mantissa shifted into place and the exponent rebiased (127 - 15 = 112 added); an
 * exponent of all ones (infinity, NaN: 31 + 112) moved up 112 more, to all ones again; a subnormal (or
 * zero) built as 2^-14 * (1 + m / 1024) and 2^-14 taken off, which is exact. `T` the 32-bit unsigned type
 * (a vector of them, or one), `F` the float type of as many lanes, MASK(c) all ones where c holds. */
#define HALF_BITS(T, F, MASK, h, out)                                                                        \
    do {                                                                                                     \
        const T sign_ = ((h) & 0x8000u) << 16;                                                               \
        T bits_ = ((h) & 0x7fffu) << 13;                                                                     \
        const T exp_ = bits_ & (0x7c00u << 13);                                                              \
        bits_ += 112u << 23;                                                                                 \
        const T top_ = MASK(exp_ == (0x7c00u << 13)), zero_ = MASK(exp_ == 0);                               \
        bits_ += top_ & (112u << 23);                                                                        \
        T sub_ = bits_ + (1u << 23);                                                                         \
        F sub_f_;                                                                                            \
        __builtin_memcpy(&sub_f_, &sub_, sizeof sub_f_);                                                     \
        sub_f_ -= 6.103515625e-05f; /* 2^-14 */                                                              \
        __builtin_memcpy(&sub_, &sub_f_, sizeof sub_);                                                       \
        (out) = ((zero_ & sub_) | (~zero_ & bits_)) | sign_;                                                 \
    } while (0)
#define VECTOR_MASK(c) ((vu32)(c))       /* vector comparisons give all ones or zeros per lane */
#define SCALAR_MASK(c) (0u - (uint32_t)(c)) /* a scalar one gives 1 or 0 */

INLINE vfloat wload(const void *w, int64_t i, int fmt) {
    if (fmt == FMT_F16) {
        const uint16_t *p = (const uint16_t *)w + i;
#if defined(__AVX512F__)
        const __m512 f = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#elif defined(__F16C__) && VEC == 8
        const __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
        vu16 h;
        __builtin_memcpy(&h, p, sizeof h);
        const vu32 h32 = __builtin_convertvector(h, vu32);
        vu32 f;
        HALF_BITS(vu32, vfloat, VECTOR_MASK, h32, f);
#endif
        vfloat v;
        __builtin_memcpy(&v, &f, sizeof v);
        return v;
    }
    if (fmt == FMT_BF16) {
        vu16 h;
        __builtin_memcpy(&h, (const uint16_t *)w + i, sizeof h);
        const vu32 bits = __builtin_convertvector(h, vu32) << 16;
        vfloat f;
        __builtin_memcpy(&f, &bits, sizeof f);
        return f;
    }
    return vload((const float *)w + i);
}

/* One element (the tails, and the stack tiles of the transposed expand). */
INLINE float wscalar(const void *w, int64_t i, int fmt) {
    if (fmt == FMT_F32) return ((const float *)w)[i];
    const uint32_t h = ((const uint16_t *)w)[i];
    uint32_t bits = h << 16;
    if (fmt == FMT_F16) {
#if defined(__F16C__)
        return _cvtsh_ss((unsigned short)h);
#else
        HALF_BITS(uint32_t, float, SCALAR_MASK, h, bits);
#endif
    }
    float f;
    __builtin_memcpy(&f, &bits, sizeof f);
    return f;
}

/* `call` (an expression naming `FMT`) with FMT each format as a constant, the one `fmt` names run. */
#define FOR_EACH_FORMAT(fmt, call)                                                                           \
    do {                                                                                                     \
        switch (fmt) {                                                                                       \
        case FMT_F16: {                                                                                      \
            enum { FMT = FMT_F16 };                                                                          \
            call;                                                                                            \
        } break;                                                                                             \
        case FMT_BF16: {                                                                                     \
            enum { FMT = FMT_BF16 };                                                                         \
            call;                                                                                            \
        } break;                                                                                             \
        default: {                                                                                           \
            enum { FMT = FMT_F32 };                                                                          \
            call;                                                                                            \
        } break;                                                                                             \
        }                                                                                                    \
    } while (0)

/* The lanes' sum as a tree (halves added pairwise): log2(VEC) dependent additions, not VEC. */
static inline float vsum(vfloat v) {
    float t[VEC];
    __builtin_memcpy(t, &v, sizeof t);
    for (int width = VEC / 2; width >= 1; width /= 2)
        for (int i = 0; i < width; i++) t[i] += t[i + width];
    return t[0];
}

static inline int64_t segment_cols(int64_t num_cols, const int64_t *ranks, int64_t g, int64_t rank_columns) {
    const int64_t cols = ranks[g] * rank_columns;
    return cols < num_cols ? cols : num_cols;
}

/* u[r * u_rs] = x[r] . w for r < rows (at most ROWS_BLOCK): one pass over w (format `fmt`). Inlined into
 * callers that pass a constant `rows` and `fmt`, so that the sums are registers. Each row's sum runs in
 * CHAINS(rows) independent vectors: one chain of fused multiply-adds waits on each one's latency (four
 * cycles or so), and at one or two rows (a decode step's segment) that is slower than memory brings w in. */
#define CHAINS(rows) ((rows) == 1 ? 4 : (rows) == 2 ? 2 : 1)
INLINE void shrink_column(const float *x, int64_t x_rs, int64_t k_len, const void *w, int fmt, int rows, float *u,
                          int64_t u_rs) {
    const int chains = CHAINS(rows);
    vfloat acc[ROWS_BLOCK][4];
    for (int r = 0; r < rows; r++)
        for (int p = 0; p < chains; p++) acc[r][p] = (vfloat){0.0f};
    int64_t k = 0;
    for (; k + chains * VEC <= k_len; k += chains * VEC) {
        for (int64_t line = 0; line < chains * VEC * format_size(fmt); line += 64)
            __builtin_prefetch((const char *)at(w, k, fmt) + PREFETCH_BYTES + line, 0, 0);
        for (int p = 0; p < chains; p++) {
            const vfloat wv = wload(w, k + p * VEC, fmt);
            for (int r = 0; r < rows; r++) acc[r][p] += vload(x + r * x_rs + k + p * VEC) * wv;
        }
    }
    for (; k + VEC <= k_len; k += VEC) {
        const vfloat wv = wload(w, k, fmt);
        for (int r = 0; r < rows; r++) acc[r][0] += vload(x + r * x_rs + k) * wv;
    }
    for (int r = 0; r < rows; r++) {
        vfloat total = acc[r][0];
        for (int p = 1; p < chains; p++) total += acc[r][p];
        float s = vsum(total);
        for (int64_t kk = k; kk < k_len; kk++) s += x[r * x_rs + kk] * wscalar(w, kk, fmt);
        u[r * u_rs] = s;
    }
}

/* u rows 0..rows_total (x and u pointing at a segment's first row), columns c0..c1 of one segment whose
 * slot of a starts at `a` (format `fmt`, rows a_rs elements apart). */
INLINE void shrink_block_as(const float *x, int64_t x_rs, int64_t k_len, const void *a, int64_t a_rs, int fmt,
                            int64_t rows_total, int64_t c0, int64_t c1, float *u, int64_t u_rs) {
    for (int64_t c = c0; c < c1; c++) {
        const void *w = at(a, c * a_rs, fmt);
        for (int64_t t0 = 0; t0 < rows_total; t0 += ROWS_BLOCK) {
            const float *xt = x + t0 * x_rs;
            float *ut = u + t0 * u_rs + c;
            switch (rows_total - t0 < ROWS_BLOCK ? rows_total - t0 : ROWS_BLOCK) {
            case 4: shrink_column(xt, x_rs, k_len, w, fmt, 4, ut, u_rs); break;
            case 3: shrink_column(xt, x_rs, k_len, w, fmt, 3, ut, u_rs); break;
            case 2: shrink_column(xt, x_rs, k_len, w, fmt, 2, ut, u_rs); break;
            default: shrink_column(xt, x_rs, k_len, w, fmt, 1, ut, u_rs); break;
            }
        }
    }
}

__attribute__((noinline)) static void shrink_block(const float *x, int64_t x_rs, int64_t k_len, const void *a, int64_t a_rs, int fmt,
                         int64_t rows_total, int64_t c0, int64_t c1, float *u, int64_t u_rs) {
    FOR_EACH_FORMAT(fmt, shrink_block_as(x, x_rs, k_len, a, a_rs, FMT, rows_total, c0, c1, u, u_rs));
}

#define SHRINK_COLS 8 /* columns of a per work item */

/* Work is shared out by segment when there are enough of them (each thread then reads whole adapters, and
 * the schedule hands out few items), else by (segment, block of columns), so that a step of one or two
 * segments still uses every thread. */
static inline int by_segment(int64_t num_segments, int threads) { return num_segments >= 4 * (int64_t)threads; }

void openlora_sgmv_shrink(const float *x, int64_t x_rs, int64_t k_len, const float *a, int64_t a_ss, int64_t a_rs,
                          const int64_t *starts, const int64_t *ends, const int64_t *slots, const int64_t *ranks,
                          const int64_t *formats, int64_t num_segments, int64_t rank_columns, float *u, int64_t u_rs,
                          int64_t num_cols, int threads) {
    if (by_segment(num_segments, threads)) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t g = 0; g < num_segments; g++) {
            shrink_block(x + starts[g] * x_rs, x_rs, k_len, slot_of(a, slots[g], a_ss), a_rs, (int)formats[g],
                         ends[g] - starts[g], 0, segment_cols(num_cols, ranks, g, rank_columns), u + starts[g] * u_rs,
                         u_rs);
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
            shrink_block(x + starts[g] * x_rs, x_rs, k_len, slot_of(a, slots[g], a_ss), a_rs, (int)formats[g],
                         ends[g] - starts[g], c0, c1, u + starts[g] * u_rs, u_rs);
        }
    }
}

/* y rows start..end, outputs o0..o0 + width (width <= EXPAND_TILE) of one segment, b with outputs contiguous
 * (b[o, c] at o + c * b_cs: the CPU pools' layout), the sums on the stack. */
__attribute__((noinline)) static void expand_tile_direct(const float *u, int64_t u_rs, int64_t u_cs, const void *b, int64_t b_cs, int fmt,
                               float s, int64_t start, int64_t end, int64_t cols, int64_t o0, int64_t width, float *y,
                               int64_t y_rs) {
    for (int64_t t = start; t < end; t++) {
        float acc[EXPAND_TILE] = {0.0f};
        for (int64_t c = 0; c < cols; c++) {
            const float uc = s * u[t * u_rs + c * u_cs];
            const void *bc = at(b, c * b_cs + o0, fmt);
            for (int64_t j = 0; j < width; j++) acc[j] += uc * wscalar(bc, j, fmt);
        }
        float *yt = y + t * y_rs + o0;
#pragma omp simd
        for (int64_t j = 0; j < width; j++) yt[j] += acc[j];
    }
}

/* The expand's sums for wider ranges of outputs: a buffer per thread, grown as needed and kept for the
 * thread's life (torch's pool threads persist), at most ROWS_BLOCK rows of the widest output a call asked
 * for. NULL when it cannot grow: the caller then works in tiles on the stack. */
static _Thread_local float *scratch;
static _Thread_local int64_t scratch_len;

static float *thread_scratch(int64_t len) {
    if (len <= scratch_len) return scratch;
    float *grown = malloc((size_t)len * sizeof(float));
    if (!grown) return NULL;
    free(scratch);
    scratch = grown;
    scratch_len = len;
    return scratch;
}

/* acc[r * width + j] += (s * u[r, c]) * bc[j] for r < rows (at most ROWS_BLOCK), j < width: one pass over a
 * row of b. Inlined into callers that pass a constant `rows` and `fmt`. */
INLINE void expand_row(float *acc, int64_t width, const void *bc, int fmt, const float *uc, int rows) {
    int64_t j = 0;
    for (; j + VEC <= width; j += VEC) {
        if ((j * format_size(fmt)) % 64 == 0) __builtin_prefetch((const char *)at(bc, j, fmt) + PREFETCH_BYTES, 0, 0);
        const vfloat bv = wload(bc, j, fmt);
        for (int r = 0; r < rows; r++) vstore(acc + r * width + j, vload(acc + r * width + j) + uc[r] * bv);
    }
    for (; j < width; j++)
        for (int r = 0; r < rows; r++) acc[r * width + j] += uc[r] * wscalar(bc, j, fmt);
}

/* y rows start..end, outputs o0..o0 + width of one segment, b outputs-contiguous: each row of b read once
 * per ROWS_BLOCK rows of y, in address order. */
INLINE void expand_direct(const float *u, int64_t u_rs, int64_t u_cs, const void *b, int64_t b_cs, int fmt, float s,
                          int64_t start, int64_t end, int64_t cols, int64_t o0, int64_t width, float *y, int64_t y_rs) {
    float *acc = width > EXPAND_TILE ? thread_scratch(ROWS_BLOCK * width) : NULL;
    if (!acc) {
        for (int64_t j0 = 0; j0 < width; j0 += EXPAND_TILE)
            expand_tile_direct(u, u_rs, u_cs, b, b_cs, fmt, s, start, end, cols, o0 + j0,
                               width - j0 < EXPAND_TILE ? width - j0 : EXPAND_TILE, y, y_rs);
        return;
    }
    for (int64_t t0 = start; t0 < end; t0 += ROWS_BLOCK) {
        const int rows = (int)(end - t0 < ROWS_BLOCK ? end - t0 : ROWS_BLOCK);
        memset(acc, 0, (size_t)(rows * width) * sizeof(float));
        for (int64_t c = 0; c < cols; c++) {
            float uc[ROWS_BLOCK];
            for (int r = 0; r < rows; r++) uc[r] = s * u[(t0 + r) * u_rs + c * u_cs];
            const void *bc = at(b, c * b_cs + o0, fmt);
            switch (rows) {
            case 4: expand_row(acc, width, bc, fmt, uc, 4); break;
            case 3: expand_row(acc, width, bc, fmt, uc, 3); break;
            case 2: expand_row(acc, width, bc, fmt, uc, 2); break;
            default: expand_row(acc, width, bc, fmt, uc, 1); break;
            }
        }
        for (int r = 0; r < rows; r++) {
            float *yt = y + (t0 + r) * y_rs + o0;
            const float *ar = acc + r * width;
#pragma omp simd
            for (int64_t j = 0; j < width; j++) yt[j] += ar[j];
        }
    }
}

/* The same for any other layout of b (b[o, c] at o * b_os + c * b_cs): the tile of b is transposed once
 * onto the stack, widened to float32, and reused by every row of the segment. */
__attribute__((noinline)) static void expand_tile_transposed(const float *u, int64_t u_rs, int64_t u_cs, const void *b, int64_t b_os,
                                   int64_t b_cs, int fmt, float s, int64_t start, int64_t end, int64_t cols,
                                   int64_t o0, int64_t width, float *y, int64_t y_rs) {
    float bt[MAX_COLS][EXPAND_TILE]; /* bt[c][j] = b[o0 + j, c] */
    for (int64_t j = 0; j < width; j++)
        for (int64_t c = 0; c < cols; c++) bt[c][j] = wscalar(b, (o0 + j) * b_os + c * b_cs, fmt);
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

/* Outputs tile..tile_end (tiles of EXPAND_TILE) of a segment whose slot of b starts at `bs` (format `fmt`),
 * its scale `s`. */
INLINE void expand_tiles_as(const float *u, int64_t u_rs, int64_t u_cs, const void *bs, int64_t b_os, int64_t b_cs,
                            int fmt, int64_t out_len, float s, int64_t start, int64_t end, int64_t cols, int64_t tile,
                            int64_t tile_end, float *y, int64_t y_rs) {
    if (b_os == 1) {
        const int64_t o0 = tile * EXPAND_TILE, o1 = tile_end * EXPAND_TILE < out_len ? tile_end * EXPAND_TILE : out_len;
        expand_direct(u, u_rs, u_cs, bs, b_cs, fmt, s, start, end, cols, o0, o1 - o0, y, y_rs);
        return;
    }
    for (; tile < tile_end; tile++) {
        const int64_t o0 = tile * EXPAND_TILE;
        const int64_t width = out_len - o0 < EXPAND_TILE ? out_len - o0 : EXPAND_TILE;
        expand_tile_transposed(u, u_rs, u_cs, bs, b_os, b_cs, fmt, s, start, end, cols, o0, width, y, y_rs);
    }
}

__attribute__((noinline)) static void expand_tiles(const float *u, int64_t u_rs, int64_t u_cs, const float *b, int64_t b_ss, int64_t b_os,
                         int64_t b_cs, int64_t out_len, const float *scale, int64_t start, int64_t end, int64_t slot,
                         int fmt, int64_t cols, int64_t tile, int64_t tile_end, float *y, int64_t y_rs) {
    const void *bs = slot_of(b, slot, b_ss);
    const float s = scale[slot];
    FOR_EACH_FORMAT(fmt, expand_tiles_as(u, u_rs, u_cs, bs, b_os, b_cs, FMT, out_len, s, start, end, cols, tile,
                                         tile_end, y, y_rs));
}

void openlora_sgmv_expand(const float *u, int64_t u_rs, int64_t u_cs, const float *b, int64_t b_ss, int64_t b_os,
                          int64_t b_cs, int64_t out_len, const float *scale, const int64_t *starts,
                          const int64_t *ends, const int64_t *slots, const int64_t *ranks, const int64_t *formats,
                          int64_t num_segments, int64_t num_cols, float *y, int64_t y_rs, int threads) {
    const int64_t tiles = (out_len + EXPAND_TILE - 1) / EXPAND_TILE;
    if (by_segment(num_segments, threads)) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int64_t g = 0; g < num_segments; g++)
            expand_tiles(u, u_rs, u_cs, b, b_ss, b_os, b_cs, out_len, scale, starts[g], ends[g], slots[g],
                         (int)formats[g], segment_cols(num_cols, ranks, g, 1), 0, tiles, y, y_rs);
        return;
    }
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)
    for (int64_t g = 0; g < num_segments; g++)
        for (int64_t tile = 0; tile < tiles; tile++)
            expand_tiles(u, u_rs, u_cs, b, b_ss, b_os, b_cs, out_len, scale, starts[g], ends[g], slots[g],
                         (int)formats[g], segment_cols(num_cols, ranks, g, 1), tile, tile + 1, y, y_rs);
}

#define FUSED_ROWS 32 /* rows of a segment whose u one work item of the fused path holds at once */

/* A projection's whole LoRA in one call: the shrink, then the expand of each of `num_slices` slices (b, its
 * strides, out_len, the first column of y it writes and scale given per slice, their addresses as int64);
 * slice_ids[i] is the slice's place in a's rank-interleaved columns (of num_slices_all), b_cols[i] its
 * pool's columns. With enough segments each work item takes a whole segment: u stays on its stack, between
 * the reads of its adapter's A and B. Else the shrink fills a u of (num_rows, num_cols) the call allocates
 * and the expands read it, each shared out over columns or tiles as above. A segment's format is that of
 * its slot in a and in every b. Returns 0, or -1 when u cannot be allocated (nothing written). */
int openlora_sgmv_lora(const float *x, int64_t x_rs, int64_t k_len, const float *a, int64_t a_ss, int64_t a_rs,
                        int64_t num_cols, int64_t num_slices_all, int64_t num_slices, const int64_t *slice_ids,
                        const int64_t *b_addrs, const int64_t *b_ss, const int64_t *b_os, const int64_t *b_cs,
                        const int64_t *b_cols, const int64_t *out_lens, const int64_t *y_cols,
                        const int64_t *scale_addrs, const int64_t *starts, const int64_t *ends, const int64_t *slots,
                        const int64_t *ranks, const int64_t *formats, int64_t num_segments, int64_t num_rows,
                        float *y, int64_t y_rs, int threads) {
    if (!by_segment(num_segments, threads)) {
        float *u = malloc((size_t)(num_rows * num_cols) * sizeof(float));
        if (!u) return -1;
        openlora_sgmv_shrink(x, x_rs, k_len, a, a_ss, a_rs, starts, ends, slots, ranks, formats, num_segments,
                             num_slices_all, u, num_cols, num_cols, threads);
        for (int64_t i = 0; i < num_slices; i++)
            openlora_sgmv_expand(u + slice_ids[i], num_cols, num_slices_all, (const float *)b_addrs[i], b_ss[i],
                                 b_os[i], b_cs[i], out_lens[i], (const float *)scale_addrs[i], starts, ends, slots,
                                 ranks, formats, num_segments, b_cols[i], y + y_cols[i], y_rs, threads);
        free(u);
        return 0;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t g = 0; g < num_segments; g++) {
        float us[FUSED_ROWS * MAX_COLS];
        const int64_t cols = segment_cols(num_cols, ranks, g, num_slices_all);
        const int fmt = (int)formats[g];
        for (int64_t t0 = starts[g]; t0 < ends[g]; t0 += FUSED_ROWS) {
            const int64_t rows = ends[g] - t0 < FUSED_ROWS ? ends[g] - t0 : FUSED_ROWS;
            shrink_block(x + t0 * x_rs, x_rs, k_len, slot_of(a, slots[g], a_ss), a_rs, fmt, rows, 0, cols, us, cols);
            for (int64_t i = 0; i < num_slices; i++) {
                const int64_t tiles = (out_lens[i] + EXPAND_TILE - 1) / EXPAND_TILE;
                expand_tiles(us + slice_ids[i], cols, num_slices_all, (const float *)b_addrs[i], b_ss[i], b_os[i],
                             b_cs[i], out_lens[i], (const float *)scale_addrs[i], 0, rows, slots[g], fmt,
                             segment_cols(b_cols[i], ranks, g, 1), 0, tiles, y + t0 * y_rs + y_cols[i], y_rs);
            }
        }
    }
    return 0;
}

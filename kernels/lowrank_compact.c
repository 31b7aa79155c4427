/* The CPU path's compact kernels: low-rank pack deltas computed on their codes.
 *
 * A factor is kept as its tiers, each with float32 scales and zeros per group of
 * `group_size` columns: value = code * scale + zero (kernels/quant.py). Codes are cut into
 * chunks of 32 columns: 32 bytes, or for 2- and 4-bit tiers (`nibbles`) 16 bytes whose low
 * nibbles are columns 0..15 and high nibbles columns 16..31, so 16 bytes widen into two
 * vectors of floats with a mask and a shift. A tier's chunks are row by row (A: the shrink
 * streams a row) or `blocked`, chunk j of every row side by side (Bᵀ: the expand reads one
 * chunk of every row in turn, so a tier is read front to back). A step's columns of t are the
 * concatenated rows of the tiers of the packs it uses; `row_tier[k]` and `row_index[k]` say
 * which tier and row column k of t is. Built by kernels/lowrank_compact.py with
 * -O3 -march=native -fopenmp and the three flags that let gcc vectorise float sums
 * (-fassociative-math -fno-signed-zeros -fno-trapping-math): NaN and infinities are kept.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *codes;
    const float *scales; /* rows x (pcols / group_size) */
    const float *zeros;  /* rows x (pcols / group_size) */
    int64_t rows, pcols, group_size, col, group_shift; /* group_size == 1 << group_shift */
    int64_t blocked, nibbles;
} Tier;

static inline int64_t chunk_bytes(const Tier *T) { return T->nibbles ? 16 : 32; }

/* the bytes of chunk j (columns 32j .. 32j + 31) of row r */
static inline const uint8_t *chunk_at(const Tier *T, int64_t r, int64_t j) {
    const int64_t cb = chunk_bytes(T);
    return T->blocked ? T->codes + (j * T->rows + r) * cb : T->codes + (r * ((T->pcols + 31) >> 5) + j) * cb;
}

/* from one chunk of a row to the next */
static inline int64_t chunk_stride(const Tier *T) { return T->blocked ? T->rows * chunk_bytes(T) : chunk_bytes(T); }

static inline int code_of(const Tier *T, int64_t r, int64_t c) {
    const uint8_t *chunk = chunk_at(T, r, c >> 5);
    const int64_t i = c & 31;
    if (!T->nibbles) return chunk[i];
    return i < 16 ? chunk[i] & 15 : chunk[i - 16] >> 4;
}

/* this thread's OpenMP threads for its next parallel regions (torch's ops share this libgomp);
   returns the previous count */
int64_t set_omp_threads(int64_t n) {
#ifdef _OPENMP
    const int64_t old = omp_get_max_threads();
    omp_set_num_threads((int)n);
    return old;
#else
    (void)n;
    return 1;
#endif
}

/* below this many multiply-adds a step runs on one thread (set_parallel_fmas: tests force the
   threaded loops with 0) */
static int64_t parallel_fmas = 2 << 20;
int64_t set_parallel_fmas(int64_t fmas) {
    const int64_t old = parallel_fmas;
    parallel_fmas = fmas;
    return old;
}
#define MAX_ROWS 64      /* shrink/expand serve decode-sized steps; bigger ones dequantize and use a GEMM */

typedef float v16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));

/* a chunk's 32 codes as two vectors of floats (columns 0..15, 16..31): gcc 12 turns
   __builtin_convertvector from bytes into 16 scalar conversions, so widen with the
   machine's own instructions where it has them */
static inline v16 widen(u8x16 b) {
#if defined(__AVX512F__)
    __m128i v;
    memcpy(&v, &b, 16);
    return (v16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
#elif defined(__AVX2__)
    __m128i v;
    memcpy(&v, &b, 16);
    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
    v16 out;
    memcpy(&out, &lo, 32);
    memcpy((char *)&out + 32, &hi, 32);
    return out;
#else
    return __builtin_convertvector(b, v16);
#endif
}

static inline void load_chunk(const uint8_t *chunk, int64_t nibbles, v16 *lo, v16 *hi) {
    u8x16 a, b;
    memcpy(&a, chunk, 16);
    if (nibbles) {
        b = a >> 4;
        a = a & 15;
    } else {
        memcpy(&b, chunk + 16, 16);
    }
    *lo = widen(a);
    *hi = widen(b);
}

static inline v16 loadu(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void storeu(float *p, v16 v) { memcpy(p, &v, sizeof v); }

typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

static inline float hsum(v16 v) { /* a tree, not a chain of 16 dependent adds */
    const v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

/* Columns [0, vector_cols) go a chunk of 32 at a time (one group per 16 columns:
   group_size >= 16); the rest, and every column of a tier with smaller groups, one by one. */
static inline int64_t vector_cols(const Tier *T, int64_t cols) {
    return T->group_size >= 16 ? cols / 32 * 32 : 0;
}

/* One column k of t (one rank of one pack's tier), looked up once per call. */
typedef struct {
    const uint8_t *q; /* chunk 0 of its codes */
    const float *sc, *zr;
    const Tier *T;
    int64_t stride, shift, vc, nibbles, r;
} Col;

static void make_cols(const Tier *tiers, const int64_t *row_tier, const int64_t *row_index, int64_t R, int64_t cols,
                      Col *out) {
    for (int64_t k = 0; k < R; k++) {
        const Tier *T = &tiers[row_tier[k]];
        const int64_t r = row_index[k], groups = T->pcols >> T->group_shift;
        out[k] = (Col){chunk_at(T, r, 0), T->scales + r * groups, T->zeros + r * groups, T,
                       chunk_stride(T), T->group_shift, vector_cols(T, cols), T->nibbles, r};
    }
}

/* columns c0 .. c0 + m - 1 (chunk j, m <= 32) of column k's factor row, as two vectors (zeros past m) */
static inline void col_chunk(const Col *C, int64_t j, int64_t c0, int64_t m, v16 *w0, v16 *w1) {
    if (c0 + 32 <= C->vc) {
        load_chunk(C->q + j * C->stride, C->nibbles, w0, w1);
        const int64_t g0 = c0 >> C->shift, g1 = (c0 + 16) >> C->shift; /* the same group when it spans 32+ */
        *w0 = *w0 * C->sc[g0] + C->zr[g0];
        *w1 = *w1 * C->sc[g1] + C->zr[g1];
        return;
    }
    for (int64_t i = 0; i < 16; i++) {
        const int64_t c = c0 + i, d = c + 16;
        (*w0)[i] = i < m ? (float)code_of(C->T, C->r, c) * C->sc[c >> C->shift] + C->zr[c >> C->shift]
                         : 0.0f;
        (*w1)[i] = i + 16 < m ? (float)code_of(C->T, C->r, d) * C->sc[d >> C->shift] + C->zr[d >> C->shift]
                              : 0.0f;
    }
}

/* Software prefetch. Between two pack steps the base GEMMs stream megabytes of weights
   through the caches, so a step's factors come from memory, in many short streams (each
   pack's tiers, their scales) that the hardware prefetcher does not pick up. The kernels ask
   for the lines a few columns (shrink) or blocks (expand) ahead of use. Asking for every line
   of a step up front did not help: the requests were issued in under a microsecond and most
   were evidently dropped (the step was no faster than without them). */
#define PF_COLS 4   /* shrink: columns of A ahead */
#define PF_BLOCKS 4 /* expand: blocks of 32 columns of Bᵀ ahead */

static inline void prefetch_lines(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

/* column k's scales and zeros (one float each per group of its row) */
static inline void prefetch_groups(const Col *K, int64_t cols) {
    const int64_t bytes = (((cols - 1) >> K->shift) + 1) * (int64_t)sizeof(float);
    prefetch_lines(K->sc, bytes);
    prefetch_lines(K->zr, bytes);
}

#define INLINE static inline __attribute__((always_inline))

/* One group of nr (1..4) rows of column k: with nr a constant after inlining, a pack used by
   one row (a batch whose rows each use their own pack) does a quarter of a 4-row group's work. */
INLINE void shrink_rows(const float *x, int64_t cols, const Col *K, int64_t k, int64_t R, int64_t p,
                        const int64_t *rows, const int nr, const float *weights, int64_t ldw, const float *s,
                        float *t) {
    const int64_t vc = K->vc;
    const float *xr[4];
    for (int i = 0; i < 4; i++) xr[i] = x + rows[i < nr ? i : nr - 1] * cols;
    /* two sums a row (the chunk's halves): one would chain its two multiply-adds, and a
       row alone (nr = 1) would wait on that chain */
    v16 lo[4] = {{0}, {0}, {0}, {0}}, hi[4] = {{0}, {0}, {0}, {0}};
    for (int64_t c = 0; c < vc; c += 32) {
        v16 w, u;
        col_chunk(K, c >> 5, c, 32, &w, &u);
        for (int i = 0; i < nr; i++) {
            lo[i] += loadu(xr[i] + c) * w;
            hi[i] += loadu(xr[i] + c + 16) * u;
        }
    }
    for (int i = 0; i < nr; i++) {
        float a = hsum(lo[i] + hi[i]);
        for (int64_t c = vc; c < cols; c++)
            a += xr[i][c] * ((float)code_of(K->T, K->r, c) * K->sc[c >> K->shift] + K->zr[c >> K->shift]);
        const int64_t row = rows[i];
        t[row * R + k] = a * weights[row * ldw + p] * s[k];
    }
}

/* t[i, k] = (x[i] . A_k) * weights[i, p(k)] * s[k] for the rows i that use column k's pack p(k)
   (no other entry of t is read). Rows go up to 4 at a time, their sums in registers while
   A_k's chunks stream by. */
static void seg_shrink(const float *x, int64_t cols, const Col *C, int64_t R, const int64_t *pack_of_col,
                       const int64_t *prow, const int64_t *pcount, int64_t n, const float *weights, int64_t ldw,
                       const float *s, float *t, const Col *next, int64_t next_cols, int64_t threads) {
    for (int64_t k = 0; k < PF_COLS && k < R; k++) {
        prefetch_lines(C[k].q, ((cols + 31) >> 5) * C[k].stride);
        prefetch_groups(&C[k], cols);
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t k = 0; k < R; k++) {
        if (k + PF_COLS < R) { /* A is row by row: a column's chunks are one run */
            prefetch_lines(C[k + PF_COLS].q, ((cols + 31) >> 5) * C[k + PF_COLS].stride);
            prefetch_groups(&C[k + PF_COLS], cols);
        }
        /* what the expand reads first: Bᵀ's scales and first blocks for this column */
        prefetch_groups(&next[k], next_cols);
        for (int64_t j = 0; j < PF_BLOCKS; j++) __builtin_prefetch(next[k].q + j * next[k].stride, 0, 3);
        const int64_t p = pack_of_col[k], m = pcount[p];
        const int64_t *rows = prow + p * n;
        for (int64_t r0 = 0; r0 < m; r0 += 4) {
            switch (m - r0 < 4 ? m - r0 : 4) {
            case 1: shrink_rows(x, cols, &C[k], k, R, p, rows + r0, 1, weights, ldw, s, t); break;
            case 2: shrink_rows(x, cols, &C[k], k, R, p, rows + r0, 2, weights, ldw, s, t); break;
            case 3: shrink_rows(x, cols, &C[k], k, R, p, rows + r0, 3, weights, ldw, s, t); break;
            default: shrink_rows(x, cols, &C[k], k, R, p, rows + r0, 4, weights, ldw, s, t); break;
            }
        }
    }
}

/* block b (columns c0 .. c0 + m - 1) of one group of nr rows, over columns k0 .. k1 - 1 of t */
INLINE void expand_rows(float *y, int64_t ldy, const float *t, int64_t R, const Col *C, int64_t k0, int64_t k1,
                        int64_t b, int64_t c0, int64_t m, const int64_t *rows, const int nr) {
    v16 lo[4] = {{0}, {0}, {0}, {0}}, hi[4] = {{0}, {0}, {0}, {0}};
    for (int64_t k = k0; k < k1; k++) {
        v16 w0, w1;
        col_chunk(&C[k], b, c0, m, &w0, &w1);
        for (int i = 0; i < nr; i++) {
            const float ti = t[rows[i] * R + k];
            lo[i] += ti * w0;
            hi[i] += ti * w1;
        }
    }
    for (int i = 0; i < nr; i++) {
        float *yi = y + rows[i] * ldy + c0;
        if (m == 32) {
            storeu(yi, loadu(yi) + lo[i]);
            storeu(yi + 16, loadu(yi + 16) + hi[i]);
        } else {
            for (int64_t j = 0; j < m; j++) yi[j] += j < 16 ? lo[i][j] : hi[i][j - 16];
        }
    }
}

/* y[i, c] += sum over the packs p row i uses, and their columns k, of t[i, k] * B_k[c]
   (y: row stride ldy). Pack by pack, then group by group of up to 4 of its rows, the blocks of
   32 columns go in order, the group's sums in registers over the pack's columns: a pack's Bᵀ
   tiers are read front to back, a few streams the hardware prefetcher follows (blocks outside
   and packs inside interleaved every pack's streams: measured slower), and y's rows stay in
   L1. Threads split the blocks. */
static void seg_expand(float *y, int64_t ldy, int64_t cols, const float *t, int64_t R, const Col *C,
                       const int64_t *kstart, const int64_t *prow, const int64_t *pcount, int64_t npacks, int64_t n,
                       int64_t threads) {
    const int64_t blocks = (cols + 31) / 32;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t b_lo = 0, b_hi = blocks;
#ifdef _OPENMP
        const int64_t nt = omp_get_num_threads(), me = omp_get_thread_num();
        b_lo = blocks * me / nt;
        b_hi = blocks * (me + 1) / nt;
#endif
        for (int64_t p = 0; p < npacks; p++) {
            const int64_t *rows = prow + p * n, k0 = kstart[p], k1 = kstart[p + 1];
            for (int64_t r0 = 0; r0 < pcount[p]; r0 += 4) {
                const int nr = pcount[p] - r0 < 4 ? (int)(pcount[p] - r0) : 4;
                for (int64_t b = b_lo; b < b_hi; b++) {
                    const int64_t c0 = b * 32, m = cols - c0 < 32 ? cols - c0 : 32;
                    if (b + PF_BLOCKS < b_hi) /* one line a column: a few columns share it, the rest are hits */
                        for (int64_t k = k0; k < k1; k++)
                            __builtin_prefetch(C[k].q + (b + PF_BLOCKS) * C[k].stride, 0, 3);
                    switch (nr) {
                    case 1: expand_rows(y, ldy, t, R, C, k0, k1, b, c0, m, rows + r0, 1); break;
                    case 2: expand_rows(y, ldy, t, R, C, k0, k1, b, c0, m, rows + r0, 2); break;
                    case 3: expand_rows(y, ldy, t, R, C, k0, k1, b, c0, m, rows + r0, 3); break;
                    default: expand_rows(y, ldy, t, R, C, k0, k1, b, c0, m, rows + r0, 4); break;
                    }
                }
            }
        }
    }
}

/* One chunk (32 columns: 4 x bits bytes of file codes, code c in byte c / (8 / bits) at bit
   (c % (8 / bits)) * bits, kernels/quant.py) as the kernels keep it */
INLINE void chunk_of(const uint8_t *src, int64_t bits, uint8_t *dst) {
    if (bits == 8) {
        memcpy(dst, src, 32);
        return;
    }
    const int64_t per = 8 / bits, mask = (1 << bits) - 1;
    const uint8_t *high = src + 16 / per; /* columns 16..31 */
    for (int64_t i = 0; i < 16; i++) {
        const int64_t shift = (i % per) * bits;
        dst[i] = (uint8_t)(((src[i / per] >> shift) & mask) | (((high[i / per] >> shift) & mask) << 4));
    }
}

/* One row of file codes into its chunks, `step` bytes apart; columns past the row's are 0 */
INLINE void chunk_row(const uint8_t *src, int64_t src_bytes, int64_t bits, uint8_t *dst, int64_t step) {
    const int64_t per_chunk = 4 * bits;
    int64_t j = 0;
    for (; (j + 1) * per_chunk <= src_bytes; j++) chunk_of(src + j * per_chunk, bits, dst + j * step);
    if (j * per_chunk < src_bytes) { /* a last part chunk, zero-padded */
        uint8_t tail[32] = {0};
        memcpy(tail, src + j * per_chunk, (size_t)(src_bytes - j * per_chunk));
        chunk_of(tail, bits, dst + j * step);
    }
}

/* A layout's tiers from their file codes (src: rows x src_bytes) into the kernels' chunks (dst):
   row by row, or `blocked`, each tier's chunk j of every row side by side, the tiers (tier_rows,
   ntiers of them, summing to rows) one after another. One pass here instead of a handful of
   torch ops over temporaries (tests/kernels/test_lowrank_torch.py spells the layout out). */
void to_chunks(const uint8_t *src, int64_t rows, int64_t src_bytes, int64_t bits, int64_t blocked,
               const int64_t *tier_rows, int64_t ntiers, uint8_t *dst) {
    const int64_t nch = (src_bytes * (8 / bits) + 31) >> 5, cb = bits <= 4 ? 16 : 32;
    int64_t first = 0, k = 0;
    for (int64_t r = 0; r < rows; r++) {
        while (blocked && k < ntiers - 1 && r >= first + tier_rows[k]) first += tier_rows[k++];
        uint8_t *d = blocked ? dst + (first * nch + (r - first)) * cb : dst + r * nch * cb;
        const int64_t step = blocked ? tier_rows[k] * cb : cb;
        switch (bits) { /* constant widths: shifts and masks, not divisions */
        case 2: chunk_row(src + r * src_bytes, src_bytes, 2, d, step); break;
        case 4: chunk_row(src + r * src_bytes, src_bytes, 4, d, step); break;
        default: chunk_row(src + r * src_bytes, src_bytes, 8, d, step); break;
        }
    }
}

/* n copies: sizes[i] bytes from the address srcs[i] to dst + offsets[i] (a pack's tiers
   gathered linear by linear, kernels/lowrank_compact.py) */
void copy_segments(uint8_t *dst, const int64_t *offsets, const int64_t *srcs, const int64_t *sizes, int64_t n) {
    for (int64_t i = 0; i < n; i++) memcpy(dst + offsets[i], (const void *)(intptr_t)srcs[i], (size_t)sizes[i]);
}

/* out[k, c] = B_k[c] for c < cols: every column k dequantized (out: R x cols), for large steps */
int dequantize(const Tier *tiers, const int64_t *row_tier, const int64_t *row_index, int64_t R, int64_t cols,
               float *out, int64_t threads) {
    Col *C = (Col *)malloc(sizeof(Col) * (size_t)(R + 1));
    if (!C) return 2;
    make_cols(tiers, row_tier, row_index, R, cols, C);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < R; k++) {
        float *o = out + k * cols;
        for (int64_t c = 0; c < cols; c += 32) { /* a chunk (two vectors) at a time */
            const int64_t m = cols - c < 32 ? cols - c : 32;
            v16 lo, hi;
            col_chunk(&C[k], c >> 5, c, m, &lo, &hi);
            if (m == 32) {
                storeu(o + c, lo);
                storeu(o + c + 16, hi);
            } else {
                for (int64_t i = 0; i < m; i++) o[c + i] = i < 16 ? lo[i] : hi[i - 16];
            }
        }
    }
    free(C);
    return 0;
}

/* A plan's columns as the kernels walk them (each column's tier, row, pointers and widths),
   looked up once per plan and linear (`plan_new`), not on every call: a decode step makes
   hundreds of calls with the same plan. The tiers it points into must outlive it. */
typedef struct {
    Col *a, *b;
    int64_t R, in_cols, out_cols;
} Plan;

void plan_free(void *plan) {
    Plan *P = (Plan *)plan;
    if (!P) return;
    free(P->a);
    free(P->b);
    free(P);
}

/* the plan of tiers a and b (A: in_cols wide, Bᵀ: out_cols) whose column k of t is row
   row_index[k] of tier row_tier[k]; NULL when out of memory */
void *plan_new(const Tier *a, const Tier *b, const int64_t *row_tier, const int64_t *row_index, int64_t R,
               int64_t in_cols, int64_t out_cols) {
    Plan *P = (Plan *)calloc(1, sizeof(Plan));
    if (!P) return NULL;
    P->a = (Col *)malloc(sizeof(Col) * (size_t)(R + 1));
    P->b = (Col *)malloc(sizeof(Col) * (size_t)(R + 1));
    if (!P->a || !P->b) {
        plan_free(P);
        return NULL;
    }
    make_cols(a, row_tier, row_index, R, in_cols, P->a);
    make_cols(b, row_tier, row_index, R, out_cols, P->b);
    P->R = R, P->in_cols = in_cols, P->out_cols = out_cols;
    return P;
}

/* One linear of a call: y (row stride ldy) += its deltas, on its plan (`plan_new`); pack_of_col
   (R): the pack of column k, nondecreasing (a pack's ranks are consecutive columns); s (R):
   singular values; t: n x R scratch. */
typedef struct {
    float *y;
    int64_t ldy;
    const void *plan;
    const int64_t *pack_of_col;
    const float *s;
    float *t;
} Target;

/* y += the step's low-rank deltas for rows of x, for `count` linears that read the same x (q, k
   and v; gate and up: one call each instead of one per linear). x: n x in_cols; weights (n x
   ldw): row i's weight for each of the step's ldw - 1 packs. A plan is the same for every step
   with its set of packs. Work follows the rows that use each pack, not every row: in a batch
   whose rows each use their own pack, an eighth of a dense formulation's. */
int lowrank_add_many(const Target *targets, int64_t count, const float *x, int64_t n, const float *weights,
                     int64_t ldw, int64_t threads) {
    if (n > MAX_ROWS) return 1;
    const int64_t npacks = ldw - 1;
    int64_t *prow = (int64_t *)malloc(sizeof(int64_t) * (size_t)(npacks * n + 1));
    int64_t *pcount = (int64_t *)calloc((size_t)(npacks + 1), sizeof(int64_t));
    int64_t *kstart = (int64_t *)malloc(sizeof(int64_t) * (size_t)(npacks + 2));
    if (!prow || !pcount || !kstart) {
        free(prow); free(pcount); free(kstart);
        return 2;
    }
    for (int64_t p = 0; p < npacks; p++)
        for (int64_t i = 0; i < n; i++)
            if (weights[i * ldw + p] != 0.0f) prow[p * n + pcount[p]++] = i;
    for (int64_t j = 0; j < count; j++) {
        const Target *T = &targets[j];
        const Plan *P = (const Plan *)T->plan;
        const int64_t R = P->R, in_cols = P->in_cols, out_cols = P->out_cols;
        for (int64_t p = 0, k = 0; p <= npacks; p++) {
            while (k < R && T->pack_of_col[k] < p) k++;
            kstart[p] = k;
        }
        /* a second thread costs tens of microseconds to wake where torch's OpenMP threads sleep
           between ops (more OpenMP threads than cores: libgomp barely spins): only a linear with
           enough work (rows x ranks x widths) gets one */
        int64_t fmas = 0;
        for (int64_t p = 0; p < npacks; p++) fmas += pcount[p] * (kstart[p + 1] - kstart[p]) * (in_cols + out_cols);
        const int64_t th = fmas < parallel_fmas ? 1 : threads;
        seg_shrink(x, in_cols, P->a, R, T->pack_of_col, prow, pcount, n, weights, ldw, T->s, T->t, P->b, out_cols, th);
        seg_expand(T->y, T->ldy, out_cols, T->t, R, P->b, kstart, prow, pcount, npacks, n, th);
    }
    free(prow); free(pcount); free(kstart);
    return 0;
}

/* lowrank_add_many for one linear */
int lowrank_add(float *y, int64_t ldy, const float *x, int64_t n, const float *weights, int64_t ldw, int64_t threads,
                const void *plan, const int64_t *pack_of_col, const float *s, float *t) {
    const Target target = {y, ldy, plan, pack_of_col, s, t};
    return lowrank_add_many(&target, 1, x, n, weights, ldw, threads);
}

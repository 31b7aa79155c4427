/* The CPU path's compact kernels: low-rank pack deltas computed on their codes.
 *
 * A factor is kept as its tiers, each with float32 scales and zeros per group of
 * `group_size` columns: value = code * scale + zero (kernels/quant.py). Codes are cut into
 * chunks of 32 columns: 32 bytes, or for 2- and 4-bit tiers (`nibbles`) 16 bytes whose low
 * nibbles are columns 0..15 and high nibbles columns 16..31, so 16 bytes widen into two
 * vectors of floats with a mask and a shift. A tier's chunks are row by row (A: the shrink
 * streams a row) or `blocked`, chunk j of every row side by side (Bᵀ: the expand reads one
 * chunk of every row in turn; `block_rows` rows a chunk index, as tiers of one layout share
 * one blocked tensor). A step's columns of t are the
 * concatenated rows of the tiers of the packs it uses; `row_tier[k]` and `row_index[k]` say
 * which tier and row column k of t is. Built by kernels/lowrank_compact.py with
 * -O3 -march=native -fopenmp and the three flags that let gcc vectorise float sums
 * (-fassociative-math -fno-signed-zeros -fno-trapping-math): NaN and infinities are kept.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *codes;
    const float *scales;   /* rows x (pcols / group_size) */
    const float *zeros;    /* rows x (pcols / group_size) */
    int64_t rows, pcols, group_size, col, group_shift; /* group_size == 1 << group_shift */
    int64_t blocked, nibbles;
    int64_t block_rows; /* blocked: rows stored per chunk index (the tier may share its storage with others) */
} Tier;

static inline int64_t chunk_bytes(const Tier *T) { return T->nibbles ? 16 : 32; }

/* the bytes of chunk j (columns 32j .. 32j + 31) of row r */
static inline const uint8_t *chunk_at(const Tier *T, int64_t r, int64_t j) {
    const int64_t cb = chunk_bytes(T);
    return T->blocked ? T->codes + (j * T->block_rows + r) * cb : T->codes + (r * ((T->pcols + 31) >> 5) + j) * cb;
}

/* from one chunk of a row to the next */
static inline int64_t chunk_stride(const Tier *T) { return T->blocked ? T->block_rows * chunk_bytes(T) : chunk_bytes(T); }

static inline int code_of(const Tier *T, int64_t r, int64_t c) {
    const uint8_t *chunk = chunk_at(T, r, c >> 5);
    const int64_t i = c & 31;
    if (!T->nibbles) return chunk[i];
    return i < 16 ? chunk[i] & 15 : chunk[i - 16] >> 4;
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

/* t[i, k] = sum_c x[i, c] * A_k[c] for c < cols, every column k of t (x: n x cols, t: n x R).
   Rows of x go 8 at a time (a short tile repeats its first row and drops those sums), their
   partial sums in registers while one row of codes streams by. */
int shrink(const float *x, int64_t n, int64_t cols, const Tier *tiers, const int64_t *row_tier,
           const int64_t *row_index, int64_t R, float *t, int64_t threads) {
    if (n > MAX_ROWS) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < R; k++) {
        const Tier *T = &tiers[row_tier[k]];
        const int64_t r = row_index[k], groups = T->pcols >> T->group_shift, sh = T->group_shift;
        const uint8_t *q = chunk_at(T, r, 0);
        const int64_t cb = chunk_bytes(T);
        const float *sc = T->scales + r * groups, *zr = T->zeros + r * groups;
        const int64_t vc = vector_cols(T, cols);
        for (int64_t i0 = 0; i0 < n; i0 += 8) {
            const int64_t ni = n - i0 < 8 ? n - i0 : 8;
            const float *xr[8];
            for (int i = 0; i < 8; i++) xr[i] = x + (i0 + (i < ni ? i : 0)) * cols;
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
            for (int64_t c = 0; c < vc; c += 32) {
                v16 lo, hi;
                load_chunk(q + (c >> 5) * cb, T->nibbles, &lo, &hi);
                const v16 w = lo * sc[c >> sh] + zr[c >> sh], u = hi * sc[(c + 16) >> sh] + zr[(c + 16) >> sh];
                a0 += loadu(xr[0] + c) * w + loadu(xr[0] + c + 16) * u;
                a1 += loadu(xr[1] + c) * w + loadu(xr[1] + c + 16) * u;
                a2 += loadu(xr[2] + c) * w + loadu(xr[2] + c + 16) * u;
                a3 += loadu(xr[3] + c) * w + loadu(xr[3] + c + 16) * u;
                a4 += loadu(xr[4] + c) * w + loadu(xr[4] + c + 16) * u;
                a5 += loadu(xr[5] + c) * w + loadu(xr[5] + c + 16) * u;
                a6 += loadu(xr[6] + c) * w + loadu(xr[6] + c + 16) * u;
                a7 += loadu(xr[7] + c) * w + loadu(xr[7] + c + 16) * u;
            }
            const v16 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
            for (int64_t i = 0; i < ni; i++) {
                float a = hsum(acc[i]);
                for (int64_t c = vc; c < cols; c++)
                    a += xr[i][c] * ((float)code_of(T, r, c) * sc[c >> sh] + zr[c >> sh]);
                t[(i0 + i) * R + k] = a;
            }
        }
    }
    return 0;
}

/* y[i, c] += sum_k t[i, k] * B_k[c] for c < cols (y: n x cols, row stride ldy; t: n x R).
   A tile of 8 rows x 32 columns keeps its sums in registers over every k (a GEMM micro-kernel
   whose B is dequantized 32 codes at a time), so y is read and written once. Where a block's
   columns are not all vector-ready (groups under 16 columns, the last columns) they are
   dequantized one by one into the same registers. */
int expand(float *y, int64_t ldy, int64_t n, int64_t cols, const float *t, const Tier *tiers,
           const int64_t *row_tier, const int64_t *row_index, int64_t R, int64_t threads,
           const float *weights, int64_t ldw, const int64_t *pack_of_col, const float *s) {
    /* weights (n x ldw), pack_of_col (R), s (R): when given, column k of row i is scaled by
       weights[i, pack_of_col[k]] * s[k] first (each row keeps its own packs' columns) */
    if (n > MAX_ROWS) return 1;
    const int64_t blocks = (cols + 31) / 32;
    /* per column k of t: its code row, scale and zero rows and group shift, looked up once */
    const uint8_t **q = (const uint8_t **)malloc(sizeof(void *) * (size_t)(R + 1));
    const float **sc = (const float **)malloc(sizeof(void *) * (size_t)(R + 1));
    const float **zr = (const float **)malloc(sizeof(void *) * (size_t)(R + 1));
    int64_t *sh = (int64_t *)malloc(sizeof(int64_t) * (size_t)(R + 1));
    int64_t *vc = (int64_t *)malloc(sizeof(int64_t) * (size_t)(R + 1));
    int64_t *bs = (int64_t *)malloc(sizeof(int64_t) * (size_t)(R + 1));
    int64_t *nb = (int64_t *)malloc(sizeof(int64_t) * (size_t)(R + 1));
    int64_t *rk = (int64_t *)malloc(sizeof(int64_t) * (size_t)(R + 1));
    const Tier **tk_of = (const Tier **)malloc(sizeof(void *) * (size_t)(R + 1));
    float *tt = (float *)malloc(sizeof(float) * (size_t)(R * 8 + 1)); /* t's tile, k-major: 8 rows per k */
    if (!q || !sc || !zr || !sh || !vc || !bs || !nb || !rk || !tk_of || !tt) {
        free(q); free(sc); free(zr); free(sh); free(vc); free(bs); free(nb); free(rk); free(tk_of); free(tt);
        return 2;
    }
    for (int64_t k = 0; k < R; k++) {
        const Tier *T = &tiers[row_tier[k]];
        const int64_t r = row_index[k], groups = T->pcols >> T->group_shift;
        q[k] = chunk_at(T, r, 0);
        bs[k] = chunk_stride(T); /* from one chunk of 32 columns to the next */
        nb[k] = T->nibbles;
        tk_of[k] = T;
        rk[k] = r;
        sc[k] = T->scales + r * groups;
        zr[k] = T->zeros + r * groups;
        sh[k] = T->group_shift;
        vc[k] = vector_cols(T, cols);
    }
    for (int64_t i0 = 0; i0 < n; i0 += 8) {
        const int64_t ni = n - i0 < 8 ? n - i0 : 8;
        for (int64_t k = 0; k < R; k++)
            for (int64_t i = 0; i < 8; i++) {
                float v = i < ni ? t[(i0 + i) * R + k] : 0.0f;
                if (weights && i < ni) v *= weights[(i0 + i) * ldw + pack_of_col[k]] * s[k];
                tt[k * 8 + i] = v;
            }
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t c0 = b * 32, m = cols - c0 < 32 ? cols - c0 : 32;
            v16 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
            v16 b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}, b4 = {0}, b5 = {0}, b6 = {0}, b7 = {0};
            for (int64_t k = 0; k < R; k++) {
                v16 w0, w1;
                if (c0 + 32 <= vc[k]) {
                    const int64_t g0 = c0 >> sh[k], g1 = (c0 + 16) >> sh[k];
                    load_chunk(q[k] + b * bs[k], nb[k], &w0, &w1); /* this chunk of column k's codes */
                    w0 = w0 * sc[k][g0] + zr[k][g0];
                    w1 = w1 * sc[k][g1] + zr[k][g1];
                } else {
                    for (int64_t j = 0; j < 16; j++) {
                        const int64_t c = c0 + j, d = c + 16;
                        w0[j] = j < m ? (float)code_of(tk_of[k], rk[k], c) * sc[k][c >> sh[k]] + zr[k][c >> sh[k]] : 0.0f;
                        w1[j] = j + 16 < m ? (float)code_of(tk_of[k], rk[k], d) * sc[k][d >> sh[k]] + zr[k][d >> sh[k]]
                                           : 0.0f;
                    }
                }
                const float *tk = tt + k * 8;
                a0 += tk[0] * w0; b0 += tk[0] * w1; a1 += tk[1] * w0; b1 += tk[1] * w1;
                a2 += tk[2] * w0; b2 += tk[2] * w1; a3 += tk[3] * w0; b3 += tk[3] * w1;
                a4 += tk[4] * w0; b4 += tk[4] * w1; a5 += tk[5] * w0; b5 += tk[5] * w1;
                a6 += tk[6] * w0; b6 += tk[6] * w1; a7 += tk[7] * w0; b7 += tk[7] * w1;
            }
            const v16 lo[8] = {a0, a1, a2, a3, a4, a5, a6, a7}, hi[8] = {b0, b1, b2, b3, b4, b5, b6, b7};
            for (int64_t i = 0; i < ni; i++) {
                float *yi = y + (i0 + i) * ldy + c0;
                if (m == 32) {
                    storeu(yi, loadu(yi) + lo[i]);
                    storeu(yi + 16, loadu(yi + 16) + hi[i]);
                } else {
                    for (int64_t j = 0; j < m; j++) yi[j] += j < 16 ? lo[i][j] : hi[i][j - 16];
                }
            }
        }
    }
    free(q); free(sc); free(zr); free(sh); free(vc); free(bs); free(nb); free(rk); free(tk_of); free(tt);
    return 0;
}

/* out[k, c] = B_k[c] for c < cols: every column k dequantized (out: R x cols), for large steps */
int dequantize(const Tier *tiers, const int64_t *row_tier, const int64_t *row_index, int64_t R, int64_t cols,
               float *out, int64_t threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < R; k++) {
        const Tier *T = &tiers[row_tier[k]];
        const int64_t r = row_index[k], groups = T->pcols / T->group_size;
        const float *sc = T->scales + r * groups, *zr = T->zeros + r * groups;
        float *o = out + k * cols;
        const int64_t vc = vector_cols(T, cols), sh = T->group_shift, stride = chunk_stride(T);
        const uint8_t *q = chunk_at(T, r, 0);
        for (int64_t c = 0; c < vc; c += 32) { /* a chunk (two vectors) at a time */
            v16 lo, hi;
            load_chunk(q + (c >> 5) * stride, T->nibbles, &lo, &hi);
            storeu(o + c, lo * sc[c >> sh] + zr[c >> sh]);
            storeu(o + c + 16, hi * sc[(c + 16) >> sh] + zr[(c + 16) >> sh]);
        }
        for (int64_t c = vc; c < cols; c++) o[c] = (float)code_of(T, r, c) * sc[c >> sh] + zr[c >> sh];
    }
    return 0;
}

/* y += the step's low-rank deltas for rows of x: shrink, scale by each row's pack weights and
   s, expand; one call per linear (x: n x in_cols, y: n x out_cols with row stride ldy). */
int lowrank_add(float *y, int64_t ldy, const float *x, int64_t n, int64_t in_cols, int64_t out_cols,
                const Tier *a, const Tier *b, const int64_t *row_tier, const int64_t *row_index, int64_t R,
                const float *weights, int64_t ldw, const int64_t *pack_of_col, const float *s, float *t,
                int64_t threads) {
    int code = shrink(x, n, in_cols, a, row_tier, row_index, R, t, threads);
    if (code) return code;
    return expand(y, ldy, n, out_cols, t, b, row_tier, row_index, R, threads, weights, ldw, pack_of_col, s);
}

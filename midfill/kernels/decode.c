/* Few-row matrix products for decoding: y[m, n] = sum_k x[m, k] * W[n, k], weights in bf16, int8 or int4.
 *
 * One decoded token multiplies one activation row by every weight matrix, so the speed is the
 * speed at which weights stream from memory. These loops read each weight byte once for up to
 * MAX_ROWS activation rows and widens it in registers (AVX2): bf16 to float32 for FMA; int8 and int4
 * to int16 for vpmaddwd against activations rounded to int16 (see quantize_rows). The output rows are
 * split across the OpenMP threads of the process (torch's own runtime, when torch loaded it first);
 * with one activation row, bf16 and int8 weight rows go in far-apart pairs (pair_bf16, pair_int8).
 * midfill builds this file on first use; PackedLinear.unpack (midfill/model/quantize.py) is the
 * pure-torch reference that tests compare it with.
 *
 * Layouts (row n of W is output feature n; K is a multiple of 32):
 *   bf16: uint16 [N, K], the upper half of a float32.
 *   int8: int8 [N, K] and float32 scale [N]: W = q * scale[n].
 *   int4: uint8 [N, K/2] and float16 scale, minimum [N, K/32]: W = q * scale + minimum, q in 0..15.
 *         In each group of 32 weights, byte i holds weight i in its low nibble, weight i+16 in its high.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 4
#define GROUP 32
#ifndef PREFETCH
#define PREFETCH 1024 /* bytes ahead of the weight being read: the hardware prefetcher alone leaves gaps */
#endif

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 bf16x8(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Lane i of the result is the sum of a[i]'s lanes: eight horizontal sums for the price of about two. */
static inline __m256 hsum8x8(const __m256 a[8]) {
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* The row kernels are written once for a compile-time row count and inlined per count. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Independent accumulators per row hide the FMA latency: four for one row, two each for more. */
#define ACCS(M) ((M) == 1 ? 4 : 2)

/* A 32-bit lane of packed bf16 holds weight 2i in its low half and 2i+1 in its high half: a shift and a
 * mask turn them into floats without shuffles, against x de-interleaved to match (see split_even_odd). */
ALWAYS_INLINE void row_bf16(const float *x, const uint16_t *w, float *y, int64_t n, int64_t N, int64_t K, const int M) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 acc[MAX_ROWS][4];
    for (int m = 0; m < M; m++)
        for (int a = 0; a < 4; a++) acc[m][a] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        _mm_prefetch((const char *)(w + k) + PREFETCH, _MM_HINT_T0);
        __m256i v0 = _mm256_loadu_si256((const __m256i *)(w + k)), v1 = _mm256_loadu_si256((const __m256i *)(w + k + 16));
        __m256 wv[4] = {_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_castsi256_ps(_mm256_and_si256(v0, high)),
                        _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), _mm256_castsi256_ps(_mm256_and_si256(v1, high))};
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 4; j++)
                acc[m][j % ACCS(M)] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(x + m * K + k + 8 * j), acc[m][j % ACCS(M)]);
    }
    for (int m = 0; m < M; m++) {
        __m256 total = acc[m][0];
        for (int a = 1; a < ACCS(M); a++) total = _mm256_add_ps(total, acc[m][a]);
        y[m * N + n] = hsum(total);
    }
}

/* Per block of 16: the 8 even-indexed values, then the 8 odd-indexed ones. */
static float *split_even_odd(const float *x, int64_t M, int64_t K) {
    float *out = malloc(M * K * sizeof(float));
    if (!out) return NULL;
    for (int64_t i = 0; i < M * K; i += 16)
        for (int j = 0; j < 8; j++) out[i + j] = x[i + 2 * j], out[i + 8 + j] = x[i + 2 * j + 1];
    return out;
}

/* Integer paths: activations rounded to int16 per row (relative error 2^-16 of the row's largest
 * value, far below the weights' own rounding), so pairs of products come from one vpmaddwd. */
typedef struct {
    int16_t *q;     /* [M, K] */
    float *scale;   /* [M]: x ~= q * scale */
    float *sums;    /* [M, K / GROUP]: group sums of x, for the int4 minimum term */
} Rows;

static int quantize_rows(const float *x, int64_t M, int64_t K, Rows *rows) {
    rows->q = aligned_alloc(32, (size_t)(M * K * sizeof(int16_t) + 32) / 32 * 32);
    rows->scale = malloc(M * sizeof(float));
    rows->sums = malloc(M * (K / GROUP) * sizeof(float));
    if (!rows->q || !rows->scale || !rows->sums) return -1;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        __m256 top = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(xm + k)));
        __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        t = _mm_max_ps(t, _mm_movehl_ps(t, t));
        t = _mm_max_ss(t, _mm_movehdup_ps(t));
        float amax = _mm_cvtss_f32(t), step = amax / 32767.0f;
        __m256 inverse = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
        rows->scale[m] = step;
        for (int64_t k = 0; k < K; k += 16) {
            __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + k), inverse));
            __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xm + k + 8), inverse));
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
            _mm256_storeu_si256((__m256i *)(rows->q + m * K + k), packed);
        }
        for (int64_t g = 0; g < K / GROUP; g++) {
            const float *xg = xm + g * GROUP;
            __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xg), _mm256_loadu_ps(xg + 8)),
                                       _mm256_add_ps(_mm256_loadu_ps(xg + 16), _mm256_loadu_ps(xg + 24)));
            rows->sums[m * (K / GROUP) + g] = hsum(sum);
        }
    }
    return 0;
}

static void free_rows(Rows *rows) {
    free(rows->q);
    free(rows->scale);
    free(rows->sums);
}

/* int32 partial sums are folded into float every BLOCK weights, far before they could overflow. */
#define BLOCK 2048

ALWAYS_INLINE void row_int8(const Rows *rows, const int8_t *w, float scale, float *y, int64_t n, int64_t N, int64_t K,
                            const int M) {
    __m256 total[MAX_ROWS];
    for (int m = 0; m < M; m++) total[m] = _mm256_setzero_ps();
    for (int64_t start = 0; start < K; start += BLOCK) {
        const int64_t stop = start + BLOCK < K ? start + BLOCK : K;
        __m256i acc[MAX_ROWS][2];
        for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
        for (int64_t k = start; k < stop; k += 32) {
            _mm_prefetch((const char *)(w + k) + PREFETCH, _MM_HINT_T0);
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k)));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k + 16)));
            for (int m = 0; m < M; m++) {
                const int16_t *xm = rows->q + m * K + k;
                acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xm)));
                acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xm + 16))));
            }
        }
        for (int m = 0; m < M; m++) total[m] = _mm256_add_ps(total[m], _mm256_cvtepi32_ps(_mm256_add_epi32(acc[m][0], acc[m][1])));
    }
    for (int m = 0; m < M; m++) y[m * N + n] = scale * rows->scale[m] * hsum(total[m]);
}

/* Groups go eight at a time: their integer dots are summed across lanes together (hsum8x8), then
 * scaled by eight float16 scales in one vector; the minimum term is a dot of minimums with group sums. */
ALWAYS_INLINE void row_int4(const Rows *rows, const uint8_t *w, const uint16_t *scale, const uint16_t *minimum, float *y,
                            int64_t n, int64_t N, int64_t K, const int M) {
    const int64_t groups = K / GROUP;
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 acc[MAX_ROWS], offset[MAX_ROWS];
    for (int m = 0; m < M; m++) acc[m] = offset[m] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m256 dots[MAX_ROWS][8];
        for (int i = 0; i < 8; i++) {
            const uint8_t *wg = w + (g + i) * GROUP / 2;
            _mm_prefetch((const char *)wg + PREFETCH, _MM_HINT_T0);
            __m128i bytes = _mm_loadu_si128((const __m128i *)wg);
            __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, low));
            __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), low));
            for (int m = 0; m < M; m++) {
                const int16_t *xm = rows->q + m * K + (g + i) * GROUP;
                __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xm)),
                                               _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xm + 16))));
                dots[m][i] = _mm256_cvtepi32_ps(dot);
            }
        }
        __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + g)));
        __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(minimum + g)));
        for (int m = 0; m < M; m++) {
            acc[m] = _mm256_fmadd_ps(hsum8x8(dots[m]), s, acc[m]);
            offset[m] = _mm256_fmadd_ps(mn, _mm256_loadu_ps(rows->sums + m * groups + g), offset[m]);
        }
    }
    float tail[MAX_ROWS] = {0};
    for (; g < groups; g++) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(w + g * GROUP / 2));
        __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, low));
        __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), low));
        for (int m = 0; m < M; m++) {
            const int16_t *xm = rows->q + m * K + g * GROUP;
            __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xm)),
                                           _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xm + 16))));
            tail[m] += _cvtsh_ss(scale[g]) * hsum(_mm256_cvtepi32_ps(dot)) * rows->scale[m]
                       + _cvtsh_ss(minimum[g]) * rows->sums[m * groups + g];
        }
    }
    for (int m = 0; m < M; m++) y[m * N + n] = rows->scale[m] * hsum(acc[m]) + hsum(offset[m]) + tail[m];
}

/* Each entry point takes M <= MAX_ROWS rows (the caller splits taller inputs) and returns 0, or -1 when
 * scratch memory could not be had. */
#define DISPATCH(CALL)                  \
    switch (M) {                        \
        case 1: CALL(1); break;         \
        case 2: CALL(2); break;         \
        case 3: CALL(3); break;         \
        default: CALL(4); break;        \
    }

/* One activation row against two weight rows far apart (n and n + N/2): each thread then reads two
 * streams at once, which keeps more of its loads in flight than one stream does. Measured here on
 * the 1.6B shapes: ~0.99 of the read bandwidth against ~0.86 for one row at a time (rows side by
 * side give no gain: it is the second stream, not the shared activation loads). */
static void pair_bf16(const float *x, const uint16_t *wa, const uint16_t *wb, float *ya, float *yb, int64_t K) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    for (int64_t k = 0; k < K; k += 32) {
        _mm_prefetch((const char *)(wa + k) + PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(wb + k) + PREFETCH, _MM_HINT_T0);
        __m256i va0 = _mm256_loadu_si256((const __m256i *)(wa + k)), va1 = _mm256_loadu_si256((const __m256i *)(wa + k + 16));
        __m256i vb0 = _mm256_loadu_si256((const __m256i *)(wb + k)), vb1 = _mm256_loadu_si256((const __m256i *)(wb + k + 16));
        __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8), x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(va0, 16)), x0, a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(va0, high)), x1, a1);
        a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(va1, 16)), x2, a0);
        a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(va1, high)), x3, a1);
        b0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(vb0, 16)), x0, b0);
        b1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(vb0, high)), x1, b1);
        b0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(vb1, 16)), x2, b0);
        b1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(vb1, high)), x3, b1);
    }
    *ya = hsum(_mm256_add_ps(a0, a1));
    *yb = hsum(_mm256_add_ps(b0, b1));
}

int midfill_linear_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
    float *split = split_even_odd(x, M, K);
    if (!split) return -1;
    if (M == 1) {
        const int64_t half = N / 2;
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < half; n++) pair_bf16(split, w + n * K, w + (n + half) * K, y + n, y + n + half, K);
        if (N % 2) row_bf16(split, w + (N - 1) * K, y, N - 1, N, K, 1);
        free(split);
        return 0;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
#define CALL(R) row_bf16(split, w + n * K, y, n, N, K, R)
        DISPATCH(CALL)
#undef CALL
    }
    free(split);
    return 0;
}

/* As pair_bf16: one activation row, two int8 weight rows far apart, two streams per thread. */
static void pair_int8(const Rows *rows, const int8_t *wa, const int8_t *wb, float sa, float sb, float *ya, float *yb, int64_t K) {
    __m256 ta = _mm256_setzero_ps(), tb = ta;
    for (int64_t start = 0; start < K; start += BLOCK) {
        const int64_t stop = start + BLOCK < K ? start + BLOCK : K;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, b0 = a0, b1 = a0;
        for (int64_t k = start; k < stop; k += 32) {
            _mm_prefetch((const char *)(wa + k) + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(wb + k) + PREFETCH, _MM_HINT_T0);
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(rows->q + k)), x1 = _mm256_loadu_si256((const __m256i *)(rows->q + k + 16));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wa + k))), x0));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wa + k + 16))), x1));
            b0 = _mm256_add_epi32(b0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + k))), x0));
            b1 = _mm256_add_epi32(b1, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb + k + 16))), x1));
        }
        ta = _mm256_add_ps(ta, _mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)));
        tb = _mm256_add_ps(tb, _mm256_cvtepi32_ps(_mm256_add_epi32(b0, b1)));
    }
    *ya = sa * rows->scale[0] * hsum(ta);
    *yb = sb * rows->scale[0] * hsum(tb);
}

int midfill_linear_int8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K) {
    Rows rows;
    if (quantize_rows(x, M, K, &rows)) return free_rows(&rows), -1;
    if (M == 1) {
        const int64_t half = N / 2;
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < half; n++)
            pair_int8(&rows, w + n * K, w + (n + half) * K, scale[n], scale[n + half], y + n, y + n + half, K);
        if (N % 2) row_int8(&rows, w + (N - 1) * K, scale[N - 1], y, N - 1, N, K, 1);
        free_rows(&rows);
        return 0;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
#define CALL(R) row_int8(&rows, w + n * K, scale[n], y, n, N, K, R)
        DISPATCH(CALL)
#undef CALL
    }
    free_rows(&rows);
    return 0;
}

/* One activation row, int4: two groups per 32-byte load, widened by in-lane unpacks instead of one
 * cvtepu8 per half group, about a quarter fewer instructions per byte (int4 is compute-bound here).
 * After the unpacks, 128-bit lane 0 holds group g's weights and lane 1 group g+1's, eight at a time,
 * so the activations are laid out to match once per call (pair_layout); lanes 0-3 of the integer
 * dot then sum group g and lanes 4-7 group g+1, each scaled by its own float16 scale. */
static void pair_layout(const int16_t *q, int16_t *out, int64_t K) {
    const int64_t paired = K / (2 * GROUP) * 2 * GROUP;
    for (int64_t base = 0; base < paired; base += 2 * GROUP)
        for (int part = 0; part < 4; part++)  /* weights 8*part .. 8*part+7 of each group */
            for (int j = 0; j < 8; j++) {
                out[base + 16 * part + j] = q[base + 8 * part + j];
                out[base + 16 * part + 8 + j] = q[base + GROUP + 8 * part + j];
            }
    memcpy(out + paired, q + paired, (K - paired) * sizeof(int16_t));
}

static float one_row_int4(const Rows *rows, const int16_t *xp, const uint8_t *w, const uint16_t *scale,
                          const uint16_t *minimum, int64_t K) {
    const int64_t groups = K / GROUP;
    const __m256i low = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
    __m256i spread[4];  /* for pair i of eight groups: scales 2i (lanes 0-3) and 2i+1 (lanes 4-7) */
    for (int i = 0; i < 4; i++) spread[i] = _mm256_setr_epi32(2 * i, 2 * i, 2 * i, 2 * i, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1);
    __m256 acc = _mm256_setzero_ps(), offset = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale + g)));
        for (int i = 0; i < 4; i++) {
            const uint8_t *wg = w + (g + 2 * i) * GROUP / 2;
            const int16_t *xg = xp + (g + 2 * i) * GROUP;
            _mm_prefetch((const char *)wg + PREFETCH, _MM_HINT_T0);
            __m256i bytes = _mm256_loadu_si256((const __m256i *)wg);
            __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
            __m256i d = _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), _mm256_loadu_si256((const __m256i *)xg));
            d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), _mm256_loadu_si256((const __m256i *)(xg + 16))));
            d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), _mm256_loadu_si256((const __m256i *)(xg + 32))));
            d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), _mm256_loadu_si256((const __m256i *)(xg + 48))));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_permutevar8x32_ps(s, spread[i]), acc);
        }
        offset = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(minimum + g))), _mm256_loadu_ps(rows->sums + g), offset);
    }
    float tail = 0.0f;
    const __m128i low128 = _mm_set1_epi8(0x0F);
    for (; g < groups; g++) {  /* the last (fewer than eight) groups, one at a time, on the plain layout */
        __m128i bytes = _mm_loadu_si128((const __m128i *)(w + g * GROUP / 2));
        __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, low128));
        __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), low128));
        const int16_t *xg = rows->q + g * GROUP;
        __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xg)),
                                       _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xg + 16))));
        tail += _cvtsh_ss(scale[g]) * hsum(_mm256_cvtepi32_ps(dot)) * rows->scale[0] + _cvtsh_ss(minimum[g]) * rows->sums[g];
    }
    return rows->scale[0] * hsum(acc) + hsum(offset) + tail;
}

int midfill_linear_int4(const float *x, const uint8_t *w, const uint16_t *scale, const uint16_t *minimum, float *y,
                        int64_t M, int64_t N, int64_t K) {
    const int64_t groups = K / GROUP;
    Rows rows;
    if (quantize_rows(x, M, K, &rows)) return free_rows(&rows), -1;
    if (M == 1) {
        int16_t *xp = aligned_alloc(32, (size_t)(K * sizeof(int16_t) + 32) / 32 * 32);
        if (!xp) return free_rows(&rows), -1;
        pair_layout(rows.q, xp, K);
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) y[n] = one_row_int4(&rows, xp, w + n * K / 2, scale + n * groups, minimum + n * groups, K);
        free(xp);
        free_rows(&rows);
        return 0;
    }
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
#define CALL(R) row_int4(&rows, w + n * K / 2, scale + n * groups, minimum + n * groups, y, n, N, K, R)
        DISPATCH(CALL)
#undef CALL
    }
    free_rows(&rows);
    return 0;
}

/* Streams `count` floats (a multiple of 32) through the cores and returns their sum: the read bandwidth probe.
 * No software prefetch: measured here, a plain stream of loads reads fastest. */
float midfill_read_bandwidth(const float *data, int64_t count) {
    float total = 0.0f;
#pragma omp parallel reduction(+ : total)
    {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < count; i += 32) {
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(data + i));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(data + i + 8));
            a2 = _mm256_add_ps(a2, _mm256_loadu_ps(data + i + 16));
            a3 = _mm256_add_ps(a3, _mm256_loadu_ps(data + i + 24));
        }
        total += hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
    return total;
}

/* exp for 8 floats: 2^n * e^r with |r| <= ln2/2 and a degree-6 polynomial (relative error ~1e-7). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(power));
}

/* Softmax in place over one head's scores p[0..S) (padded with -inf to a multiple of 8); returns 1/sum. */
static inline float softmax_unnormalized(float *p, int64_t S) {
    const int64_t padded = (S + 7) / 8 * 8;
    float top = -INFINITY;
    for (int64_t j = 0; j < S; j++) top = p[j] > top ? p[j] : top;
    for (int64_t j = S; j < padded; j++) p[j] = -INFINITY;
    __m256 total = _mm256_setzero_ps(), shift = _mm256_set1_ps(top);
    for (int64_t j = 0; j < padded; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), shift));
        _mm256_storeu_ps(p + j, e);
        total = _mm256_add_ps(total, e);
    }
    return 1.0f / hsum(total);
}

/* G heads of one row against the shared K/V head, inlined with G and D known at compile time.
 * Each key and value vector is loaded once for all G heads (the cache is re-read H/G times, not H):
 * scores take 8/G keys at a time for G heads, eight sums in registers; values take 8/G of the D/8
 * column blocks at a time for G heads. */
ALWAYS_INLINE void attend_heads(const float *qv, const float *keys, const float *values, const float *bv, float *p,
                                float *o, int64_t S, int64_t padded, float scale, const int G, const int D) {
    const int KB = 8 / G, DB = 8 / G;
    int64_t j = 0;
    for (; j + KB <= S; j += KB) {
        __m256 a[8];
        for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8)
            for (int kb = 0; kb < KB; kb++) {
                __m256 kd = _mm256_loadu_ps(keys + (j + kb) * D + d);
                for (int g = 0; g < G; g++) a[g * KB + kb] = _mm256_fmadd_ps(_mm256_loadu_ps(qv + g * D + d), kd, a[g * KB + kb]);
            }
        float sums[8];
        _mm256_storeu_ps(sums, hsum8x8(a));
        for (int g = 0; g < G; g++)
            for (int kb = 0; kb < KB; kb++) p[g * padded + j + kb] = sums[g * KB + kb] * scale + bv[g * S + j + kb];
    }
    for (; j < S; j++)
        for (int g = 0; g < G; g++) {
            __m256 a0 = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qv + g * D + d), _mm256_loadu_ps(keys + j * D + d), a0);
            p[g * padded + j] = hsum(a0) * scale + bv[g * S + j];
        }
    float inverse[8];
    for (int g = 0; g < G; g++) inverse[g] = softmax_unnormalized(p + g * padded, S);
    for (int block = 0; block < D / 8; block += DB) {
        __m256 acc[8];
        for (int i = 0; i < G * DB; i++) acc[i] = _mm256_setzero_ps();
        for (j = 0; j < S; j++)
            for (int db = 0; db < DB && block + db < D / 8; db++) {
                __m256 vd = _mm256_loadu_ps(values + j * D + 8 * (block + db));
                for (int g = 0; g < G; g++) acc[g * DB + db] = _mm256_fmadd_ps(_mm256_set1_ps(p[g * padded + j]), vd, acc[g * DB + db]);
            }
        for (int g = 0; g < G; g++)
            for (int db = 0; db < DB && block + db < D / 8; db++)
                _mm256_storeu_ps(o + g * D + 8 * (block + db), _mm256_mul_ps(acc[g * DB + db], _mm256_set1_ps(inverse[g])));
    }
}

/* One new query per row against its cached keys, for every head of a multi-query layer.
 *
 * q, out: [B, H, D]; k, v: row b's keys start at b * row_stride, one D-vector per position;
 * bias: [B, H, S] additive (ALiBi and masks, -inf-like where hidden). D is 32, 64 or 128.
 * All heads share the one K/V head, so K and V stay in cache while the heads take turns.
 */
int midfill_attention_one(const float *q, const float *k, const float *v, const float *bias, float *out, int64_t B,
                          int64_t H, int64_t S, int64_t D, int64_t row_stride, float scale) {
    if (D != 32 && D != 64 && D != 128) return -2;
    const int64_t padded = (S + 7) / 8 * 8, G = H % 4 == 0 ? 4 : 1, groups = B * H / G;
    float *scratch = malloc((size_t)B * H * padded * sizeof(float));
    if (!scratch) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t group = 0; group < groups; group++) {
        const int64_t bh = group * G, b = bh / H;
        const float *keys = k + b * row_stride, *values = v + b * row_stride;
#define ATTEND(GROUP_HEADS, DIM) \
    attend_heads(q + bh * D, keys, values, bias + bh * S, scratch + bh * padded, out + bh * D, S, padded, scale, GROUP_HEADS, DIM)
        if (G == 4) {
            if (D == 32) ATTEND(4, 32);
            else if (D == 64) ATTEND(4, 64);
            else ATTEND(4, 128);
        } else {
            if (D == 32) ATTEND(1, 32);
            else if (D == 64) ATTEND(1, 64);
            else ATTEND(1, 128);
        }
#undef ATTEND
    }
    free(scratch);
    return 0;
}

/* ---- One whole decoder block for one new token per row, so a decoded token costs one call per layer. ---- */

enum { FORMAT_BF16 = 0, FORMAT_INT8 = 1, FORMAT_INT4 = 2 };

typedef struct {
    int64_t format, n_out, n_in;
    const void *weight, *scale, *minimum;
} Matrix;

/* y [M, n_out] = x [M, n_in] W^T, any number of rows. */
static int matrix_apply(const Matrix *m, const float *x, float *y, int64_t M) {
    for (int64_t start = 0; start < M; start += MAX_ROWS) {
        const int64_t rows = M - start < MAX_ROWS ? M - start : MAX_ROWS;
        const float *xs = x + start * m->n_in;
        float *ys = y + start * m->n_out;
        int status;
        if (m->format == FORMAT_BF16) status = midfill_linear_bf16(xs, m->weight, ys, rows, m->n_out, m->n_in);
        else if (m->format == FORMAT_INT8) status = midfill_linear_int8(xs, m->weight, m->scale, ys, rows, m->n_out, m->n_in);
        else status = midfill_linear_int4(xs, m->weight, m->scale, m->minimum, ys, rows, m->n_out, m->n_in);
        if (status) return status;
    }
    return 0;
}

/* Bias-free LayerNorm of each row of x [M, E] into out. */
static void layer_norm(const float *x, const float *weight, float eps, float *out, int64_t M, int64_t E) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * E;
        double sum = 0.0, squares = 0.0;
        for (int64_t e = 0; e < E; e++) sum += xm[e], squares += (double)xm[e] * xm[e];
        const double mean = sum / E, variance = squares / E - mean * mean;
        const float inverse = (float)(1.0 / sqrt((variance > 0 ? variance : 0) + eps)), shift = (float)mean;
        for (int64_t e = 0; e < E; e++) out[m * E + e] = (xm[e] - shift) * inverse * weight[e];
    }
}

/* out [M, F] = silu(gate) * up, with gate_up [M, 2F] = [gate | up]. */
static void swiglu(const float *gate_up, float *out, int64_t M, int64_t F) {
    for (int64_t m = 0; m < M; m++) {
        const float *gate = gate_up + m * 2 * F, *up = gate + F;
        for (int64_t f = 0; f < F; f += 8) {
            __m256 g = _mm256_loadu_ps(gate + f);
            __m256 sig = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            _mm256_storeu_ps(out + m * F + f, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + f)));
        }
    }
}

/* x [M, E] += block(x). matrices: q, kv, attention out, gate_up, mlp out. The new token's key and
 * value go to k_cache/v_cache at row m * row_stride + slots[m] * D; bias [M, H, S] as for attention.
 * F (the MLP width) is a multiple of 8, E and D multiples of 32. */
int midfill_decode_block(float *x, int64_t M, int64_t E, int64_t H, int64_t D, int64_t F, const float *ln_1,
                         const float *ln_2, float eps, const Matrix *matrices, float *k_cache, float *v_cache,
                         int64_t row_stride, const int64_t *slots, const float *bias, int64_t S) {
    float *h = malloc(M * E * sizeof(float)), *q = malloc(M * E * sizeof(float)), *kv = malloc(M * 2 * D * sizeof(float));
    float *mixed = malloc(M * E * sizeof(float)), *wide = malloc(M * 2 * F * sizeof(float)), *act = malloc(M * F * sizeof(float));
    int status = -1;
    if (!h || !q || !kv || !mixed || !wide || !act) goto done;
    layer_norm(x, ln_1, eps, h, M, E);
    if ((status = matrix_apply(&matrices[0], h, q, M)) || (status = matrix_apply(&matrices[1], h, kv, M))) goto done;
    for (int64_t m = 0; m < M; m++) {
        memcpy(k_cache + m * row_stride + slots[m] * D, kv + m * 2 * D, D * sizeof(float));
        memcpy(v_cache + m * row_stride + slots[m] * D, kv + m * 2 * D + D, D * sizeof(float));
    }
    if ((status = midfill_attention_one(q, k_cache, v_cache, bias, mixed, M, H, S, D, row_stride, 1.0f / sqrtf((float)D)))) goto done;
    if ((status = matrix_apply(&matrices[2], mixed, h, M))) goto done;
    for (int64_t i = 0; i < M * E; i++) x[i] += h[i];
    layer_norm(x, ln_2, eps, h, M, E);
    if ((status = matrix_apply(&matrices[3], h, wide, M))) goto done;
    swiglu(wide, act, M, F);
    if ((status = matrix_apply(&matrices[4], act, h, M))) goto done;
    for (int64_t i = 0; i < M * E; i++) x[i] += h[i];
done:
    free(h), free(q), free(kv), free(mixed), free(wide), free(act);
    return status;
}

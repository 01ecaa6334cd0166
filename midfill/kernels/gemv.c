/* Few-row matrix products for decoding: y[m, n] = sum_k x[m, k] * W[n, k], weights in bf16, int8 or int4.
 *
 * One decoded token multiplies one activation row by every weight matrix, so the speed is the
 * speed at which weights stream from memory. These loops read each weight byte once for up to
 * MAX_ROWS activation rows and widens it in registers (AVX2): bf16 to float32 for FMA; int8 and int4
 * to int16 for vpmaddwd against activations rounded to int16 (see quantize_rows). The output rows are
 * split across the OpenMP threads of the process (torch's own runtime, when torch loaded it first). midfill builds this file on first use; midfill/model/packed_linear.py holds the
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
#include <stdlib.h>

#define MAX_ROWS 4
#define GROUP 32
#ifndef PREFETCH
#define PREFETCH 2048 /* bytes ahead of the weight being read: the hardware prefetcher alone leaves gaps */
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

ALWAYS_INLINE void row_int4(const Rows *rows, const uint8_t *w, const uint16_t *scale, const uint16_t *minimum, float *y,
                            int64_t n, int64_t N, int64_t K, const int M) {
    const int64_t groups = K / GROUP;
    const __m128i low = _mm_set1_epi8(0x0F);
    __m256 acc[MAX_ROWS];
    float offset[MAX_ROWS];
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps(), offset[m] = 0.0f;
    for (int64_t g = 0; g < groups; g++) {
        _mm_prefetch((const char *)(w + g * GROUP / 2) + PREFETCH, _MM_HINT_T0);
        __m128i bytes = _mm_loadu_si128((const __m128i *)(w + g * GROUP / 2));
        __m256i w0 = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, low));
        __m256i w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), low));
        __m256 s = _mm256_set1_ps(_cvtsh_ss(scale[g]));
        float mn = _cvtsh_ss(minimum[g]);
        for (int m = 0; m < M; m++) {
            const int16_t *xm = rows->q + m * K + g * GROUP;
            __m256i dot = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xm)),
                                           _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xm + 16))));
            acc[m] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(dot), acc[m]);
            offset[m] += mn * rows->sums[m * groups + g];
        }
    }
    for (int m = 0; m < M; m++) y[m * N + n] = rows->scale[m] * hsum(acc[m]) + offset[m];
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

int midfill_linear_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
    float *split = split_even_odd(x, M, K);
    if (!split) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
#define CALL(R) row_bf16(split, w + n * K, y, n, N, K, R)
        DISPATCH(CALL)
#undef CALL
    }
    free(split);
    return 0;
}

int midfill_linear_int8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K) {
    Rows rows;
    if (quantize_rows(x, M, K, &rows)) return free_rows(&rows), -1;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
#define CALL(R) row_int8(&rows, w + n * K, scale[n], y, n, N, K, R)
        DISPATCH(CALL)
#undef CALL
    }
    free_rows(&rows);
    return 0;
}

int midfill_linear_int4(const float *x, const uint8_t *w, const uint16_t *scale, const uint16_t *minimum, float *y,
                        int64_t M, int64_t N, int64_t K) {
    const int64_t groups = K / GROUP;
    Rows rows;
    if (quantize_rows(x, M, K, &rows)) return free_rows(&rows), -1;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
#define CALL(R) row_int4(&rows, w + n * K / 2, scale + n * groups, minimum + n * groups, y, n, N, K, R)
        DISPATCH(CALL)
#undef CALL
    }
    free_rows(&rows);
    return 0;
}

/* Streams `count` floats (a multiple of 32) through the cores and returns their sum: the read bandwidth probe. */
float midfill_read_bandwidth(const float *data, int64_t count) {
    float total = 0.0f;
#pragma omp parallel reduction(+ : total)
    {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < count; i += 32) {
            _mm_prefetch((const char *)(data + i) + PREFETCH, _MM_HINT_T0);
            a0 = _mm256_add_ps(a0, _mm256_loadu_ps(data + i));
            a1 = _mm256_add_ps(a1, _mm256_loadu_ps(data + i + 8));
            a2 = _mm256_add_ps(a2, _mm256_loadu_ps(data + i + 16));
            a3 = _mm256_add_ps(a3, _mm256_loadu_ps(data + i + 24));
        }
        total += hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
    return total;
}

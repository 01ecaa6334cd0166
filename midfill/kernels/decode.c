/* Few-row matrix products for decoding, y[m, n] = sum_k x[m, k] * W[n, k] with weights in bf16, int8
 * or int4; attention for one new query per row; and a whole decoder block built from the two.
 *
 * One decoded token multiplies one activation row by every weight matrix, so the speed is the
 * speed at which weights stream from memory. The matrix loops read each weight byte once for up to
 * MAX_ROWS activation rows (a batch of sequences, or the drafted tokens of a speculative step) and
 * widen it in registers: bf16 to float32 for FMA; int8 to int16 for a multiply-add of pairs against
 * activations rounded to int16 (see quantize_rows); int4 nibbles to bytes for a multiply-add of
 * quadruples against activations rounded to int8 per group of 32 (see quantize_groups). bf16 stays
 * exact: a bf16 dot product instruction (AVX512-BF16) would round the float32 activations to bf16 as well.
 *
 * native.py compiles this file once per instruction set, with different flags, and loads the best
 * one the CPU runs. Only the vector layer below differs between them; the kernels are written once:
 *   avx2        256-bit vectors (AVX2, FMA, F16C);
 *   avx512      512-bit vectors (AVX-512 F/BW/VL), pairs of int16 products as vpmaddwd + vpaddd, quadruples
 *               of byte products as vpmaddubsw + vpmaddwd + vpaddd;
 *   avx512vnni  the same with one vpdpwssd or vpdpbusd each (AVX512-VNNI): integer sums, so its results
 *               are bit for bit those of avx512.
 * Every output is the same operations in the same order however many rows the call has and however
 * outputs are grouped, so a row's result does not depend on the batch around it, bit for bit.
 * Output rows are split across the OpenMP threads of the process (torch's own runtime, when torch
 * loaded it first). PackedLinear.unpack (midfill/model/quantize.py) is the pure-torch reference that
 * tests compare every variant with.
 *
 * Layouts (row n of W is output feature n; K is a multiple of 32):
 *   bf16: uint16 [N, K], the upper half of a float32.
 *   int8: int8 [N, K] and float32 scale [N]: W = q * scale[n].
 *   int4: uint8 [N, K/2], uint8 scale codes and int8 minimum codes [N, K/32], float32 steps [N, 2]:
 *         W = q * (scale * steps[n][0]) + minimum * steps[n][1], q in 0..15. In each group of 32
 *         weights, byte i holds weight i in its low nibble, weight i+16 in its high.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8
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

/* Lane i of the result is the sum of a[i]'s lanes: eight horizontal sums for the price of about two. */
static inline __m256 hsum8x8(const __m256 a[8]) {
    __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* ---- The vector layer: the only code that differs between the variants. ---- */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LANES 16 /* float32 lanes per vector */
typedef __m512 vfloat;
typedef __m512i vint;
static inline vfloat vf_zero(void) { return _mm512_setzero_ps(); }
static inline vfloat vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline vfloat vf_fmadd(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
static inline vfloat vf_add(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
static inline vfloat vf_from_int(vint v) { return _mm512_cvtepi32_ps(v); }
static inline float vf_sum(vfloat v) { return _mm512_reduce_add_ps(v); }
static inline vfloat vf_codes(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }
static inline vint vi_zero(void) { return _mm512_setzero_si512(); }
static inline vint vi_load(const void *p) { return _mm512_loadu_si512(p); }
static inline vint vi_widen_int8(const int8_t *p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
static inline vint vi_low_nibbles(vint v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
static inline vint vi_high_nibbles(vint v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }
#define vi_shift32(v, bits) _mm512_slli_epi32(v, bits)
static inline vint vi_and(vint a, vint b) { return _mm512_and_si512(a, b); }
static inline vint vi_set32(int value) { return _mm512_set1_epi32(value); }
static inline vfloat vf_cast(vint v) { return _mm512_castsi512_ps(v); }
static inline vfloat vf_mul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
#ifdef __AVX512VNNI__
#define ISA "avx512vnni"
static inline vint vi_dot(vint acc, vint a, vint b) { return _mm512_dpwssd_epi32(acc, a, b); }
static inline vint vi_dot_bytes(vint acc, vint u, vint s) { return _mm512_dpbusd_epi32(acc, u, s); }
#else
#define ISA "avx512"
static inline vint vi_dot(vint acc, vint a, vint b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
/* Two products of u8 x s8 fit an int16 unsaturated here (|15 * 127 * 2| < 32767): vpdpbusd's sums exactly. */
static inline vint vi_dot_bytes(vint acc, vint u, vint s) {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
}
#endif
/* LANES int4 scale codes as floats, and those of vector j's four groups, each in its group's four 32-bit lanes. */
static inline vfloat vf_scale_codes(const uint8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p))); }
static inline vfloat vf_spread(vfloat codes, int j) {
    const __m512i lanes = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(_mm512_add_epi32(lanes, _mm512_set1_epi32(4 * j)), codes);
}
#else
#define ISA "avx2"
#define LANES 8
typedef __m256 vfloat;
typedef __m256i vint;
static inline vfloat vf_zero(void) { return _mm256_setzero_ps(); }
static inline vfloat vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline vfloat vf_fmadd(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
static inline vfloat vf_add(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
static inline vfloat vf_from_int(vint v) { return _mm256_cvtepi32_ps(v); }
static inline float vf_sum(vfloat v) { return hsum(v); }
static inline vfloat vf_codes(const int8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
static inline vint vi_zero(void) { return _mm256_setzero_si256(); }
static inline vint vi_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vint vi_widen_int8(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }
static inline vint vi_low_nibbles(vint v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
static inline vint vi_high_nibbles(vint v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }
#define vi_shift32(v, bits) _mm256_slli_epi32(v, bits)
static inline vint vi_and(vint a, vint b) { return _mm256_and_si256(a, b); }
static inline vint vi_set32(int value) { return _mm256_set1_epi32(value); }
static inline vfloat vf_cast(vint v) { return _mm256_castsi256_ps(v); }
static inline vfloat vf_mul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
static inline vint vi_dot(vint acc, vint a, vint b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
static inline vint vi_dot_bytes(vint acc, vint u, vint s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
/* LANES int4 scale codes as floats, and those of vector j's two groups, each in its group's four 32-bit lanes. */
static inline vfloat vf_scale_codes(const uint8_t *p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p))); }
static inline vfloat vf_spread(vfloat codes, int j) {
    return _mm256_permutevar8x32_ps(codes, _mm256_add_epi32(_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_set1_epi32(2 * j)));
}
#endif

/* The instruction set this build was compiled for: native.py checks that the flags took. */
const char *midfill_isa(void) { return ISA; }

#define GROUPS_PER_VECTOR (LANES / 4) /* int4: 16 bytes a group, 4 * LANES bytes a vector */

/* ---- Activation rows, prepared once per call in the order the weights are widened. ---- */

/* On a cache line: a vector load that straddles two lines costs two (half the speed from L1). */
static void *cache_aligned(size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); }

/* Prepared rows start a little more than K values apart: rows a multiple of 4 KiB long would all map
 * to the same L1 sets and evict each other while the kernels cycle through them. */
static inline int64_t row_stride(int64_t K) { return K + 32; }

/* A 32-bit lane of packed bf16 holds weight 2i in its low half and 2i+1 in its high half: a shift and a
 * mask turn them into floats without shuffles, against x laid out to match: per block of 2 * LANES,
 * the LANES even-indexed values, then the LANES odd-indexed ones. */
static float *split_even_odd(const float *x, int64_t M, int64_t K) {
    float *out = cache_aligned(M * row_stride(K) * sizeof(float));
    if (!out) return NULL;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k += 2 * LANES)
            for (int j = 0; j < LANES; j++) {
                out[m * row_stride(K) + k + j] = x[m * K + k + 2 * j];
                out[m * row_stride(K) + k + LANES + j] = x[m * K + k + 2 * j + 1];
            }
    return out;
}

/* Integer paths: activations rounded to int16 per row (relative error 2^-16 of the row's largest
 * value, far below the weights' own rounding), so pairs of products come from one multiply-add. */
typedef struct {
    int16_t *q;     /* [M, K], rows row_stride(K) apart */
    float *scale;   /* [M]: x ~= q * scale */
} Rows;

static void free_rows(Rows *rows) {
    free(rows->q);
    free(rows->scale);
}

static int quantize_rows(const float *x, int64_t M, int64_t K, Rows *rows) {
    rows->q = cache_aligned(M * row_stride(K) * sizeof(int16_t));
    rows->scale = malloc(M * sizeof(float));
    if (!rows->q || !rows->scale) return free_rows(rows), -1;
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
            _mm256_storeu_si256((__m256i *)(rows->q + m * row_stride(K) + k), packed);
        }
    }
    return 0;
}

/* int4 path: activations rounded to int8 per group of 32 weights (q8_0's precision: relative error 2^-8 of
 * the group's largest value, against the int4 weights' own 2^-4 of their range), so that the nibbles,
 * widened to bytes, multiply them four products at a time (vi_dot_bytes: twice vpdpwssd's rate). A vector
 * of weights holds GROUPS_PER_VECTOR groups of 16 bytes, byte i of a group weight i in its low nibble and
 * weight i + 16 in its high one, so its activations are laid out to match: the first 16 of each group's
 * 32 values, group after group, then the last 16 of each. Groups after the last whole vector keep their
 * order. Each group's sum lands in its group's four 32-bit lanes, scaled there by both scales. */
typedef struct {
    int8_t *q;      /* [M, K], rows row_stride(K) apart, in the order above */
    float *spread;  /* [M, 4 * K / GROUP]: x ~= q * scale group by group, each group's scale in its four lanes */
    float *sums;    /* [M, K / GROUP]: group sums of the rounded x, for the minimum term */
} Groups;

static void free_groups(Groups *a) {
    free(a->q);
    free(a->spread);
    free(a->sums);
}

static inline int32_t hsum_epi32(__m128i s) {
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}

/* The minimum term takes the sums of the rounded activations, so the product is exactly the unpacked
 * weights times the rounded activations: its error is the weights' (centred) times the rounding's. */
static int quantize_groups(const float *x, int64_t M, int64_t K, Groups *a) {
    const int64_t groups = K / GROUP, per_vector = GROUPS_PER_VECTOR * GROUP, whole = K / per_vector * per_vector;
    a->q = cache_aligned(M * row_stride(K));
    a->spread = cache_aligned(M * 4 * groups * sizeof(float));
    a->sums = cache_aligned(M * groups * sizeof(float));
    if (!a->q || !a->spread || !a->sums) return free_groups(a), -1;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7); /* undoes the two packs' lane interleave */
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            const float *xg = x + m * K + g * GROUP;
            const __m256 v0 = _mm256_loadu_ps(xg), v1 = _mm256_loadu_ps(xg + 8), v2 = _mm256_loadu_ps(xg + 16), v3 = _mm256_loadu_ps(xg + 24);
            __m256 top = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                       _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
            __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
            t = _mm_max_ps(t, _mm_movehl_ps(t, t));
            const float amax = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t))), step = amax / 127.0f;
            const __m256 inverse = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            const __m256i c0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inverse)), c1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inverse));
            const __m256i c2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inverse)), c3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inverse));
            const __m256i codes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3)), in_order);
            const int64_t k = g * GROUP, vector = k / per_vector * per_vector;
            int8_t *out = a->q + m * row_stride(K);
            int8_t *first = k < whole ? out + vector + (k - vector) / 2 : out + k;  /* group j's first 16 at 16 j */
            int8_t *last = k < whole ? first + GROUPS_PER_VECTOR * 16 : out + k + 16;
            _mm_storeu_si128((__m128i *)first, _mm256_castsi256_si128(codes));
            _mm_storeu_si128((__m128i *)last, _mm256_extracti128_si256(codes, 1));
            for (int lane = 0; lane < 4; lane++) a->spread[m * 4 * groups + 4 * g + lane] = step;
            const __m256i total = _mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3));
            a->sums[m * groups + g] = step * (float)hsum_epi32(_mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1)));
        }
    return 0;
}

/* ---- The kernels, inlined per row count M and per unit of NR weight rows n[0..NR). ----
 *
 * Each output is one chain of sums over k, whatever M and NR, so no output depends on the rows or
 * weight rows that share its loop. (Walking K in chunks whose activations stay in L1 made the
 * kernels faster with weights in L2, but no faster, or slower, with weights streaming from memory.) */

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define UNROLL _Pragma("GCC unroll 8")
#define UNIT_MAX 4 /* weight rows a unit can hold */

/* Inlined by force: as a plain function GCC finds it free of side effects and drops every call. */
ALWAYS_INLINE void prefetch(const void *p) { _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0); }

/* One matrix product: the prepared activations and the weights of one format. */
typedef struct {
    const float *x;    /* bf16: activations split even/odd */
    const Rows *rows;  /* int8 */
    const Groups *groups; /* int4 */
    const void *w, *scale, *minimum;
    const float *steps; /* int4 */
    float *y;
    int64_t N, K;
} Product;

ALWAYS_INLINE void unit_bf16(const Product *p, const int64_t *n, const int M, const int NR) {
    const int64_t K = p->K;
    const uint16_t *wr[UNIT_MAX];
    UNROLL for (int r = 0; r < NR; r++) wr[r] = (const uint16_t *)p->w + n[r] * K;
    const vint high = vi_set32((int)0xFFFF0000u);
    vfloat acc[MAX_ROWS][UNIT_MAX];
    UNROLL for (int m = 0; m < M; m++) UNROLL for (int r = 0; r < NR; r++) acc[m][r] = vf_zero();
    for (int64_t k = 0; k < K; k += 2 * LANES) {
        vfloat even[UNIT_MAX], odd[UNIT_MAX];
        UNROLL for (int r = 0; r < NR; r++) {
            prefetch(wr[r] + k);
            const vint v = vi_load(wr[r] + k);
            even[r] = vf_cast(vi_shift32(v, 16)), odd[r] = vf_cast(vi_and(v, high));
        }
        UNROLL for (int m = 0; m < M; m++) {
            const float *xm = p->x + m * row_stride(K) + k;
            const vfloat xe = vf_load(xm), xo = vf_load(xm + LANES);
            UNROLL for (int r = 0; r < NR; r++) acc[m][r] = vf_fmadd(odd[r], xo, vf_fmadd(even[r], xe, acc[m][r]));
        }
    }
    UNROLL for (int m = 0; m < M; m++) UNROLL for (int r = 0; r < NR; r++) p->y[m * p->N + n[r]] = vf_sum(acc[m][r]);
}

/* int8: integer sums folded into float every BLOCK weights, far before they could overflow. */
#define BLOCK 2048

ALWAYS_INLINE void unit_int8(const Product *p, const int64_t *n, const int M, const int NR) {
    const int64_t K = p->K;
    const int8_t *wr[UNIT_MAX];
    UNROLL for (int r = 0; r < NR; r++) wr[r] = (const int8_t *)p->w + n[r] * K;
    const int16_t *q = p->rows->q;
    vfloat total[MAX_ROWS][UNIT_MAX];
    UNROLL for (int m = 0; m < M; m++) UNROLL for (int r = 0; r < NR; r++) total[m][r] = vf_zero();
    for (int64_t start = 0; start < K; start += BLOCK) {
        const int64_t stop = start + BLOCK < K ? start + BLOCK : K;
        vint acc[MAX_ROWS][UNIT_MAX];
        UNROLL for (int m = 0; m < M; m++) UNROLL for (int r = 0; r < NR; r++) acc[m][r] = vi_zero();
        for (int64_t k = start; k < stop; k += 2 * LANES) {
            vint wv[UNIT_MAX];
            UNROLL for (int r = 0; r < NR; r++) prefetch(wr[r] + k), wv[r] = vi_widen_int8(wr[r] + k);
            UNROLL for (int m = 0; m < M; m++) {
                const vint xv = vi_load(q + m * row_stride(K) + k);
                UNROLL for (int r = 0; r < NR; r++) acc[m][r] = vi_dot(acc[m][r], wv[r], xv);
            }
        }
        UNROLL for (int m = 0; m < M; m++) UNROLL for (int r = 0; r < NR; r++) total[m][r] = vf_add(total[m][r], vf_from_int(acc[m][r]));
    }
    const float *scale = p->scale;
    UNROLL for (int m = 0; m < M; m++) UNROLL for (int r = 0; r < NR; r++)
        p->y[m * p->N + n[r]] = scale[n[r]] * p->rows->scale[m] * vf_sum(total[m][r]);
}

/* One group of 32 int4 weights against its 32 int8 activations in plain order: the integer dot. */
static inline int32_t group_dot_int4(const uint8_t *w, const int8_t *x) {
    const __m128i low = _mm_set1_epi8(0x0F), bytes = _mm_loadu_si128((const __m128i *)w), ones = _mm_set1_epi16(1);
    const __m128i first = _mm_and_si128(bytes, low), last = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
    const __m128i s = _mm_add_epi32(_mm_madd_epi16(_mm_maddubs_epi16(first, _mm_loadu_si128((const __m128i *)x)), ones),
                                    _mm_madd_epi16(_mm_maddubs_epi16(last, _mm_loadu_si128((const __m128i *)(x + 16))), ones));
    return hsum_epi32(s);
}

/* sum_g minimum[g] * sums[g] in minimum codes: the minimum term of one weight row against one activation row. */
static inline float minimum_term(const int8_t *minimum, const float *sums, int64_t groups) {
    vfloat acc = vf_zero();
    int64_t g = 0;
    for (; g + LANES <= groups; g += LANES) acc = vf_fmadd(vf_codes(minimum + g), vf_load(sums + g), acc);
    float total = vf_sum(acc);
    for (; g < groups; g++) total += (float)minimum[g] * sums[g];
    return total;
}

/* Per vector of groups: two byte dots (first and last 16 weights of each group) give each group's sum in
 * its four 32-bit lanes, scaled there by the weight group's scale code and the activation group's scale
 * (the codes of four vectors widened at once: one permute a vector); then the groups after the last whole
 * vector, one at a time, and the minimum term, each on its row step. */
ALWAYS_INLINE void unit_int4(const Product *p, const int64_t *n, const int M, const int NR) {
    const int64_t K = p->K, groups = K / GROUP, whole = groups / GROUPS_PER_VECTOR * GROUPS_PER_VECTOR;
    const uint8_t *wr[UNIT_MAX];
    const uint8_t *sr[UNIT_MAX];
    UNROLL for (int r = 0; r < NR; r++) wr[r] = (const uint8_t *)p->w + n[r] * K / 2, sr[r] = (const uint8_t *)p->scale + n[r] * groups;
    const Groups *a = p->groups;
    vfloat acc[MAX_ROWS][UNIT_MAX];
    UNROLL for (int m = 0; m < M; m++) UNROLL for (int r = 0; r < NR; r++) acc[m][r] = vf_zero();
    for (int64_t block = 0; block < whole; block += LANES) {
        const int vectors = whole - block >= LANES ? 4 : (int)((whole - block) / GROUPS_PER_VECTOR);
        vfloat codes[UNIT_MAX];
        UNROLL for (int r = 0; r < NR; r++) {
            uint8_t last_codes[LANES] = {0}; /* the row's last block: no read past its codes */
            if (vectors < 4) memcpy(last_codes, sr[r] + block, (size_t)(whole - block));
            codes[r] = vf_scale_codes(vectors < 4 ? last_codes : sr[r] + block);
        }
        UNROLL for (int j = 0; j < 4; j++) {
            if (j >= vectors) break;
            const int64_t g = block + j * GROUPS_PER_VECTOR;
            vint first[UNIT_MAX], last[UNIT_MAX];
            vfloat scales[UNIT_MAX];
            UNROLL for (int r = 0; r < NR; r++) {
                prefetch(wr[r] + g * GROUP / 2);
                const vint v = vi_load(wr[r] + g * GROUP / 2);
                first[r] = vi_low_nibbles(v), last[r] = vi_high_nibbles(v);
                scales[r] = vf_spread(codes[r], j);
            }
            UNROLL for (int m = 0; m < M; m++) {
                const int8_t *xg = a->q + m * row_stride(K) + g * GROUP;
                const vint x0 = vi_load(xg), x1 = vi_load(xg + 4 * LANES);
                const vfloat xs = vf_load(a->spread + m * 4 * groups + 4 * g);
                UNROLL for (int r = 0; r < NR; r++) {
                    const vint d = vi_dot_bytes(vi_dot_bytes(vi_zero(), first[r], x0), last[r], x1);
                    acc[m][r] = vf_fmadd(vf_from_int(d), vf_mul(scales[r], xs), acc[m][r]);
                }
            }
        }
    }
    const int8_t *minimum = p->minimum;
    UNROLL for (int m = 0; m < M; m++) UNROLL for (int r = 0; r < NR; r++) {
        const int8_t *x = a->q + m * row_stride(K);
        float tail = 0.0f;
        for (int64_t g = whole; g < groups; g++)
            tail += (float)sr[r][g] * a->spread[m * 4 * groups + 4 * g] * (float)group_dot_int4(wr[r] + g * GROUP / 2, x + g * GROUP);
        const float offset = minimum_term(minimum + n[r] * groups, a->sums + m * groups, groups);
        p->y[m * p->N + n[r]] = p->steps[2 * n[r]] * (vf_sum(acc[m][r]) + tail) + p->steps[2 * n[r] + 1] * offset;
    }
}

/* ---- Entry points: M <= MAX_ROWS rows (the caller splits taller inputs); 0, -1 without scratch memory,
 * -2 for a row count out of range. ---- */

/* A unit is NR weight rows N/NR apart (n, n + N/NR, ...): each thread then reads NR streams at once,
 * which keeps more loads in flight than one stream does (two rows: ~0.99 of the read bandwidth
 * against ~0.86 for one, measured on Zen 3), and each activation load serves NR weight rows. The
 * counts, measured here (Xeon, weights streaming from memory), give a thread enough independent sums
 * to hide the multiply-add latency with one activation row and leave registers for more: AVX2 has 16
 * (four weight rows for one activation row, two for up to four), AVX-512 32 (two for up to eight).
 * bf16 on AVX-512 takes four for two to four rows: it widens each weight with two instructions and
 * then needs an FMA per row, and an activation load serving four weight rows leaves fewer loads per
 * FMA (Zen 4: the matrices alone at four rows 1.18-1.37x, a whole 1.6B step at four rows 1.21-1.32x;
 * at one row the four streams a thread then reads were slower in the whole step, 0.82-0.98x, and
 * int8 and int4 were no faster at any count, int4 at one row 0.84-0.89x). Not measured on a Xeon. */
#define UNIT_ROWS(M) (LANES == 16 ? 2 : (M) == 1 ? 4 : (M) <= 4 ? 2 : 1)
#define UNIT_ROWS_BF16(M) (LANES == 16 && (M) >= 2 && (M) <= 4 ? 4 : UNIT_ROWS(M))

/* The units split across threads; the N % NR rows left over go one at a time on the calling thread. */
#define OVER_OUTPUTS(FORMAT, P, M, NR)                                                        \
    do {                                                                                    \
        const int64_t spacing = (P)->N / (NR);                                              \
        _Pragma("omp parallel for schedule(static)")                                        \
        for (int64_t u = 0; u < spacing; u++) {                                             \
            const int64_t n[UNIT_MAX] = {u, u + spacing, u + 2 * spacing, u + 3 * spacing}; \
            unit_##FORMAT(P, n, M, NR);                                                     \
        }                                                                                   \
        for (int64_t left = spacing * (NR); left < (P)->N; left++)                          \
            unit_##FORMAT(P, &left, M, 1);                                                  \
    } while (0)

/* RULE: the unit rows for a row count (UNIT_ROWS, or UNIT_ROWS_BF16). */
#define BY_ROW_COUNT(FORMAT, P, RULE)                        \
    switch (M) {                                             \
        case 1: OVER_OUTPUTS(FORMAT, P, 1, RULE(1)); break; \
        case 2: OVER_OUTPUTS(FORMAT, P, 2, RULE(2)); break; \
        case 3: OVER_OUTPUTS(FORMAT, P, 3, RULE(3)); break; \
        case 4: OVER_OUTPUTS(FORMAT, P, 4, RULE(4)); break; \
        case 5: OVER_OUTPUTS(FORMAT, P, 5, RULE(5)); break; \
        case 6: OVER_OUTPUTS(FORMAT, P, 6, RULE(6)); break; \
        case 7: OVER_OUTPUTS(FORMAT, P, 7, RULE(7)); break; \
        case 8: OVER_OUTPUTS(FORMAT, P, 8, RULE(8)); break; \
    }

int midfill_linear_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
    if (M < 1 || M > MAX_ROWS) return -2;
    float *split = split_even_odd(x, M, K);
    if (!split) return -1;
    const Product p = {.x = split, .w = w, .y = y, .N = N, .K = K};
    BY_ROW_COUNT(bf16, &p, UNIT_ROWS_BF16)
    free(split);
    return 0;
}

int midfill_linear_int8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K) {
    if (M < 1 || M > MAX_ROWS) return -2;
    Rows rows;
    if (quantize_rows(x, M, K, &rows)) return -1;
    const Product p = {.rows = &rows, .w = w, .scale = scale, .y = y, .N = N, .K = K};
    BY_ROW_COUNT(int8, &p, UNIT_ROWS)
    free_rows(&rows);
    return 0;
}

int midfill_linear_int4(const float *x, const uint8_t *w, const uint8_t *scale, const int8_t *minimum, const float *steps,
                        float *y, int64_t M, int64_t N, int64_t K) {
    if (M < 1 || M > MAX_ROWS) return -2;
    Groups groups;
    if (quantize_groups(x, M, K, &groups)) return -1;
    const Product p = {.groups = &groups, .w = w, .scale = scale, .minimum = minimum, .steps = steps, .y = y, .N = N, .K = K};
    BY_ROW_COUNT(int4, &p, UNIT_ROWS)
    free_groups(&groups);
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

/* exp for 8 floats: 2^n * e^r with |r| <= ln2/2 and a degree-6 polynomial (relative error ~1e-7).
 * Below e^-64 it is 0: softmax weights that small (masked keys, far keys under ALiBi) are far below a
 * float32 sum of at least 1, and multiplied into the values they make subnormal floats, each one a
 * microcode assist (attention over 512 ALiBi positions ran 15x slower). */
static inline __m256 exp8(__m256 x) {
    const __m256 kept = _mm256_cmp_ps(x, _mm256_set1_ps(-64.0f), _CMP_GT_OQ);
    x = _mm256_max_ps(x, _mm256_set1_ps(-64.0f));
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
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(power)), kept);
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

/* G heads of one row against the shared K/V head, inlined with G and D known at compile time and its
 * small constant loops unrolled by force (left to GCC -O2 the sums stayed on the stack: 3-4x slower).
 * Each key and value vector is loaded once for all G heads (the cache is re-read H/G times, not H):
 * scores take 8/G keys at a time for G heads, eight sums in registers; values take 8/G of the D/8
 * column blocks at a time for G heads. */
ALWAYS_INLINE void attend_heads(const float *qv, const float *keys, const float *values, const float *bv, float *p,
                                float *o, int64_t S, int64_t padded, float scale, const int G, const int D) {
    const int KB = 8 / G, DB = 8 / G;
    int64_t j = 0;
    for (; j + KB <= S; j += KB) {
        __m256 a[8];
        UNROLL for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
        UNROLL for (int d = 0; d < D; d += 8)
            UNROLL for (int kb = 0; kb < KB; kb++) {
                __m256 kd = _mm256_loadu_ps(keys + (j + kb) * D + d);
                UNROLL for (int g = 0; g < G; g++) a[g * KB + kb] = _mm256_fmadd_ps(_mm256_loadu_ps(qv + g * D + d), kd, a[g * KB + kb]);
            }
        float sums[8];
        _mm256_storeu_ps(sums, hsum8x8(a));
        UNROLL for (int g = 0; g < G; g++)
            UNROLL for (int kb = 0; kb < KB; kb++) p[g * padded + j + kb] = sums[g * KB + kb] * scale + bv[g * S + j + kb];
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
        UNROLL for (int i = 0; i < G * DB; i++) acc[i] = _mm256_setzero_ps();
        for (j = 0; j < S; j++)
            UNROLL for (int db = 0; db < DB && block + db < D / 8; db++) {
                __m256 vd = _mm256_loadu_ps(values + j * D + 8 * (block + db));
                UNROLL for (int g = 0; g < G; g++) acc[g * DB + db] = _mm256_fmadd_ps(_mm256_set1_ps(p[g * padded + j]), vd, acc[g * DB + db]);
            }
        UNROLL for (int g = 0; g < G; g++)
            UNROLL for (int db = 0; db < DB && block + db < D / 8; db++)
                _mm256_storeu_ps(o + g * D + 8 * (block + db), _mm256_mul_ps(acc[g * DB + db], _mm256_set1_ps(inverse[g])));
    }
}

/* One new query each against the cached keys of its row, for every head of a multi-query layer.
 *
 * q, out: [B, H, D]; k, v: query b's keys start at rows[b] * row_stride, one D-vector per position
 * (several queries may share a row: a draft being verified); bias: [B, H, S] additive (ALiBi and
 * masks, -inf-like where hidden: a query sees no later one of its row). D is 32, 64 or 128.
 * All heads share the one K/V head, so K and V stay in cache while the heads take turns.
 */
int midfill_attention_one(const float *q, const float *k, const float *v, const int64_t *rows, const float *bias,
                          float *out, int64_t B, int64_t H, int64_t S, int64_t D, int64_t row_stride, float scale) {
    if (D != 32 && D != 64 && D != 128) return -2;
    const int64_t padded = (S + 7) / 8 * 8, G = H % 4 == 0 ? 4 : 1, groups = B * H / G;
    float *scratch = malloc((size_t)B * H * padded * sizeof(float));
    if (!scratch) return -1;
#pragma omp parallel for schedule(static)
    for (int64_t group = 0; group < groups; group++) {
        const int64_t bh = group * G, b = bh / H;
        const float *keys = k + rows[b] * row_stride, *values = v + rows[b] * row_stride;
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
    const void *weight, *scale, *minimum, *steps;
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
        else status = midfill_linear_int4(xs, m->weight, m->scale, m->minimum, m->steps, ys, rows, m->n_out, m->n_in);
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
 * value go to k_cache/v_cache at rows[m] * row_stride + slots[m] * D; bias [M, H, S] as for attention.
 * F (the MLP width) is a multiple of 8, E and D multiples of 32. */
int midfill_decode_block(float *x, int64_t M, int64_t E, int64_t H, int64_t D, int64_t F, const float *ln_1,
                         const float *ln_2, float eps, const Matrix *matrices, float *k_cache, float *v_cache,
                         int64_t row_stride, const int64_t *rows, const int64_t *slots, const float *bias, int64_t S) {
    float *h = malloc(M * E * sizeof(float)), *q = malloc(M * E * sizeof(float)), *kv = malloc(M * 2 * D * sizeof(float));
    float *mixed = malloc(M * E * sizeof(float)), *wide = malloc(M * 2 * F * sizeof(float)), *act = malloc(M * F * sizeof(float));
    int status = -1;
    if (!h || !q || !kv || !mixed || !wide || !act) goto done;
    layer_norm(x, ln_1, eps, h, M, E);
    if ((status = matrix_apply(&matrices[0], h, q, M)) || (status = matrix_apply(&matrices[1], h, kv, M))) goto done;
    for (int64_t m = 0; m < M; m++) {
        memcpy(k_cache + rows[m] * row_stride + slots[m] * D, kv + m * 2 * D, D * sizeof(float));
        memcpy(v_cache + rows[m] * row_stride + slots[m] * D, kv + m * 2 * D + D, D * sizeof(float));
    }
    if ((status = midfill_attention_one(q, k_cache, v_cache, rows, bias, mixed, M, H, S, D, row_stride, 1.0f / sqrtf((float)D)))) goto done;
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

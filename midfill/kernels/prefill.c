/* Many-row matrix products for prefill: y[M, N] = x[M, K] W[N, K]^T, W in bf16, x and y float32.
 *
 * With hundreds of activation rows every weight is used hundreds of times, so the speed is the
 * arithmetic rate, not the memory rate that bounds decoding (decode.c). The arithmetic is float32
 * FMA on weights widened in cache. AVX512-BF16's vdpbf16ps would do twice the multiply-adds per
 * instruction, but on the CPU this was tuned on (Xeon with AVX512-BF16, no AMX) it retires about one
 * every two to three cycles against two FMAs per cycle: the same blocking built on it ran at half the
 * speed (78 against 153 GFLOP/s on one core), and it would also round x to bf16. So x stays float32
 * and y matches torch's x @ W.float().T up to summation order, without W ever existing in float32.
 *
 * Blocking, per work item (NC weight rows x up to MC activation rows), for each KC-wide slice of K:
 *   - the item's weight block is widened to float32 and transposed into a per-thread scratch block
 *     (NC x KC floats, in L2), so each weight is read from memory once per MC activation rows;
 *   - tiles of MR activation rows x NR weight rows run over the slice: 24 zmm accumulators, each k
 *     costs two vector loads of W and MR broadcasts of x for 2 * MR FMAs. The tile's x rows (MR x KC)
 *     stay in L1 while the item's weight panels stream past them from L2, and the item's part of y
 *     (MC x NC) stays in L2 between slices.
 * Items are handed out dynamically, so a thread slowed by a neighbour on a shared machine leaves its
 * work to the others instead of holding up the call.
 *
 * Layouts: x [M, K] and y [M, N] row-major float32; W [N, K] row-major bf16 (the upper half of a
 * float32), as torch and decode.c hold it. K is a positive multiple of 32; M and N are arbitrary.
 * Built with -mavx512f -fopenmp; without AVX-512 the function reports -2 (unsupported).
 */
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#include <omp.h>

#define MR 12        /* activation rows per tile */
#define NR 32        /* weight rows per tile: two zmm of outputs */
#define KC 512       /* K slice: a tile's x rows (MR x KC floats, 24 KB) stay in L1 */
#define NC 256       /* weight rows per item: the packed block (NC x KC floats, 512 KB) stays in L2 */
#define MC 512       /* activation rows per item: the item's y (MC x NC floats, 512 KB) stays in L2 */
#define MIN_MC 256   /* with fewer rows per item, packing W again for each item costs more than a few percent */

#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* In-register transpose: lane j of r[i] goes to lane i of r[j]. */
ALWAYS_INLINE void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    }
    /* Now 128-bit lane L of r[4q + j] holds rows 4q..4q+3 of column 4L + j: gather the lanes. */
    __m512 u[16];
    for (int j = 0; j < 4; j++) {
        u[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
        u[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
        u[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        u[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
    }
    for (int j = 0; j < 4; j++) {
        r[j] = _mm512_shuffle_f32x4(u[j], u[8 + j], 0x88);
        r[4 + j] = _mm512_shuffle_f32x4(u[4 + j], u[12 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(u[j], u[8 + j], 0xDD);
        r[12 + j] = _mm512_shuffle_f32x4(u[4 + j], u[12 + j], 0xDD);
    }
}

/* W rows n0..n0+rows-1 (rows <= NR), k in [k0, k0 + kc), into out[k][NR] as float32, zero past `rows`.
 * A 32-bit lane holds two neighbouring bf16 of one row, so one transpose of lanes moves 512 weights,
 * and a shift and a mask turn each lane's halves into the floats for k and k + 1. */
static void pack_weights(const uint16_t *w, int64_t K, int64_t n0, int64_t rows, int64_t k0, int64_t kc, float *out) {
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int half = 0; half < NR; half += 16) {
        for (int64_t k = 0; k < kc; k += 32) {
            __m512 r[16];
            for (int i = 0; i < 16; i++)
                r[i] = half + i < rows ? _mm512_castsi512_ps(_mm512_loadu_si512(w + (n0 + half + i) * K + k0 + k)) : _mm512_setzero_ps();
            transpose16(r);
            for (int j = 0; j < 16; j++) {
                const __m512i pair = _mm512_castps_si512(r[j]);
                _mm512_store_ps(out + (k + 2 * j) * NR + half, _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)));
                _mm512_store_ps(out + (k + 2 * j + 1) * NR + half, _mm512_castsi512_ps(_mm512_and_si512(pair, high)));
            }
        }
    }
}

/* y[rows, min(cols, NR)] (+)= x[rows, kc] @ packed[kc, NR]; rows is a compile-time count once inlined. */
ALWAYS_INLINE void tile(const float *x, int64_t K, const float *packed, int64_t kc, float *y, int64_t N, int64_t cols,
                        int accumulate, const int rows) {
    __m512 acc[MR][2];
    for (int r = 0; r < rows; r++) {
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        /* y is read and written only after the loop: start fetching it now */
        _mm_prefetch((const char *)(y + r * N), _MM_HINT_T0);
        _mm_prefetch((const char *)(y + r * N + 16), _MM_HINT_T0);
    }
    for (int64_t k = 0; k < kc; k++) {
        const __m512 w0 = _mm512_load_ps(packed + k * NR), w1 = _mm512_load_ps(packed + k * NR + 16);
        for (int r = 0; r < rows; r++) {
            const __m512 a = _mm512_set1_ps(x[r * K + k]);
            acc[r][0] = _mm512_fmadd_ps(a, w0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(a, w1, acc[r][1]);
        }
    }
    for (int v = 0; v < 2; v++) {
        const int64_t left = cols - 16 * v;
        const __mmask16 mask = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
        for (int r = 0; r < rows; r++) {
            float *out = y + r * N + 16 * v;
            if (accumulate) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_maskz_loadu_ps(mask, out));
            _mm512_mask_storeu_ps(out, mask, acc[r][v]);
        }
    }
}

/* The last tile of an item may have fewer than MR rows: one inlined copy of tile per row count. */
static void tile_rows(const float *x, int64_t K, const float *packed, int64_t kc, float *y, int64_t N, int64_t cols,
                      int accumulate, int rows) {
    switch (rows) {
#define ROWS(R) \
    case R: tile(x, K, packed, kc, y, N, cols, accumulate, R); break;
        ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8) ROWS(9) ROWS(10) ROWS(11) ROWS(12)
#undef ROWS
    }
}

/* y [M, N] = x [M, K] W^T; 0, or -1 when scratch memory cannot be had. */
int midfill_gemm_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
    if (M <= 0 || N <= 0) return 0;
    const int64_t groups = (N + NC - 1) / NC, threads = omp_get_max_threads();
    /* Split the rows further only when there are too few weight groups to share among the threads. */
    int64_t chunks = (M + MC - 1) / MC;
    if (groups * chunks < 2 * threads) {
        const int64_t wanted = (2 * threads + groups - 1) / groups, most = (M + MIN_MC - 1) / MIN_MC;
        chunks = wanted < most ? wanted : most;
    }
    /* a multiple of MR, so that only the last item ends in a short tile */
    const int64_t chunk_rows = ((M + chunks - 1) / chunks + MR - 1) / MR * MR;
    chunks = (M + chunk_rows - 1) / chunk_rows;
    int failed = 0;
#pragma omp parallel
    {
        float *packed = aligned_alloc(64, (size_t)NC * KC * sizeof(float));
        if (!packed) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic)
        for (int64_t item = 0; item < groups * chunks; item++) {
            if (!packed) continue;
            const int64_t n0 = item / chunks * NC, n1 = n0 + NC < N ? n0 + NC : N;
            const int64_t m0 = item % chunks * chunk_rows, m1 = m0 + chunk_rows < M ? m0 + chunk_rows : M;
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t kc = K - k0 < KC ? K - k0 : KC;
                for (int64_t n = n0; n < n1; n += NR) pack_weights(w, K, n, n1 - n < NR ? n1 - n : NR, k0, kc, packed + (n - n0) * KC);
                for (int64_t m = m0; m < m1; m += MR) {
                    const int rows = m1 - m < MR ? (int)(m1 - m) : MR;
                    for (int64_t n = n0; n < n1; n += NR)
                        tile_rows(x + m * K + k0, K, packed + (n - n0) * KC, kc, y + m * N + n, N, n1 - n, k0 > 0, rows);
                }
            }
        }
        free(packed);
    }
    return failed ? -1 : 0;
}

#else

int midfill_gemm_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
    (void)x, (void)w, (void)y, (void)M, (void)N, (void)K;
    return -2;
}

#endif

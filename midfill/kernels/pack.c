/* Packing float32 weights into int8 and int4: the same least-squares range search as the pure-torch
 * reference in midfill/model/quantize.py (int8_scale, int4_range, int4_levels), one row or group at a
 * time; and widening them back to bf16 for a prompt's products on bf16 matrix units (midfill_widen_bf16).
 *
 * torch runs the search as a few dozen passes over whole tensors, each writing an intermediate as
 * large as the weight: minutes of packing for the 1.6B model on two cores. Here a row
 * (int8) or a group of 32 (int4) stays in registers for its whole search, so the cost is arithmetic
 * only. Each step mirrors the reference's order of operations (subtract, divide, round half to even,
 * clamp; the int4 row steps and codes), so the levels are the reference's; only summation order
 * differs, which moves the squared errors by a few ulps and can, rarely, pick another of two starts
 * that fit equally well. tests/test_native.py holds the two to that.
 *
 * Built into the same library as decode.c; AVX2 + FMA + F16C are enough (every variant has them).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* Equal to RANGE_STARTS and REFIT_ROUNDS in quantize.py: tests/test_native.py compares the results. */
static const float RANGE_STARTS[3] = {-0.04f, 0.0f, 0.05f};
#define N_STARTS 3
#define REFIT_ROUNDS 3

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#define ROUND_EVEN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

static inline float to_half_and_back(float x) { return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)); }

static inline float round_even(float x) { return _mm_cvtss_f32(_mm_round_ss(_mm_setzero_ps(), _mm_set_ss(x), ROUND_EVEN)); }

/* Levels 0..15 of one group of 32 for a scale and minimum, and their squared error. */
static inline float round_group(const __m256 g[4], float s, float m, __m256 q[4]) {
    __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m), step = _mm256_set1_ps(s == 0.0f ? 1.0f : s);
    __m256 error = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        __m256 level = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(g[i], vm), step), ROUND_EVEN);
        q[i] = _mm256_min_ps(_mm256_max_ps(level, _mm256_setzero_ps()), _mm256_set1_ps(15.0f));
        __m256 d = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(q[i], vs), vm), g[i]);
        error = _mm256_fmadd_ps(d, d, error);
    }
    return sum8(error);
}

/* int4_range of quantize.py for one group: the scale and minimum of least squared error reached by
 * REFIT_ROUNDS least-squares refits from each pair of RANGE_STARTS, each tried at float16 precision. */
static void int4_group_range(const float *w, float *best_scale, float *best_minimum) {
    __m256 g[4], q[4];
    __m256 lo = _mm256_loadu_ps(w), hi = lo, total = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        g[i] = _mm256_loadu_ps(w + 8 * i);
        lo = _mm256_min_ps(lo, g[i]);
        hi = _mm256_max_ps(hi, g[i]);
        total = _mm256_add_ps(total, g[i]);
    }
    float low = w[0], high = w[0];
    float lows[8], highs[8];
    _mm256_storeu_ps(lows, lo);
    _mm256_storeu_ps(highs, hi);
    for (int i = 0; i < 8; i++) {
        low = lows[i] < low ? lows[i] : low;
        high = highs[i] > high ? highs[i] : high;
    }
    float mean = sum8(total) / 32.0f, span = high - low;
    float best_error = __builtin_inff();
    *best_scale = to_half_and_back(span), *best_minimum = to_half_and_back(low);
    for (int a = 0; a < N_STARTS; a++) {
        for (int b = 0; b < N_STARTS; b++) {
            float scale = span * (1.0f - RANGE_STARTS[a] - RANGE_STARTS[b]) / 15.0f;
            float minimum = low + RANGE_STARTS[a] * span;
            for (int round = 0; round <= REFIT_ROUNDS; round++) {
                const float s = to_half_and_back(scale), m = to_half_and_back(minimum);
                float error = round_group(g, s, m, q);
                if (error < best_error)
                    best_error = error, *best_scale = s, *best_minimum = m;
                __m256 q_total = _mm256_add_ps(_mm256_add_ps(q[0], q[1]), _mm256_add_ps(q[2], q[3]));
                float q_mean = sum8(q_total) / 32.0f;
                __m256 vq_mean = _mm256_set1_ps(q_mean), vmean = _mm256_set1_ps(mean);
                __m256 var = _mm256_setzero_ps(), cov = _mm256_setzero_ps();
                for (int i = 0; i < 4; i++) {
                    __m256 dq = _mm256_sub_ps(q[i], vq_mean);
                    var = _mm256_fmadd_ps(dq, dq, var);
                    cov = _mm256_fmadd_ps(dq, _mm256_sub_ps(g[i], vmean), cov);
                }
                float variance = sum8(var), covariance = sum8(cov);
                if (variance > 0.0f)
                    scale = covariance / (variance > 1e-12f ? variance : 1e-12f);
                scale = scale > 0.0f ? scale : 0.0f;
                minimum = mean - scale * q_mean;
            }
        }
    }
}

static inline float clamp(float x, float low, float high) { return x < low ? low : x > high ? high : x; }

/* int4_levels of quantize.py: w [n_out, k] float32 (k a multiple of 32) -> packed [n_out, k/2] (in each
 * group of 32, weight i in the low nibble of byte i, weight i + 16 in the high one), scale codes
 * [n_out, k/32] uint8 and minimum codes int8, steps [n_out, 2] float32: each group's best range, then
 * its codes on the row's steps, then its levels for the coded range. */
void midfill_pack_int4(const float *w, int64_t n_out, int64_t k, uint8_t *packed, uint8_t *scale, int8_t *minimum, float *steps) {
    const int64_t groups = k / 32;
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t n = 0; n < n_out; n++) {
        float fitted_scale[groups], fitted_minimum[groups], top_scale = 0.0f, top_minimum = 0.0f;
        for (int64_t j = 0; j < groups; j++) {
            int4_group_range(w + n * k + 32 * j, &fitted_scale[j], &fitted_minimum[j]);
            top_scale = fitted_scale[j] > top_scale ? fitted_scale[j] : top_scale;
            top_minimum = fabsf(fitted_minimum[j]) > top_minimum ? fabsf(fitted_minimum[j]) : top_minimum;
        }
        const float scale_step = (top_scale > 1e-12f ? top_scale : 1e-12f) / 255.0f;
        const float minimum_step = (top_minimum > 1e-12f ? top_minimum : 1e-12f) / 127.0f;
        steps[2 * n] = scale_step, steps[2 * n + 1] = minimum_step;
        for (int64_t j = 0; j < groups; j++) {
            const int64_t at = n * groups + j;
            const float sc = clamp(round_even(fitted_scale[j] / scale_step), 0.0f, 255.0f);
            const float mc = clamp(round_even(fitted_minimum[j] / minimum_step), -127.0f, 127.0f);
            scale[at] = (uint8_t)sc, minimum[at] = (int8_t)mc;
            const float *group = w + n * k + 32 * j;
            __m256 g[4], q[4];
            for (int i = 0; i < 4; i++)
                g[i] = _mm256_loadu_ps(group + 8 * i);
            round_group(g, sc * scale_step, mc * minimum_step, q);
            float levels[32];
            for (int i = 0; i < 4; i++)
                _mm256_storeu_ps(levels + 8 * i, q[i]);
            for (int i = 0; i < 16; i++)
                packed[16 * at + i] = (uint8_t)((int)levels[i] | ((int)levels[i + 16] << 4));
        }
    }
}

/* Levels -127..127 of a row for one scale (w / scale, rounded half to even) and their squared error;
 * with sums, also sum(q * w) and sum(q * q) for the refit. */
static float round_row(const float *w, int64_t k, float scale, int8_t *out, float *qw, float *qq) {
    __m256 vs = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    __m256 error = _mm256_setzero_ps(), sum_qw = _mm256_setzero_ps(), sum_qq = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8) {
        __m256 x = _mm256_loadu_ps(w + i);
        __m256 q = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_div_ps(x, vs), ROUND_EVEN), lo), hi);
        __m256 d = _mm256_sub_ps(_mm256_mul_ps(q, vs), x);
        error = _mm256_fmadd_ps(d, d, error);
        sum_qw = _mm256_fmadd_ps(q, x, sum_qw);
        sum_qq = _mm256_fmadd_ps(q, q, sum_qq);
        if (out) {
            __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(_mm256_cvtps_epi32(q)), _mm256_extracti128_si256(_mm256_cvtps_epi32(q), 1));
            _mm_storel_epi64((__m128i *)(out + i), _mm_packs_epi16(words, words));
        }
    }
    *qw = sum8(sum_qw), *qq = sum8(sum_qq);
    return sum8(error);
}

/* pack_int8 of quantize.py: w [n_out, k] float32 (k a multiple of 8) -> q [n_out, k] int8 and one
 * float32 scale per row: max |w| / 127, then REFIT_ROUNDS least-squares refits, the best kept. */
void midfill_pack_int8(const float *w, int64_t n_out, int64_t k, int8_t *q, float *scale) {
#pragma omp parallel for schedule(dynamic, 16)
    for (int64_t n = 0; n < n_out; n++) {
        const float *row = w + n * k;
        __m256 amax = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.0f);
        for (int64_t i = 0; i < k; i += 8)
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(row + i)));
        float lanes[8], top = 0.0f;
        _mm256_storeu_ps(lanes, amax);
        for (int i = 0; i < 8; i++)
            top = lanes[i] > top ? lanes[i] : top;
        float s = (top > 1e-12f ? top : 1e-12f) / 127.0f, best = s, best_error = __builtin_inff(), qw, qq;
        for (int round = 0; round <= REFIT_ROUNDS; round++) {
            float error = round_row(row, k, s, 0, &qw, &qq);
            if (error < best_error)
                best_error = error, best = s;
            s = qw / (qq > 1.0f ? qq : 1.0f);
            s = s > 1e-12f ? s : 1e-12f;
        }
        scale[n] = best;
        round_row(row, k, best, q + n * k, &qw, &qq);
    }
}

/* 16 bf16 from two vectors of 8 floats; round = 0 when every float is exact in bf16 (int8 levels). */
static inline void store_bf16(uint16_t *out, __m256 a, __m256 b, int round) {
    __m256i x = _mm256_castps_si256(a), y = _mm256_castps_si256(b);
    if (round) { /* to nearest even, as torch's float -> bfloat16 (weights are finite) */
        const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7FFF);
        x = _mm256_add_epi32(x, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(x, 16), one)));
        y = _mm256_add_epi32(y, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(y, 16), one)));
    }
    __m256i words = _mm256_packus_epi32(_mm256_srli_epi32(x, 16), _mm256_srli_epi32(y, 16)); /* lanes a0 b0 a1 b1 */
    _mm256_storeu_si256((__m256i *)out, _mm256_permute4x64_epi64(words, 0xD8));
}

/* One group of 32 int4 weights as PackedLinear.unpack computes them, q * scale + minimum (a product
 * rounded to float32, then a sum: the empty asm keeps the compiler from fusing the two). */
static inline __m256 int4_weights(const uint8_t *bytes, int high, __m256 scale, __m256 minimum) {
    __m256i q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)bytes));
    q = high ? _mm256_srli_epi32(q, 4) : _mm256_and_si256(q, _mm256_set1_epi32(0x0F));
    __m256 product = _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale);
    __asm__("" : "+x"(product));
    return _mm256_add_ps(product, minimum);
}

/* Packed weights [n_out, k] as bf16 in out [n_out, k]: format 1 (int8) gives the levels themselves,
 * exact in bf16 (the row scale is applied to the product's output); format 2 (int4) gives
 * q * scale + minimum rounded to bf16, equal to PackedLinear.unpack().to(torch.bfloat16). k is a
 * multiple of 32. Reads the packed bytes once and writes each bf16 once: a layer of the 1.6B model in
 * a few milliseconds, where the torch path built float32 intermediates several times its size. */
void midfill_widen_bf16(int64_t format, const uint8_t *weight, const uint8_t *scale, const int8_t *minimum, const float *steps,
                        int64_t n_out, int64_t k, uint16_t *out) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < n_out; n++) {
        uint16_t *row = out + n * k;
        for (int64_t i = 0; i < k; i += 32) {
            if (format == 1) {
                const int8_t *q = (const int8_t *)weight + n * k + i;
                __m256 f[4];
                for (int j = 0; j < 4; j++)
                    f[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * j))));
                store_bf16(row + i, f[0], f[1], 0);
                store_bf16(row + i + 16, f[2], f[3], 0);
            } else {
                const int64_t g = (n * k + i) / 32;
                const uint8_t *bytes = weight + 16 * g;
                const __m256 s = _mm256_set1_ps((float)scale[g] * steps[2 * n]), m = _mm256_set1_ps((float)minimum[g] * steps[2 * n + 1]);
                /* byte j holds weight j (low nibble) and weight j + 16 (high nibble) */
                store_bf16(row + i, int4_weights(bytes, 0, s, m), int4_weights(bytes + 8, 0, s, m), 1);
                store_bf16(row + i + 16, int4_weights(bytes, 1, s, m), int4_weights(bytes + 8, 1, s, m), 1);
            }
        }
    }
}

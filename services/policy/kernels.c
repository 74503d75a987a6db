/* The fused decode step's elementwise work, one C loop per job instead of a chain of
 * small torch ops (services/policy/kernels.py builds and checks this file).
 *
 * Each kernel exists for bf16 (stored as uint16_t) and fp32 storage. Arithmetic is
 * fp32 and every intermediate that transformers' Llama rounds to the model's dtype is
 * rounded here too (ROUND), so a bf16 result is the one transformers computes, up to
 * the order of a row's sum of squares. Every kernel splits its rows over the caller's
 * OpenMP team (the elementwise ones from ROWS_IN_PARALLEL rows on: below that a row is too
 * little work to share), so no job of the step leaves the team's other threads waiting;
 * attention and the row maximum use AVX-512 registers where the compiler targets them
 * (-march=native) and plain loops elsewhere.
 */
#define _DEFAULT_SOURCE /* syscall(), for the AMX grant */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS_IN_PARALLEL 4

static inline float bf16_load(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Round to nearest even; NaN stays NaN. Branch-free so that loops vectorise. */
static inline uint16_t bf16_store(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
    uint32_t quiet = u | 0x400000u;
    return (uint16_t)((((u & 0x7fffffffu) > 0x7f800000u) ? quiet : rounded) >> 16);
}

static inline float f32_load(float v) { return v; }
static inline float f32_store(float f) { return f; }

/* e^x for x in [-87, 88] without a library call (which would stop vectorisation):
 * 2^k * p(r), r = x - k ln 2 in [-ln2/2, ln2/2], p of degree 6: relative error ~2e-7. */
static inline float exp_approx(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    float k = (x * 1.44269504f + 12582912.f) - 12582912.f; /* round to nearest integer */
    float r = x - k * 0.693145752f - k * 1.42860677e-06f;
    float p = 1.f + r * (1.f + r * (0.5f + r * (0.166666672f + r * (0.0416666679f + r * (0.00833333377f + r * 0.00138888892f)))));
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

#define KERNELS(NAME, T)                                                                                   \
    /* x[r] <- x[r] + delta[r] (delta may be NULL), then out[r] = w * (x[r] / rms(x[r])) */                \
    void add_rms_norm_##NAME(T *restrict x, const T *restrict delta, const T *restrict w, T *restrict out, \
                             int64_t n, int64_t h, float eps) {                                            \
        _Pragma("omp parallel for if (n >= ROWS_IN_PARALLEL)")                                             \
        for (int64_t r = 0; r < n; r++) {                                                                  \
            T *xr = x + r * h;                                                                             \
            T *o = out + r * h;                                                                            \
            float squares = 0.f;                                                                           \
            if (delta) {                                                                                   \
                const T *d = delta + r * h;                                                                \
                _Pragma("omp simd reduction(+ : squares)") for (int64_t i = 0; i < h; i++) {               \
                    T v = NAME##_store(NAME##_load(xr[i]) + NAME##_load(d[i]));                            \
                    xr[i] = v;                                                                             \
                    float f = NAME##_load(v);                                                              \
                    squares += f * f;                                                                      \
                }                                                                                          \
            } else {                                                                                       \
                _Pragma("omp simd reduction(+ : squares)") for (int64_t i = 0; i < h; i++) {               \
                    float f = NAME##_load(xr[i]);                                                          \
                    squares += f * f;                                                                      \
                }                                                                                          \
            }                                                                                              \
            float inv = 1.0f / sqrtf(squares / (float)h + eps);                                            \
            _Pragma("omp simd") for (int64_t i = 0; i < h; i++) {                                          \
                float normed = NAME##_load(NAME##_store(NAME##_load(xr[i]) * inv));                        \
                o[i] = NAME##_store(NAME##_load(w[i]) * normed);                                           \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    /* out[r, i] = silu(gate[r, i]) * up[r, i], with rows of gate_up laid out [gate | up] */               \
    void silu_mul_##NAME(const T *restrict gate_up, T *restrict out, int64_t n, int64_t inter) {           \
        _Pragma("omp parallel for if (n >= ROWS_IN_PARALLEL)")                                             \
        for (int64_t r = 0; r < n; r++) {                                                                  \
            const T *g = gate_up + r * 2 * inter;                                                          \
            const T *u = g + inter;                                                                        \
            T *o = out + r * inter;                                                                        \
            _Pragma("omp simd") for (int64_t i = 0; i < inter; i++) {                                      \
                float v = NAME##_load(g[i]);                                                               \
                float act = NAME##_load(NAME##_store(v / (1.f + exp_approx(-v))));                         \
                o[i] = NAME##_store(act * NAME##_load(u[i]));                                              \
            }                                                                                              \
        }                                                                                                  \
    }                                                                                                      \
                                                                                                           \
    /* Rotary embedding in place on the first `heads` heads of each row (row stride `stride`):             \
     * halves a, b become a cos - b sin and b cos + a sin. cos/sin: [n, dim / 2], row stride cs_stride. */ \
    void rope_##NAME(T *restrict qk, int64_t stride, const T *restrict cos, const T *restrict sin,         \
                     int64_t cs_stride, int64_t n, int64_t heads, int64_t dim) {                           \
        int64_t half = dim / 2;                                                                            \
        _Pragma("omp parallel for if (n >= ROWS_IN_PARALLEL)")                                             \
        for (int64_t r = 0; r < n; r++) {                                                                  \
            const T *c = cos + r * cs_stride;                                                              \
            const T *s = sin + r * cs_stride;                                                              \
            for (int64_t head = 0; head < heads; head++) {                                                 \
                T *a = qk + r * stride + head * dim;                                                       \
                T *b = a + half;                                                                           \
                _Pragma("omp simd") for (int64_t i = 0; i < half; i++) {                                   \
                    float av = NAME##_load(a[i]), bv = NAME##_load(b[i]);                                  \
                    float cv = NAME##_load(c[i]), sv = NAME##_load(s[i]);                                  \
                    float ac = NAME##_load(NAME##_store(av * cv)), bs = NAME##_load(NAME##_store(bv * sv)); \
                    float bc = NAME##_load(NAME##_store(bv * cv)), as = NAME##_load(NAME##_store(av * sv)); \
                    a[i] = NAME##_store(ac - bs);                                                          \
                    b[i] = NAME##_store(bc + as);                                                          \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }

/* Decode attention for one (row, K/V head): `group` query heads q [group * dim] over the
 * columns of K and V ([columns, dim] each) where m is nonzero; out: [group * dim]. Rounds like
 * kv.py's decode_attention: q.k rounded to T, then scaled, softmax in fp32, weights rounded to
 * T, their sum with V accumulated in fp32. scratch: group * (2 * dim + columns) floats. */
#define ATTEND(NAME, T)                                                                                    \
    static void attend_##NAME(const T *restrict q, const T *restrict K, const T *restrict V,               \
                              const uint8_t *restrict m, T *restrict out, int64_t group, int64_t columns,  \
                              int64_t dim, float scale, float *restrict scratch) {                         \
        float *qf = scratch, *acc = scratch + group * dim, *p = scratch + 2 * group * dim;                 \
        for (int64_t g = 0; g < group; g++) {                                                              \
            for (int64_t d = 0; d < dim; d++) {                                                            \
                qf[g * dim + d] = NAME##_load(q[g * dim + d]);                                             \
                acc[g * dim + d] = 0.f;                                                                    \
            }                                                                                              \
        }                                                                                                  \
        float best[64], total[64];                                                                         \
        for (int64_t g = 0; g < group; g++) best[g] = -INFINITY, total[g] = 0.f;                           \
        for (int64_t c = 0; c < columns; c++) {                                                            \
            if (!m[c]) continue;                                                                           \
            const T *k = K + c * dim;                                                                      \
            for (int64_t g = 0; g < group; g++) {                                                          \
                const float *qg = qf + g * dim;                                                            \
                float dot = 0.f;                                                                           \
                _Pragma("omp simd reduction(+ : dot)") for (int64_t d = 0; d < dim; d++) dot +=            \
                    qg[d] * NAME##_load(k[d]);                                                             \
                float score = NAME##_load(NAME##_store(dot)) * scale;                                      \
                p[g * columns + c] = score;                                                                \
                best[g] = score > best[g] ? score : best[g];                                               \
            }                                                                                              \
        }                                                                                                  \
        for (int64_t g = 0; g < group; g++) {                                                              \
            float *pg = p + g * columns, top = best[g], sum = 0.f;                                         \
            _Pragma("omp simd reduction(+ : sum)") for (int64_t c = 0; c < columns; c++) {                 \
                float e = m[c] ? exp_approx(pg[c] - top) : 0.f;                                            \
                pg[c] = e;                                                                                 \
                sum += e;                                                                                  \
            }                                                                                              \
            total[g] = sum;                                                                                \
        }                                                                                                  \
        for (int64_t c = 0; c < columns; c++) {                                                            \
            if (!m[c]) continue;                                                                           \
            const T *v = V + c * dim;                                                                      \
            for (int64_t g = 0; g < group; g++) {                                                          \
                float w = NAME##_load(NAME##_store(p[g * columns + c] / total[g]));                        \
                float *a = acc + g * dim;                                                                  \
                _Pragma("omp simd") for (int64_t d = 0; d < dim; d++) a[d] += w * NAME##_load(v[d]);       \
            }                                                                                              \
        }                                                                                                  \
        for (int64_t i = 0; i < group * dim; i++) out[i] = NAME##_store(acc[i]);                           \
    }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ROW_MAX_FAST 1
#include <immintrin.h>
/* The same attention with AVX-512 registers, for dim a multiple of 16 up to 256 (the
 * served models' 64 and 128): the plain loops above spend their time in horizontal sums,
 * one per (column, query head), and keep no accumulator in a register. Here only the
 * unmasked columns are visited; 16 columns' keys (then values) are widened to fp32 once per
 * block and reused by every query head of the group; 16 dot products are summed across
 * lanes together (sum16); the softmax runs on whole registers. Roundings are those of
 * attend_*: each score, weight and output is rounded to the storage type where attend_*
 * rounds it. Measured here (bf16, 28 rows x 3 K/V heads x 110 of 128 columns, group 3,
 * dim 64, one thread): 1.0 ms per call for the plain loops, 0.34-0.43 ms for this. */
#define FAST_DIM_LIMIT 256
#define FLAT __attribute__((always_inline)) static inline

FLAT __m512 load16(const void *p, int64_t i, int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)p + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* bf16_store then bf16_load on every lane (round to nearest even; NaN stays NaN) */
FLAT __m512 round16(__m512 x, int bf16) {
    if (!bf16) return x;
    __m512i u = _mm512_castps_si512(x);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    rounded = _mm512_mask_blend_epi32(nan, rounded, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32((int)0xffff0000u)));
}

FLAT void store16(void *p, int64_t i, __m512 x, int bf16) {
    if (!bf16) {
        _mm512_storeu_ps((float *)p + i, x);
        return;
    }
    __m512i high = _mm512_srli_epi32(_mm512_castps_si512(round16(x, 1)), 16);
    _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm512_cvtepi32_epi16(high));
}

/* exp_approx on every lane; NaN stays NaN */
FLAT __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(88.f), _mm512_max_ps(_mm512_set1_ps(-87.f), x));
    __m512 big = _mm512_set1_ps(12582912.f);
    __m512 k = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), big), big);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(k, _mm512_set1_ps(0.693145752f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(k, _mm512_set1_ps(1.42860677e-06f)));
    static const float c[] = {0.00138888892f, 0.00833333377f, 0.0416666679f, 0.166666672f, 0.5f, 1.f, 1.f};
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < 7; i++) p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c[i]));
    __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

/* the first min(16, left) lanes: a block of 16 columns that may run past the last one */
FLAT __mmask16 first_lanes(int64_t left) { return (__mmask16)(left < 16 ? (1u << left) - 1u : 0xffffu); }

/* lane i = the sum of v[i]'s 16 lanes */
FLAT __m512 sum16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

/* attend_* for one (row, K/V head), `chunks` = dim / 16 registers per head (a constant
 * where the caller's switch inlines it). scratch: group * (2 * dim + columns) + 16 * dim
 * floats; live: columns ints. */
FLAT void attend16(const void *q, const void *K, const void *V, const uint8_t *restrict m, void *out,
                   int64_t group, int64_t columns, int64_t chunks, float scale, float *restrict scratch,
                   int32_t *restrict live, int bf16) {
    const int64_t dim = 16 * chunks;
    float *qf = scratch, *acc = qf + group * dim, *block = acc + group * dim, *p = block + 16 * dim;
    int64_t n = 0;
    for (int64_t c = 0; c < columns; c++)
        if (m[c]) live[n++] = (int32_t)c;
    for (int64_t i = 0; i < group * dim; i += 16) {
        _mm512_storeu_ps(qf + i, load16(q, i, bf16));
        _mm512_storeu_ps(acc + i, _mm512_setzero_ps());
    }
    const __m512 scaled = _mm512_set1_ps(scale);
    for (int64_t b0 = 0; b0 < n; b0 += 16) { /* scores of 16 columns at a time */
        int64_t width = n - b0 < 16 ? n - b0 : 16;
        __mmask16 lanes = first_lanes(width);
        for (int64_t i = 0; i < 16; i++) /* a short block's last rows: zeros, so that every lane is finite */
            for (int64_t x = 0; x < chunks; x++)
                _mm512_storeu_ps(block + i * dim + 16 * x,
                                 i < width ? load16(K, live[b0 + i] * dim + 16 * x, bf16) : _mm512_setzero_ps());
        for (int64_t g = 0; g < group; g++) {
            __m512 dots[16];
            for (int i = 0; i < 16; i++) {
                dots[i] = _mm512_mul_ps(_mm512_loadu_ps(qf + g * dim), _mm512_loadu_ps(block + i * dim));
                for (int64_t x = 1; x < chunks; x++)
                    dots[i] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * dim + 16 * x),
                                              _mm512_loadu_ps(block + i * dim + 16 * x), dots[i]);
            }
            _mm512_mask_storeu_ps(p + g * n + b0, lanes, _mm512_mul_ps(round16(sum16(dots), bf16), scaled));
        }
    }
    for (int64_t g = 0; g < group; g++) { /* softmax */
        float *row = p + g * n;
        __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t += 16) {
            __mmask16 lanes = first_lanes(n - t);
            top = _mm512_mask_max_ps(top, lanes, top, _mm512_maskz_loadu_ps(lanes, row + t));
        }
        __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        for (int64_t t = 0; t < n; t += 16) {
            __mmask16 lanes = first_lanes(n - t);
            __m512 e = _mm512_maskz_mov_ps(lanes, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, row + t), best)));
            _mm512_mask_storeu_ps(row + t, lanes, e);
            sum = _mm512_add_ps(sum, e);
        }
        __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
        for (int64_t t = 0; t < n; t += 16) {
            __mmask16 lanes = first_lanes(n - t);
            __m512 w = round16(_mm512_div_ps(_mm512_maskz_loadu_ps(lanes, row + t), total), bf16);
            _mm512_mask_storeu_ps(row + t, lanes, w);
        }
    }
    for (int64_t b0 = 0; b0 < n; b0 += 16) { /* weights x values, 16 columns at a time */
        int64_t width = n - b0 < 16 ? n - b0 : 16;
        for (int64_t i = 0; i < width; i++)
            for (int64_t x = 0; x < chunks; x++)
                _mm512_storeu_ps(block + i * dim + 16 * x, load16(V, live[b0 + i] * dim + 16 * x, bf16));
        for (int64_t g = 0; g < group; g++) {
            __m512 a[FAST_DIM_LIMIT / 16];
            for (int64_t x = 0; x < chunks; x++) a[x] = _mm512_loadu_ps(acc + g * dim + 16 * x);
            for (int64_t i = 0; i < width; i++) {
                __m512 w = _mm512_set1_ps(p[g * n + b0 + i]);
                for (int64_t x = 0; x < chunks; x++) a[x] = _mm512_fmadd_ps(w, _mm512_loadu_ps(block + i * dim + 16 * x), a[x]);
            }
            for (int64_t x = 0; x < chunks; x++) _mm512_storeu_ps(acc + g * dim + 16 * x, a[x]);
        }
    }
    for (int64_t i = 0; i < group * dim; i += 16) store16(out, i, _mm512_loadu_ps(acc + i), bf16);
}

/* A row's largest value and the first index that holds it (NaN when the row has one), 16
 * lanes at a time: each lane keeps its own best and where it first saw it (strictly greater
 * replaces, so a lane's first occurrence stays), then the lanes that hold the row's
 * largest value give the smallest of their indices. */
static void row_max_fast(const void *x, int64_t width, int bf16, float *value, int64_t *index) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i at = _mm512_setzero_si512(), lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < width; i += 16) {
        __mmask16 lanes = first_lanes(width - i);
        __m512 v;
        if (bf16) {
            __m256i h = _mm256_maskz_loadu_epi16(lanes, (const uint16_t *)x + i);
            v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        } else {
            v = _mm512_maskz_loadu_ps(lanes, (const float *)x + i);
        }
        v = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), lanes, v);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        __mmask16 greater = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, greater, v);
        at = _mm512_mask_mov_epi32(at, greater, _mm512_add_epi32(lane, _mm512_set1_epi32((int)i)));
    }
    float top = _mm512_reduce_max_ps(best);
    __mmask16 holders = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    *value = nan ? NAN : top;
    *index = nan ? 0 : _mm512_mask_reduce_min_epi32(holders, at);
}

/* 1 when attend16 served it */
static int attend_fast(const void *q, const void *K, const void *V, const uint8_t *m, void *out, int64_t group,
                       int64_t columns, int64_t dim, float scale, float *scratch, int32_t *live, int bf16) {
    switch (dim) { /* the common head sizes get their own inlined copy, with the loops unrolled */
    case 64:
        bf16 ? attend16(q, K, V, m, out, group, columns, 4, scale, scratch, live, 1)
             : attend16(q, K, V, m, out, group, columns, 4, scale, scratch, live, 0);
        return 1;
    case 128:
        bf16 ? attend16(q, K, V, m, out, group, columns, 8, scale, scratch, live, 1)
             : attend16(q, K, V, m, out, group, columns, 8, scale, scratch, live, 0);
        return 1;
    default:
        if (dim % 16 || dim > FAST_DIM_LIMIT) return 0;
        bf16 ? attend16(q, K, V, m, out, group, columns, dim / 16, scale, scratch, live, 1)
             : attend16(q, K, V, m, out, group, columns, dim / 16, scale, scratch, live, 0);
        return 1;
    }
}
#else
#define ROW_MAX_FAST 0
static int attend_fast(const void *q, const void *K, const void *V, const uint8_t *m, void *out, int64_t group,
                       int64_t columns, int64_t dim, float scale, float *scratch, int32_t *live, int bf16) {
    (void)q, (void)K, (void)V, (void)m, (void)out, (void)group, (void)columns, (void)dim, (void)scale;
    (void)scratch, (void)live, (void)bf16;
    return 0; /* no AVX-512 on this CPU: attend_* serves every shape */
}
static void row_max_fast(const void *x, int64_t width, int bf16, float *value, int64_t *index) {
    (void)x, (void)width, (void)bf16, (void)value, (void)index; /* never called: ROW_MAX_FAST is 0 */
}
#endif

/* Decode attention, one new token per row, over each row's KV window read in place.
 * Query head h of row r: q + r * q_stride + h * dim. Key/value column c of K/V head j, row r:
 * keys/values + r * s_row + j * s_head + c * dim. mask: [n, columns], nonzero = attend.
 * out: [n, heads * dim]. Returns 0, or -1 when scratch memory could not be had. Parallel over
 * (row, K/V head) with the caller's OpenMP team; dynamic scheduling, so that a thread whose
 * core is busy elsewhere holds back only the tasks it has taken. */
#define ATTENTION(NAME, T, BF16)                                                                           \
    int decode_attention_##NAME(const T *restrict q, int64_t q_stride, const T *restrict keys,             \
                                const T *restrict values, int64_t s_row, int64_t s_head,                   \
                                const uint8_t *restrict mask, T *restrict out, int64_t n, int64_t heads,   \
                                int64_t kv_heads, int64_t columns, int64_t dim, float scale) {             \
        int64_t group = heads / kv_heads;                                                                  \
        int failed = 0;                                                                                    \
        _Pragma("omp parallel reduction(| : failed)") {                                                    \
            float *scratch = malloc(sizeof(float) * (size_t)(group * (2 * dim + columns) + 16 * dim));     \
            int32_t *live = malloc(sizeof(int32_t) * (size_t)columns);                                     \
            if (!scratch || !live) failed = 1;                                                             \
            _Pragma("omp for schedule(dynamic, 2)") for (int64_t task = 0; task < n * kv_heads; task++) {  \
                if (!scratch || !live) continue;                                                           \
                int64_t r = task / kv_heads, j = task % kv_heads;                                          \
                const T *qh = q + r * q_stride + j * group * dim;                                          \
                const T *K = keys + r * s_row + j * s_head, *V = values + r * s_row + j * s_head;          \
                T *o = out + r * heads * dim + j * group * dim;                                            \
                const uint8_t *m = mask + r * columns;                                                     \
                if (!attend_fast(qh, K, V, m, o, group, columns, dim, scale, scratch, live, BF16))         \
                    attend_##NAME(qh, K, V, m, o, group, columns, dim, scale, scratch);                    \
            }                                                                                              \
            free(scratch);                                                                                 \
            free(live);                                                                                    \
        }                                                                                                  \
        return failed ? -1 : 0;                                                                            \
    }

/* Each row's largest value and the first index that holds it, as torch.max(x, dim=-1) gives
 * them (NaN, index 0, for a row with a NaN: a caller fails that row). x: [n, width], row
 * stride `stride`; values: [n] floats; indices: [n]. */
#define ROW_MAX(NAME, T, BF16)                                                                             \
    void row_max_##NAME(const T *restrict x, int64_t stride, int64_t n, int64_t width,                     \
                        float *restrict values, int64_t *restrict indices) {                               \
        _Pragma("omp parallel for if (n > 1)") for (int64_t r = 0; r < n; r++) {                           \
            const T *xr = x + r * stride;                                                                  \
            if (ROW_MAX_FAST) {                                                                            \
                row_max_fast(xr, width, BF16, values + r, indices + r);                                    \
                continue;                                                                                  \
            }                                                                                              \
            float best = -INFINITY;                                                                        \
            int nan = 0;                                                                                   \
            _Pragma("omp simd reduction(max : best) reduction(| : nan)")                                   \
            for (int64_t i = 0; i < width; i++) {                                                          \
                float v = NAME##_load(xr[i]);                                                              \
                nan |= v != v;                                                                             \
                best = v > best ? v : best;                                                                \
            }                                                                                              \
            int64_t at = 0;                                                                                \
            while (!nan && at < width - 1 && NAME##_load(xr[at]) != best) at++;                            \
            values[r] = nan ? NAN : best;                                                                  \
            indices[r] = nan ? 0 : at;                                                                     \
        }                                                                                                  \
    }

KERNELS(bf16, uint16_t)
KERNELS(f32, float)
ATTEND(bf16, uint16_t)
ATTEND(f32, float)
ATTENTION(bf16, uint16_t, 1)
ATTENTION(f32, float, 0)
ROW_MAX(bf16, uint16_t, 1)
ROW_MAX(f32, float, 0)

/* Linear layers of decode steps: out = x W^T, fp32 sums rounded once to bf16, reading W once per
 * 32 rows, in the order it is stored, from a copy reordered by pack_linear_bf16. Two kernels
 * read that copy: AVX512-BF16 dot products (up to kernels.py's SMALL_LINEAR_ROWS rows; above
 * that oneDNN's matmul is the faster), and where the CPU has AMX, tile products at any row
 * count. oneDNN's matmul left most of the memory bandwidth unused at decode steps' row counts:
 * SmolLM2-135M's 121 layer matmuls (bf16, 2 threads, medians of 8), oneDNN / dot products /
 * tiles: 1 row 30.0 / 16.6 / 14.5 ms, 8 rows 27.2 / 23.0 / 15.4, 16 rows 26.9 / 43.1 / 14.4,
 * 32 rows 37.9 / - / 20.7, 64 rows 38.6 / - / 32.6. */
#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
int linear_available(void) { return 1; }

/* w [n, k] -> per block of 16 output columns, per pair p of input columns: 16 lanes of
 * (w[c, 2p], w[c, 2p + 1]). n % 16 == 0, k % 2 == 0. */
void pack_linear_bf16(const uint16_t *restrict w, int64_t n, int64_t k, uint32_t *restrict out) {
    int64_t pairs = k / 2;
    for (int64_t nb = 0; nb < n / 16; nb++)
        for (int64_t p = 0; p < pairs; p++)
            for (int64_t l = 0; l < 16; l++) {
                const uint16_t *row = w + (nb * 16 + l) * k;
                out[(nb * pairs + p) * 16 + l] = (uint32_t)row[2 * p] | ((uint32_t)row[2 * p + 1] << 16);
            }
}

/* R rows of x (row stride x_stride, in pairs) times one 16-column block of packed weights */
#define LINEAR_ROWS(R)                                                                                     \
    FLAT void linear_rows_##R(const uint32_t *restrict x, int64_t x_stride, int64_t pairs,                \
                              const __m512i *restrict w, uint16_t *restrict out, int64_t n) {             \
        __m512 acc[R];                                                                                     \
        for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();                                          \
        for (int64_t p = 0; p < pairs; p++) {                                                              \
            __m512bh b = (__m512bh)_mm512_loadu_si512(w + p);                                              \
            _mm_prefetch((const char *)(w + p + 64), _MM_HINT_T0);                                         \
            for (int r = 0; r < R; r++)                                                                    \
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_set1_epi32((int)x[r * x_stride + p]), b); \
        }                                                                                                  \
        for (int r = 0; r < R; r++) store16(out + r * n, 0, acc[r], 1);                                    \
    }
LINEAR_ROWS(8)
LINEAR_ROWS(4)
LINEAR_ROWS(2)
LINEAR_ROWS(1)

/* out [m, n] = x [m, k] (row stride x_stride elements, even) . w^T, w packed by pack_linear_bf16.
 * Output blocks of 16 columns are split over the caller's OpenMP team. Returns 0. */
int linear_bf16(const uint16_t *restrict x, int64_t x_stride, int64_t m, int64_t k,
                const uint32_t *restrict packed, int64_t n, uint16_t *restrict out) {
    int64_t pairs = k / 2, stride = x_stride / 2;
    const uint32_t *x32 = (const uint32_t *)x;
    _Pragma("omp parallel for schedule(static)") for (int64_t nb = 0; nb < n / 16; nb++) {
        const __m512i *w = (const __m512i *)(packed + nb * pairs * 16);
        uint16_t *o = out + nb * 16;
        int64_t r = 0;
        for (; r + 8 <= m; r += 8) linear_rows_8(x32 + r * stride, stride, pairs, w, o + r * n, n);
        if (m - r >= 4) {
            linear_rows_4(x32 + r * stride, stride, pairs, w, o + r * n, n);
            r += 4;
        }
        if (m - r >= 2) {
            linear_rows_2(x32 + r * stride, stride, pairs, w, o + r * n, n);
            r += 2;
        }
        if (m - r >= 1) linear_rows_1(x32 + r * stride, stride, pairs, w, o + r * n, n);
    }
    return 0;
}

#else
int linear_available(void) { return 0; }
void pack_linear_bf16(const uint16_t *w, int64_t n, int64_t k, uint32_t *out) { (void)w, (void)n, (void)k, (void)out; }
int linear_bf16(const uint16_t *x, int64_t x_stride, int64_t m, int64_t k, const uint32_t *packed, int64_t n,
                uint16_t *out) {
    (void)x, (void)x_stride, (void)m, (void)k, (void)packed, (void)n, (void)out;
    return -1; /* no AVX512-BF16 on this CPU */
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__) && ROW_MAX_FAST
#include <sys/syscall.h>
#include <unistd.h>

/* Linux hands a process the AMX tile registers only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM
 * for XFEATURE_XTILEDATA); the grant covers all its threads. 1 when granted. */
int amx_available(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) tile_config;

/* Each tile product's weights are fetched into L1 this many 32-deep steps ahead: over
 * SmolLM2-135M's layers, 1, 2 and 4 ran alike (1 row 14.3-15.0 ms, 32 rows 19.3-20.7),
 * 8 slower (17.6, 25.4), none slower still (19.4, 26.1). */
#define AMX_AHEAD 2

/* Tiles 0-3: the fp32 sums of a 32-row x 32-column block (rows 0-15 by columns 0-15, 0-15 by
 * 16-31, 16-31 by 0-15, 16-31 by 16-31); 4, 5: the two 16-row halves' 32 input columns; 6, 7: two
 * 16-column blocks' packed weights for those 32 input columns (16 pairs of 16 lanes, 64 bytes
 * each: exactly pack_linear_bf16's layout, so one copy of the weights serves both kernels). */
static void tiles_configure(void) {
    tile_config config = {0};
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
}

/* x: 16 or 32 rows (`halves`), row stride x_stride elements; w0/w1: two 16-column blocks of
 * packed weights (w1 NULL: one block); c: [32][32] floats. */
#define AMX_BLOCK(HALVES, BLOCKS)                                                                          \
    static void amx_block_##HALVES##_##BLOCKS(const uint16_t *x, int64_t x_stride, int64_t kblocks,       \
                                              const uint32_t *w0, const uint32_t *w1, float *c) {          \
        _tile_zero(0);                                                                                     \
        if (BLOCKS == 2) _tile_zero(1);                                                                    \
        if (HALVES == 2) _tile_zero(2);                                                                    \
        if (HALVES == 2 && BLOCKS == 2) _tile_zero(3);                                                     \
        for (int64_t kb = 0; kb < kblocks; kb++) {                                                         \
            _tile_loadd(4, x + kb * 32, x_stride * 2);                                                     \
            if (HALVES == 2) _tile_loadd(5, x + 16 * x_stride + kb * 32, x_stride * 2);                    \
            for (int line = 0; line < 16; line++) {                                                        \
                _mm_prefetch((const char *)(w0 + (kb + AMX_AHEAD) * 256 + line * 16), _MM_HINT_T0);        \
                if (BLOCKS == 2)                                                                           \
                    _mm_prefetch((const char *)(w1 + (kb + AMX_AHEAD) * 256 + line * 16), _MM_HINT_T0);    \
            }                                                                                              \
            _tile_loadd(6, w0 + kb * 256, 64);                                                             \
            if (BLOCKS == 2) _tile_loadd(7, w1 + kb * 256, 64);                                            \
            _tile_dpbf16ps(0, 4, 6);                                                                       \
            if (BLOCKS == 2) _tile_dpbf16ps(1, 4, 7);                                                      \
            if (HALVES == 2) _tile_dpbf16ps(2, 5, 6);                                                      \
            if (HALVES == 2 && BLOCKS == 2) _tile_dpbf16ps(3, 5, 7);                                       \
        }                                                                                                  \
        _tile_stored(0, c, 128);                                                                           \
        if (BLOCKS == 2) _tile_stored(1, c + 16, 128);                                                     \
        if (HALVES == 2) _tile_stored(2, c + 16 * 32, 128);                                                \
        if (HALVES == 2 && BLOCKS == 2) _tile_stored(3, c + 16 * 32 + 16, 128);                            \
    }
AMX_BLOCK(1, 1)
AMX_BLOCK(1, 2)
AMX_BLOCK(2, 1)
AMX_BLOCK(2, 2)

/* What amx_linear does with each pair of 16-column blocks' sums before they leave the registers. */
typedef struct {
    enum { PLAIN, GATED, ROTATED } kind;
    const uint16_t *cos, *sin; /* ROTATED: each row's [half] cos and sin, `cs_stride` apart */
    int64_t cs_stride, rotated, half_blocks; /* blocks of rotated heads; 16-column blocks per half head */
} epilogue;

static int64_t pairs_of_blocks(int64_t blocks, const epilogue *e) {
    if (e->kind == GATED) return blocks / 2;
    if (e->kind == ROTATED) return e->rotated / 2 + (blocks - e->rotated + 1) / 2;
    return (blocks + 1) / 2;
}

/* Pair bp's first block (nb) and its partner: neighbours (PLAIN, and ROTATED past the rotated
 * heads); gate block j with up block j (GATED); a rotated head's block j of its first half with
 * block j of its second (ROTATED). A partner at or past `blocks`: the first block is alone. */
static void pair_blocks(int64_t bp, int64_t blocks, const epilogue *e, int64_t *nb, int64_t *partner) {
    if (e->kind == GATED) {
        *nb = bp, *partner = bp + blocks / 2;
    } else if (e->kind == ROTATED && bp < e->rotated / 2) {
        int64_t head = bp / e->half_blocks, j = bp % e->half_blocks;
        *nb = head * 2 * e->half_blocks + j, *partner = *nb + e->half_blocks;
    } else {
        *nb = e->kind == ROTATED ? e->rotated + 2 * (bp - e->rotated / 2) : 2 * bp;
        *partner = *nb + 1;
    }
}

/* out = x [m, k] . w^T on AMX tiles, k % 32 == 0, with `e` applied to the fp32 sums. The rows go
 * 32 at a time (x copied into a zero-padded buffer when m is not a multiple of 16); pairs of
 * 16-column output blocks are dealt to the caller's OpenMP team two at a time as threads come
 * free (a thread whose core is taken by another process holds back only what it has taken:
 * under the serving bench's 32 clients, 576-714 tok/s against 578-671 for a static split), each
 * pair's weights read once, in storage order, for every 32 rows. PLAIN: out [m, n]. GATED (w = [gate | up],
 * n / 16 even): out [m, n / 2] = silu(gate) * up, rounded as silu_mul_bf16 rounds it. ROTATED:
 * out [m, n] with its first `rotated` blocks' heads rotated as rope_bf16 rotates them. Returns 0,
 * or -1 when the buffer could not be had. */
static int amx_linear(const uint16_t *restrict x, int64_t x_stride, int64_t m, int64_t k,
                      const uint32_t *restrict packed, int64_t n, uint16_t *restrict out, const epilogue *e) {
    int64_t pairs = k / 2, kblocks = k / 32, rows = (m + 15) / 16 * 16;
    uint16_t *padded = NULL;
    if (rows != m) {
        padded = calloc((size_t)(rows * k), sizeof(uint16_t));
        if (!padded) return -1;
        for (int64_t r = 0; r < m; r++) memcpy(padded + r * k, x + r * x_stride, (size_t)k * 2);
        x = padded;
        x_stride = k;
    }
    int64_t blocks = n / 16, count = pairs_of_blocks(blocks, e);
    int64_t width = e->kind == GATED ? n / 2 : n; /* of out's rows */
    _Pragma("omp parallel") {
        tiles_configure();
        float c[32 * 32] __attribute__((aligned(64)));
        _Pragma("omp for schedule(dynamic, 2)") for (int64_t bp = 0; bp < count; bp++) {
            int64_t nb, partner;
            pair_blocks(bp, blocks, e, &nb, &partner);
            int two = partner < blocks, rotate = e->kind == ROTATED && nb < e->rotated;
            const uint32_t *w0 = packed + nb * pairs * 16, *w1 = two ? packed + partner * pairs * 16 : NULL;
            for (int64_t r = 0; r < rows; r += 32) {
                const uint16_t *xr = x + r * x_stride;
                int halves = rows - r >= 32 ? 2 : 1;
                if (halves == 2 && two) amx_block_2_2(xr, x_stride, kblocks, w0, w1, c);
                else if (halves == 2) amx_block_2_1(xr, x_stride, kblocks, w0, w1, c);
                else if (two) amx_block_1_2(xr, x_stride, kblocks, w0, w1, c);
                else amx_block_1_1(xr, x_stride, kblocks, w0, w1, c);
                int64_t last = r + 32 < m ? r + 32 : m;
                for (int64_t i = r; i < last; i++) {
                    __m512 first = _mm512_load_ps(c + (i - r) * 32), second = _mm512_load_ps(c + (i - r) * 32 + 16);
                    uint16_t *o = out + i * width;
                    if (e->kind == GATED) {
                        __m512 gate = round16(first, 1), one = _mm512_set1_ps(1.f);
                        __m512 act = _mm512_div_ps(gate, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gate))));
                        store16(o, nb * 16, _mm512_mul_ps(round16(act, 1), round16(second, 1)), 1);
                    } else if (rotate) {
                        int64_t at = (nb % (2 * e->half_blocks)) * 16;
                        __m512 a = round16(first, 1), b = round16(second, 1);
                        __m512 cv = load16(e->cos + i * e->cs_stride, at, 1), sv = load16(e->sin + i * e->cs_stride, at, 1);
                        __m512 ac = round16(_mm512_mul_ps(a, cv), 1), bs = round16(_mm512_mul_ps(b, sv), 1);
                        __m512 bc = round16(_mm512_mul_ps(b, cv), 1), as = round16(_mm512_mul_ps(a, sv), 1);
                        store16(o, nb * 16, _mm512_sub_ps(ac, bs), 1);
                        store16(o, partner * 16, _mm512_add_ps(bc, as), 1);
                    } else {
                        store16(o, nb * 16, first, 1);
                        if (two) store16(o, partner * 16, second, 1);
                    }
                }
            }
        }
        _tile_release();
    }
    free(padded);
    return 0;
}

int linear_amx_bf16(const uint16_t *restrict x, int64_t x_stride, int64_t m, int64_t k,
                    const uint32_t *restrict packed, int64_t n, uint16_t *restrict out) {
    epilogue plain = {.kind = PLAIN};
    return amx_linear(x, x_stride, m, k, packed, n, out, &plain);
}

int linear_silu_amx_bf16(const uint16_t *restrict x, int64_t x_stride, int64_t m, int64_t k,
                         const uint32_t *restrict packed, int64_t n, uint16_t *restrict out) {
    epilogue gated = {.kind = GATED};
    return amx_linear(x, x_stride, m, k, packed, n, out, &gated);
}

/* linear_amx_bf16, then rope_bf16 on the first `heads` heads of `dim` values (dim % 32 == 0) */
int linear_rope_amx_bf16(const uint16_t *restrict x, int64_t x_stride, int64_t m, int64_t k,
                         const uint32_t *restrict packed, int64_t n, uint16_t *restrict out,
                         const uint16_t *cos, const uint16_t *sin, int64_t cs_stride, int64_t heads, int64_t dim) {
    epilogue rotated = {.kind = ROTATED, .cos = cos, .sin = sin, .cs_stride = cs_stride,
                        .rotated = heads * dim / 16, .half_blocks = dim / 32};
    return amx_linear(x, x_stride, m, k, packed, n, out, &rotated);
}

/* One decoder layer of a bf16 decode step in one call (fused.py's FusedDecoder.step, which
 * otherwise makes each of these its own call): every matmul on AMX tiles, from weights packed
 * by pack_linear_bf16.
 *   normed [n, hidden]: the layer's normed input; on return, the next norm's output.
 *   x [n, hidden]: the residual stream, updated in place.
 *   q/k/v: qkv_w, [heads + 2 kv_heads] heads of dim; rope on the first heads + kv_heads heads
 *     (cos/sin: [n, dim / 2], cs_stride apart), in the matmul's last pass where dim % 32 == 0.
 *   The new keys and values go to column `end` of keys/values ([n, kv_heads, columns, dim] at
 *     s_row, s_head; columns contiguous); attention over columns where mask [n, columns] is set.
 *   o_w, norm_post; gate_up_w ([gate | up], inter2 = 2 * intermediate), down_w, norm_next.
 *   scratch: n * (qkv + heads * dim + hidden + inter2 / 2 + hidden) bf16 values.
 * Returns 0, or -1 when scratch memory could not be had. */
int decode_layer_bf16(uint16_t *restrict x, uint16_t *restrict normed, int64_t n, int64_t hidden,
                      const uint32_t *qkv_w, const uint32_t *o_w, const uint32_t *gate_up_w, int64_t inter2,
                      const uint32_t *down_w, const uint16_t *norm_post, const uint16_t *norm_next, float eps,
                      const uint16_t *cos, const uint16_t *sin, int64_t cs_stride, uint16_t *keys, uint16_t *values,
                      int64_t s_row, int64_t s_head, int64_t end, const uint8_t *mask, int64_t heads,
                      int64_t kv_heads, int64_t columns, int64_t dim, float scale, uint16_t *scratch) {
    int64_t width = (heads + 2 * kv_heads) * dim, q_width = heads * dim, inter = inter2 / 2;
    uint16_t *qkv = scratch, *attn = qkv + n * width, *o = attn + n * q_width, *act = o + n * hidden;
    uint16_t *down = act + n * inter;
    epilogue plain = {.kind = PLAIN}, gated = {.kind = GATED};
    epilogue rotated = {.kind = ROTATED, .cos = cos, .sin = sin, .cs_stride = cs_stride,
                        .rotated = (heads + kv_heads) * dim / 16, .half_blocks = dim / 32};
    int rotate_here = dim % 32 == 0;
    if (amx_linear(normed, hidden, n, hidden, qkv_w, width, qkv, rotate_here ? &rotated : &plain)) return -1;
    if (!rotate_here) rope_bf16(qkv, width, cos, sin, cs_stride, n, heads + kv_heads, dim);
    for (int64_t r = 0; r < n; r++)
        for (int64_t j = 0; j < kv_heads; j++) {
            const uint16_t *k = qkv + r * width + (heads + j) * dim;
            memcpy(keys + r * s_row + j * s_head + end * dim, k, (size_t)dim * 2);
            memcpy(values + r * s_row + j * s_head + end * dim, k + kv_heads * dim, (size_t)dim * 2);
        }
    if (decode_attention_bf16(qkv, width, keys, values, s_row, s_head, mask, attn, n, heads, kv_heads, columns, dim,
                              scale))
        return -1;
    if (amx_linear(attn, q_width, n, q_width, o_w, hidden, o, &plain)) return -1;
    add_rms_norm_bf16(x, o, norm_post, normed, n, hidden, eps);
    if (amx_linear(normed, hidden, n, hidden, gate_up_w, inter2, act, &gated)) return -1;
    if (amx_linear(act, inter, n, inter, down_w, hidden, down, &plain)) return -1;
    add_rms_norm_bf16(x, down, norm_next, normed, n, hidden, eps);
    return 0;
}
#else
int amx_available(void) { return 0; }
int decode_layer_bf16(void) { return -1; /* no AMX on this CPU or compiler: never called (amx_available is 0) */ }
int linear_amx_bf16(const uint16_t *x, int64_t x_stride, int64_t m, int64_t k, const uint32_t *packed, int64_t n,
                    uint16_t *out) {
    (void)x, (void)x_stride, (void)m, (void)k, (void)packed, (void)n, (void)out;
    return -1; /* no AMX on this CPU or compiler */
}
int linear_silu_amx_bf16(const uint16_t *x, int64_t x_stride, int64_t m, int64_t k, const uint32_t *packed, int64_t n,
                         uint16_t *out) {
    (void)x, (void)x_stride, (void)m, (void)k, (void)packed, (void)n, (void)out;
    return -1; /* no AMX on this CPU or compiler */
}
int linear_rope_amx_bf16(const uint16_t *x, int64_t x_stride, int64_t m, int64_t k, const uint32_t *packed, int64_t n,
                         uint16_t *out, const uint16_t *cos, const uint16_t *sin, int64_t cs_stride, int64_t heads,
                         int64_t dim) {
    (void)x, (void)x_stride, (void)m, (void)k, (void)packed, (void)n, (void)out, (void)cos, (void)sin;
    (void)cs_stride, (void)heads, (void)dim;
    return -1; /* no AMX on this CPU or compiler */
}
#endif

/* The fused decode step's elementwise work, one C loop per job instead of a chain of
 * small torch ops (services/policy/kernels.py builds and checks this file).
 *
 * Each kernel exists for bf16 (stored as uint16_t) and fp32 storage. Arithmetic is
 * fp32 and every intermediate that transformers' Llama rounds to the model's dtype is
 * rounded here too (ROUND), so a bf16 result is the one transformers computes, up to
 * the order of a row's sum of squares. Single-threaded: a decode step's rows are tiny,
 * and the caller's OpenMP team stays torch's.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
    /* x[r] <- x[r] + delta[r] (delta may be NULL), then out[r] = w * (x[r] / rms(x[r])) */               \
    void add_rms_norm_##NAME(T *restrict x, const T *restrict delta, const T *restrict w, T *restrict out, \
                             int64_t n, int64_t h, float eps) {                                            \
        for (int64_t r = 0; r < n; r++) {                                                                  \
            T *xr = x + r * h;                                                                             \
            T *o = out + r * h;                                                                            \
            float squares = 0.f;                                                                           \
            if (delta) {                                                                                   \
                const T *d = delta + r * h;                                                                \
                _Pragma("omp simd reduction(+ : squares)") for (int64_t i = 0; i < h; i++) {              \
                    T v = NAME##_store(NAME##_load(xr[i]) + NAME##_load(d[i]));                            \
                    xr[i] = v;                                                                             \
                    float f = NAME##_load(v);                                                              \
                    squares += f * f;                                                                      \
                }                                                                                          \
            } else {                                                                                       \
                _Pragma("omp simd reduction(+ : squares)") for (int64_t i = 0; i < h; i++) {              \
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
    /* out[r, i] = silu(gate[r, i]) * up[r, i], with rows of gate_up laid out [gate | up] */             \
    void silu_mul_##NAME(const T *restrict gate_up, T *restrict out, int64_t n, int64_t inter) {           \
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
    /* Rotary embedding in place on the first `heads` heads of each row (row stride `stride`):           \
     * halves a, b become a cos - b sin and b cos + a sin. cos/sin: [n, dim / 2], row stride cs_stride. */ \
    void rope_##NAME(T *restrict qk, int64_t stride, const T *restrict cos, const T *restrict sin,        \
                     int64_t cs_stride, int64_t n, int64_t heads, int64_t dim) {                           \
        int64_t half = dim / 2;                                                                            \
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

#define ATTENTION(NAME, T)                                                                                 \
    /* Decode attention, one new token per row, over each row's KV window read in place.                  \
     * Query head h of row r: q + r * q_stride + h * dim. Key/value column c of K/V head j, row r:         \
     * keys/values + r * s_row + j * s_head + c * dim. mask: [n, columns], nonzero = attend.                \
     * out: [n, heads * dim]. Rounds like kv.py's decode_attention: q.k rounded to T, then scaled,         \
     * softmax in fp32, weights rounded to T, their sum with V accumulated in fp32. Returns 0, or -1        \
     * when scratch memory could not be had. Parallel over (row, K/V head) with the caller's OpenMP team.  \
     */                                                                                                    \
    int decode_attention_##NAME(const T *restrict q, int64_t q_stride, const T *restrict keys,            \
                                const T *restrict values, int64_t s_row, int64_t s_head,                  \
                                const uint8_t *restrict mask, T *restrict out, int64_t n, int64_t heads,   \
                                int64_t kv_heads, int64_t columns, int64_t dim, float scale) {            \
        int64_t group = heads / kv_heads;                                                                  \
        int failed = 0;                                                                                    \
        _Pragma("omp parallel reduction(| : failed)") {                                                    \
            float *scratch = malloc(sizeof(float) * (size_t)(group * (2 * dim + columns)));                \
            if (!scratch) failed = 1;                                                                      \
            _Pragma("omp for schedule(static)") for (int64_t task = 0; task < n * kv_heads; task++) {     \
                if (!scratch) continue;                                                                    \
                int64_t r = task / kv_heads, j = task % kv_heads;                                          \
                float *qf = scratch, *acc = scratch + group * dim, *p = scratch + 2 * group * dim;         \
                const uint8_t *m = mask + r * columns;                                                     \
                const T *K = keys + r * s_row + j * s_head, *V = values + r * s_row + j * s_head;          \
                for (int64_t g = 0; g < group; g++) {                                                      \
                    const T *qh = q + r * q_stride + (j * group + g) * dim;                                \
                    for (int64_t d = 0; d < dim; d++) {                                                    \
                        qf[g * dim + d] = NAME##_load(qh[d]);                                              \
                        acc[g * dim + d] = 0.f;                                                            \
                    }                                                                                      \
                }                                                                                          \
                float best[64], total[64];                                                                 \
                for (int64_t g = 0; g < group; g++) best[g] = -INFINITY, total[g] = 0.f;                   \
                for (int64_t c = 0; c < columns; c++) {                                                    \
                    if (!m[c]) continue;                                                                   \
                    const T *k = K + c * dim;                                                              \
                    for (int64_t g = 0; g < group; g++) {                                                  \
                        const float *qg = qf + g * dim;                                                    \
                        float dot = 0.f;                                                                   \
                        _Pragma("omp simd reduction(+ : dot)") for (int64_t d = 0; d < dim; d++) dot +=    \
                            qg[d] * NAME##_load(k[d]);                                                     \
                        float score = NAME##_load(NAME##_store(dot)) * scale;                              \
                        p[g * columns + c] = score;                                                        \
                        best[g] = score > best[g] ? score : best[g];                                       \
                    }                                                                                      \
                }                                                                                          \
                for (int64_t g = 0; g < group; g++) {                                                      \
                    float *pg = p + g * columns, top = best[g], sum = 0.f;                                 \
                    _Pragma("omp simd reduction(+ : sum)") for (int64_t c = 0; c < columns; c++) {         \
                        float e = m[c] ? exp_approx(pg[c] - top) : 0.f;                                    \
                        pg[c] = e;                                                                         \
                        sum += e;                                                                          \
                    }                                                                                      \
                    total[g] = sum;                                                                        \
                }                                                                                          \
                for (int64_t c = 0; c < columns; c++) {                                                    \
                    if (!m[c]) continue;                                                                   \
                    const T *v = V + c * dim;                                                              \
                    for (int64_t g = 0; g < group; g++) {                                                  \
                        float w = NAME##_load(NAME##_store(p[g * columns + c] / total[g]));                \
                        float *a = acc + g * dim;                                                          \
                        _Pragma("omp simd") for (int64_t d = 0; d < dim; d++) a[d] += w * NAME##_load(v[d]); \
                    }                                                                                      \
                }                                                                                          \
                for (int64_t g = 0; g < group; g++) {                                                      \
                    T *o = out + r * heads * dim + (j * group + g) * dim;                                  \
                    for (int64_t d = 0; d < dim; d++) o[d] = NAME##_store(acc[g * dim + d]);               \
                }                                                                                          \
            }                                                                                              \
            free(scratch);                                                                                 \
        }                                                                                                  \
        return failed ? -1 : 0;                                                                            \
    }

KERNELS(bf16, uint16_t)
KERNELS(f32, float)
ATTENTION(bf16, uint16_t)
ATTENTION(f32, float)

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

KERNELS(bf16, uint16_t)
KERNELS(f32, float)

/* Small SIMD helpers shared by qgemv.c, qlayer.c and attention.c. */
#ifndef QWEN2CLI_SIMD_H
#define QWEN2CLI_SIMD_H
#include <immintrin.h>

static inline float hsum(__m256 v) { /* the sum of a vector's 8 floats */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* e^x for a vector of floats (Cephes' polynomial on x - n ln 2, then 2^n put into the exponent), within a few ulp
 * of expf on [-87.3, 88.37] and clamped to that range outside it (e^-87.3 ~ 1e-38 stands for 0, e^88.37 ~ 2e38 for
 * overflow: SiLU and softmax take either as expf's 0 and inf). One definition for each width: P the intrinsics'
 * prefix (_mm256, _mm512), F and I the float and integer vector types, ROUND rounding to nearest, CAST integer
 * bits to floats. libm's scalar expf was most of the SiLU's and the softmax's time. */
#define DEFINE_EXP(name, P, F, I, ROUND, CAST)                                                                  \
    static inline F name(F x) {                                                                                 \
        x = P##_min_ps(P##_max_ps(x, P##_set1_ps(-87.3f)), P##_set1_ps(88.3762626647949f));                    \
        F n = ROUND(P##_mul_ps(x, P##_set1_ps(1.44269504088896341f)));                                          \
        F r = P##_fnmadd_ps(n, P##_set1_ps(0.693359375f), x);                                                   \
        r = P##_fnmadd_ps(n, P##_set1_ps(-2.12194440e-4f), r);                                                  \
        F p = P##_set1_ps(1.9875691500e-4f);                                                                    \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.3981999507e-3f));                                                  \
        p = P##_fmadd_ps(p, r, P##_set1_ps(8.3334519073e-3f));                                                  \
        p = P##_fmadd_ps(p, r, P##_set1_ps(4.1665795894e-2f));                                                  \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.6666665459e-1f));                                                  \
        p = P##_fmadd_ps(p, r, P##_set1_ps(5.0000001201e-1f));                                                  \
        p = P##_fmadd_ps(p, P##_mul_ps(r, r), P##_add_ps(r, P##_set1_ps(1.f)));                                 \
        /* 2^n: n + 127 into the exponent field; n >= -126 here, so the field is never 0 */                     \
        I bits = P##_slli_epi32(P##_add_epi32(P##_cvtps_epi32(n), P##_set1_epi32(127)), 23);                    \
        return P##_mul_ps(p, CAST(bits));                                                                       \
    }

static inline __m256 round8(__m256 x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
DEFINE_EXP(exp8, _mm256, __m256, __m256i, round8, _mm256_castsi256_ps)

#if defined(__AVX512F__)
static inline __m512 round16(__m512 x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
DEFINE_EXP(exp16, _mm512, __m512, __m512i, round16, _mm512_castsi512_ps)
#endif

#endif

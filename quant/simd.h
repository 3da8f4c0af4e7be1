/* Small AVX2 helpers shared by qgemv.c and qlayer.c. */
#ifndef QWEN2CLI_SIMD_H
#define QWEN2CLI_SIMD_H
#include <immintrin.h>

static inline float hsum(__m256 v) { /* the sum of a vector's 8 floats */
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

#endif

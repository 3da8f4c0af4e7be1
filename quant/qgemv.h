/* What qgemv.c (row-major codes) and qgemv_x8.c (codes of 8 rows interleaved) share: the code layouts, the
 * activations quantized to int8, and the reading of the per-group tables. The layouts are qgemv.c's. */
#ifndef QWEN2CLI_QGEMV_H
#define QWEN2CLI_QGEMV_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define VNNI512 1
#else
#define VNNI512 0
#endif

enum { KIND_Q8 = 0, KIND_Q4 = 1, KIND_Q5 = 2 }; /* the codes' layouts (qgemv.c) */

/* Rows of activations quantized to int8 in blocks of 32, one float scale a block (qgemv.c's quantize_rows) */
typedef struct {
    int8_t *xq;       /* (count, cols) */
    float *d;         /* (count, cols / 32) */
    float *xsum;      /* (count, groups): the float inputs' sums per group */
    int32_t *shift16; /* (count, cols / 16): -128 x the int8 codes' sums per 16 inputs */
    int32_t *shift32; /* (count, cols / 32): the same per 32 */
} Activations;

Activations quantize_rows(const float *x, int cols, int group, int count);
void release_rows(Activations a);

/* A block of 32 q4 weights in input order, codes 0..15 */
static inline __m256i weights_q4(const uint8_t *w, int b) {
    __m128i packed = _mm_loadu_si128((const __m128i *)(w + b * 16));
    __m128i lo = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
    return _mm256_set_m128i(hi, lo);
}

/* A q5 block: q4's nibbles with each code's fifth bit (bit j of the block's uint32) or-ed in as 16, the bits spread to
 * one byte each as llama.cpp's bytes_from_bits_32 does. Pair sums of maddubs stay within int16: 2 * 31 * 127. */
static inline __m256i weights_q5(const uint8_t *w, int b) {
    const uint8_t *block = w + (size_t)b * 20;
    __m128i packed = _mm_loadu_si128((const __m128i *)block);
    __m128i lo = _mm_and_si128(packed, _mm_set1_epi8(0x0F));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(0x0F));
    uint32_t bits;
    memcpy(&bits, block + 16, 4);
    __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits),
                                         _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                           0x0101010101010101, 0x0000000000000000));
    __m256i set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe)),
                                    _mm256_set1_epi64x(-1));
    return _mm256_or_si256(_mm256_set_m128i(hi, lo), _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
}

/* block b's 32 codes in input order: unsigned (q4, q5) or int8 (q8) */
static inline __attribute__((always_inline)) __m256i block_codes(const uint8_t *w, int kind, int b) {
    if (kind == KIND_Q4) return weights_q4(w, b);
    if (kind == KIND_Q5) return weights_q5(w, b);
    return _mm256_loadu_si256((const __m256i *)(w + (size_t)b * 32));
}

static inline __attribute__((always_inline)) float group_scale(const void *s, size_t g, int half) {
    return half ? _cvtsh_ss(((const uint16_t *)s)[g]) : ((const float *)s)[g];
}

/* 8 floats stored from element `at` on: float32, or bfloat16 rounded to nearest even as torch converts */
static inline __attribute__((always_inline)) void store8(void *out, size_t at, __m256 v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)out + at, v);
        return;
    }
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    __m128i halves = _mm_packus_epi32(_mm256_castsi256_si128(rounded), _mm256_extracti128_si256(rounded, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)out + at), halves);
}

/* A block's 32 codes (block_codes' order and signs) as weights, from out[at] on: (stored - zero) * scale (half) or
 * stored * scale + offset, group g's entries at index base + g * stride of the tables (row-major: a row's groups
 * side by side; interleaved: 8 rows' entries of a group side by side) */
static inline __attribute__((always_inline)) void store_block(__m256i codes, int kind, const void *s, const void *o,
                                                              int half, int group, int first_input, size_t base,
                                                              size_t stride, void *out, size_t at, int bf16) {
    for (int k = 0; k < 4; k++) { /* 8 codes at a time, each 8 within one group (groups are 16 or more) */
        size_t index = base + (size_t)((first_input + k * 8) / group) * stride;
        __m256 vs = _mm256_set1_ps(group_scale(s, index, half));
        __m256 vo = _mm256_set1_ps(half ? 0.f : ((const float *)o)[index]);
        __m256i zero = _mm256_set1_epi32(half ? ((const int16_t *)o)[index] : 0);
        __m128i bytes = k < 2 ? _mm256_castsi256_si128(codes) : _mm256_extracti128_si256(codes, 1);
        if (k % 2) bytes = _mm_srli_si128(bytes, 8);
        __m256i wide = kind != KIND_Q8 ? _mm256_cvtepu8_epi32(bytes) : _mm256_cvtepi8_epi32(bytes);
        __m256 v = half ? _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(wide, zero)), vs)
                        : _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), vs, vo);
        store8(out, at + (size_t)k * 8, v, bf16);
    }
}

#endif

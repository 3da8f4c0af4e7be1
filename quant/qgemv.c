/* int4 and int8 weights x a few rows of float activations, as llama.cpp computes Q4/Q8 x Q8: the activations are
 * quantized to int8 in blocks of 32 (one float scale each), and each block's dot product with 32 codes is one
 * maddubs.
 *
 * q4: weights (rows, cols/2) uint8: per row, each block of 32 inputs is 16 bytes, byte j = code[j] | code[j+16] << 4.
 * q8: weights (rows, cols) int8: code - 128.
 * q5: weights (rows, cols/32 * 20) uint8: per block of 32 inputs, q4's 16 bytes, then a little-endian uint32 whose
 * bit j is code j's fifth bit (GGML's Q5 blocks without their scales).
 * Groups are multiples of 32 inputs, or 16 (two groups to a block: GGML's K-quants of 16-value sub-blocks).
 * q4_gemv/q8_gemv: scales and offsets (rows, groups) float: weight = stored * scale + offset within a group (the
 * int8 head: offsets 0). out[r] = sum_g scale[r,g] * sum_{blocks b of g} d_b * (stored_b . xq_b)
 *                                 + offset[r,g] * sum_{i in g} x_i.
 * q4_gemv_h/q8_gemv_h (quantized checkpoints' layers): scales (rows, groups) float16, as GPTQ and AWQ store them,
 * and zeros (rows, groups) int16: weight = (stored - zero) * scale (q8: the zero minus 128, as the codes); 4 bytes
 * a group instead of 8, exactly the checkpoint's weights. The zero term is then -scale * zero * sum_{i in g} x_i.
 * Built at first use by quant/native.py with gcc -O3 -mavx2 -mfma -mf16c -fopenmp, plus AVX-512 BW/VL/VNNI where the
 * CPU has them (then two blocks are one 512-bit vpdpbusd: a third of AVX2's instructions per byte of weights); rows
 * are split over OpenMP threads (torch's own runtime once torch is loaded: the same libgomp.so.1). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qgemv.h"
#include "simd.h"

int q4_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           (!VNNI512 || (__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512vnni")));
}

int q4_vnni512(void) { return VNNI512; } /* which build this is (tests run both paths where they can) */

/* x (cols) -> xq (cols) int8, d (cols/32) block scales, xsum (groups) float sums per group, shift16 / shift32
 * -128 x the codes' sums per 16 / 32 (what unsigned q8 codes, code + 128, add to a dot product). Vectorized: it runs
 * on one thread before each product's parallel rows (scalar lrintf took ~20 us for the 4864 inputs of down_proj);
 * cvtps_epi32 rounds to nearest even, as lrintf does in the default rounding mode. */
static void quantize_row(const float *x, int cols, int group, int8_t *xq, float *d, float *xsum, int32_t *shift16,
                         int32_t *shift32) {
    const __m256 sign_bits = _mm256_set1_ps(-0.0f);
    const __m256i lanes = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int g = 0; g < cols / group; g++) xsum[g] = 0.f;
    for (int b = 0; b < cols / 32; b++) {
        const float *block = x + b * 32;
        __m256 v0 = _mm256_loadu_ps(block), v1 = _mm256_loadu_ps(block + 8), v2 = _mm256_loadu_ps(block + 16),
               v3 = _mm256_loadu_ps(block + 24);
        if (group == 16) {
            xsum[2 * b] += hsum(_mm256_add_ps(v0, v1));
            xsum[2 * b + 1] += hsum(_mm256_add_ps(v2, v3));
        } else {
            xsum[b * 32 / group] += hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
        }
        __m256 amax = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign_bits, v0), _mm256_andnot_ps(sign_bits, v1)),
                                    _mm256_max_ps(_mm256_andnot_ps(sign_bits, v2), _mm256_andnot_ps(sign_bits, v3)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float scale = _mm_cvtss_f32(m4) / 127.f;
        float inverse = scale > 0.f ? 1.f / scale : 0.f;
        d[b] = scale;
        __m256 inv = _mm256_set1_ps(inverse);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv)),
                i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv));
        /* packs work within 128-bit lanes: 0-3 8-11 4-7 12-15 | ... ; the permute restores element order */
        __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256((__m256i *)(xq + b * 32), _mm256_permutevar8x32_epi32(packed, lanes));
        shift16[2 * b] = -128 * (int32_t)hsum(_mm256_cvtepi32_ps(_mm256_add_epi32(i0, i1))); /* exact: |sum| < 2^24 */
        shift16[2 * b + 1] = -128 * (int32_t)hsum(_mm256_cvtepi32_ps(_mm256_add_epi32(i2, i3)));
        shift32[b] = shift16[2 * b] + shift16[2 * b + 1];
    }
}

/* block b's codes as block_dot takes them (the unsigned operand of maddubs): q4/q5 codes as they are (no signs),
 * int8 codes as their magnitudes with the codes themselves in `signs`, moved onto the activations (llama.cpp's
 * trick). Pair sums stay within int16: 2 * 31 * 127 and 2 * 128 * 127. */
static inline __attribute__((always_inline)) __m256i unsigned_codes(const uint8_t *w, int kind, int b, int q4,
                                                                     __m256i *signs) {
    if (q4) {
        *signs = _mm256_setzero_si256();
        return block_codes(w, kind, b);
    }
    *signs = block_codes(w, kind, b);
    return _mm256_sign_epi8(*signs, *signs);
}

static inline __m256i block_dot(__m256i unsigned_w, __m256i signs, int q4, __m256i xv) {
    __m256i x = q4 ? xv : _mm256_sign_epi8(xv, signs);
#if VNNI512
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), unsigned_w, x);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned_w, x), _mm256_set1_epi16(1));
#endif
}

Activations quantize_rows(const float *x, int cols, int group, int count) {
    Activations a = {aligned_alloc(32, ((size_t)cols * count + 31) / 32 * 32), malloc(sizeof(float) * (cols / 32) * count),
                     malloc(sizeof(float) * (cols / group) * count), malloc(sizeof(int32_t) * (cols / 16) * count),
                     malloc(sizeof(int32_t) * (cols / 32) * count)};
    for (int m = 0; m < count; m++)
        quantize_row(x + (size_t)m * cols, cols, group, a.xq + (size_t)m * cols, a.d + (size_t)m * (cols / 32),
                     a.xsum + (size_t)m * (cols / group), a.shift16 + (size_t)m * (cols / 16),
                     a.shift32 + (size_t)m * (cols / 32));
    return a;
}

void release_rows(Activations a) {
    free(a.xq);
    free(a.d);
    free(a.xsum);
    free(a.shift16);
    free(a.shift32);
}

/* a group's zero term per unit of its activations' sum: the float32 offset, or -scale * zero */
static inline __attribute__((always_inline)) float group_offset(const void *o, int g, int half, float scale) {
    return half ? -scale * (float)((const int16_t *)o)[g] : ((const float *)o)[g];
}

/* sum_g offset[g] * xsum[g] over a row's groups, eight at a time (offsets: float32, or -scale * zero) */
static inline __attribute__((always_inline)) float zero_terms(const void *s, const void *o, int half,
                                                               const float *xsum, int groups) {
    __m256 total = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= groups; g += 8) {
        __m256 offsets;
        if (half) {
            __m256 scales = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + g)));
            __m256 zeros =
                _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)((const int16_t *)o + g))));
            offsets = _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), scales), zeros);
        } else {
            offsets = _mm256_loadu_ps((const float *)o + g);
        }
        total = _mm256_fmadd_ps(offsets, _mm256_loadu_ps(xsum + g), total);
    }
    float rest = hsum(total);
    for (; g < groups; g++) rest += group_offset(o, g, half, group_scale(s, g, half)) * xsum[g];
    return rest;
}

/* block b's contribution for groups of 16 or 32 (one scale per block, or one per half: lanes 0-3 hold the sums of
 * its first 16 bytes), into `acc` */
static inline __attribute__((always_inline)) void small_group_block(const uint8_t *w, int kind, const void *s,
                                                                    int half, Activations a, int cols, int group,
                                                                    int m0, int n, int b, __m256 *acc) {
    int blocks = cols / 32, q4 = kind != KIND_Q8;
    __m256i signs, unsigned_w = unsigned_codes(w, kind, b, q4, &signs);
    __m256 scale = group == 16 ? _mm256_set_m128(_mm_set1_ps(group_scale(s, 2 * b + 1, half)),
                                                 _mm_set1_ps(group_scale(s, 2 * b, half)))
                               : _mm256_set1_ps(group_scale(s, b, half));
    for (int j = 0; j < n; j++) {
        size_t m = (size_t)(m0 + j);
        __m256i xv = _mm256_loadu_si256((const __m256i *)(a.xq + m * cols + b * 32));
        __m256i sums = block_dot(unsigned_w, signs, q4, xv);
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(scale, _mm256_set1_ps(a.d[m * blocks + b])),
                                 acc[j]);
    }
}

/* rows_dot for groups of 16 or 32 (GGML's blocks), where the per-group work is per block: each block's sums
 * scaled by d_x * scale in one multiply, even and odd blocks into separate accumulators (one chain of dependent
 * FMAs a row was the kernel's limit), the zero terms one vectorised pass over the groups after. */
static inline __attribute__((always_inline)) void rows_dot_small(const uint8_t *w, int kind, const void *s,
                                                                 const void *o, int half, Activations a, float *out,
                                                                 int r, int rows, int cols, int group, int m0,
                                                                 int n) {
    int blocks = cols / 32, groups = cols / group;
    __m256 even[4], odd[4];
    for (int j = 0; j < n; j++) even[j] = odd[j] = _mm256_setzero_ps();
    int b = 0;
    for (; b + 2 <= blocks; b += 2) {
        small_group_block(w, kind, s, half, a, cols, group, m0, n, b, even);
        small_group_block(w, kind, s, half, a, cols, group, m0, n, b + 1, odd);
    }
    if (b < blocks) small_group_block(w, kind, s, half, a, cols, group, m0, n, b, even);
    for (int j = 0; j < n; j++)
        out[(size_t)(m0 + j) * rows + r] = hsum(_mm256_add_ps(even[j], odd[j])) +
                                           zero_terms(s, o, half, a.xsum + (size_t)(m0 + j) * groups, groups);
}

/* One weight row against activation rows m0..m0+n-1 (n <= 4, a constant at each inlined call, as are `q4` and
 * `half`): each block of weights is loaded and unpacked once for the n rows. Each row's arithmetic is the same
 * whatever n is (a row's result never depends on the rows beside it). */
static inline __attribute__((always_inline)) void rows_dot(const uint8_t *w, int kind, const void *s, const void *o,
                                                           int half, Activations a, float *out, int r, int rows,
                                                           int cols, int group, int m0, int n) {
    int blocks = cols / 32, groups = cols / group, per_group = group / 32, q4 = kind != KIND_Q8;
    __m256 acc[4];
    float zero_terms[4];
    for (int j = 0; j < n; j++) {
        acc[j] = _mm256_setzero_ps();
        zero_terms[j] = 0.f;
    }
    for (int g = 0; g < groups; g++) {
        __m256 group_acc[4];
        for (int j = 0; j < n; j++) group_acc[j] = _mm256_setzero_ps();
        for (int k = 0; k < per_group; k++) {
            int b = g * per_group + k;
            __m256i signs, unsigned_w = unsigned_codes(w, kind, b, q4, &signs);
            for (int j = 0; j < n; j++) {
                size_t m = (size_t)(m0 + j);
                __m256i xv = _mm256_loadu_si256((const __m256i *)(a.xq + m * cols + b * 32));
                __m256i sums = block_dot(unsigned_w, signs, q4, xv);
                group_acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(a.d[m * blocks + b]),
                                               group_acc[j]);
            }
        }
        float scale = group_scale(s, g, half), offset = group_offset(o, g, half, scale);
        for (int j = 0; j < n; j++) {
            acc[j] = _mm256_fmadd_ps(group_acc[j], _mm256_set1_ps(scale), acc[j]);
            zero_terms[j] += offset * a.xsum[(size_t)(m0 + j) * groups + g];
        }
    }
    for (int j = 0; j < n; j++) out[(size_t)(m0 + j) * rows + r] = hsum(acc[j]) + zero_terms[j];
}

#if VNNI512
/* rows_dot with AVX-512 VNNI, for groups of an even number of blocks: blocks b and b + 1 at once, their 64 codes in
 * one vector in the activations' order, one vpdpbusd giving each block's 4-byte sums in its own 8 lanes, scaled by
 * [d_b x 8, d_b+1 x 8]. q4: the 32 bytes of the two blocks go to 128-bit lanes [b, b, b+1, b+1], the second of each
 * pair shifted right by 4 (its high nibbles). q8: |w| and the activations negated where w < 0 (AVX-512 has no
 * vpsignb; w = 0 contributes 0 either way). */
static inline __attribute__((always_inline)) void rows_dot512(const uint8_t *w, int q4, const void *s, const void *o,
                                                              int half, Activations a, float *out, int r, int rows,
                                                              int cols, int group, int m0, int n) {
    int blocks = cols / 32, groups = cols / group, per_group = group / 32;
    const __m512i spread = _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0);
    const __m512i nibble_shift = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0, 0,
                                                  0x0004000400040004, 0x0004000400040004, 0, 0);
    const __m512i pair_scale = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[4];
    float zero_terms[4];
    for (int j = 0; j < n; j++) {
        acc[j] = _mm512_setzero_ps();
        zero_terms[j] = 0.f;
    }
    for (int g = 0; g < groups; g++) {
        __m512 group_acc[4];
        for (int j = 0; j < n; j++) group_acc[j] = _mm512_setzero_ps();
        for (int k = 0; k < per_group; k += 2) {
            int b = g * per_group + k;
            __m512i unsigned_w;
            __mmask64 negative = 0;
            if (q4) {
                __m512i packed = _mm512_permutexvar_epi64(
                    spread, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w + b * 16))));
                unsigned_w = _mm512_and_si512(_mm512_srlv_epi16(packed, nibble_shift), _mm512_set1_epi8(0x0F));
            } else {
                __m512i signed_w = _mm512_loadu_si512(w + b * 32);
                negative = _mm512_movepi8_mask(signed_w);
                unsigned_w = _mm512_abs_epi8(signed_w);
            }
            for (int j = 0; j < n; j++) {
                size_t m = (size_t)(m0 + j);
                __m512i x = _mm512_loadu_si512(a.xq + m * cols + b * 32);
                if (!q4) x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
                __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), unsigned_w, x);
                __m512 d = _mm512_permutexvar_ps(
                    pair_scale, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)(a.d + m * blocks + b)))));
                group_acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), d, group_acc[j]);
            }
        }
        float scale = group_scale(s, g, half), offset = group_offset(o, g, half, scale);
        for (int j = 0; j < n; j++) {
            acc[j] = _mm512_fmadd_ps(group_acc[j], _mm512_set1_ps(scale), acc[j]);
            zero_terms[j] += offset * a.xsum[(size_t)(m0 + j) * groups + g];
        }
    }
    for (int j = 0; j < n; j++) out[(size_t)(m0 + j) * rows + r] = _mm512_reduce_add_ps(acc[j]) + zero_terms[j];
}
#endif

static inline __attribute__((always_inline)) void row_dot(const uint8_t *w, int kind, const void *s, const void *o,
                                                          int half, Activations a, float *out, int r, int rows,
                                                          int cols, int group, int count) {
    int m = 0;
#if VNNI512
    if (group % 64 == 0 && kind != KIND_Q5) {
        int q4 = kind == KIND_Q4;
        for (; m + 4 <= count; m += 4) rows_dot512(w, q4, s, o, half, a, out, r, rows, cols, group, m, 4);
        if (count - m == 3) rows_dot512(w, q4, s, o, half, a, out, r, rows, cols, group, m, 3);
        else if (count - m == 2) rows_dot512(w, q4, s, o, half, a, out, r, rows, cols, group, m, 2);
        else if (count - m == 1) rows_dot512(w, q4, s, o, half, a, out, r, rows, cols, group, m, 1);
        return;
    }
#endif
    if (group <= 32) {
        for (; m + 4 <= count; m += 4) rows_dot_small(w, kind, s, o, half, a, out, r, rows, cols, group, m, 4);
        if (count - m == 3) rows_dot_small(w, kind, s, o, half, a, out, r, rows, cols, group, m, 3);
        else if (count - m == 2) rows_dot_small(w, kind, s, o, half, a, out, r, rows, cols, group, m, 2);
        else if (count - m == 1) rows_dot_small(w, kind, s, o, half, a, out, r, rows, cols, group, m, 1);
        return;
    }
    for (; m + 4 <= count; m += 4) rows_dot(w, kind, s, o, half, a, out, r, rows, cols, group, m, 4);
    if (count - m == 3) rows_dot(w, kind, s, o, half, a, out, r, rows, cols, group, m, 3);
    else if (count - m == 2) rows_dot(w, kind, s, o, half, a, out, r, rows, cols, group, m, 2);
    else if (count - m == 1) rows_dot(w, kind, s, o, half, a, out, r, rows, cols, group, m, 1);
}

/* one function per (codes, scale layout), so that `q4` and `half` are constants inside each OpenMP region; `half`:
 * scales float16 and zeros int16 (2 bytes each an element), else scales and offsets float (4) */
#define DEFINE_GEMV(name, kind, row_bytes, half)                                                                    \
    void name(const uint8_t *weights, const void *scales, const void *offsets, const float *x, float *out,        \
              int rows, int cols, int group, int count) {                                                         \
        Activations a = quantize_rows(x, cols, group, count);                                                     \
        int groups = cols / group;                                                                                \
        size_t table_bytes = (half) ? 2 : 4;                                                                      \
        _Pragma("omp parallel for schedule(static)")                                                              \
        for (int r = 0; r < rows; r++)                                                                            \
            row_dot(weights + (size_t)r * (row_bytes), kind, (const char *)scales + (size_t)r * groups * table_bytes, \
                    (const char *)offsets + (size_t)r * groups * table_bytes, half, a, out, r, rows, cols, group,   \
                    count);                                                                                       \
        release_rows(a);                                                                                               \
    }

DEFINE_GEMV(q4_gemv, KIND_Q4, cols / 2, 0)
DEFINE_GEMV(q8_gemv, KIND_Q8, cols, 0)
DEFINE_GEMV(q5_gemv, KIND_Q5, cols / 32 * 20, 0)
DEFINE_GEMV(q4_gemv_h, KIND_Q4, cols / 2, 1)
DEFINE_GEMV(q8_gemv_h, KIND_Q8, cols, 1)
DEFINE_GEMV(q5_gemv_h, KIND_Q5, cols / 32 * 20, 1)

/* any of the above by (kind, half): what qlayer.c and quant/native.py call */
void q_gemv(const uint8_t *weights, const void *scales, const void *offsets, const float *x, float *out, int rows,
            int cols, int group, int count, int kind, int half) {
    void (*const variants[6])(const uint8_t *, const void *, const void *, const float *, float *, int, int, int,
                              int) = {q8_gemv, q8_gemv_h, q4_gemv, q4_gemv_h, q5_gemv, q5_gemv_h};
    variants[kind * 2 + (half ? 1 : 0)](weights, scales, offsets, x, out, rows, cols, group, count);
}

/* Rows of a q4/q8 matrix as numbers, for long inputs' GEMM: out (rows, cols) float32, or bfloat16 rounded to nearest
 * even as torch converts. Weights as the kernels read them: (stored - zero) * scale with float16 scales and int16
 * zeros (exactly the checkpoint's dequantization), stored * scale + offset with float32 tables. One pass from the
 * packed codes, where unpacking with torch's ops took eight over the whole block (a fifth of a prompt's time). */
static inline __attribute__((always_inline)) void unpack_row(const uint8_t *w, int kind, const void *s,
                                                             const void *o, int half, int cols, int group, void *out,
                                                             size_t at, int bf16) {
    for (int b = 0; b < cols / 32; b++)
        store_block(block_codes(w, kind, b), kind, s, o, half, group, b * 32, 0, 1, out, at + (size_t)b * 32, bf16);
}

#define DEFINE_UNPACK(name, kind, row_bytes, half, bf16)                                                            \
    static void name(const uint8_t *weights, const void *scales, const void *offsets, void *out, int rows,       \
                     int cols, int group) {                                                                       \
        int groups = cols / group;                                                                                \
        size_t table_bytes = (half) ? 2 : 4;                                                                      \
        _Pragma("omp parallel for schedule(static)")                                                              \
        for (int r = 0; r < rows; r++)                                                                            \
            unpack_row(weights + (size_t)r * (row_bytes), kind, (const char *)scales + (size_t)r * groups * table_bytes, \
                       (const char *)offsets + (size_t)r * groups * table_bytes, half, cols, group, out,          \
                       (size_t)r * cols, bf16);                                                                   \
    }

DEFINE_UNPACK(unpack_q8_f32, KIND_Q8, cols, 0, 0)
DEFINE_UNPACK(unpack_q8_h_f32, KIND_Q8, cols, 1, 0)
DEFINE_UNPACK(unpack_q4_f32, KIND_Q4, cols / 2, 0, 0)
DEFINE_UNPACK(unpack_q4_h_f32, KIND_Q4, cols / 2, 1, 0)
DEFINE_UNPACK(unpack_q5_f32, KIND_Q5, cols / 32 * 20, 0, 0)
DEFINE_UNPACK(unpack_q5_h_f32, KIND_Q5, cols / 32 * 20, 1, 0)
DEFINE_UNPACK(unpack_q8_bf16, KIND_Q8, cols, 0, 1)
DEFINE_UNPACK(unpack_q8_h_bf16, KIND_Q8, cols, 1, 1)
DEFINE_UNPACK(unpack_q4_bf16, KIND_Q4, cols / 2, 0, 1)
DEFINE_UNPACK(unpack_q4_h_bf16, KIND_Q4, cols / 2, 1, 1)
DEFINE_UNPACK(unpack_q5_bf16, KIND_Q5, cols / 32 * 20, 0, 1)
DEFINE_UNPACK(unpack_q5_h_bf16, KIND_Q5, cols / 32 * 20, 1, 1)

/* kind: KIND_Q8, KIND_Q4 or KIND_Q5; half: float16 scales and int16 zeros (else float32 scales, offsets);
 * bf16: out bfloat16 (else float32) */
void q_unpack(const uint8_t *weights, const void *scales, const void *offsets, void *out, int rows, int cols,
              int group, int kind, int half, int bf16) {
    void (*const variants[12])(const uint8_t *, const void *, const void *, void *, int, int, int) = {
        unpack_q8_f32,  unpack_q8_h_f32,  unpack_q4_f32,  unpack_q4_h_f32,  unpack_q5_f32,  unpack_q5_h_f32,
        unpack_q8_bf16, unpack_q8_h_bf16, unpack_q4_bf16, unpack_q4_h_bf16, unpack_q5_bf16, unpack_q5_h_bf16};
    variants[(bf16 ? 6 : 0) + kind * 2 + (half ? 1 : 0)](weights, scales, offsets, out, rows, cols, group);
}

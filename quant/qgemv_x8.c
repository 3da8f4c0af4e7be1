/* qgemv.c's products on codes of 8 rows interleaved (AVX-512 VNNI builds): one weight row per 32-bit lane.
 *
 * Row-major codes give a block's 32 products of one row in one vpdpbusd, 8 lanes that then each need the block's
 * float scale: a conversion, a multiply and an FMA per block and row, which is what several rows decoded together
 * (a server's requests) were bound by. Interleaved, lane i holds row i: the 8 vpdpbusd of a block add into one
 * int32 vector for 8 rows (4 activation bytes broadcast to each), and the float work is one conversion and one FMA
 * per block for 8 rows. Same bytes as the row-major layout, in another order, for rows in groups of 8:
 *
 *   per group of 8 rows R, per block b of 32 inputs, 8 vectors k of 32 bytes, byte 4i + j = row 8R + i's code
 *   4k + j, stored as:
 *   q8: the 8 vectors as they are (int8, code - 128): 256 bytes;
 *   q4: 4 vectors of nibbles, vector k in the low nibbles of pair k / 2 if k is even, the high ones if odd: 128 bytes;
 *   q5: q4's 128 bytes of low four bits, then 8 little-endian uint32, bit p of the k-th being byte p of vector k's
 *       fifth bit: 160 bytes.
 *   Tables (scales, offsets or zeros): per group of 8 rows, per group of inputs g, the 8 rows' entries side by side.
 *
 * Rows 8R..8R+7 of a matrix are then the bytes of rows 8R..8R+7 in the row-major layout, so a slice of whole row
 * groups is a slice of rows. Each output is the same sum in the same order whatever the activation rows beside it.
 * The q8 codes enter vpdpbusd unsigned (code = stored + 128), the 128 x sum of the block's activation codes that
 * adds taken off in the integer sum itself (Activations' shift). */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "qgemv.h"

int q_x8_supported(void) { return VNNI512; }

#if VNNI512
static inline int x8_block_bytes(int kind) { return kind == KIND_Q8 ? 256 : kind == KIND_Q4 ? 128 : 160; }

/* the 8 vectors of a block (see above) as vpdpbusd's unsigned operand: codes 0..15, 0..31 or 0..255 (q8: stored +
 * 128) */
static inline __attribute__((always_inline)) void x8_vectors(const uint8_t *block, int kind, __m256i *v) {
    if (kind == KIND_Q8) {
        for (int k = 0; k < 8; k++)
            v[k] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(block + 32 * k)), _mm256_set1_epi8((char)0x80));
        return;
    }
    for (int pair = 0; pair < 4; pair++) {
        __m256i nibbles = _mm256_loadu_si256((const __m256i *)(block + 32 * pair));
        v[2 * pair] = _mm256_and_si256(nibbles, _mm256_set1_epi8(0x0F));
        v[2 * pair + 1] = _mm256_and_si256(_mm256_srli_epi16(nibbles, 4), _mm256_set1_epi8(0x0F));
    }
    if (kind == KIND_Q5)
        for (int k = 0; k < 8; k++) {
            uint32_t bits;
            memcpy(&bits, block + 128 + 4 * k, 4);
            v[k] = _mm256_mask_add_epi8(v[k], (__mmask32)bits, v[k], _mm256_set1_epi8(0x10));
        }
}

/* 8 rows x 8 lanes of 32 bits, transposed (lane i of row k <-> lane k of row i) */
static inline __attribute__((always_inline)) void transpose8(__m256i *v) {
    __m256i t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(v[i], v[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(v[i], v[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x20);
        v[i + 4] = _mm256_permute2x128_si256(u[i], u[i + 4], 0x31);
    }
}

/* the 8 rows' entries of group g: scales, and zero terms per unit of activation sum (offsets, or -scale * zero) */
static inline __attribute__((always_inline)) __m256 x8_scales(const void *s, size_t at, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)s + at)))
                : _mm256_loadu_ps((const float *)s + at);
}

static inline __attribute__((always_inline)) __m256 x8_offsets(const void *o, size_t at, int half, __m256 scales) {
    if (!half) return _mm256_loadu_ps((const float *)o + at);
    __m256 zeros = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)((const int16_t *)o + at))));
    return _mm256_mul_ps(_mm256_sub_ps(_mm256_setzero_ps(), scales), zeros);
}

/* vectors first..first+count-1 of a block against activation row m's bytes, added to `sum` (two chains) */
static inline __attribute__((always_inline)) __m256i x8_dot(const __m256i *v, const int8_t *x, int first, int count,
                                                            __m256i sum) {
    __m256i other = _mm256_setzero_si256();
    for (int k = first; k < first + count; k += 2) { /* broadcasts straight from memory: a load, no vector uop */
        sum = _mm256_dpbusd_epi32(sum, v[k], _mm256_broadcastd_epi32(_mm_loadu_si32(x + 4 * k)));
        other = _mm256_dpbusd_epi32(other, v[k + 1], _mm256_broadcastd_epi32(_mm_loadu_si32(x + 4 * k + 4)));
    }
    return _mm256_add_epi32(sum, other);
}

/* rows 8R..8R+7 against activation rows m0..m0+n-1 (n <= 8, a constant at each inlined call, as are kind, half
 * and whether group is 16); one accumulator an activation row takes the blocks' products and the zero terms */
static inline __attribute__((always_inline)) void x8_rows(const uint8_t *w, int kind, const void *s, const void *o,
                                                          int half, Activations a, float *out, int R, int rows,
                                                          int cols, int group, int m0, int n) {
    int blocks = cols / 32, groups = cols / group, bytes = x8_block_bytes(kind), q8 = kind == KIND_Q8;
    const uint8_t *base = w + (size_t)R * blocks * bytes;
    size_t tables = (size_t)R * groups * 8;
    __m256 acc[8];
    for (int j = 0; j < n; j++) acc[j] = _mm256_setzero_ps();
    if (group == 16) {
        for (int b = 0; b < blocks; b++) {
            __m256i v[8];
            x8_vectors(base + (size_t)b * bytes, kind, v);
            __m256 s0 = x8_scales(s, tables + (size_t)16 * b, half), s1 = x8_scales(s, tables + (size_t)16 * b + 8, half);
            __m256 o0 = x8_offsets(o, tables + (size_t)16 * b, half, s0);
            __m256 o1 = x8_offsets(o, tables + (size_t)16 * b + 8, half, s1);
            for (int j = 0; j < n; j++) {
                size_t m = (size_t)(m0 + j);
                const int8_t *x = a.xq + m * cols + b * 32;
                const int32_t *shift = a.shift16 + m * (cols / 16) + 2 * b;
                __m256i first = x8_dot(v, x, 0, 4, q8 ? _mm256_set1_epi32(shift[0]) : _mm256_setzero_si256());
                __m256i second = x8_dot(v, x, 4, 4, q8 ? _mm256_set1_epi32(shift[1]) : _mm256_setzero_si256());
                __m256 d = _mm256_set1_ps(a.d[m * blocks + b]);
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first), _mm256_mul_ps(s0, d), acc[j]);
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(second), _mm256_mul_ps(s1, d), acc[j]);
                const float *xsum = a.xsum + m * groups + 2 * b;
                acc[j] = _mm256_fmadd_ps(o0, _mm256_set1_ps(xsum[0]), acc[j]);
                acc[j] = _mm256_fmadd_ps(o1, _mm256_set1_ps(xsum[1]), acc[j]);
            }
        }
    } else {
        int per_group = group / 32;
        for (int g = 0; g < groups; g++) {
            __m256 scales = x8_scales(s, tables + (size_t)8 * g, half);
            for (int k = 0; k < per_group; k++) {
                int b = g * per_group + k;
                __m256i v[8];
                x8_vectors(base + (size_t)b * bytes, kind, v);
                for (int j = 0; j < n; j++) {
                    size_t m = (size_t)(m0 + j);
                    __m256i start = q8 ? _mm256_set1_epi32(a.shift32[m * blocks + b]) : _mm256_setzero_si256();
                    __m256i sum = x8_dot(v, a.xq + m * cols + b * 32, 0, 8, start);
                    acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum),
                                             _mm256_mul_ps(scales, _mm256_set1_ps(a.d[m * blocks + b])), acc[j]);
                }
            }
            __m256 offsets = x8_offsets(o, tables + (size_t)8 * g, half, scales);
            for (int j = 0; j < n; j++)
                acc[j] = _mm256_fmadd_ps(offsets, _mm256_set1_ps(a.xsum[(size_t)(m0 + j) * groups + g]), acc[j]);
        }
    }
    for (int j = 0; j < n; j++)
        _mm256_storeu_ps(out + (size_t)(m0 + j) * rows + (size_t)R * 8, acc[j]);
}

static inline __attribute__((always_inline)) void x8_group(const uint8_t *w, int kind, const void *s, const void *o,
                                                           int half, Activations a, float *out, int R, int rows,
                                                           int cols, int group, int count) {
    int m = 0;
    for (; m + 8 <= count; m += 8) x8_rows(w, kind, s, o, half, a, out, R, rows, cols, group, m, 8);
    if (count - m >= 4) {
        x8_rows(w, kind, s, o, half, a, out, R, rows, cols, group, m, 4);
        m += 4;
    }
    if (count - m == 3) x8_rows(w, kind, s, o, half, a, out, R, rows, cols, group, m, 3);
    else if (count - m == 2) x8_rows(w, kind, s, o, half, a, out, R, rows, cols, group, m, 2);
    else if (count - m == 1) x8_rows(w, kind, s, o, half, a, out, R, rows, cols, group, m, 1);
}

/* one function per (codes, tables), with groups of 16 and the rest apart, so that each is a constant inside */
#define DEFINE_X8_GEMV(name, kind, half)                                                                            \
    static void name(const uint8_t *w, const void *s, const void *o, const float *x, float *out, int rows,         \
                     int cols, int group, int count) {                                                            \
        Activations a = quantize_rows(x, cols, group, count);                                                     \
        if (group == 16) {                                                                                        \
            _Pragma("omp parallel for schedule(static)") for (int R = 0; R < rows / 8; R++)                        \
                x8_group(w, kind, s, o, half, a, out, R, rows, cols, 16, count);                                  \
        } else {                                                                                                  \
            _Pragma("omp parallel for schedule(static)") for (int R = 0; R < rows / 8; R++)                        \
                x8_group(w, kind, s, o, half, a, out, R, rows, cols, group, count);                               \
        }                                                                                                         \
        release_rows(a);                                                                                          \
    }

DEFINE_X8_GEMV(x8_gemv_q8, KIND_Q8, 0)
DEFINE_X8_GEMV(x8_gemv_q8_h, KIND_Q8, 1)
DEFINE_X8_GEMV(x8_gemv_q4, KIND_Q4, 0)
DEFINE_X8_GEMV(x8_gemv_q4_h, KIND_Q4, 1)
DEFINE_X8_GEMV(x8_gemv_q5, KIND_Q5, 0)
DEFINE_X8_GEMV(x8_gemv_q5_h, KIND_Q5, 1)

/* x (count, cols) -> out (count, rows) on interleaved codes and tables (rows % 8 == 0); qgemv.c's q_gemv else */
void x8_gemv(const uint8_t *w, const void *s, const void *o, const float *x, float *out, int rows, int cols, int group,
             int count, int kind, int half) {
    void (*const variants[6])(const uint8_t *, const void *, const void *, const float *, float *, int, int, int,
                              int) = {x8_gemv_q8, x8_gemv_q8_h, x8_gemv_q4, x8_gemv_q4_h, x8_gemv_q5, x8_gemv_q5_h};
    variants[kind * 2 + (half ? 1 : 0)](w, s, o, x, out, rows, cols, group, count);
}

/* the row-major codes (block_codes' order and signs) of block b of rows 8R..8R+7 */
static inline __attribute__((always_inline)) void x8_row_codes(const uint8_t *w, int kind, int blocks, int R, int b,
                                                               __m256i *rows8) {
    int bytes = x8_block_bytes(kind);
    x8_vectors(w + ((size_t)R * blocks + b) * bytes, kind, rows8);
    transpose8(rows8);
    if (kind == KIND_Q8)
        for (int i = 0; i < 8; i++) rows8[i] = _mm256_xor_si256(rows8[i], _mm256_set1_epi8((char)0x80));
}

#define DEFINE_X8_UNPACK(name, kind, half, bf16)                                                                    \
    static void name(const uint8_t *w, const void *s, const void *o, void *out, int rows, int cols, int group) {  \
        int blocks = cols / 32, groups = cols / group;                                                            \
        _Pragma("omp parallel for schedule(static)") for (int R = 0; R < rows / 8; R++) {                          \
            for (int b = 0; b < blocks; b++) {                                                                    \
                __m256i codes[8];                                                                                 \
                x8_row_codes(w, kind, blocks, R, b, codes);                                                       \
                for (int i = 0; i < 8; i++)                                                                       \
                    store_block(codes[i], kind, s, o, half, group, b * 32, (size_t)R * groups * 8 + i, 8, out,    \
                                ((size_t)R * 8 + i) * cols + (size_t)b * 32, bf16);                               \
            }                                                                                                     \
        }                                                                                                         \
    }

/* each (codes, tables) for one output dtype */
#define DEFINE_X8_UNPACKS(dtype, bf16)                                                                              \
    DEFINE_X8_UNPACK(x8_unpack_q8_##dtype, KIND_Q8, 0, bf16)                                                      \
    DEFINE_X8_UNPACK(x8_unpack_q8_h_##dtype, KIND_Q8, 1, bf16)                                                    \
    DEFINE_X8_UNPACK(x8_unpack_q4_##dtype, KIND_Q4, 0, bf16)                                                      \
    DEFINE_X8_UNPACK(x8_unpack_q4_h_##dtype, KIND_Q4, 1, bf16)                                                    \
    DEFINE_X8_UNPACK(x8_unpack_q5_##dtype, KIND_Q5, 0, bf16)                                                      \
    DEFINE_X8_UNPACK(x8_unpack_q5_h_##dtype, KIND_Q5, 1, bf16)

DEFINE_X8_UNPACKS(f32, 0)
DEFINE_X8_UNPACKS(bf16, 1)

/* qgemv.c's q_unpack on interleaved codes and tables */
void x8_unpack(const uint8_t *w, const void *s, const void *o, void *out, int rows, int cols, int group, int kind,
               int half, int bf16) {
    void (*const variants[12])(const uint8_t *, const void *, const void *, void *, int, int, int) = {
        x8_unpack_q8_f32,  x8_unpack_q8_h_f32,  x8_unpack_q4_f32,  x8_unpack_q4_h_f32,
        x8_unpack_q5_f32,  x8_unpack_q5_h_f32,  x8_unpack_q8_bf16, x8_unpack_q8_h_bf16,
        x8_unpack_q4_bf16, x8_unpack_q4_h_bf16, x8_unpack_q5_bf16, x8_unpack_q5_h_bf16};
    variants[(bf16 ? 6 : 0) + kind * 2 + (half ? 1 : 0)](w, s, o, out, rows, cols, group);
}

/* Row-major codes and tables (qgemv.c's layouts) -> interleaved, rows % 8 == 0. table_bytes: 2 (float16 scales,
 * int16 zeros) or 4 (float32) */
void q_interleave(const uint8_t *w, const void *s, const void *o, uint8_t *w8, void *s8, void *o8, int rows, int cols,
                  int group, int kind, int table_bytes) {
    int blocks = cols / 32, groups = cols / group, bytes = x8_block_bytes(kind);
    size_t row_bytes = (size_t)blocks * bytes / 8;
#pragma omp parallel for schedule(static)
    for (int R = 0; R < rows / 8; R++) {
        for (int b = 0; b < blocks; b++) {
            __m256i v[8];
            for (int i = 0; i < 8; i++) v[i] = block_codes(w + ((size_t)R * 8 + i) * row_bytes, kind, b);
            transpose8(v); /* now vector k: row i's codes 4k..4k+3 in lane i */
            uint8_t *block = w8 + ((size_t)R * blocks + b) * bytes;
            if (kind == KIND_Q8) {
                for (int k = 0; k < 8; k++) _mm256_storeu_si256((__m256i *)(block + 32 * k), v[k]);
                continue;
            }
            for (int pair = 0; pair < 4; pair++) {
                __m256i low = _mm256_and_si256(v[2 * pair], _mm256_set1_epi8(0x0F));
                __m256i high = _mm256_slli_epi16(_mm256_and_si256(v[2 * pair + 1], _mm256_set1_epi8(0x0F)), 4);
                _mm256_storeu_si256((__m256i *)(block + 32 * pair), _mm256_or_si256(low, high));
            }
            if (kind == KIND_Q5)
                for (int k = 0; k < 8; k++) {
                    __m256i fifth = _mm256_and_si256(v[k], _mm256_set1_epi8(0x10));
                    uint32_t bits = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(fifth, _mm256_set1_epi8(0x10)));
                    memcpy(block + 128 + 4 * k, &bits, 4);
                }
        }
        for (int g = 0; g < groups; g++)
            for (int i = 0; i < 8; i++) {
                size_t from = ((size_t)R * 8 + i) * groups + g, to = ((size_t)R * groups + g) * 8 + i;
                memcpy((char *)s8 + to * table_bytes, (const char *)s + from * table_bytes, table_bytes);
                memcpy((char *)o8 + to * table_bytes, (const char *)o + from * table_bytes, table_bytes);
            }
    }
}
#else
void x8_gemv(const uint8_t *w, const void *s, const void *o, const float *x, float *out, int rows, int cols, int group,
             int count, int kind, int half) {
    (void)w, (void)s, (void)o, (void)x, (void)out, (void)rows, (void)cols, (void)group, (void)count, (void)kind,
        (void)half;
}
void x8_unpack(const uint8_t *w, const void *s, const void *o, void *out, int rows, int cols, int group, int kind,
               int half, int bf16) {
    (void)w, (void)s, (void)o, (void)out, (void)rows, (void)cols, (void)group, (void)kind, (void)half, (void)bf16;
}
void q_interleave(const uint8_t *w, const void *s, const void *o, uint8_t *w8, void *s8, void *o8, int rows, int cols,
                  int group, int kind, int table_bytes) {
    (void)w, (void)s, (void)o, (void)w8, (void)s8, (void)o8, (void)rows, (void)cols, (void)group, (void)kind,
        (void)table_bytes;
}
#endif

/* Causal grouped-query attention over a prompt chunk, flash-style (online softmax over blocks of 64 keys), float32,
 * AVX-512; faster than torch's CPU flash attention on prompts (measured: docs/performance.md).
 *
 * q (heads, length, d) and out (same), any row and head strides; keys and values (kv_heads, >= start + length, d),
 * float32 or bfloat16, any row and head strides. Query row i sits at position start + i and takes keys 0..start + i;
 * query head h reads key/value head h / (heads / kv_heads). softmax(q k^T / sqrt(d)) v, as torch's SDPA.
 *
 * Keys are first copied transposed, a block of 64 at a time ((kv_heads, keys / 64, d, 64) float32: one row of a
 * transposed (d, keys) table strode a power of two apart and thrashed L1's sets), and values to float32 rows, so
 * that a tile of 4
 * query rows x 64 keys is 16 vector accumulators fed by one key row load per dimension and 4 broadcasts; values are
 * taken the same way (4 rows x 64 dimensions). Work items: (head, block of 32 query rows), dynamically scheduled (the
 * causal triangle makes later rows dearer). Built only into the AVX-512 library (quant/native.py): elsewhere
 * attention_supported() is 0 and callers keep torch's SDPA. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#if defined(__AVX512F__)
#define KEY_BLOCK 64
#define ROWS 4
#define QUERY_BLOCK 32 /* query rows that take each block of keys while it is in cache */

static inline float element(const void *base, size_t index, int bf16) {
    if (!bf16) return ((const float *)base)[index];
    uint32_t bits = (uint32_t)((const uint16_t *)base)[index] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* acc rows (4 x `vectors` x 16 floats from dimension i0) += p (4 x keys) v (keys x the same dimensions), the
 * accumulators in registers: `vectors` is a constant at each inlined call */
static inline __attribute__((always_inline)) void add_pv(float *acc, const float (*p)[KEY_BLOCK], const float *v,
                                                         int keys, int d, int i0, int vectors) {
    __m512 o[ROWS][4];
    for (int k = 0; k < ROWS; k++)
        for (int c = 0; c < vectors; c++) o[k][c] = _mm512_load_ps(acc + k * d + i0 + c * 16);
    for (int j = 0; j < keys; j++) {
        const float *value_row = v + (size_t)j * d + i0;
        __m512 vv[4];
        for (int c = 0; c < vectors; c++) vv[c] = _mm512_loadu_ps(value_row + c * 16);
        for (int k = 0; k < ROWS; k++) {
            __m512 pk = _mm512_set1_ps(p[k][j]);
            for (int c = 0; c < vectors; c++) o[k][c] = _mm512_fmadd_ps(pk, vv[c], o[k][c]);
        }
    }
    for (int k = 0; k < ROWS; k++)
        for (int c = 0; c < vectors; c++) _mm512_store_ps(acc + k * d + i0 + c * 16, o[k][c]);
}

/* One block of 64 keys (from j0) for 4 query rows: scores, the online softmax's running max m and sum l, and
 * acc += p v. query: each row's query for this block (d, pre-scaled), acc: 4 rows of d, last: each row's last key;
 * kt: the block's keys transposed (d x 64), v: its value rows. */
static void tile_step(const float *const query[ROWS], float *acc, float *m, float *l, const int *last,
                      const float *kt, const float *v, int j0, int d) {
    float p[ROWS][KEY_BLOCK] __attribute__((aligned(64)));
    {
        __m512 s00 = _mm512_setzero_ps(), s01 = s00, s02 = s00, s03 = s00, s10 = s00, s11 = s00, s12 = s00, s13 = s00,
               s20 = s00, s21 = s00, s22 = s00, s23 = s00, s30 = s00, s31 = s00, s32 = s00, s33 = s00;
        for (int i = 0; i < d; i++) {
            const float *key_row = kt + i * KEY_BLOCK;
            __m512 k0 = _mm512_load_ps(key_row), k1 = _mm512_load_ps(key_row + 16), k2 = _mm512_load_ps(key_row + 32),
                   k3 = _mm512_load_ps(key_row + 48);
            __m512 q0 = _mm512_set1_ps(query[0][i]), q1 = _mm512_set1_ps(query[1][i]), q2 = _mm512_set1_ps(query[2][i]),
                   q3 = _mm512_set1_ps(query[3][i]);
            s00 = _mm512_fmadd_ps(q0, k0, s00), s01 = _mm512_fmadd_ps(q0, k1, s01);
            s02 = _mm512_fmadd_ps(q0, k2, s02), s03 = _mm512_fmadd_ps(q0, k3, s03);
            s10 = _mm512_fmadd_ps(q1, k0, s10), s11 = _mm512_fmadd_ps(q1, k1, s11);
            s12 = _mm512_fmadd_ps(q1, k2, s12), s13 = _mm512_fmadd_ps(q1, k3, s13);
            s20 = _mm512_fmadd_ps(q2, k0, s20), s21 = _mm512_fmadd_ps(q2, k1, s21);
            s22 = _mm512_fmadd_ps(q2, k2, s22), s23 = _mm512_fmadd_ps(q2, k3, s23);
            s30 = _mm512_fmadd_ps(q3, k0, s30), s31 = _mm512_fmadd_ps(q3, k1, s31);
            s32 = _mm512_fmadd_ps(q3, k2, s32), s33 = _mm512_fmadd_ps(q3, k3, s33);
        }
        _mm512_store_ps(p[0], s00), _mm512_store_ps(p[0] + 16, s01), _mm512_store_ps(p[0] + 32, s02);
        _mm512_store_ps(p[0] + 48, s03), _mm512_store_ps(p[1], s10), _mm512_store_ps(p[1] + 16, s11);
        _mm512_store_ps(p[1] + 32, s12), _mm512_store_ps(p[1] + 48, s13), _mm512_store_ps(p[2], s20);
        _mm512_store_ps(p[2] + 16, s21), _mm512_store_ps(p[2] + 32, s22), _mm512_store_ps(p[2] + 48, s23);
        _mm512_store_ps(p[3], s30), _mm512_store_ps(p[3] + 16, s31), _mm512_store_ps(p[3] + 32, s32);
        _mm512_store_ps(p[3] + 48, s33);
    }
    for (int k = 0; k < ROWS; k++) { /* scores -> probabilities in place */
        __mmask16 valid[4];
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int c = 0; c < 4; c++) {
            int count = last[k] + 1 - (j0 + c * 16); /* keys of this vector the row takes */
            valid[c] = count >= 16 ? (__mmask16)0xFFFF : count <= 0 ? (__mmask16)0 : (__mmask16)((1u << count) - 1);
            top = _mm512_mask_max_ps(top, valid[c], top, _mm512_load_ps(p[k] + c * 16));
        }
        float block_max = _mm512_reduce_max_ps(top);
        if (block_max == -INFINITY) { /* no key of this block for this row */
            memset(p[k], 0, sizeof(p[k]));
            continue;
        }
        float new_max = block_max > m[k] ? block_max : m[k];
        float rescale = m[k] == -INFINITY ? 0.f : expf(m[k] - new_max);
        __m512 total = _mm512_setzero_ps(), shift = _mm512_set1_ps(new_max);
        for (int c = 0; c < 4; c++) {
            __m512 e = _mm512_maskz_mov_ps(valid[c], exp16(_mm512_sub_ps(_mm512_load_ps(p[k] + c * 16), shift)));
            total = _mm512_add_ps(total, e);
            _mm512_store_ps(p[k] + c * 16, e);
        }
        l[k] = l[k] * rescale + _mm512_reduce_add_ps(total);
        m[k] = new_max;
        if (rescale != 1.f) {
            __m512 factor = _mm512_set1_ps(rescale);
            for (int i = 0; i < d; i += 16)
                _mm512_store_ps(acc + k * d + i, _mm512_mul_ps(_mm512_load_ps(acc + k * d + i), factor));
        }
    }
    int end = last[ROWS - 1] + 1, keys = end - j0 < KEY_BLOCK ? end - j0 : KEY_BLOCK;
    int i0 = 0;
    for (; i0 + 64 <= d; i0 += 64) add_pv(acc, p, v, keys, d, i0, 4);
    for (; i0 < d; i0 += 16) add_pv(acc, p, v, keys, d, i0, 1);
}

/* Query rows r0..r0+QUERY_BLOCK-1 of one head (fewer at the chunk's end): each block of keys is taken by all of
 * their 4-row tiles in turn while it is in cache (a tile alone read every key once per 4 rows: at 32K positions,
 * 16 MB of keys and values per tile). Rows past the chunk repeat its last row; only real rows are written.
 * q[0]: the queries; with dual chunk attention (chunk_len > 0, a multiple of 64) q[0..2] are the intra, successive
 * and inter queries, each row taking the keys of its own chunk with the first, of the chunk before with the second
 * and all earlier ones with the third (one softmax over all). */
static void query_block(const float *const q[3], long q_row, float *out, long out_row, const float *kt,
                        const float *v, int length, int start, int d, int r0, int chunk_len) {
    int rows = length - r0 < QUERY_BLOCK ? length - r0 : QUERY_BLOCK, tiles = (rows + ROWS - 1) / ROWS;
    int variants = chunk_len ? 3 : 1;
    size_t table = (size_t)tiles * ROWS * d; /* floats of one variant's rows */
    float *acc = aligned_alloc(64, sizeof(float) * (1 + variants) * table), *query = acc + table;
    float m[QUERY_BLOCK], l[QUERY_BLOCK];
    int last[QUERY_BLOCK];
    float scale = 1.f / sqrtf((float)d);
    for (int k = 0; k < tiles * ROWS; k++) {
        int row = k < rows ? r0 + k : r0 + rows - 1;
        for (int variant = 0; variant < variants; variant++)
            for (int i = 0; i < d; i++) query[variant * table + k * d + i] = q[variant][(size_t)row * q_row + i] * scale;
        memset(acc + k * d, 0, sizeof(float) * d);
        m[k] = -INFINITY;
        l[k] = 0.f;
        last[k] = start + row;
    }
    for (int j0 = 0; j0 <= last[tiles * ROWS - 1]; j0 += KEY_BLOCK)
        for (int t = 0; t < tiles; t++) {
            if (last[t * ROWS + ROWS - 1] < j0) continue; /* the tile takes no key of this block */
            const float *rows_query[ROWS];
            for (int k = 0; k < ROWS; k++) {
                int variant = 0, at = t * ROWS + k;
                if (chunk_len) {
                    int own = last[at] / chunk_len * chunk_len, previous = own - chunk_len;
                    variant = j0 >= own ? 0 : j0 >= previous ? 1 : 2;
                }
                rows_query[k] = query + variant * table + (size_t)at * d;
            }
            tile_step(rows_query, acc + t * ROWS * d, m + t * ROWS, l + t * ROWS, last + t * ROWS,
                      kt + (size_t)j0 * d, v + (size_t)j0 * d, j0, d);
        }
    for (int k = 0; k < rows; k++) {
        float inverse = 1.f / l[k];
        for (int i = 0; i < d; i++) out[(size_t)(r0 + k) * out_row + i] = acc[k * d + i] * inverse;
    }
    free(acc);
}

int attention_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* d: a multiple of 16. Strides in elements. q_successive, q_inter: NULL, or with chunk_len (a multiple of 64) the
 * dual chunk attention queries, laid out as q. */
void attention_prefill(const float *q, const float *q_successive, const float *q_inter, long q_head, long q_row,
                       const void *k, long k_head, long k_row, const void *v, long v_head, long v_row, int kv_bf16,
                       float *out, long out_head, long out_row, int heads, int kv_heads, int length, int start, int d,
                       int chunk_len) {
    int keys = start + length, keys_padded = (keys + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;
    float *kt = aligned_alloc(64, sizeof(float) * (size_t)kv_heads * d * keys_padded);
    float *vf = aligned_alloc(64, sizeof(float) * (size_t)kv_heads * keys_padded * d);
#pragma omp parallel for schedule(static)
    for (int h = 0; h < kv_heads; h++) {
        float *kth = kt + (size_t)h * d * keys_padded, *vh = vf + (size_t)h * keys_padded * d;
        for (int j = 0; j < keys_padded; j++)
            for (int i = 0; i < d; i++) {
                int real = j < keys;
                kth[(size_t)(j / KEY_BLOCK) * KEY_BLOCK * d + i * KEY_BLOCK + j % KEY_BLOCK] =
                    real ? element(k, h * k_head + (size_t)j * k_row + i, kv_bf16) : 0.f;
                vh[(size_t)j * d + i] = real ? element(v, h * v_head + (size_t)j * v_row + i, kv_bf16) : 0.f;
            }
    }
    int blocks = (length + QUERY_BLOCK - 1) / QUERY_BLOCK, group = heads / kv_heads;
#pragma omp parallel for schedule(dynamic, 1)
    for (int item = 0; item < heads * blocks; item++) {
        /* the dearest blocks (last rows) first; the heads sharing a key/value head next to each other */
        int h = item % heads, b = blocks - 1 - item / heads;
        int kv = h / group;
        const float *queries[3] = {q + (size_t)h * q_head, chunk_len ? q_successive + (size_t)h * q_head : NULL,
                                   chunk_len ? q_inter + (size_t)h * q_head : NULL};
        query_block(queries, q_row, out + (size_t)h * out_head, out_row, kt + (size_t)kv * d * keys_padded,
                    vf + (size_t)kv * keys_padded * d, length, start, d, b * QUERY_BLOCK, chunk_len);
    }
    free(kt);
    free(vf);
}
#else
int attention_supported(void) { return 0; }
void attention_prefill(void) {}
#endif

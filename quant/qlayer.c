/* One Qwen2 decoder layer for one token of each of `count` sequences, in one call, on qgemv.c's int4/int8 kernels:
 * decoding on CPU spent about as long in Python and in torch's per-op dispatch (some 40 small ops a layer) as in the
 * matrix products. The sequences share each weight read (qgemv.c takes their rows together) and each has its own
 * cache and position; every row's arithmetic is the same whatever the other rows and their number, so a sequence
 * decoded beside others gets exactly the numbers it gets alone.
 *
 * x (count, hidden) float32, updated in place: x += attention(rms_norm(x)); x += mlp(rms_norm(x)). Everything here is
 * float32; the keys and values are written to, and read from, the caller's cache (float32 or bfloat16,
 * (kv_heads, max_len, head_dim) per layer). q/k/v and gate/up are each one fused matrix (rows q, k, v and gate, up).
 * Rotary embedding as Qwen2 (rotate_half): the cos/sin rows of the token's position are passed in. Attention is
 * softmax(q k^T / sqrt(head_dim)) v over positions 0..pos, each query head reading its group's key/value head;
 * key/value heads (and slices of their query heads) are split over OpenMP threads. Built with qgemv.c into one
 * library by quant/native.py. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

void q_gemv(const uint8_t *weights, const void *scales, const void *offsets, const float *x, float *out, int rows,
            int cols, int group, int count, int kind, int half);
void x8_gemv(const uint8_t *weights, const void *scales, const void *offsets, const float *x, float *out, int rows,
             int cols, int group, int count, int kind, int half);

typedef struct {
    const uint8_t *weights;
    const void *scales, *offsets; /* (rows, groups): float16 scales and int16 zeros (half), else float32 both */
    int rows, cols, group, kind, half; /* kind: qgemv.c's KIND_Q8, KIND_Q4 or KIND_Q5 */
    int interleaved;                   /* codes and tables of 8 rows interleaved (qgemv_x8.c) */
} QMatrix;

typedef struct {
    QMatrix qkv[3], o, gate_up[2], down; /* q/k/v and gate/up: one fused matrix, or parts (rows 0: absent) */
    const float *qkv_bias;                /* (q + k + v rows) or NULL */
    const float *input_norm, *post_norm; /* (hidden) */
    void *keys, *values; /* (kv_heads, max_len, head_dim): one sequence's cache, set by qlayer_decode per row */
} Layer;

typedef struct {
    int hidden, heads, kv_heads, head_dim, intermediate, max_len, cache_bf16;
    float eps;
} Shape;

/* x (count, m->cols) -> out (count, m->rows) */
static void gemv(const QMatrix *m, const float *x, int count, float *out) {
    (m->interleaved ? x8_gemv : q_gemv)(m->weights, m->scales, m->offsets, x, out, m->rows, m->cols, m->group, count,
                                        m->kind, m->half);
}

/* a projection made of parts side by side, out (count, total): each part writes its columns of every row (through
 * `scratch`, count x its rows, where it is not the whole row) */
static void gemv_parts(const QMatrix *parts, int n, const float *x, int count, float *out, int total, float *scratch) {
    int offset = 0;
    for (int i = 0; i < n; i++) {
        const QMatrix *m = &parts[i];
        if (m->rows == 0) continue;
        if (count == 1 || m->rows == total) {
            gemv(m, x, count, out + offset);
        } else {
            gemv(m, x, count, scratch);
            for (int r = 0; r < count; r++)
                memcpy(out + (size_t)r * total + offset, scratch + (size_t)r * m->rows, sizeof(float) * m->rows);
        }
        offset += m->rows;
    }
}

static void rms_norm(const float *x, const float *weight, float *out, int n, float eps) {
    float total = 0.f;
    for (int i = 0; i < n; i++) total += x[i] * x[i];
    float inverse = 1.f / sqrtf(total / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inverse * weight[i];
}

static void rotate(float *v, const float *cos, const float *sin, int d) {
    int half = d / 2;
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch converts */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m256 load8(const void *base, size_t index, int bf16) { /* 8 cache values from element `index` */
    if (!bf16) return _mm256_loadu_ps((const float *)base + index);
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + index));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}

static void store(void *base, size_t index, const float *v, int d, int bf16) {
    if (bf16) {
        for (int i = 0; i < d; i++) ((uint16_t *)base)[index + i] = to_bf16(v[i]);
    } else {
        memcpy((float *)base + index, v, sizeof(float) * d);
    }
}

/* The dot products of `query` (d floats) with 8 consecutive cached rows from element `base` on: one vector
 * accumulator per row, then one transposing reduction for the 8 (a horizontal sum per row cost more than its row's
 * 8 FMAs) */
static inline __m256 dot8(const float *query, const void *rows, size_t base, int d, int bf16) {
    __m256 acc[8];
    for (int r = 0; r < 8; r++) {
        __m256 a = _mm256_setzero_ps();
        for (int i = 0; i < d; i += 8)
            a = _mm256_fmadd_ps(_mm256_loadu_ps(query + i), load8(rows, base + (size_t)r * d + i, bf16), a);
        acc[r] = a;
    }
    /* per 128-bit half: sums of elements 0-3 (low) and 4-7 (high) of rows 0-3 and 4-7, then the halves added */
    __m256 rows0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    __m256 rows4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(rows0123, rows4567, 0x20),
                         _mm256_permute2f128_ps(rows0123, rows4567, 0x31));
}

/* q (heads, d) -> out (heads, d); scores: heads * length floats of scratch. The query heads that share a key/value
 * head are taken together, so that each cached row is read from memory once for all of them, not once per head
 * (past a few thousand positions a layer's cache outgrows the caches and every head streamed it again); work items
 * are (key/value head, slice of its query heads), enough of them for every thread. */
#define PV_BLOCK 64 /* positions whose value rows stay in L1 while every head of an item takes them in */
static void attend(const float *q, const Layer *layer, const Shape *s, int length, float *out, float *scores) {
    int d = s->head_dim, group = s->heads / s->kv_heads, bf16 = s->cache_bf16;
    float scale = 1.f / sqrtf((float)d);
    int threads = omp_get_max_threads();
    int slices = threads > s->kv_heads ? (threads + s->kv_heads - 1) / s->kv_heads : 1;
    if (slices > group) slices = group;
    int per_slice = (group + slices - 1) / slices;
#pragma omp parallel for schedule(static)
    for (int item = 0; item < s->kv_heads * slices; item++) {
        int kv = item / slices, first = kv * group + (item % slices) * per_slice;
        int last = first + per_slice < (kv + 1) * group ? first + per_slice : (kv + 1) * group;
        if (first >= last) continue;
        size_t head_base = (size_t)kv * s->max_len * d;
        float inverse_totals[256];
        int t = 0;
        for (; t + 8 <= length; t += 8) /* the 8 key rows stay in L1 across the heads */
            for (int h = first; h < last; h++)
                _mm256_storeu_ps(scores + (size_t)h * length + t,
                                 _mm256_mul_ps(dot8(q + (size_t)h * d, layer->keys, head_base + (size_t)t * d, d, bf16),
                                               _mm256_set1_ps(scale)));
        for (; t < length; t++)
            for (int h = first; h < last; h++) {
                __m256 acc = _mm256_setzero_ps();
                for (int i = 0; i < d; i += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)h * d + i),
                                          load8(layer->keys, head_base + (size_t)t * d + i, bf16), acc);
                scores[(size_t)h * length + t] = hsum(acc) * scale;
            }
        for (int h = first; h < last; h++) { /* softmax numerators in place; 1 / their sum */
            float *row = scores + (size_t)h * length, best = -INFINITY, total = 0.f;
            __m256 bests = _mm256_set1_ps(-INFINITY);
            for (t = 0; t + 8 <= length; t += 8) bests = _mm256_max_ps(bests, _mm256_loadu_ps(row + t));
            for (; t < length; t++) best = fmaxf(best, row[t]);
            float lanes[8];
            _mm256_storeu_ps(lanes, bests);
            for (int i = 0; i < 8; i++) best = fmaxf(best, lanes[i]);
            __m256 sums = _mm256_setzero_ps(), top = _mm256_set1_ps(best);
            for (t = 0; t + 8 <= length; t += 8) {
                __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + t), top));
                _mm256_storeu_ps(row + t, e);
                sums = _mm256_add_ps(sums, e);
            }
            for (; t < length; t++) {
                row[t] = expf(row[t] - best);
                total += row[t];
            }
            inverse_totals[h - first] = 1.f / (total + hsum(sums));
            memset(out + (size_t)h * d, 0, sizeof(float) * d);
        }
        for (int t0 = 0; t0 < length; t0 += PV_BLOCK) {
            int t1 = t0 + PV_BLOCK < length ? t0 + PV_BLOCK : length;
            for (int h = first; h < last; h++) {
                const float *row = scores + (size_t)h * length;
                float *o = out + (size_t)h * d;
                __m256 acc[32]; /* head_dim <= 256 */
                for (int i = 0; i < d / 8; i++) acc[i] = _mm256_loadu_ps(o + i * 8);
                for (t = t0; t < t1; t++) {
                    __m256 p = _mm256_set1_ps(row[t]);
                    for (int i = 0; i < d / 8; i++)
                        acc[i] = _mm256_fmadd_ps(p, load8(layer->values, head_base + (size_t)t * d + i * 8, bf16),
                                                 acc[i]);
                }
                for (int i = 0; i < d / 8; i++) _mm256_storeu_ps(o + i * 8, acc[i]);
            }
        }
        for (int h = first; h < last; h++) {
            __m256 inverse = _mm256_set1_ps(inverse_totals[h - first]);
            for (int i = 0; i < d; i += 8)
                _mm256_storeu_ps(out + (size_t)h * d + i,
                                 _mm256_mul_ps(_mm256_loadu_ps(out + (size_t)h * d + i), inverse));
        }
    }
}

/* exp8 over n floats (n % 8 == 0), for the tests */
void qlayer_exp(const float *x, float *out, int n) {
    for (int i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, exp8(_mm256_loadu_ps(x + i)));
}

/* the floats of qlayer_decode's work for `count` rows: each row's vectors, one row's attention scores, and the
 * scratch of a projection made of parts */
long qlayer_work_floats(const Shape *s, int count) {
    long q = (long)s->heads * s->head_dim, kv = (long)s->kv_heads * s->head_dim;
    long qkv = q + 2 * kv, gate_up = 2L * s->intermediate, widest = qkv > gate_up ? qkv : gate_up;
    return count * (2L * s->hidden + 2 * q + 2 * kv + 3L * s->intermediate + widest) + (long)s->heads * s->max_len;
}

/* rows r of x (count, hidden) at position pos[r] of the cache keys[r] / values[r]; cos, sin (count, head_dim): each
 * row's rotary rows; work: qlayer_work_floats(s, count) floats */
void qlayer_decode(const Layer *layer, const Shape *s, int count, float *x, const float *cos, const float *sin,
                   const int *pos, void *const *keys, void *const *values, float *work) {
    int d = s->head_dim, q_size = s->heads * d, kv_size = s->kv_heads * d, qkv_size = q_size + 2 * kv_size;
    int hidden = s->hidden, intermediate = s->intermediate;
    float *normed = work, *qkv = normed + (size_t)count * hidden, *attention = qkv + (size_t)count * qkv_size;
    float *projected = attention + (size_t)count * q_size, *gate_up = projected + (size_t)count * hidden;
    float *activation = gate_up + (size_t)count * 2 * intermediate;
    float *scratch = activation + (size_t)count * intermediate;
    float *scores = scratch + (size_t)count * (qkv_size > 2 * intermediate ? qkv_size : 2 * intermediate);

    for (int r = 0; r < count; r++)
        rms_norm(x + (size_t)r * hidden, layer->input_norm, normed + (size_t)r * hidden, hidden, s->eps);
    gemv_parts(layer->qkv, 3, normed, count, qkv, qkv_size, scratch);
    for (int r = 0; r < count; r++) {
        float *row = qkv + (size_t)r * qkv_size;
        if (layer->qkv_bias)
            for (int i = 0; i < qkv_size; i++) row[i] += layer->qkv_bias[i];
        for (int h = 0; h < s->heads + s->kv_heads; h++) /* q heads, then k */
            rotate(row + (size_t)h * d, cos + (size_t)r * d, sin + (size_t)r * d, d);
        Layer own = *layer;
        own.keys = keys[r];
        own.values = values[r];
        for (int h = 0; h < s->kv_heads; h++) {
            size_t at = ((size_t)h * s->max_len + pos[r]) * d;
            store(own.keys, at, row + q_size + (size_t)h * d, d, s->cache_bf16);
            store(own.values, at, row + q_size + kv_size + (size_t)h * d, d, s->cache_bf16);
        }
        attend(row, &own, s, pos[r] + 1, attention + (size_t)r * q_size, scores);
    }
    gemv(&layer->o, attention, count, projected);
    for (size_t i = 0; i < (size_t)count * hidden; i++) x[i] += projected[i];

    for (int r = 0; r < count; r++)
        rms_norm(x + (size_t)r * hidden, layer->post_norm, normed + (size_t)r * hidden, hidden, s->eps);
    gemv_parts(layer->gate_up, 2, normed, count, gate_up, 2 * intermediate, scratch);
    for (int r = 0; r < count; r++) { /* silu(gate) * up */
        const float *gates = gate_up + (size_t)r * 2 * intermediate, *ups = gates + intermediate;
        float *out = activation + (size_t)r * intermediate;
        int i = 0;
        for (; i + 8 <= intermediate; i += 8) {
            __m256 g = _mm256_loadu_ps(gates + i);
            __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e));
            _mm256_storeu_ps(out + i, _mm256_mul_ps(silu, _mm256_loadu_ps(ups + i)));
        }
        for (; i < intermediate; i++) out[i] = gates[i] / (1.f + expf(-gates[i])) * ups[i];
    }
    gemv(&layer->down, activation, count, projected);
    for (size_t i = 0; i < (size_t)count * hidden; i++) x[i] += projected[i];
}

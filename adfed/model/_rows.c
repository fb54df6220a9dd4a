/* Row kernels for embedding tables and their optimizer: see adfed/model/row_kernels.py.
 *
 * Every float operation here is one IEEE float32 operation, in the order written, and
 * this file is compiled with -ffp-contract=off, so no compiler fuses a multiply and an
 * add behind our back; where torch's CPU kernels fuse (lerp), fmaf says so explicitly.
 * The results are bitwise those of the torch operations named in each comment, whatever
 * the machine (tests/unit/model/test_row_kernels.py holds both sides to it).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* On x86-64 the loops below are also built for CPUs with AVX2 and FMA, picked at load
 * time; both builds compute the same bits (every operation is exact IEEE rounding). */
#if defined(__x86_64__) && defined(__GNUC__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTOR_CLONES
#endif

#define RADIX_BITS 11
#define RADIX_MASK ((1 << RADIX_BITS) - 1)

/* Working memory, one per thread, kept between calls: fresh blocks of this size would
 * come from mmap and cost a page fault per 4 KiB on every call. */
typedef struct {
    int64_t *keys, *slots; /* hash table: id, its slot (cap entries) */
    int64_t *ids;          /* the distinct ids (first seen, or sorted after adfed_sum_rows) */
    int64_t *order;        /* two arrays of max_k slots, for sorting */
    float *rows, *sorted;  /* their sums, [k][width] */
    int64_t cap, max_k, max_floats, k, width;
} Scratch;

static _Thread_local Scratch scratch;

static int grow(void **p, int64_t count, size_t size) {
    void *q = realloc(*p, (size_t)(count > 0 ? count : 1) * size);
    if (!q) return -1;
    *p = q;
    return 0;
}

static int reserve(int64_t cap, int64_t max_k, int64_t width) {
    Scratch *s = &scratch;
    if (cap > s->cap) {
        if (grow((void **)&s->keys, cap, sizeof(int64_t)) || grow((void **)&s->slots, cap, sizeof(int64_t)))
            return -1;
        s->cap = cap;
    }
    if (max_k > s->max_k) {
        if (grow((void **)&s->ids, max_k, sizeof(int64_t)) || grow((void **)&s->order, 2 * max_k, sizeof(int64_t)))
            return -1;
        s->max_k = max_k;
    }
    if (max_k * width > s->max_floats) {
        if (grow((void **)&s->rows, max_k * width, sizeof(float)) || grow((void **)&s->sorted, max_k * width, sizeof(float)))
            return -1;
        s->max_floats = max_k * width;
    }
    return 0;
}

/* The distinct ids among ids[0..n) (all in [0, num_rows)) and each one's row sum, into
 * scratch.ids[0..k) (first-seen order) and scratch.rows[k][width]: each id's rows
 * src[source[j]] (src[j] when source is NULL) added to zero in position order. Returns
 * k; -1 when memory ran out; -2 when an id lies outside [0, num_rows). Each id's slot is found in a table indexed by id when
 * the table is small, else in an open-addressing hash table with at least twice as many
 * entries as there can be distinct ids.
 */
static int64_t group_rows(int64_t n, const int64_t *ids, const int64_t *source, const float *src,
                          int64_t width, int64_t num_rows) {
    int64_t max_k = n < num_rows ? n : num_rows, cap = 16;
    while (cap < 2 * max_k) cap *= 2;
    const int direct = num_rows <= 4 * cap; /* small table: index the slots by id */
    if (direct) cap = num_rows;
    if (reserve(cap, max_k, width)) return -1;
    Scratch *s = &scratch;
    int64_t *restrict keys = s->keys, *restrict slots = s->slots;
    for (int64_t h = 0; h < cap; h++) keys[h] = -1;
    const uint64_t mask = (uint64_t)cap - 1;
    int64_t k = 0;
    for (int64_t j = 0; j < n; j++) {
        int64_t id = ids[j];
        if (id < 0 || id >= num_rows) return -2;
        uint64_t h = (uint64_t)id;
        if (!direct) {
            h = (((uint64_t)id * 0x9E3779B97F4A7C15ull) >> 20) & mask;
            while (keys[h] != -1 && keys[h] != id) h = (h + 1) & mask;
        }
        const float *restrict x = src + (source ? source[j] : j) * width;
        if (keys[h] == -1) {
            keys[h] = id;
            slots[h] = k;
            s->ids[k] = id;
            float *restrict a = s->rows + k++ * width;
            for (int64_t c = 0; c < width; c++) a[c] = 0.0f + x[c];
        } else {
            float *restrict a = s->rows + slots[h] * width;
            for (int64_t c = 0; c < width; c++) a[c] += x[c];
        }
    }
    s->k = k;
    s->width = width;
    return k;
}

/* Row sums by id, as a coalesced sparse gradient: group_rows, then the ids sorted
 * increasing with their rows. Returns k; adfed_take_rows then copies the result out
 * (the caller allocates exactly k entries in between). -1 when memory ran out, -2 for
 * an id outside [0, num_rows).
 */
int64_t adfed_sum_rows(int64_t n, const int64_t *ids, const int64_t *source, const float *src,
                       int64_t width, int64_t num_rows) {
    int64_t k = group_rows(n, ids, source, src, width, num_rows);
    if (k < 0) return k;
    Scratch *s = &scratch;
    /* Sort the slots by id: a stable LSD radix sort over RADIX_BITS-bit digits of the
     * ids (each < num_rows), ping-ponging between the two halves of s->order. */
    int64_t *from = s->order, *to = s->order + s->max_k;
    for (int64_t i = 0; i < k; i++) from[i] = i;
    int64_t count[1 << RADIX_BITS];
    for (int shift = 0; shift == 0 || (num_rows - 1) >> shift > 0; shift += RADIX_BITS) {
        memset(count, 0, sizeof count);
        for (int64_t i = 0; i < k; i++) count[(s->ids[from[i]] >> shift) & RADIX_MASK]++;
        int64_t total = 0;
        for (int d = 0; d < (1 << RADIX_BITS); d++) {
            int64_t c = count[d];
            count[d] = total;
            total += c;
        }
        for (int64_t i = 0; i < k; i++) to[count[(s->ids[from[i]] >> shift) & RADIX_MASK]++] = from[i];
        int64_t *t = from; from = to; to = t;
    }
    for (int64_t i = 0; i < k; i++) {
        to[i] = s->ids[from[i]];
        memcpy(s->sorted + i * width, s->rows + from[i] * width, (size_t)width * sizeof(float));
    }
    memcpy(s->ids, to, (size_t)k * sizeof(int64_t));
    return k;
}

/* Copy the last adfed_sum_rows result of this thread: k ids, k rows of width floats. */
void adfed_take_rows(int64_t *out_ids, float *out_rows) {
    Scratch *s = &scratch;
    memcpy(out_ids, s->ids, (size_t)s->k * sizeof(int64_t));
    memcpy(out_rows, s->sorted, (size_t)(s->k * s->width) * sizeof(float));
}

/* Lazy Adam on k unique rows (RowSparseAdam's _adam_rows, op by op):
 *
 *   exp_avg.lerp_(grad, w1); exp_avg_sq.lerp_(grad.square(), w2)
 *   param.addcdiv_(exp_avg, sqrt(exp_avg_sq) + eps, value=value)
 *
 * param, exp_avg, exp_avg_sq: [rows][width]; ids: the k rows (distinct); grad:
 * [k][width], negated first when negate is set (maximize). torch's float32 lerp on a CPU
 * (ATen's lerp_vec) is fma(w, end - start, start) for |w| < 0.5, else
 * fma(w - 1, end - start, end); written out below with the choice hoisted, so that the
 * compiler vectorises the row.
 */
VECTOR_CLONES
void adfed_adam_rows(int64_t k, const int64_t *ids, const float *grad, int64_t width,
                     float *restrict param, float *restrict exp_avg, float *restrict exp_avg_sq,
                     float w1, float w2, float eps, float value, int negate) {
    const int small1 = fabsf(w1) < 0.5f, small2 = fabsf(w2) < 0.5f;
    const float c1 = small1 ? w1 : w1 - 1.0f, c2 = small2 ? w2 : w2 - 1.0f;
    const float sign = negate ? -1.0f : 1.0f; /* exact: multiplies by +-1 */
    for (int64_t i = 0; i < k; i++) {
        int64_t base = ids[i] * width;
        const float *restrict g = grad + i * width;
        float *restrict p = param + base, *restrict m = exp_avg + base, *restrict v = exp_avg_sq + base;
        for (int64_t c = 0; c < width; c++) {
            float gc = sign * g[c], g2 = gc * gc;
            float mc = fmaf(c1, gc - m[c], small1 ? m[c] : gc);
            float vc = fmaf(c2, g2 - v[c], small2 ? v[c] : g2);
            m[c] = mc;
            v[c] = vc;
            p[c] = p[c] + value * mc / (sqrtf(vc) + eps);
        }
    }
}

/* RowSparseAdam's step for one parameter of num_rows rows from its sparse gradient's n
 * stored entries (rows[j], values[j][width]): entries of one row are summed first
 * (group_rows; the order of the rows does not matter here), unless the rows are already
 * strictly increasing; then adfed_adam_rows. Returns 0; -1 when memory ran out, -2 for
 * a row outside [0, num_rows) (nothing is changed then).
 */
int adfed_sparse_adam(int64_t n, const int64_t *rows, const float *values, int64_t width,
                      int64_t num_rows, float *param, float *exp_avg, float *exp_avg_sq, float w1,
                      float w2, float eps, float value, int negate) {
    int64_t j = 1;
    while (j < n && rows[j] > rows[j - 1]) j++;
    if (j >= n) {
        if (n > 0 && (rows[0] < 0 || rows[n - 1] >= num_rows)) return -2;
        adfed_adam_rows(n, rows, values, width, param, exp_avg, exp_avg_sq, w1, w2, eps, value, negate);
        return 0;
    }
    int64_t k = group_rows(n, rows, NULL, values, width, num_rows);
    if (k < 0) return (int)k;
    adfed_adam_rows(k, scratch.ids, scratch.rows, width, param, exp_avg, exp_avg_sq, w1, w2, eps, value, negate);
    return 0;
}

/* multi_hot_mean's row-normalised count matrix, out[n][num_rows] (zeroed here): bag b
 * holds the next lengths[b] of the nnz values (bags back to back from 0), and
 * out[b][v] = (times v occurs in bag b) / max(lengths[b], 1), the count added up 1.0f at
 * a time, as torch's index_put_(accumulate=True) then division. Returns -1; or the
 * position of the first value outside [0, num_rows); or -2 when the lengths are negative
 * or do not add up to nnz (out is incomplete then).
 */
int64_t adfed_bag_counts(int64_t n, int64_t nnz, const int64_t *values, const int64_t *lengths,
                         int64_t num_rows, float *out) {
    memset(out, 0, (size_t)(n * num_rows) * sizeof(float));
    int64_t j = 0;
    for (int64_t b = 0; b < n; b++) {
        if (lengths[b] < 0 || lengths[b] > nnz - j) return -2;
        float *restrict row = out + b * num_rows;
        for (int64_t end = j + lengths[b]; j < end; j++) {
            int64_t v = values[j];
            if (v < 0 || v >= num_rows) return j;
            row[v] += 1.0f;
        }
        float len = (float)(lengths[b] > 1 ? lengths[b] : 1);
        for (int64_t v = 0; v < num_rows; v++) row[v] = row[v] / len;
    }
    return j == nnz ? -1 : -2;
}

/* VocabMatch's counts, out[n]: bag b holds the next lengths[b] of the nnz values (bags
 * back to back from 0), and out[b] = how many of them equal ids[b] (an exact integer in
 * float32, as the torch path's sum of 1.0f hits). Returns -1; or -2 when the lengths are
 * negative or do not add up to nnz (out is incomplete then).
 */
int64_t adfed_bag_matches(int64_t n, int64_t nnz, const int64_t *values, const int64_t *lengths,
                          const int64_t *ids, float *out) {
    int64_t j = 0;
    for (int64_t b = 0; b < n; b++) {
        if (lengths[b] < 0 || lengths[b] > nnz - j) return -2;
        int64_t hits = 0, id = ids[b];
        for (int64_t end = j + lengths[b]; j < end; j++) hits += values[j] == id;
        out[b] = (float)hits;
    }
    return j == nnz ? -1 : -2;
}

/* A dense table's gradient from the gradients of its reads: out[num_rows][width] (zeroed
 * here), out[ids[j]] += src[source[j]] (src[j] when source is NULL) for j = 0..n-1 in
 * order, each row summed from zero in position order, as torch's index_add_ on a CPU.
 * Returns -1, or the position of the first id outside [0, num_rows) (out incomplete).
 */
VECTOR_CLONES
int64_t adfed_index_add(int64_t n, const int64_t *ids, const int64_t *source, const float *src,
                        int64_t width, int64_t num_rows, float *restrict out) {
    memset(out, 0, (size_t)(num_rows * width) * sizeof(float));
    for (int64_t j = 0; j < n; j++) {
        int64_t id = ids[j];
        if (id < 0 || id >= num_rows) return j;
        float *restrict a = out + id * width;
        const float *restrict x = src + (source ? source[j] : j) * width;
        for (int64_t c = 0; c < width; c++) a[c] += x[c];
    }
    return -1;
}

/*
 * gguf_writer.h - a minimal GGUF v3 writer for tests that need a model file
 * with known contents: metadata (u32, f32, string, string array) and 2-D
 * tensors in F32, F16, Q8_0 or Q4_1, quantized here from floats.
 *
 * Written from the GGUF specification (ggml/docs/gguf.md) and ggml's block
 * layouts, not from model/gguf.c or kernels/cpu/quant.c, so a file it writes
 * checks the reader rather than mirroring it:
 *   "GGUF" u32 version u64 n_tensors u64 n_kv, then n_kv key/values
 *   (u64-length string key, u32 type, value), then tensor infos (name,
 *   u32 n_dims, u64 ne[n_dims], u32 type, u64 offset from the data start),
 *   zero padding to the alignment (32), then the tensor data, each tensor
 *   at an aligned offset.
 * Blocks of 32 elements along ne[0]:
 *   Q8_0: fp16 d, int8 q[32];            x = d * q
 *   Q4_1: fp16 d, fp16 m, u8 qs[16];     x = d * q + m, q of element j in
 *         the low nibble of qs[j], of element j + 16 in the high nibble.
 *
 * Header-only (static functions) so each test includes it directly. Errors
 * (out of memory, write failure) make gw_write return nonzero; an allocation
 * failure while building is remembered and reported there.
 */
#ifndef EKV_TEST_GGUF_WRITER_H
#define EKV_TEST_GGUF_WRITER_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    GW_T_F32 = 0,
    GW_T_F16 = 1,
    GW_T_Q4_1 = 3,
    GW_T_Q8_0 = 8,
};

enum { GW_V_UINT32 = 4, GW_V_FLOAT32 = 6, GW_V_STRING = 8, GW_V_ARRAY = 9 };

#define GW_ALIGN 32
#define GW_QK 32

typedef struct gw_buf {
    uint8_t *p;
    size_t n, cap;
    int oom;
} gw_buf;

typedef struct gw_tensor {
    char name[96];
    uint32_t type;
    uint64_t ne0, ne1;
    uint8_t *data;
    size_t nbytes;
} gw_tensor;

typedef struct gguf_writer {
    gw_buf kv;
    uint64_t n_kv;
    gw_tensor *t;
    size_t n_t, cap_t;
    int oom;
} gguf_writer;

static void gw_put(gw_buf *b, const void *p, size_t n)
{
    if (b->oom)
        return;
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n)
            cap *= 2;
        uint8_t *q = realloc(b->p, cap);
        if (!q) {
            b->oom = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, p, n);
    b->n += n;
}

static void gw_put_u32(gw_buf *b, uint32_t v) { gw_put(b, &v, 4); }
static void gw_put_u64(gw_buf *b, uint64_t v) { gw_put(b, &v, 8); }

static void gw_put_str(gw_buf *b, const char *s)
{
    gw_put_u64(b, (uint64_t)strlen(s));
    gw_put(b, s, strlen(s));
}

static void gw_key(gguf_writer *w, const char *key, uint32_t type)
{
    gw_put_str(&w->kv, key);
    gw_put_u32(&w->kv, type);
    w->n_kv++;
}

static void gw_kv_u32(gguf_writer *w, const char *key, uint32_t v)
{
    gw_key(w, key, GW_V_UINT32);
    gw_put_u32(&w->kv, v);
}

static void gw_kv_f32(gguf_writer *w, const char *key, float v)
{
    gw_key(w, key, GW_V_FLOAT32);
    gw_put(&w->kv, &v, 4);
}

static void gw_kv_str(gguf_writer *w, const char *key, const char *v)
{
    gw_key(w, key, GW_V_STRING);
    gw_put_str(&w->kv, v);
}

static void gw_kv_str_array(gguf_writer *w, const char *key, const char *const *v, uint64_t n)
{
    gw_key(w, key, GW_V_ARRAY);
    gw_put_u32(&w->kv, GW_V_STRING);
    gw_put_u64(&w->kv, n);
    for (uint64_t i = 0; i < n; i++)
        gw_put_str(&w->kv, v[i]);
}

/* IEEE binary16 from binary32, round to nearest even; overflow gives inf. */
static uint16_t gw_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    const int32_t e = (int32_t)(ax >> 23) - 127 + 15; /* biased fp16 exponent */
    uint32_t mant = (ax & 0x7fffffu) | 0x800000u;  /* 24 significant bits */
    if (e >= 31)
        return (uint16_t)(sign | 0x7c00u);
    int shift = 13;   /* normal: keep 11 of the 24 bits */
    uint32_t base = 0;
    if (e <= 0) {     /* subnormal: fewer bits survive */
        shift = 14 - e;
        if (shift > 25)
            return sign;
    } else {
        base = (uint32_t)e << 10;
        mant &= 0x7fffffu; /* the implicit bit is in the exponent */
    }
    uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1)))
        q++;
    /* a mantissa carry rolls into the exponent, which is what fp16 wants */
    return (uint16_t)(sign | (base + q));
}

/* Exact binary16 to binary32. */
static float gw_f16_to_f32(uint16_t h)
{
    const int sign = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0)
        v = ldexpf((float)m, -24);
    else if (e == 31)
        v = m ? NAN : INFINITY;
    else
        v = ldexpf((float)(m | 1024), e - 25);
    return sign ? -v : v;
}

static size_t gw_row_bytes(uint32_t type, uint64_t k)
{
    switch (type) {
    case GW_T_F32: return (size_t)k * 4;
    case GW_T_F16: return (size_t)k * 2;
    case GW_T_Q8_0: return (size_t)(k / GW_QK) * 34;
    case GW_T_Q4_1: return (size_t)(k / GW_QK) * 20;
    default: return 0;
    }
}

/* Encodes one row of k floats (k a multiple of 32 for the block types). */
static void gw_encode_row(uint32_t type, const float *x, uint64_t k, uint8_t *out)
{
    switch (type) {
    case GW_T_F32:
        memcpy(out, x, (size_t)k * 4);
        return;
    case GW_T_F16:
        for (uint64_t j = 0; j < k; j++) {
            uint16_t h = gw_f32_to_f16(x[j]);
            memcpy(out + 2 * j, &h, 2);
        }
        return;
    case GW_T_Q8_0:
        for (uint64_t b = 0; b < k / GW_QK; b++, x += GW_QK, out += 34) {
            float amax = 0.0f;
            for (int j = 0; j < GW_QK; j++)
                amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;
            const uint16_t dh = gw_f32_to_f16(amax / 127.0f);
            const float d = gw_f16_to_f32(dh);
            memcpy(out, &dh, 2);
            for (int j = 0; j < GW_QK; j++) {
                long q = d > 0.0f ? lroundf(x[j] / d) : 0;
                q = q > 127 ? 127 : q < -127 ? -127 : q;
                out[2 + j] = (uint8_t)(int8_t)q;
            }
        }
        return;
    case GW_T_Q4_1:
        for (uint64_t b = 0; b < k / GW_QK; b++, x += GW_QK, out += 20) {
            float lo = x[0], hi = x[0];
            for (int j = 1; j < GW_QK; j++) {
                lo = x[j] < lo ? x[j] : lo;
                hi = x[j] > hi ? x[j] : hi;
            }
            const uint16_t dh = gw_f32_to_f16((hi - lo) / 15.0f), mh = gw_f32_to_f16(lo);
            const float d = gw_f16_to_f32(dh), m = gw_f16_to_f32(mh);
            memcpy(out, &dh, 2);
            memcpy(out + 2, &mh, 2);
            uint8_t q[GW_QK];
            for (int j = 0; j < GW_QK; j++) {
                long v = d > 0.0f ? lroundf((x[j] - m) / d) : 0;
                q[j] = (uint8_t)(v < 0 ? 0 : v > 15 ? 15 : v);
            }
            for (int j = 0; j < GW_QK / 2; j++)
                out[4 + j] = (uint8_t)(q[j] | (q[j + GW_QK / 2] << 4));
        }
        return;
    }
}

/* Adds a tensor of ne1 rows of ne0 floats (ne1 == 1: a 1-D tensor), encoded
 * as type. The data is copied. */
static void gw_tensor_add(gguf_writer *w, const char *name, uint32_t type, uint64_t ne0,
                          uint64_t ne1, const float *x)
{
    if (w->oom)
        return;
    if (w->n_t == w->cap_t) {
        size_t cap = w->cap_t ? 2 * w->cap_t : 16;
        gw_tensor *t = realloc(w->t, cap * sizeof *t);
        if (!t) {
            w->oom = 1;
            return;
        }
        w->t = t;
        w->cap_t = cap;
    }
    gw_tensor *t = &w->t[w->n_t];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->type = type;
    t->ne0 = ne0;
    t->ne1 = ne1;
    const size_t rb = gw_row_bytes(type, ne0);
    t->nbytes = rb * (size_t)ne1;
    t->data = malloc(t->nbytes ? t->nbytes : 1);
    if (!t->data) {
        w->oom = 1;
        return;
    }
    for (uint64_t r = 0; r < ne1; r++)
        gw_encode_row(type, x + r * ne0, ne0, t->data + r * rb);
    w->n_t++;
}

static const gw_tensor *gw_tensor_find(const gguf_writer *w, const char *name)
{
    for (size_t i = 0; i < w->n_t; i++)
        if (!strcmp(w->t[i].name, name))
            return &w->t[i];
    return NULL;
}

static size_t gw_pad(size_t n) { return (n + GW_ALIGN - 1) / GW_ALIGN * GW_ALIGN; }

/* Writes the file; 0 on success. */
static int gw_write(const gguf_writer *w, const char *path)
{
    if (w->oom || w->kv.oom)
        return -1;
    gw_buf h = {0};
    gw_put(&h, "GGUF", 4);
    gw_put_u32(&h, 3);
    gw_put_u64(&h, (uint64_t)w->n_t);
    gw_put_u64(&h, w->n_kv);
    gw_put(&h, w->kv.p, w->kv.n);
    size_t off = 0;
    for (size_t i = 0; i < w->n_t; i++) {
        const gw_tensor *t = &w->t[i];
        gw_put_str(&h, t->name);
        const uint32_t n_dims = t->ne1 == 1 ? 1 : 2;
        gw_put_u32(&h, n_dims);
        gw_put_u64(&h, t->ne0);
        if (n_dims == 2)
            gw_put_u64(&h, t->ne1);
        gw_put_u32(&h, t->type);
        gw_put_u64(&h, (uint64_t)off);
        off = gw_pad(off + t->nbytes);
    }
    static const uint8_t zeros[GW_ALIGN];
    gw_put(&h, zeros, gw_pad(h.n) - h.n);
    int rc = h.oom ? -1 : 0;
    FILE *f = rc ? NULL : fopen(path, "wb");
    if (!f)
        rc = -1;
    if (f && fwrite(h.p, 1, h.n, f) != h.n)
        rc = -1;
    for (size_t i = 0; f && !rc && i < w->n_t; i++) {
        const gw_tensor *t = &w->t[i];
        if (fwrite(t->data, 1, t->nbytes, f) != t->nbytes ||
            fwrite(zeros, 1, gw_pad(t->nbytes) - t->nbytes, f) != gw_pad(t->nbytes) - t->nbytes)
            rc = -1;
    }
    if (f && fclose(f))
        rc = -1;
    free(h.p);
    return rc;
}

static void gw_free(gguf_writer *w)
{
    for (size_t i = 0; i < w->n_t; i++)
        free(w->t[i].data);
    free(w->t);
    free(w->kv.p);
    memset(w, 0, sizeof *w);
}

#endif

/*
 * gguf.c - the GGUF (v2, v3) reader: maps a file and validates its header.
 *
 * The whole header is parsed once, up front, by a bounds-checked cursor
 * (struct reader). Every length or count read from the file is compared with
 * the bytes that remain before it is used, and every allocation is sized by
 * entries already parsed (or by a count proven to fit in the remaining bytes),
 * so a hostile file cannot make us allocate more than a small multiple of its
 * own size. After gguf_open succeeds the index (kvs, tensors, two name indexes)
 * is immutable and every accessor is a bounds-checked lookup.
 *
 * Layout (all little-endian, read with memcpy so unaligned input is fine):
 *   "GGUF" u32 version u64 n_tensors u64 n_kv
 *   n_kv x      { str key, u32 type, value }
 *   n_tensors x { str name, u32 n_dims, n_dims x u64 ne, u32 type, u64 offset }
 *   padding to general.alignment (default 32), then the tensor data.
 * A string is u64 len + bytes; an array is u32 elem type + u64 count + elems.
 */
#include "entrokv/gguf.h"

#include "entrokv/dtype.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAGIC 0x46554747u /* "GGUF" read as little-endian u32 */
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_KEY_LEN 65535
#define GGUF_MAX_NEST 8 /* nested arrays deeper than this are rejected */

/* printf arguments for "%.*s" showing at most 64 bytes of a file string. */
#define SHOWN(s) (int)((s).len < 64 ? (s).len : 64), (s).ptr

/* The smallest possible encodings, used to bound counts before looping. */
#define MIN_KV_BYTES 14     /* key len + 1-byte key + type + 1-byte value */
#define MIN_TENSOR_BYTES 33 /* name len + 1-byte name + n_dims + one ne + type + offset */
#define MIN_ARRAY_BYTES 12  /* elem type + count */

struct gguf_file {
    const uint8_t *base;
    uint64_t size;
    bool mapped; /* base came from mmap and must be unmapped */

    uint32_t version;
    uint64_t alignment;
    uint64_t data_start; /* absolute offset of the data section */

    uint64_t n_kv;
    gguf_kv *kvs;
    uint64_t n_tensors;
    gguf_tensor *tensors;

    /* Names sorted for lookup; each points at the first member of a kv or tensor. */
    const gguf_str **kv_index;
    const gguf_str **tensor_index;
};

/* ---- the bounded cursor ---- */

typedef struct reader {
    const uint8_t *buf;
    uint64_t size;
    uint64_t pos;
    ekv_error *err;
} reader;

static uint64_t rd_left(const reader *r) { return r->size - r->pos; }

static ekv_status rd_bytes(reader *r, void *out, uint64_t n, const char *what)
{
    if (n > rd_left(r))
        return ekv_error_set(r->err, EKV_EFORMAT,
                             "truncated at offset %" PRIu64 ": %s needs %" PRIu64
                             " bytes, %" PRIu64 " left",
                             r->pos, what, n, rd_left(r));
    memcpy(out, r->buf + r->pos, (size_t)n);
    r->pos += n;
    return EKV_OK;
}

/* The file is little-endian; so is every host we build for (x86-64, aarch64).
 * A big-endian port would byte-swap here and nowhere else. */
static ekv_status rd_u32(reader *r, uint32_t *out, const char *w) { return rd_bytes(r, out, 4, w); }
static ekv_status rd_u64(reader *r, uint64_t *out, const char *w) { return rd_bytes(r, out, 8, w); }

static ekv_status rd_str(reader *r, gguf_str *out, const char *what)
{
    uint64_t len = 0;
    ekv_status rc = rd_u64(r, &len, what);
    if (rc != EKV_OK)
        return rc;
    if (len > rd_left(r))
        return ekv_error_set(r->err, EKV_EFORMAT,
                             "%s at offset %" PRIu64 ": string length %" PRIu64
                             " exceeds the %" PRIu64 " bytes left",
                             what, r->pos - 8, len, rd_left(r));
    out->ptr = (const char *)r->buf + r->pos;
    out->len = len;
    r->pos += len;
    return EKV_OK;
}

/* ---- value types ---- */

/* Bytes of a fixed-size value type, 0 for STRING, ARRAY and unknown types. */
static uint64_t type_size(uint32_t t)
{
    switch (t) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
    case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
    case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
    case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
    default: return 0;
    }
}

static bool type_known(uint32_t t) { return t <= GGUF_TYPE_FLOAT64; }

static bool type_is_uint(uint32_t t)
{
    return t == GGUF_TYPE_UINT8 || t == GGUF_TYPE_UINT16 || t == GGUF_TYPE_UINT32 ||
           t == GGUF_TYPE_UINT64;
}

static bool type_is_sint(uint32_t t)
{
    return t == GGUF_TYPE_INT8 || t == GGUF_TYPE_INT16 || t == GGUF_TYPE_INT32 ||
           t == GGUF_TYPE_INT64;
}

/* Decodes one fixed-size element at p (type already validated) into the
 * widened union members. Shared by scalar kvs and array element getters.
 * The host is little-endian, so the low bytes of bits are the value. */
static void decode_scalar(uint32_t t, const uint8_t *p, uint64_t *u, int64_t *i, double *f)
{
    uint64_t n = type_size(t), bits = 0;
    float f32;
    memcpy(&bits, p, (size_t)n);
    *u = bits;
    if (type_is_sint(t) && n < 8 && (bits >> (8 * n - 1)) & 1)
        bits |= ~0ull << (8 * n); /* sign-extend */
    memcpy(i, &bits, sizeof *i);
    memcpy(&f32, &bits, sizeof f32);
    *f = 0;
    if (t == GGUF_TYPE_FLOAT32)
        *f = f32;
    else if (t == GGUF_TYPE_FLOAT64)
        memcpy(f, &bits, sizeof *f);
}

/* ---- arrays ---- */

/* Parses (out != NULL) or skips (out == NULL) an array body at r. String
 * arrays are walked twice: once to prove every string fits, then once more
 * to fill the gguf_str table, so nothing is allocated for a truncated array.
 * Nested arrays are validated recursively, at most GGUF_MAX_NEST deep. */
static ekv_status read_array(reader *r, gguf_kv *out, int depth, const char *what)
{
    uint32_t et = 0;
    uint64_t n = 0;
    ekv_status rc;
    if (depth > GGUF_MAX_NEST)
        return ekv_error_set(r->err, EKV_EFORMAT, "%s: arrays nested deeper than %d",
                             what, GGUF_MAX_NEST);
    if ((rc = rd_u32(r, &et, what)) != EKV_OK || (rc = rd_u64(r, &n, what)) != EKV_OK)
        return rc;
    if (!type_known(et))
        return ekv_error_set(r->err, EKV_EFORMAT, "%s: unknown array element type %u", what,
                             et);
    uint64_t min_elem = et == GGUF_TYPE_STRING  ? 8
                        : et == GGUF_TYPE_ARRAY ? MIN_ARRAY_BYTES
                                                : type_size(et);
    if (n > rd_left(r) / min_elem)
        return ekv_error_set(r->err, EKV_EFORMAT,
                             "%s: array of %" PRIu64 " elements cannot fit in the %" PRIu64
                             " bytes left",
                             what, n, rd_left(r));
    if (out) {
        out->arr_type = (gguf_type)et;
        out->arr_len = n;
    }
    if (type_size(et)) {
        if (out)
            out->arr_data = r->buf + r->pos;
        r->pos += n * min_elem; /* proven to fit above */
        return EKV_OK;
    }
    uint64_t start = r->pos;
    for (uint64_t k = 0; k < n; k++) {
        gguf_str s;
        rc = et == GGUF_TYPE_STRING ? rd_str(r, &s, what) : read_array(r, NULL, depth + 1, what);
        if (rc != EKV_OK)
            return rc;
    }
    if (!out || et != GGUF_TYPE_STRING || n == 0)
        return EKV_OK;
    /* n <= file size / 8, so this is at most twice the array's own bytes. */
    gguf_str *strs = malloc((size_t)n * sizeof *strs);
    if (!strs)
        return ekv_error_set(r->err, EKV_ENOMEM, "%s: no memory for %" PRIu64 " strings", what, n);
    uint64_t end = r->pos;
    r->pos = start;
    for (uint64_t k = 0; k < n; k++)
        (void)rd_str(r, &strs[k], what); /* cannot fail: the first walk succeeded */
    r->pos = end;
    out->arr_strs = strs;
    return EKV_OK;
}

/* ---- key/value pairs ---- */

static ekv_status read_kv(reader *r, gguf_kv *kv, uint64_t idx)
{
    char what[128];
    uint32_t t = 0;
    ekv_status rc;
    snprintf(what, sizeof what, "kv %" PRIu64 " key", idx);
    if ((rc = rd_str(r, &kv->key, what)) != EKV_OK)
        return rc;
    if (kv->key.len == 0 || kv->key.len > GGUF_MAX_KEY_LEN)
        return ekv_error_set(r->err, EKV_EFORMAT,
                             "kv %" PRIu64 ": key length %" PRIu64 " not in 1..%d", idx,
                             kv->key.len, GGUF_MAX_KEY_LEN);
    snprintf(what, sizeof what, "kv '%.*s'", SHOWN(kv->key));
    if ((rc = rd_u32(r, &t, what)) != EKV_OK)
        return rc;
    if (!type_known(t))
        return ekv_error_set(r->err, EKV_EFORMAT, "%s: unknown value type %u", what, t);
    kv->type = (gguf_type)t;
    if (t == GGUF_TYPE_ARRAY)
        return read_array(r, kv, 0, what);
    if (t == GGUF_TYPE_STRING)
        return rd_str(r, &kv->val.s, what);

    uint8_t raw[8] = {0};
    uint64_t u;
    int64_t i;
    double f;
    if ((rc = rd_bytes(r, raw, type_size(t), what)) != EKV_OK)
        return rc;
    decode_scalar(t, raw, &u, &i, &f);
    if (t == GGUF_TYPE_BOOL)
        kv->val.b = u != 0;
    else if (type_is_uint(t))
        kv->val.u = u;
    else if (type_is_sint(t))
        kv->val.i = i;
    else
        kv->val.f = f;
    return EKV_OK;
}

/* ---- sorted name index over keys and tensor names ----
 *
 * Pointers to the names, sorted, then binary search: O(n log n) to build and
 * O(log n) to look up whatever the names are, where a hash table could be
 * driven quadratic by a file full of crafted collisions. Duplicates end up
 * adjacent, which is how they are found. */

_Static_assert(offsetof(gguf_kv, key) == 0, "index casts a key back to its kv");
_Static_assert(offsetof(gguf_tensor, name) == 0, "index casts a name back to its tensor");

static int str_cmp(const char *a, uint64_t alen, const char *b, uint64_t blen)
{
    uint64_t n = alen < blen ? alen : blen;
    int c = n ? memcmp(a, b, (size_t)n) : 0; /* an empty gguf_str may have a NULL ptr */
    return c ? c : (alen > blen) - (alen < blen);
}

static int cmp_names(const void *a, const void *b)
{
    const gguf_str *x = *(const gguf_str *const *)a, *y = *(const gguf_str *const *)b;
    return str_cmp(x->ptr, x->len, y->ptr, y->len);
}

/* Sorts pointers to the names heading the n structs of size stride at base.
 * *dup is one of a pair of equal names, or NULL. */
static ekv_status index_build(const void *base, size_t stride, uint64_t n,
                              const gguf_str ***out, const gguf_str **dup, ekv_error *err)
{
    *dup = NULL;
    if (n == 0)
        return EKV_OK;
    const gguf_str **idx = malloc((size_t)n * sizeof *idx);
    if (!idx)
        return ekv_error_set(err, EKV_ENOMEM, "no memory for a %" PRIu64 "-entry index", n);
    for (uint64_t i = 0; i < n; i++)
        idx[i] = (const gguf_str *)((const char *)base + i * stride);
    qsort(idx, (size_t)n, sizeof *idx, cmp_names);
    for (uint64_t i = 1; i < n && !*dup; i++)
        if (cmp_names(&idx[i - 1], &idx[i]) == 0)
            *dup = idx[i];
    *out = idx;
    return EKV_OK;
}

static const gguf_str *index_find(const gguf_str *const *idx, uint64_t n, const char *key)
{
    if (!idx || !key)
        return NULL;
    uint64_t klen = strlen(key), lo = 0, hi = n;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int c = str_cmp(idx[mid]->ptr, idx[mid]->len, key, klen);
        if (c == 0)
            return idx[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* ---- tensor infos ---- */

static ekv_status read_tensor(reader *r, gguf_tensor *t, uint64_t idx)
{
    char what[128];
    ekv_status rc;
    snprintf(what, sizeof what, "tensor %" PRIu64 " name", idx);
    if ((rc = rd_str(r, &t->name, what)) != EKV_OK)
        return rc;
    if (t->name.len == 0 || t->name.len > GGUF_MAX_KEY_LEN)
        return ekv_error_set(r->err, EKV_EFORMAT,
                             "tensor %" PRIu64 ": name length %" PRIu64 " not in 1..%d", idx,
                             t->name.len, GGUF_MAX_KEY_LEN);
    snprintf(what, sizeof what, "tensor '%.*s'", SHOWN(t->name));
    if ((rc = rd_u32(r, &t->n_dims, what)) != EKV_OK)
        return rc;
    if (t->n_dims == 0 || t->n_dims > GGUF_MAX_DIMS)
        return ekv_error_set(r->err, EKV_EFORMAT, "%s: n_dims %u not in 1..%d", what,
                             t->n_dims, GGUF_MAX_DIMS);
    uint64_t nelem = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) {
        t->ne[d] = 1;
        if (d < t->n_dims && (rc = rd_u64(r, &t->ne[d], what)) != EKV_OK)
            return rc;
        /* Kernels index with int64, so the element count must fit in one. */
        if (t->ne[d] == 0 || t->ne[d] > (uint64_t)INT64_MAX / nelem)
            return ekv_error_set(r->err, EKV_EFORMAT,
                                 "%s: dimension %u (%" PRIu64 ") is zero or the element count "
                                 "overflows",
                                 what, d, t->ne[d]);
        nelem *= t->ne[d];
    }
    if ((rc = rd_u32(r, &t->type, what)) != EKV_OK || (rc = rd_u64(r, &t->offset, what)) != EKV_OK)
        return rc;
    const ekv_dtype_info *info = ekv_dtype_get(t->type);
    if (!info)
        return ekv_error_set(r->err, EKV_EUNSUPPORTED, "%s: unknown tensor type %u", what,
                             t->type);
    uint64_t row = 0;
    if (!ekv_dtype_row_bytes(t->type, t->ne[0], &row))
        return ekv_error_set(r->err, EKV_EFORMAT,
                             "%s: row of %" PRIu64 " elements is not a whole number of %s blocks "
                             "(%u elements each)",
                             what, t->ne[0], info->name, info->block_elems);
    uint64_t rows = nelem / t->ne[0];
    if (row > UINT64_MAX / rows)
        return ekv_error_set(r->err, EKV_EFORMAT, "%s: byte size overflows", what);
    t->nbytes = row * rows;
    return EKV_OK;
}

static int cmp_by_offset(const void *a, const void *b)
{
    const gguf_tensor *x = *(const gguf_tensor *const *)a, *y = *(const gguf_tensor *const *)b;
    return x->offset < y->offset ? -1 : x->offset > y->offset;
}

/* Places every tensor inside the data section and rejects misaligned,
 * out-of-file and overlapping data. Runs after alignment is known. */
static ekv_status place_tensors(gguf_file *f, ekv_error *err)
{
    ekv_status rc = EKV_OK;
    const gguf_tensor **order = NULL;
    uint64_t room = f->data_start <= f->size ? f->size - f->data_start : 0;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        if (t->offset % f->alignment)
            return ekv_error_set(err, EKV_EFORMAT,
                                 "tensor '%.*s': offset %" PRIu64 " is not a multiple of the "
                                 "alignment %" PRIu64,
                                 SHOWN(t->name), t->offset, f->alignment);
        if (t->offset > room || t->nbytes > room - t->offset)
            return ekv_error_set(err, EKV_EFORMAT,
                                 "tensor '%.*s': data [%" PRIu64 ", +%" PRIu64
                                 ") lies outside the %" PRIu64 "-byte data section",
                                 SHOWN(t->name), t->offset, t->nbytes, room);
        t->data = f->base + f->data_start + t->offset;
    }
    if (f->n_tensors < 2)
        return EKV_OK;
    /* Sorted by offset, each tensor must end before the next one starts. */
    order = malloc((size_t)f->n_tensors * sizeof *order);
    if (!order)
        return ekv_error_set(err, EKV_ENOMEM, "no memory to sort %" PRIu64 " tensors",
                             f->n_tensors);
    for (uint64_t i = 0; i < f->n_tensors; i++)
        order[i] = &f->tensors[i];
    qsort(order, (size_t)f->n_tensors, sizeof *order, cmp_by_offset);
    for (uint64_t i = 1; i < f->n_tensors; i++) {
        const gguf_tensor *a = order[i - 1], *b = order[i];
        if (a->offset + a->nbytes > b->offset) { /* both are inside the file: no overflow */
            rc = ekv_error_set(err, EKV_EFORMAT, "tensors '%.*s' and '%.*s' overlap",
                               SHOWN(a->name), SHOWN(b->name));
            goto out;
        }
    }
out:
    free(order);
    return rc;
}

/* ---- whole-file parse ---- */

/* Grows *arr (of *cap elements of size sz) so it holds at least need. Growth
 * follows the entries actually parsed, never the count the file claims. */
static bool grow(void **arr, uint64_t *cap, uint64_t need, size_t sz)
{
    if (need <= *cap)
        return true;
    uint64_t ncap = *cap ? *cap * 2 : 16;
    void *p = realloc(*arr, (size_t)ncap * sz);
    if (!p)
        return false;
    memset((char *)p + *cap * sz, 0, (size_t)(ncap - *cap) * sz);
    *arr = p;
    *cap = ncap;
    return true;
}

static ekv_status parse_header(gguf_file *f, reader *r, uint64_t *n_tensors, uint64_t *n_kv)
{
    uint32_t magic = 0;
    ekv_status rc;
    if ((rc = rd_u32(r, &magic, "magic")) != EKV_OK)
        return rc;
    if (magic != GGUF_MAGIC)
        return ekv_error_set(r->err, EKV_EFORMAT, "not a GGUF file (magic 0x%08x)", magic);
    if ((rc = rd_u32(r, &f->version, "version")) != EKV_OK)
        return rc;
    if (f->version == 1)
        return ekv_error_set(r->err, EKV_EUNSUPPORTED,
                             "GGUF v1 (32-bit counts) is not supported; re-convert the model");
    if ((f->version & 0xffff) == 0 && f->version)
        return ekv_error_set(r->err, EKV_EUNSUPPORTED,
                             "GGUF version 0x%08x looks big-endian; only little-endian "
                             "files are supported",
                             f->version);
    if (f->version != 2 && f->version != 3)
        return ekv_error_set(r->err, EKV_EUNSUPPORTED, "GGUF version %u is not supported (2, 3)",
                             f->version);
    if ((rc = rd_u64(r, n_tensors, "tensor count")) != EKV_OK ||
        (rc = rd_u64(r, n_kv, "kv count")) != EKV_OK)
        return rc;
    uint64_t left = rd_left(r);
    if (*n_kv > left / MIN_KV_BYTES || *n_tensors > left / MIN_TENSOR_BYTES ||
        *n_kv * MIN_KV_BYTES + *n_tensors * MIN_TENSOR_BYTES > left)
        return ekv_error_set(r->err, EKV_EFORMAT,
                             "%" PRIu64 " kvs and %" PRIu64 " tensors cannot fit in the %" PRIu64
                             " bytes left",
                             *n_kv, *n_tensors, left);
    return EKV_OK;
}

static ekv_status parse(gguf_file *f, ekv_error *err)
{
    reader r = {.buf = f->base, .size = f->size, .pos = 0, .err = err};
    uint64_t n_tensors = 0, n_kv = 0, cap = 0;
    const gguf_str *dup = NULL;
    ekv_status rc;
    if ((rc = parse_header(f, &r, &n_tensors, &n_kv)) != EKV_OK)
        return rc;

    for (uint64_t i = 0; i < n_kv; i++) {
        if (!grow((void **)&f->kvs, &cap, i + 1, sizeof *f->kvs))
            return ekv_error_set(err, EKV_ENOMEM, "no memory for kv %" PRIu64, i);
        f->n_kv = i + 1; /* counted before parsing so close frees its strings */
        if ((rc = read_kv(&r, &f->kvs[i], i)) != EKV_OK)
            return rc;
    }
    rc = index_build(f->kvs, sizeof *f->kvs, f->n_kv, &f->kv_index, &dup, err);
    if (rc != EKV_OK)
        return rc;
    if (dup)
        return ekv_error_set(err, EKV_EFORMAT, "duplicate key '%.*s'", SHOWN(*dup));

    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    const gguf_kv *al = gguf_find_kv(f, "general.alignment");
    if (al) {
        if (al->type != GGUF_TYPE_UINT32)
            return ekv_error_set(err, EKV_EFORMAT, "general.alignment has type %u, not uint32",
                                 al->type);
        if (al->val.u == 0 || (al->val.u & (al->val.u - 1)))
            return ekv_error_set(err, EKV_EFORMAT,
                                 "general.alignment %" PRIu64 " is not a power of two", al->val.u);
        f->alignment = al->val.u;
    }

    cap = 0;
    for (uint64_t i = 0; i < n_tensors; i++) {
        if (!grow((void **)&f->tensors, &cap, i + 1, sizeof *f->tensors))
            return ekv_error_set(err, EKV_ENOMEM, "no memory for tensor %" PRIu64, i);
        if ((rc = read_tensor(&r, &f->tensors[i], i)) != EKV_OK)
            return rc;
        f->n_tensors = i + 1;
    }
    rc = index_build(f->tensors, sizeof *f->tensors, f->n_tensors, &f->tensor_index,
                     &dup, err);
    if (rc != EKV_OK)
        return rc;
    if (dup)
        return ekv_error_set(err, EKV_EFORMAT, "duplicate tensor name '%.*s'", SHOWN(*dup));

    /* r.pos <= size < 2^63 in practice and alignment <= 2^31: no overflow. */
    f->data_start = (r.pos + f->alignment - 1) / f->alignment * f->alignment;
    return place_tensors(f, err);
}

/* ---- open / close ---- */

static gguf_file *open_common(const uint8_t *base, uint64_t size, bool mapped, ekv_error *err)
{
    gguf_file *f = calloc(1, sizeof *f);
    if (!f) {
        if (mapped)
            munmap((void *)base, (size_t)size);
        ekv_error_set(err, EKV_ENOMEM, "no memory for gguf_file");
        return NULL;
    }
    f->base = base;
    f->size = size;
    f->mapped = mapped;
    if (parse(f, err) != EKV_OK) {
        gguf_close(f);
        return NULL;
    }
    return f;
}

gguf_file *gguf_open_buffer(const void *buf, size_t size, ekv_error *err)
{
    if (!buf && size) {
        ekv_error_set(err, EKV_EINVAL, "gguf_open_buffer: NULL buffer of %zu bytes", size);
        return NULL;
    }
    return open_common(buf, size, false, err);
}

gguf_file *gguf_open(const char *path, ekv_error *err)
{
    gguf_file *f = NULL;
    struct stat st;
    void *map;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        ekv_error_set(err, EKV_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) != 0) {
        ekv_error_set(err, EKV_EIO, "%s: fstat: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        ekv_error_set(err, EKV_EINVAL, "%s: not a regular file", path);
        goto out;
    }
    if (st.st_size < 24) { /* also keeps mmap away from an empty file */
        ekv_error_set(err, EKV_EFORMAT, "%s: %lld bytes is too short for a GGUF header", path,
                      (long long)st.st_size);
        goto out;
    }
    map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        ekv_error_set(err, EKV_EIO, "%s: mmap: %s", path, strerror(errno));
        goto out;
    }
    f = open_common(map, (uint64_t)st.st_size, true, err);
    if (!f)
        ekv_error_wrap(err, "%s", path);
out:
    close(fd); /* the mapping stays valid after close */
    return f;
}

void gguf_close(gguf_file *f)
{
    if (!f)
        return;
    for (uint64_t i = 0; i < f->n_kv; i++)
        free((void *)f->kvs[i].arr_strs);
    free(f->kvs);
    free(f->tensors);
    free(f->kv_index);
    free(f->tensor_index);
    if (f->mapped)
        munmap((void *)f->base, (size_t)f->size);
    free(f);
}

/* ---- accessors ---- */

uint32_t gguf_version(const gguf_file *f) { return f->version; }
uint64_t gguf_alignment(const gguf_file *f) { return f->alignment; }
uint64_t gguf_kv_count(const gguf_file *f) { return f->n_kv; }
uint64_t gguf_tensor_count(const gguf_file *f) { return f->n_tensors; }

const gguf_kv *gguf_kv_at(const gguf_file *f, uint64_t i)
{
    return i < f->n_kv ? &f->kvs[i] : NULL;
}

const gguf_tensor *gguf_tensor_at(const gguf_file *f, uint64_t i)
{
    return i < f->n_tensors ? &f->tensors[i] : NULL;
}

const gguf_kv *gguf_find_kv(const gguf_file *f, const char *key)
{
    return (const gguf_kv *)index_find(f->kv_index, f->n_kv, key);
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name)
{
    return (const gguf_tensor *)index_find(f->tensor_index, f->n_tensors, name);
}

bool gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out)
{
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv)
        return false;
    if (type_is_uint(kv->type) && kv->val.u <= UINT32_MAX) {
        *out = (uint32_t)kv->val.u;
        return true;
    }
    if (type_is_sint(kv->type) && kv->val.i >= 0 && kv->val.i <= (int64_t)UINT32_MAX) {
        *out = (uint32_t)kv->val.i;
        return true;
    }
    return false;
}

bool gguf_get_f32(const gguf_file *f, const char *key, float *out)
{
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv || (kv->type != GGUF_TYPE_FLOAT32 && kv->type != GGUF_TYPE_FLOAT64))
        return false;
    /* A finite double outside float's range does not fit; inf and nan pass. */
    double v = kv->val.f;
    if (isfinite(v) && fabs(v) > FLT_MAX)
        return false;
    *out = (float)v;
    return true;
}

bool gguf_get_bool(const gguf_file *f, const char *key, bool *out)
{
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv || kv->type != GGUF_TYPE_BOOL)
        return false;
    *out = kv->val.b;
    return true;
}

bool gguf_get_str(const gguf_file *f, const char *key, gguf_str *out)
{
    const gguf_kv *kv = gguf_find_kv(f, key);
    if (!kv || kv->type != GGUF_TYPE_STRING)
        return false;
    *out = kv->val.s;
    return true;
}

bool gguf_arr_get_i64(const gguf_kv *kv, uint64_t i, int64_t *out)
{
    if (!kv || kv->type != GGUF_TYPE_ARRAY || i >= kv->arr_len)
        return false;
    uint32_t t = kv->arr_type;
    if (!type_is_uint(t) && !type_is_sint(t))
        return false;
    uint64_t u;
    int64_t s;
    double d;
    decode_scalar(t, kv->arr_data + i * type_size(t), &u, &s, &d);
    if (type_is_uint(t)) {
        if (u > (uint64_t)INT64_MAX)
            return false; /* a uint64 above INT64_MAX does not fit */
        s = (int64_t)u;
    }
    *out = s;
    return true;
}

bool gguf_arr_get_f64(const gguf_kv *kv, uint64_t i, double *out)
{
    if (!kv || kv->type != GGUF_TYPE_ARRAY || i >= kv->arr_len)
        return false;
    if (kv->arr_type != GGUF_TYPE_FLOAT32 && kv->arr_type != GGUF_TYPE_FLOAT64)
        return false;
    uint64_t u;
    int64_t s;
    decode_scalar(kv->arr_type, kv->arr_data + i * type_size(kv->arr_type), &u, &s, out);
    return true;
}

bool gguf_arr_get_str(const gguf_kv *kv, uint64_t i, gguf_str *out)
{
    if (!kv || kv->type != GGUF_TYPE_ARRAY || kv->arr_type != GGUF_TYPE_STRING ||
        i >= kv->arr_len)
        return false;
    *out = kv->arr_strs[i];
    return true;
}

bool gguf_str_eq(gguf_str s, const char *c) { return c && !str_cmp(s.ptr, s.len, c, strlen(c)); }

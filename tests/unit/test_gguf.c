/*
 * test_gguf.c - the GGUF reader on synthetic files built here, on hostile
 * files that must fail with a clear error (never a crash or an over-read),
 * and on the demo model when it is present.
 *
 * The synthetic files come from a tiny writer (gw_*) so every case states the
 * bytes it feeds in. Buffers handed to gguf_open_buffer are shrunk to their
 * exact size first, so ASan reports any read past the end.
 */
#include "ekv_test.h"

#include "entrokv/dtype.h"
#include "entrokv/gguf.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- a minimal GGUF writer ---- */

typedef struct gw {
    uint8_t *b;
    size_t n, cap;
} gw;

static void gw_raw(gw *w, const void *p, size_t n)
{
    if (w->n + n > w->cap) {
        w->cap = (w->n + n) * 2 + 64;
        w->b = realloc(w->b, w->cap);
        if (!w->b)
            abort();
    }
    if (n)
        memcpy(w->b + w->n, p, n);
    w->n += n;
}

static void gw_u8(gw *w, uint8_t v) { gw_raw(w, &v, 1); }
static void gw_u16(gw *w, uint16_t v) { gw_raw(w, &v, 2); }
static void gw_u32(gw *w, uint32_t v) { gw_raw(w, &v, 4); }
static void gw_u64(gw *w, uint64_t v) { gw_raw(w, &v, 8); }
static void gw_f32(gw *w, float v) { gw_raw(w, &v, 4); }
static void gw_f64(gw *w, double v) { gw_raw(w, &v, 8); }

static void gw_str(gw *w, const char *s)
{
    gw_u64(w, strlen(s));
    gw_raw(w, s, strlen(s));
}

static void gw_key(gw *w, const char *key, uint32_t type)
{
    gw_str(w, key);
    gw_u32(w, type);
}

static void gw_arr_head(gw *w, const char *key, uint32_t elem_type, uint64_t n)
{
    gw_key(w, key, GGUF_TYPE_ARRAY);
    gw_u32(w, elem_type);
    gw_u64(w, n);
}

/* Gives the buffer exactly n bytes so ASan catches any over-read. */
static void gw_shrink(gw *w)
{
    uint8_t *p = malloc(w->n ? w->n : 1);
    if (!p)
        abort();
    memcpy(p, w->b, w->n);
    free(w->b);
    w->b = p;
    w->cap = w->n;
}

static void gw_free(gw *w)
{
    free(w->b);
    memset(w, 0, sizeof *w);
}

typedef struct tspec {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    uint64_t offset;
} tspec;

static uint64_t tspec_bytes(const tspec *t)
{
    uint64_t row = 0, rows = 1;
    if (!ekv_dtype_row_bytes(t->type, t->ne[0], &row))
        abort();
    for (uint32_t d = 1; d < t->n_dims; d++)
        rows *= t->ne[d];
    return row * rows;
}

/* Packs tensors back to back at multiples of align; returns the data size. */
static uint64_t tspec_pack(tspec *t, size_t nt, uint64_t align)
{
    uint64_t off = 0;
    for (size_t i = 0; i < nt; i++) {
        off = (off + align - 1) / align * align;
        t[i].offset = off;
        off += tspec_bytes(&t[i]);
    }
    return off;
}

/* A whole file: header, the n_kv kvs pre-encoded in kvs, tensor infos,
 * padding to align, data_bytes of data (byte k of the section is k*7+1). */
static void gw_file(gw *w, uint32_t version, const gw *kvs, uint64_t n_kv, const tspec *t,
                    size_t nt, uint64_t align, uint64_t data_bytes)
{
    gw_raw(w, "GGUF", 4);
    gw_u32(w, version);
    gw_u64(w, nt);
    gw_u64(w, n_kv);
    gw_raw(w, kvs->b, kvs->n);
    for (size_t i = 0; i < nt; i++) {
        gw_str(w, t[i].name);
        gw_u32(w, t[i].n_dims);
        for (uint32_t d = 0; d < t[i].n_dims; d++)
            gw_u64(w, d < 4 ? t[i].ne[d] : 1); /* n_dims may be hostile */
        gw_u32(w, t[i].type);
        gw_u64(w, t[i].offset);
    }
    while (w->n % align)
        gw_u8(w, 0);
    for (uint64_t k = 0; k < data_bytes; k++)
        gw_u8(w, (uint8_t)(k * 7 + 1));
    gw_shrink(w);
}

/* ---- the rich valid file every positive test reads ---- */

#define RICH_NKV 21
static tspec rich_tensors[] = {
    {"tok", 2, {8, 2, 1, 1}, EKV_F32, 0},
    {"q8", 2, {64, 3, 1, 1}, EKV_Q8_0, 0},
    {"q4k", 1, {256, 1, 1, 1}, EKV_Q4_K, 0},
    {"f16", 4, {4, 3, 2, 1}, EKV_F16, 0},
    {"q41", 3, {32, 1, 2, 1}, EKV_Q4_1, 0},
};
#define RICH_NT (sizeof rich_tensors / sizeof rich_tensors[0])

/* align 0 omits general.alignment (default 32); it still counts in RICH_NKV
 * as a plain u32 under another key so the kv count never changes. */
static void build_rich(gw *w, uint32_t version, uint32_t align)
{
    gw kv = {0};
    gw_key(&kv, "general.architecture", GGUF_TYPE_STRING);
    gw_str(&kv, "llama");
    gw_key(&kv, align ? "general.alignment" : "t.not_alignment", GGUF_TYPE_UINT32);
    gw_u32(&kv, align ? align : 7);
    gw_key(&kv, "t.u8", GGUF_TYPE_UINT8), gw_u8(&kv, 200);
    gw_key(&kv, "t.i8", GGUF_TYPE_INT8), gw_u8(&kv, (uint8_t)-100);
    gw_key(&kv, "t.u16", GGUF_TYPE_UINT16), gw_u16(&kv, 60000);
    gw_key(&kv, "t.i16", GGUF_TYPE_INT16), gw_u16(&kv, (uint16_t)-30000);
    gw_key(&kv, "t.u32", GGUF_TYPE_UINT32), gw_u32(&kv, 4000000000u);
    gw_key(&kv, "t.i32", GGUF_TYPE_INT32), gw_u32(&kv, (uint32_t)-2000000000);
    gw_key(&kv, "t.f32", GGUF_TYPE_FLOAT32), gw_f32(&kv, 1.5f);
    gw_key(&kv, "t.bool", GGUF_TYPE_BOOL), gw_u8(&kv, 1);
    gw_key(&kv, "t.str", GGUF_TYPE_STRING), gw_str(&kv, "h\xc3\xa9llo");
    gw_key(&kv, "t.u64", GGUF_TYPE_UINT64), gw_u64(&kv, (1ull << 63) + 5);
    gw_key(&kv, "t.i64", GGUF_TYPE_INT64), gw_u64(&kv, (uint64_t)-(1ll << 62));
    gw_key(&kv, "t.f64", GGUF_TYPE_FLOAT64), gw_f64(&kv, 1e300);
    gw_arr_head(&kv, "t.arr_i32", GGUF_TYPE_INT32, 3);
    gw_u32(&kv, 1), gw_u32(&kv, (uint32_t)-2), gw_u32(&kv, 3);
    gw_arr_head(&kv, "t.arr_f32", GGUF_TYPE_FLOAT32, 2);
    gw_f32(&kv, 0.5f), gw_f32(&kv, -1.25f);
    gw_arr_head(&kv, "t.arr_str", GGUF_TYPE_STRING, 3);
    gw_str(&kv, "a"), gw_str(&kv, ""), gw_str(&kv, "<|im_start|>");
    gw_arr_head(&kv, "t.arr_nested", GGUF_TYPE_ARRAY, 2); /* [[1, 2], ["x"]] */
    gw_u32(&kv, GGUF_TYPE_UINT8), gw_u64(&kv, 2), gw_u8(&kv, 1), gw_u8(&kv, 2);
    gw_u32(&kv, GGUF_TYPE_STRING), gw_u64(&kv, 1), gw_str(&kv, "x");
    gw_arr_head(&kv, "t.arr_empty", GGUF_TYPE_UINT32, 0);
    gw_arr_head(&kv, "t.arr_u64", GGUF_TYPE_UINT64, 2);
    gw_u64(&kv, UINT64_MAX), gw_u64(&kv, 42);
    gw_arr_head(&kv, "t.arr_f64", GGUF_TYPE_FLOAT64, 1), gw_f64(&kv, -2.5);
    uint64_t a = align ? align : 32;
    uint64_t data = tspec_pack(rich_tensors, RICH_NT, a);
    gw_file(w, version, &kv, RICH_NKV, rich_tensors, RICH_NT, a, data);
    gw_free(&kv);
}

/* Touches everything an open file exposes; used on every file that opens. */
static uint64_t walk_all(const gguf_file *f)
{
    uint64_t sum = 0;
    for (uint64_t i = 0; i < gguf_kv_count(f); i++) {
        const gguf_kv *kv = gguf_kv_at(f, i);
        sum += kv->key.len ? (uint8_t)kv->key.ptr[kv->key.len - 1] : 0;
        for (uint64_t k = 0; kv->type == GGUF_TYPE_ARRAY && k < kv->arr_len; k++) {
            int64_t iv;
            double dv;
            gguf_str sv;
            if (gguf_arr_get_i64(kv, k, &iv))
                sum += (uint64_t)iv;
            if (gguf_arr_get_f64(kv, k, &dv))
                sum += dv == dv;
            if (gguf_arr_get_str(kv, k, &sv) && sv.len)
                sum += (uint8_t)sv.ptr[sv.len - 1];
        }
    }
    for (uint64_t i = 0; i < gguf_tensor_count(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        const uint8_t *d = t->data;
        sum += d[0] + d[t->nbytes - 1];
    }
    return sum;
}

/* Opens the exact-size buffer and expects failure with code and a message
 * containing what. */
static void expect_fail(gw *w, ekv_status code, const char *what, int line)
{
    ekv_error err = {0};
    gguf_file *f = gguf_open_buffer(w->b, w->n, &err);
    if (f || err.code != code || !strstr(err.msg, what)) {
        fprintf(stderr, "%s:%d: expected failure %d '%s', got %s code %d '%s'\n", __FILE__,
                line, (int)code, what, f ? "success" : "failure", (int)err.code, err.msg);
        ekv_test_failures++;
    }
    gguf_close(f);
    gw_free(w);
}
#define EXPECT_FAIL(w, code, what) expect_fail((w), (code), (what), __LINE__)

/* ---- positive tests ---- */

static void check_rich(const gguf_file *f, uint32_t version, uint64_t align)
{
    CHECK_EQ_INT(gguf_version(f), version);
    CHECK_EQ_INT(gguf_alignment(f), align);
    CHECK_EQ_INT(gguf_kv_count(f), RICH_NKV);
    CHECK_EQ_INT(gguf_tensor_count(f), RICH_NT);
    uint32_t u32;
    float f32;
    bool b;
    gguf_str s;
    CHECK(gguf_get_str(f, "general.architecture", &s) && gguf_str_eq(s, "llama"));
    CHECK(gguf_get_u32(f, "t.u8", &u32) && u32 == 200);
    CHECK(gguf_get_u32(f, "t.u16", &u32) && u32 == 60000);
    CHECK(gguf_get_u32(f, "t.u32", &u32) && u32 == 4000000000u);
    CHECK(!gguf_get_u32(f, "t.i8", &u32));  /* negative */
    CHECK(!gguf_get_u32(f, "t.u64", &u32)); /* too large */
    CHECK(!gguf_get_u32(f, "t.str", &u32)); /* not an integer */
    CHECK(!gguf_get_u32(f, "t.missing", &u32));
    CHECK_EQ_INT(gguf_find_kv(f, "t.i8")->val.i, -100);
    CHECK_EQ_INT(gguf_find_kv(f, "t.i16")->val.i, -30000);
    CHECK_EQ_INT(gguf_find_kv(f, "t.i32")->val.i, -2000000000);
    CHECK_EQ_INT(gguf_find_kv(f, "t.i64")->val.i, -(1ll << 62));
    CHECK(gguf_find_kv(f, "t.u64")->val.u == (1ull << 63) + 5);
    CHECK(gguf_get_f32(f, "t.f32", &f32) && f32 == 1.5f);
    CHECK(!gguf_get_f32(f, "t.f64", &f32)); /* 1e300 does not fit a float */
    CHECK(gguf_find_kv(f, "t.f64")->val.f == 1e300);
    CHECK(!gguf_get_f32(f, "t.u8", &f32));
    CHECK(gguf_get_bool(f, "t.bool", &b) && b);
    CHECK(!gguf_get_bool(f, "t.u8", &b));
    CHECK(gguf_get_str(f, "t.str", &s) && gguf_str_eq(s, "h\xc3\xa9llo") && s.len == 6);
    CHECK(!gguf_get_str(f, "t.u8", &s) && !gguf_get_str(f, "t.missing", &s));
    CHECK(!gguf_str_eq(s, "h\xc3\xa9ll"));

    const gguf_kv *kv = gguf_find_kv(f, "t.arr_i32");
    int64_t iv;
    double dv;
    CHECK(kv && kv->type == GGUF_TYPE_ARRAY && kv->arr_type == GGUF_TYPE_INT32 &&
          kv->arr_len == 3);
    CHECK(gguf_arr_get_i64(kv, 1, &iv) && iv == -2);
    CHECK(gguf_arr_get_i64(kv, 2, &iv) && iv == 3);
    CHECK(!gguf_arr_get_i64(kv, 3, &iv));
    CHECK(!gguf_arr_get_f64(kv, 0, &dv));
    CHECK(!gguf_arr_get_str(kv, 0, &s));
    kv = gguf_find_kv(f, "t.arr_f32");
    CHECK(gguf_arr_get_f64(kv, 1, &dv) && dv == -1.25);
    CHECK(!gguf_arr_get_i64(kv, 0, &iv));
    kv = gguf_find_kv(f, "t.arr_f64");
    CHECK(gguf_arr_get_f64(kv, 0, &dv) && dv == -2.5);
    kv = gguf_find_kv(f, "t.arr_str");
    CHECK(kv && kv->arr_type == GGUF_TYPE_STRING && kv->arr_len == 3);
    CHECK(gguf_arr_get_str(kv, 0, &s) && gguf_str_eq(s, "a"));
    CHECK(gguf_arr_get_str(kv, 1, &s) && s.len == 0 && gguf_str_eq(s, ""));
    CHECK(gguf_arr_get_str(kv, 2, &s) && gguf_str_eq(s, "<|im_start|>"));
    CHECK(!gguf_arr_get_str(kv, 3, &s));
    kv = gguf_find_kv(f, "t.arr_nested");
    CHECK(kv && kv->arr_type == GGUF_TYPE_ARRAY && kv->arr_len == 2);
    CHECK(!gguf_arr_get_i64(kv, 0, &iv) && !gguf_arr_get_str(kv, 0, &s));
    kv = gguf_find_kv(f, "t.arr_empty");
    CHECK(kv && kv->arr_len == 0 && !gguf_arr_get_i64(kv, 0, &iv));
    kv = gguf_find_kv(f, "t.arr_u64");
    CHECK(!gguf_arr_get_i64(kv, 0, &iv)); /* UINT64_MAX does not fit int64 */
    CHECK(gguf_arr_get_i64(kv, 1, &iv) && iv == 42);
    CHECK(!gguf_arr_get_i64(gguf_find_kv(f, "t.u8"), 0, &iv)); /* not an array */
    CHECK(!gguf_arr_get_f64(gguf_find_kv(f, "t.f32"), 0, &dv));
    CHECK(!gguf_arr_get_str(gguf_find_kv(f, "t.str"), 0, &s));

    CHECK(gguf_kv_at(f, RICH_NKV) == NULL);
    CHECK(gguf_tensor_at(f, RICH_NT) == NULL);
    CHECK(gguf_find_tensor(f, "nope") == NULL);
    CHECK(gguf_find_tensor(f, "q8") == gguf_tensor_at(f, 1));

    /* Data offsets: packed at multiples of align from the data section,
     * which itself starts at a multiple of align. */
    const uint8_t *first = gguf_tensor_at(f, 0)->data;
    for (size_t i = 0; i < RICH_NT; i++) {
        const gguf_tensor *t = gguf_find_tensor(f, rich_tensors[i].name);
        CHECK(t != NULL);
        if (!t)
            continue;
        CHECK_EQ_INT(t->n_dims, rich_tensors[i].n_dims);
        CHECK_EQ_INT(t->type, rich_tensors[i].type);
        CHECK_EQ_INT(t->offset % align, 0);
        CHECK_EQ_INT(t->offset, rich_tensors[i].offset);
        CHECK_EQ_INT(t->nbytes, tspec_bytes(&rich_tensors[i]));
        for (int d = 0; d < 4; d++)
            CHECK_EQ_INT(t->ne[d], rich_tensors[i].ne[d]);
        const uint8_t *p = t->data;
        CHECK(p == first + t->offset);
        CHECK_EQ_INT(p[0], (uint8_t)(t->offset * 7 + 1));
    }
    CHECK_EQ_INT(gguf_find_tensor(f, "q8")->nbytes, 3 * 2 * 34);
    CHECK_EQ_INT(gguf_find_tensor(f, "q4k")->nbytes, 144);
    CHECK_EQ_INT(gguf_find_tensor(f, "f16")->ne[3], 1);
}

static void test_rich_v3_default_alignment(void)
{
    gw w = {0};
    ekv_error err = {0};
    build_rich(&w, 3, 0);
    gguf_file *f = gguf_open_buffer(w.b, w.n, &err);
    CHECK(f != NULL);
    if (!f)
        fprintf(stderr, "  %s\n", err.msg);
    else
        check_rich(f, 3, 32);
    gguf_close(f);
    gw_free(&w);
}

static void test_rich_v2_custom_alignment(void)
{
    uint32_t aligns[] = {1, 8, 64, 256};
    for (size_t i = 0; i < sizeof aligns / sizeof aligns[0]; i++) {
        gw w = {0};
        ekv_error err = {0};
        build_rich(&w, 2, aligns[i]);
        gguf_file *f = gguf_open_buffer(w.b, w.n, &err);
        CHECK(f != NULL);
        if (!f)
            fprintf(stderr, "  align %u: %s\n", aligns[i], err.msg);
        else
            check_rich(f, 2, aligns[i]);
        gguf_close(f);
        gw_free(&w);
    }
}

static void test_open_from_file_matches_buffer(void)
{
    char path[] = "/tmp/test_gguf_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    if (fd < 0)
        return;
    gw w = {0};
    build_rich(&w, 3, 64);
    CHECK(write(fd, w.b, w.n) == (ssize_t)w.n);
    close(fd);
    ekv_error err = {0};
    gguf_file *f = gguf_open(path, &err);
    CHECK(f != NULL);
    if (f)
        check_rich(f, 3, 64);
    gguf_close(f);

    CHECK(truncate(path, 10) == 0);
    CHECK(gguf_open(path, &err) == NULL && err.code == EKV_EFORMAT);
    CHECK(truncate(path, (off_t)w.n - 1) == 0);
    CHECK(gguf_open(path, &err) == NULL && err.code == EKV_EFORMAT);
    CHECK(strstr(err.msg, path) != NULL); /* the path prefixes the reason */
    unlink(path);
    CHECK(gguf_open(path, &err) == NULL && err.code == EKV_EIO);
    CHECK(gguf_open("/tmp", &err) == NULL && err.code == EKV_EINVAL);
    gw_free(&w);
}

static void test_empty_file_has_no_kvs_or_tensors(void)
{
    gw kv = {0}, w = {0};
    ekv_error err = {0};
    gw_file(&w, 3, &kv, 0, NULL, 0, 1, 0); /* no padding: nothing follows the header */
    CHECK_EQ_INT(w.n, 24);
    gguf_file *f = gguf_open_buffer(w.b, w.n, &err);
    CHECK(f && gguf_kv_count(f) == 0 && gguf_tensor_count(f) == 0);
    CHECK(f && gguf_find_kv(f, "general.alignment") == NULL && gguf_alignment(f) == 32);
    gguf_close(f);
    gw_free(&w);
}

static void test_many_keys_all_found(void)
{
    gw kv = {0}, w = {0};
    char key[32];
    for (int i = 0; i < 1000; i++) {
        snprintf(key, sizeof key, "k.%d", i);
        gw_key(&kv, key, GGUF_TYPE_INT32);
        gw_u32(&kv, (uint32_t)i);
    }
    gw_file(&w, 3, &kv, 1000, NULL, 0, 32, 0);
    ekv_error err = {0};
    gguf_file *f = gguf_open_buffer(w.b, w.n, &err);
    CHECK(f != NULL);
    for (int i = 0; f && i < 1000; i++) {
        uint32_t v = 0;
        snprintf(key, sizeof key, "k.%d", i);
        CHECK(gguf_get_u32(f, key, &v) && v == (uint32_t)i);
    }
    CHECK(f && gguf_find_kv(f, "k.1000") == NULL && gguf_find_kv(f, "k.") == NULL);
    gguf_close(f);
    gw_free(&kv);
    gw_free(&w);
}

/* ---- hostile input: every prefix and every corrupted byte ---- */

static void test_truncated_at_every_offset_fails(void)
{
    gw w = {0};
    build_rich(&w, 3, 64);
    int opened = 0;
    for (size_t len = 0; len < w.n; len++) {
        uint8_t *p = len ? malloc(len) : NULL;
        if (len)
            memcpy(p, w.b, len);
        ekv_error err = {0};
        gguf_file *f = gguf_open_buffer(p, len, &err);
        opened += f != NULL;
        if (!f && (err.code != EKV_EFORMAT || !err.msg[0]))
            fprintf(stderr, "  len %zu: code %d '%s'\n", len, (int)err.code, err.msg);
        CHECK(f || (err.code == EKV_EFORMAT && err.msg[0]));
        gguf_close(f);
        free(p);
    }
    CHECK_EQ_INT(opened, 0);
    gw_free(&w);
}

static void test_every_corrupted_byte_is_safe(void)
{
    gw w = {0};
    build_rich(&w, 3, 32);
    const uint8_t subst[] = {0x00, 0xff, 0x80, 0x01};
    int opened = 0;
    uint64_t sink = 0;
    for (size_t i = 0; i < w.n; i++) {
        for (size_t s = 0; s < sizeof subst; s++) {
            uint8_t old = w.b[i];
            w.b[i] = old == subst[s] ? (uint8_t)(old ^ 0x5a) : subst[s];
            ekv_error err = {0};
            gguf_file *f = gguf_open_buffer(w.b, w.n, &err);
            if (f) {
                sink += walk_all(f);
                opened++;
            } else {
                CHECK(err.msg[0] != 0);
            }
            gguf_close(f);
            w.b[i] = old;
        }
    }
    CHECK(opened > 0); /* data-section bytes do not matter */
    CHECK(sink != 1);  /* keeps walk_all from being optimised away */
    gw_free(&w);
}

/* ---- hostile input: one flaw each ---- */

static void test_bad_magic_and_versions(void)
{
    gw kv = {0}, w = {0};
    gw_file(&w, 3, &kv, 0, NULL, 0, 32, 0);
    w.b[3] = 'G';
    EXPECT_FAIL(&w, EKV_EFORMAT, "not a GGUF file");
    uint32_t bad[] = {0, 1, 4, 0x03000000u};
    const char *why[] = {"version 0 is not", "v1", "version 4 is not", "big-endian"};
    for (int i = 0; i < 4; i++) {
        gw_file(&w, bad[i], &kv, 0, NULL, 0, 32, 0);
        EXPECT_FAIL(&w, EKV_EUNSUPPORTED, why[i]);
    }
}

static void test_huge_counts_fail_before_allocating(void)
{
    gw kv = {0}, w = {0};
    gw_key(&kv, "a", GGUF_TYPE_UINT8), gw_u8(&kv, 1);
    gw_file(&w, 3, &kv, 1ull << 63, NULL, 0, 32, 0);
    EXPECT_FAIL(&w, EKV_EFORMAT, "cannot fit");
    gw_file(&w, 3, &kv, UINT64_MAX, NULL, 0, 32, 0);
    EXPECT_FAIL(&w, EKV_EFORMAT, "cannot fit");
    /* A tensor count that overflows when multiplied by the minimum size. */
    gw_raw(&w, "GGUF", 4), gw_u32(&w, 3), gw_u64(&w, UINT64_MAX / 2), gw_u64(&w, 1);
    gw_raw(&w, kv.b, kv.n), gw_shrink(&w);
    EXPECT_FAIL(&w, EKV_EFORMAT, "cannot fit");
    gw_free(&kv);

    uint32_t elem[] = {GGUF_TYPE_UINT32, GGUF_TYPE_STRING, GGUF_TYPE_ARRAY, GGUF_TYPE_UINT8};
    for (int i = 0; i < 4; i++) {
        gw_arr_head(&kv, "big", elem[i], 1ull << 62);
        gw_u64(&kv, 0), gw_u64(&kv, 0);
        gw_file(&w, 3, &kv, 1, NULL, 0, 32, 0);
        EXPECT_FAIL(&w, EKV_EFORMAT, "cannot fit");
        gw_free(&kv);
    }
    gw_key(&kv, "s", GGUF_TYPE_STRING), gw_u64(&kv, 1000), gw_raw(&kv, "abc", 3);
    gw_file(&w, 3, &kv, 1, NULL, 0, 32, 0);
    EXPECT_FAIL(&w, EKV_EFORMAT, "string length 1000 exceeds");
    gw_free(&kv);
    gw_key(&kv, "s", GGUF_TYPE_STRING), gw_u64(&kv, UINT64_MAX), gw_raw(&kv, "abc", 3);
    gw_file(&w, 3, &kv, 1, NULL, 0, 32, 0);
    EXPECT_FAIL(&w, EKV_EFORMAT, "exceeds");
    gw_free(&kv);
}

static void test_bad_keys_and_value_types(void)
{
    gw kv = {0}, w = {0};
    gw_u64(&kv, 0), gw_u32(&kv, GGUF_TYPE_UINT32), gw_u32(&kv, 5); /* empty key */
    gw_file(&w, 3, &kv, 1, NULL, 0, 32, 0);
    EXPECT_FAIL(&w, EKV_EFORMAT, "key length 0");
    gw_free(&kv);

    char *longkey = malloc(70001);
    memset(longkey, 'k', 70000);
    longkey[70000] = 0;
    gw_key(&kv, longkey, GGUF_TYPE_UINT8), gw_u8(&kv, 1);
    gw_file(&w, 3, &kv, 1, NULL, 0, 32, 0);
    EXPECT_FAIL(&w, EKV_EFORMAT, "key length 70000");
    gw_free(&kv);
    free(longkey);

    uint32_t bad_types[] = {13, 0xffffffffu};
    for (int i = 0; i < 2; i++) {
        gw_key(&kv, "x", bad_types[i]), gw_u64(&kv, 0);
        gw_file(&w, 3, &kv, 1, NULL, 0, 32, 0);
        EXPECT_FAIL(&w, EKV_EFORMAT, "unknown value type");
        gw_free(&kv);
        gw_arr_head(&kv, "x", bad_types[i], 1), gw_u64(&kv, 0);
        gw_file(&w, 3, &kv, 1, NULL, 0, 32, 0);
        EXPECT_FAIL(&w, EKV_EFORMAT, "unknown array element type");
        gw_free(&kv);
    }

    gw_key(&kv, "dup", GGUF_TYPE_UINT8), gw_u8(&kv, 1);
    gw_key(&kv, "other", GGUF_TYPE_UINT8), gw_u8(&kv, 2);
    gw_key(&kv, "dup", GGUF_TYPE_STRING), gw_str(&kv, "again");
    gw_file(&w, 3, &kv, 3, NULL, 0, 32, 0);
    EXPECT_FAIL(&w, EKV_EFORMAT, "duplicate key 'dup'");
    gw_free(&kv);

    /* A scalar cut short, in a file long enough to pass the count bound. */
    gw_key(&kv, "k", GGUF_TYPE_UINT64), gw_u32(&kv, 7);
    gw_file(&w, 3, &kv, 1, NULL, 0, 1, 0);
    EXPECT_FAIL(&w, EKV_EFORMAT, "kv 'k' needs 8 bytes, 4 left");
    gw_free(&kv);

    ekv_error err = {0};
    CHECK(gguf_open_buffer(NULL, 5, &err) == NULL && err.code == EKV_EINVAL);

    /* Twenty nested arrays deep is past the nesting limit. */
    gw_arr_head(&kv, "deep", GGUF_TYPE_ARRAY, 1);
    for (int d = 0; d < 20; d++)
        gw_u32(&kv, GGUF_TYPE_ARRAY), gw_u64(&kv, 1);
    gw_u32(&kv, GGUF_TYPE_UINT8), gw_u64(&kv, 0);
    gw_file(&w, 3, &kv, 1, NULL, 0, 32, 0);
    EXPECT_FAIL(&w, EKV_EFORMAT, "nested deeper");
    gw_free(&kv);
}

static void test_bad_alignment(void)
{
    uint32_t bad[] = {0, 3, 48, 0xffffffffu};
    for (int i = 0; i < 4; i++) {
        gw kv = {0}, w = {0};
        gw_key(&kv, "general.alignment", GGUF_TYPE_UINT32), gw_u32(&kv, bad[i]);
        gw_file(&w, 3, &kv, 1, NULL, 0, 32, 0);
        EXPECT_FAIL(&w, EKV_EFORMAT, "not a power of two");
        gw_free(&kv);
    }
    gw kv = {0}, w = {0};
    gw_key(&kv, "general.alignment", GGUF_TYPE_UINT64), gw_u64(&kv, 32);
    gw_file(&w, 3, &kv, 1, NULL, 0, 32, 0);
    EXPECT_FAIL(&w, EKV_EFORMAT, "not uint32");
    gw_free(&kv);
}

/* One tensor t over a data section of data_bytes; expects failure. */
static void one_tensor_fails(tspec t, uint64_t data_bytes, ekv_status code, const char *what,
                             int line)
{
    gw kv = {0}, w = {0};
    gw_file(&w, 3, &kv, 0, &t, 1, 32, data_bytes);
    expect_fail(&w, code, what, line);
}
#define ONE_TENSOR_FAILS(t, n, code, what) one_tensor_fails(t, n, code, what, __LINE__)

static void test_bad_tensor_infos(void)
{
    tspec ok = {"w", 2, {32, 2, 1, 1}, EKV_F32, 0};
    gw kv = {0}, w = {0};
    gw_file(&w, 3, &kv, 0, &ok, 1, 32, 256);
    gguf_file *f = gguf_open_buffer(w.b, w.n, NULL);
    CHECK(f != NULL); /* the control: this one is fine */
    gguf_close(f);
    gw_free(&w);

    tspec t = ok;
    t.n_dims = 0;
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "n_dims 0");
    t.n_dims = 5;
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "n_dims 5");
    t = ok, t.ne[1] = 0;
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "dimension 1 (0)");
    t = ok, t.ne[0] = 1ull << 32, t.ne[1] = 1ull << 32;
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "overflows");
    t = ok, t.n_dims = 4, t.ne[0] = t.ne[1] = t.ne[2] = t.ne[3] = 1ull << 16;
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "overflows");
    t = ok, t.type = EKV_F64, t.ne[0] = 1ull << 31, t.ne[1] = 1ull << 31; /* 2^65 bytes */
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "byte size overflows");
    t = ok, t.type = EKV_Q8_0, t.ne[0] = 33;
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "whole number of Q8_0 blocks");
    uint32_t unknown[] = {4, 5, 16, 99, 0xffffffffu};
    for (int i = 0; i < 5; i++) {
        t = ok, t.type = unknown[i];
        ONE_TENSOR_FAILS(t, 256, EKV_EUNSUPPORTED, "unknown tensor type");
    }
    t = ok, t.offset = 16;
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "not a multiple of the alignment 32");
    t = ok;
    ONE_TENSOR_FAILS(t, 255, EKV_EFORMAT, "outside"); /* one byte short */
    t = ok, t.offset = 256;
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "outside");
    t = ok, t.offset = UINT64_MAX - 31; /* aligned, and would wrap if added */
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "outside");
    t = ok, t.name = "";
    ONE_TENSOR_FAILS(t, 256, EKV_EFORMAT, "name length 0");
}

static void test_overlapping_and_duplicate_tensors(void)
{
    gw kv = {0}, w = {0};
    tspec two[] = {{"a", 1, {56, 1, 1, 1}, EKV_F32, 0}, {"b", 1, {8, 1, 1, 1}, EKV_F32, 224}};
    gw_file(&w, 3, &kv, 0, two, 2, 32, 256);
    gguf_file *f = gguf_open_buffer(w.b, w.n, NULL);
    CHECK(f != NULL); /* control: a ends at 256 - 32 = 224 where b starts */
    gguf_close(f);
    gw_free(&w);
    two[1].offset = 192;
    gw_file(&w, 3, &kv, 0, two, 2, 32, 256);
    EXPECT_FAIL(&w, EKV_EFORMAT, "overlap");
    two[1].offset = 0; /* same start, listed after */
    gw_file(&w, 3, &kv, 0, two, 2, 32, 256);
    EXPECT_FAIL(&w, EKV_EFORMAT, "overlap");
    two[1].offset = 224, two[1].name = "a";
    gw_file(&w, 3, &kv, 0, two, 2, 32, 256);
    EXPECT_FAIL(&w, EKV_EFORMAT, "duplicate tensor name 'a'");
}

/* ---- the demo model ---- */

#define DEMO_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

/* $EKV_MODEL, else models/ at the repository root, found from this file's
 * path (absolute under CMake, relative to the root when built by hand). */
static const char *demo_model_path(char *buf, size_t cap)
{
    const char *env = getenv("EKV_MODEL");
    if (env && *env)
        return env;
    const char *src = __FILE__, *tail = strstr(src, "tests/unit/");
    snprintf(buf, cap, "%.*s%s", (int)(tail ? tail - src : 0), src, DEMO_MODEL);
    if (access(buf, R_OK) == 0)
        return buf;
    snprintf(buf, cap, "%s/../../%s", EKV_FIXTURES, DEMO_MODEL);
    return buf;
}

static void test_demo_model(void)
{
    char buf[4096];
    const char *path = demo_model_path(buf, sizeof buf);
    if (access(path, R_OK) != 0) {
        fprintf(stderr, "  skipped: %s not present\n", path);
        return;
    }
    ekv_error err = {0};
    gguf_file *f = gguf_open(path, &err);
    CHECK(f != NULL);
    if (!f) {
        fprintf(stderr, "  %s\n", err.msg);
        return;
    }
    CHECK_EQ_INT(gguf_version(f), 3);
    CHECK_EQ_INT(gguf_tensor_count(f), 272);
    CHECK_EQ_INT(gguf_kv_count(f), 33);
    uint32_t n = 0;
    CHECK(gguf_get_u32(f, "llama.block_count", &n) && n == 30);
    const gguf_tensor *t = gguf_find_tensor(f, "token_embd.weight");
    CHECK(t && t->type == EKV_Q8_0 && t->n_dims == 2 && t->ne[0] == 576 && t->ne[1] == 49152);
    CHECK(t && t->nbytes == 576 / 32 * 34 * 49152ull);
    const gguf_kv *kv = gguf_find_kv(f, "tokenizer.ggml.tokens");
    CHECK(kv && kv->type == GGUF_TYPE_ARRAY && kv->arr_type == GGUF_TYPE_STRING &&
          kv->arr_len == 49152);
    gguf_str s = {0};
    CHECK(gguf_arr_get_str(kv, 1, &s) && gguf_str_eq(s, "<|im_start|>"));
    kv = gguf_find_kv(f, "tokenizer.ggml.merges");
    CHECK(kv && kv->arr_type == GGUF_TYPE_STRING && kv->arr_len == 48900);
    CHECK(walk_all(f) != 0);
    gguf_close(f);
}

int main(void)
{
    RUN_TEST(test_rich_v3_default_alignment);
    RUN_TEST(test_rich_v2_custom_alignment);
    RUN_TEST(test_open_from_file_matches_buffer);
    RUN_TEST(test_empty_file_has_no_kvs_or_tensors);
    RUN_TEST(test_many_keys_all_found);
    RUN_TEST(test_truncated_at_every_offset_fails);
    RUN_TEST(test_every_corrupted_byte_is_safe);
    RUN_TEST(test_bad_magic_and_versions);
    RUN_TEST(test_huge_counts_fail_before_allocating);
    RUN_TEST(test_bad_keys_and_value_types);
    RUN_TEST(test_bad_alignment);
    RUN_TEST(test_bad_tensor_infos);
    RUN_TEST(test_overlapping_and_duplicate_tensors);
    RUN_TEST(test_demo_model);
    return TEST_EXIT();
}

/*
 * fuzz_gguf.c - libFuzzer target for the GGUF reader.
 *
 * Every input goes through gguf_open_buffer. When it opens, every kv, array
 * element and tensor is walked through the public accessors, and the first
 * and last byte of each tensor's data are read, so ASan flags any pointer
 * the reader hands out that is not inside the input. Lookups by name must
 * find the same entry the index walk saw (first match for keys with a NUL).
 *
 * Run with scripts/fuzz.sh; seeds live in tests/fuzz/corpus/gguf/.
 */
#include "entrokv/gguf.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static volatile uint64_t sink;

/* Copies s into a NUL-terminated buffer when it has no NUL inside. */
static int to_cstr(gguf_str s, char *buf, size_t cap)
{
    if (s.len >= cap || memchr(s.ptr, 0, (size_t)s.len))
        return 0;
    memcpy(buf, s.ptr, (size_t)s.len);
    buf[s.len] = 0;
    return 1;
}

static void walk_kv(const gguf_file *f, const gguf_kv *kv)
{
    static char key[65536];
    uint64_t acc = kv->key.len ? (uint8_t)kv->key.ptr[kv->key.len - 1] : 0;
    if (to_cstr(kv->key, key, sizeof key)) {
        uint32_t u;
        float x;
        bool b;
        gguf_str s;
        if (gguf_find_kv(f, key) != kv)
            abort(); /* keys are unique, so the lookup must land here */
        acc += gguf_get_u32(f, key, &u) ? u : 0;
        acc += gguf_get_f32(f, key, &x) ? (x == x) : 0;
        acc += gguf_get_bool(f, key, &b) ? b : 0;
        acc += gguf_get_str(f, key, &s) && s.len ? (uint8_t)s.ptr[s.len - 1] : 0;
    }
    if (kv->type == GGUF_TYPE_STRING && kv->val.s.len)
        acc += (uint8_t)kv->val.s.ptr[kv->val.s.len - 1];
    for (uint64_t i = 0; kv->type == GGUF_TYPE_ARRAY && i <= kv->arr_len; i++) {
        int64_t iv;
        double dv;
        gguf_str sv;
        /* i == arr_len checks that the end is refused, not read. */
        int got = gguf_arr_get_i64(kv, i, &iv) + gguf_arr_get_f64(kv, i, &dv) +
                  gguf_arr_get_str(kv, i, &sv);
        if (i == kv->arr_len && got)
            abort();
        if (gguf_arr_get_str(kv, i, &sv) && sv.len)
            acc += (uint8_t)sv.ptr[0] + (uint8_t)sv.ptr[sv.len - 1];
        if (gguf_arr_get_i64(kv, i, &iv))
            acc += (uint64_t)iv;
    }
    sink += acc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char name[65536];
    ekv_error err = {0};
    gguf_file *f = gguf_open_buffer(data, size, &err);
    if (!f) {
        if (!err.msg[0] || err.code == EKV_OK)
            abort(); /* every failure must say why */
        return 0;
    }
    sink += gguf_version(f) + gguf_alignment(f);
    for (uint64_t i = 0; i < gguf_kv_count(f); i++)
        walk_kv(f, gguf_kv_at(f, i));
    if (gguf_kv_at(f, gguf_kv_count(f)) || gguf_tensor_at(f, gguf_tensor_count(f)))
        abort();
    for (uint64_t i = 0; i < gguf_tensor_count(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        const uint8_t *p = t->data;
        uintptr_t lo = (uintptr_t)data, at = (uintptr_t)p;
        if (t->nbytes == 0 || at < lo || t->nbytes > size || at - lo > size - t->nbytes)
            abort();
        sink += p[0] + p[t->nbytes - 1] + t->ne[0] + t->type;
        if (to_cstr(t->name, name, sizeof name) && gguf_find_tensor(f, name) != t)
            abort();
    }
    gguf_close(f);
    return 0;
}

/*
 * gguf.h - read-only GGUF (v2, v3) files, memory-mapped.
 *
 * gguf_open maps the file and validates the whole header up front: every
 * count, string length, array length, tensor dimension, type, offset and size
 * is checked against the file before use, so a truncated, corrupt or hostile
 * file yields a clear error and never a crash or an over-read. After a
 * successful open every accessor below is bounds-safe.
 *
 * Ownership: the gguf_file owns the mapping. Every pointer it hands out
 * (strings, array data, tensor data) points into the mapping or into the
 * gguf_file's own index and is valid until gguf_close.
 */
#ifndef ENTROKV_GGUF_H
#define ENTROKV_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/status.h"

typedef enum gguf_type {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
} gguf_type;

/* A string inside the file: not NUL-terminated. */
typedef struct gguf_str {
    const char *ptr;
    uint64_t len;
} gguf_str;

typedef struct gguf_kv {
    gguf_str key;
    gguf_type type;
    /* Scalars (type != ARRAY): the value, widened. */
    union {
        uint64_t u;  /* UINT8/16/32/64 */
        int64_t i;   /* INT8/16/32/64 */
        double f;    /* FLOAT32/64 */
        bool b;      /* BOOL */
        gguf_str s;  /* STRING */
    } val;
    /* Arrays (type == ARRAY): element type and count. Nested arrays are
     * accepted and skipped (arr_type == ARRAY, no element access). */
    gguf_type arr_type;
    uint64_t arr_len;
    const uint8_t *arr_data;  /* numeric arrays: raw little-endian elements */
    const gguf_str *arr_strs; /* string arrays: arr_len validated strings */
} gguf_kv;

#define GGUF_MAX_DIMS 4

typedef struct gguf_tensor {
    gguf_str name;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS]; /* ne[0] is the contiguous (row) dimension; unused dims are 1 */
    uint32_t type;              /* ekv_dtype value */
    uint64_t offset;            /* relative to the data section */
    uint64_t nbytes;
    const void *data;           /* into the mapping, aligned to the file's alignment */
} gguf_tensor;

typedef struct gguf_file gguf_file;

/* Maps and validates path. NULL on error (err filled). */
gguf_file *gguf_open(const char *path, ekv_error *err);
/* Same on a caller-owned buffer, which must outlive the result (fuzzing, tests). */
gguf_file *gguf_open_buffer(const void *buf, size_t size, ekv_error *err);
void gguf_close(gguf_file *f);

uint32_t gguf_version(const gguf_file *f);
uint64_t gguf_alignment(const gguf_file *f);

uint64_t gguf_kv_count(const gguf_file *f);
const gguf_kv *gguf_kv_at(const gguf_file *f, uint64_t i);
const gguf_kv *gguf_find_kv(const gguf_file *f, const char *key);

uint64_t gguf_tensor_count(const gguf_file *f);
const gguf_tensor *gguf_tensor_at(const gguf_file *f, uint64_t i);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);

/* Typed scalar getters: false when the key is missing, has another kind of
 * type, or the value does not fit. Integer getters accept any integer type. */
bool gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out);
bool gguf_get_f32(const gguf_file *f, const char *key, float *out);
bool gguf_get_bool(const gguf_file *f, const char *key, bool *out);
bool gguf_get_str(const gguf_file *f, const char *key, gguf_str *out);

/* Array element getters: false when i >= arr_len or the element type differs
 * in kind (any integer type widens to int64). */
bool gguf_arr_get_i64(const gguf_kv *kv, uint64_t i, int64_t *out);
bool gguf_arr_get_f64(const gguf_kv *kv, uint64_t i, double *out);
bool gguf_arr_get_str(const gguf_kv *kv, uint64_t i, gguf_str *out);

/* True when s equals the NUL-terminated c. */
bool gguf_str_eq(gguf_str s, const char *c);

#endif

/*
 * test_common.c - thread pool, SHA-256, fp16 conversion, dtype geometry and
 * the element-wise kernels (RMSNorm, RoPE, SwiGLU).
 */
#include <stdatomic.h>
#include <stdlib.h>

#include "ekv_test.h"
#include "entrokv/dtype.h"
#include "entrokv/kernels.h"
#include "entrokv/sha256.h"
#include "entrokv/threadpool.h"

typedef struct sum_ctx {
    atomic_long total;
    atomic_int calls;
    atomic_int parts;     /* nth as the parts saw it */
    atomic_int bad_index; /* thread indices out of range */
    atomic_uint seen_parts_mask;
    int pool_size;
    long n;
} sum_ctx;

static void sum_part(void *p, int ith, int nth)
{
    sum_ctx *c = p;
    long lo, hi, s = 0;
    ekv_split_range(c->n, ith, nth, &lo, &hi);
    for (long i = lo; i < hi; i++)
        s += i;
    atomic_fetch_add(&c->total, s);
    atomic_fetch_add(&c->calls, 1);
    atomic_store(&c->parts, nth);
    if (ith < 32)
        atomic_fetch_or(&c->seen_parts_mask, 1u << ith);
    int t = ekv_pool_thread_index();
    if (t < 0 || t >= c->pool_size)
        atomic_fetch_add(&c->bad_index, 1);
}

static void test_pool_runs_every_part_once(void)
{
    for (int nt = 1; nt <= 5; nt++) {
        ekv_pool *pool = ekv_pool_create(nt, NULL);
        CHECK(pool != NULL);
        CHECK_EQ_INT(ekv_pool_size(pool), nt);
        for (int rep = 0; rep < 2000; rep++) { /* many short regions, as decode issues */
            sum_ctx c = {.n = 1000 + rep, .pool_size = nt};
            ekv_pool_run(pool, sum_part, &c);
            /* every part ran exactly once, on a thread of this pool */
            CHECK_EQ_INT(atomic_load(&c.calls), atomic_load(&c.parts));
            CHECK(atomic_load(&c.parts) >= nt);
            CHECK_EQ_INT(atomic_load(&c.bad_index), 0);
            if (atomic_load(&c.parts) <= 32)
                CHECK_EQ_INT(atomic_load(&c.seen_parts_mask),
                             atomic_load(&c.parts) == 32 ? 0xffffffffu
                                                         : (1u << atomic_load(&c.parts)) - 1);
            if (atomic_load(&c.total) != c.n * (c.n - 1) / 2) {
                CHECK_EQ_INT(atomic_load(&c.total), c.n * (c.n - 1) / 2);
                break;
            }
        }
        ekv_pool_destroy(pool);
    }
}

static void test_split_range_covers_exactly(void)
{
    for (long n = 0; n < 50; n++)
        for (int nth = 1; nth < 7; nth++) {
            long expect_lo = 0;
            for (int i = 0; i < nth; i++) {
                long lo, hi;
                ekv_split_range(n, i, nth, &lo, &hi);
                CHECK_EQ_INT(lo, expect_lo);
                CHECK(hi - lo <= n / nth + 1);
                expect_lo = hi;
            }
            CHECK_EQ_INT(expect_lo, n);
        }
}

static void hex(const uint8_t d[32], char out[65])
{
    for (int i = 0; i < 32; i++)
        snprintf(out + 2 * i, 3, "%02x", d[i]);
}

static void test_sha256_known_vectors(void)
{
    uint8_t d[32];
    char h[65];
    ekv_sha256 s;
    sha256_init(&s);
    sha256_final(&s, d);
    hex(d, h);
    CHECK_STR(h, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    sha256_init(&s);
    sha256_update(&s, "abc", 3);
    sha256_final(&s, d);
    hex(d, h);
    CHECK_STR(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    /* 1,000,000 x 'a', fed in uneven pieces */
    sha256_init(&s);
    char a[997];
    memset(a, 'a', sizeof a);
    size_t left = 1000000;
    while (left) {
        size_t n = left < sizeof a ? left : sizeof a;
        sha256_update(&s, a, n);
        left -= n;
    }
    sha256_final(&s, d);
    hex(d, h);
    CHECK_STR(h, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

/* The bulk conversion equals the scalar one bit for bit on every class of
 * input (ties, subnormal results, overflow, inf, NaN) at every length. */
static void test_f16_bulk_matches_scalar(void)
{
    static float src[4099];
    static ekv_f16 dst[4099];
    uint32_t x = 0x12345678u;
    for (int i = 0; i < 4099; i++) {
        x = x * 1664525u + 1013904223u;
        /* exponents around half's range: 2^-30 .. 2^20, both signs */
        uint32_t bits = (x & 0x807fffffu) | ((97u + (x >> 8) % 50u) << 23);
        if (i % 97 == 5)
            bits = 0x477fefffu + (uint32_t)(i % 3); /* just below, at, above 65520 */
        if (i % 89 == 7)
            bits = (x & 0x80000000u) | 0x7f800000u | (i % 2 ? 0x212345u : 0); /* nan with a payload, inf */
        if (i % 83 == 3)
            bits = 0x3f801000u; /* 1 + 2^-11: a tie, to even */
        if (i % 79 == 11)
            bits = 0x33000000u | (x & 0x80000000u); /* half the smallest subnormal */
        memcpy(&src[i], &bits, sizeof bits);
    }
    const size_t lens[] = {0, 1, 7, 8, 9, 64, 4099};
    for (size_t l = 0; l < sizeof lens / sizeof lens[0]; l++) {
        memset(dst, 0xA5, sizeof dst);
        ekv_f32_to_f16_n(src, dst, lens[l]);
        int bad = 0;
        for (size_t i = 0; i < lens[l] && !bad; i++)
            if (dst[i] != ekv_f32_to_f16(src[i])) {
                CHECK_EQ_INT(dst[i], ekv_f32_to_f16(src[i]));
                bad = 1;
            }
        if (lens[l] < 4099)
            CHECK_EQ_INT(dst[lens[l]], 0xA5A5); /* nothing past n */
    }
}

static void test_f16_round_trip(void)
{
    CHECK_EQ_INT(ekv_f32_to_f16(1.0f), 0x3c00);
    CHECK_EQ_INT(ekv_f32_to_f16(-2.0f), 0xc000);
    CHECK_EQ_INT(ekv_f32_to_f16(65504.0f), 0x7bff);
    CHECK_EQ_INT(ekv_f32_to_f16(1e6f), 0x7c00);
    CHECK_EQ_INT(ekv_f32_to_f16(5.9604645e-8f), 0x0001); /* smallest subnormal */
    CHECK_EQ_INT(ekv_f32_to_f16(1.0f + 1.0f / 2048), 0x3c00); /* tie rounds to even */
    for (uint32_t h = 0; h < 0x7c00; h++) /* every finite positive half survives */
        if (ekv_f32_to_f16(ekv_f16_to_f32((ekv_f16)h)) != h) {
            CHECK_EQ_INT(ekv_f32_to_f16(ekv_f16_to_f32((ekv_f16)h)), h);
            break;
        }
}

static void test_dtype_row_bytes(void)
{
    uint64_t b;
    CHECK(ekv_dtype_row_bytes(EKV_Q4_1, 576, &b) && b == 18 * 20);
    CHECK(ekv_dtype_row_bytes(EKV_Q8_0, 64, &b) && b == 68);
    CHECK(ekv_dtype_row_bytes(EKV_F32, 3, &b) && b == 12);
    CHECK(!ekv_dtype_row_bytes(EKV_Q4_1, 33, &b));
    CHECK(!ekv_dtype_row_bytes(4, 32, &b)); /* a removed ggml type */
    CHECK(!ekv_dtype_row_bytes(EKV_F32, UINT64_MAX / 2, &b));
}

static void test_rmsnorm(void)
{
    float x[4] = {1, 2, 3, 4}, w[4] = {1, 1, 2, 0.5f}, out[4];
    kern_rmsnorm(out, x, w, 4, 0.0f);
    const float r = sqrtf((1 + 4 + 9 + 16) / 4.0f);
    CHECK_NEAR(out[0], 1 / r, 1e-6);
    CHECK_NEAR(out[2], 6 / r, 1e-6);
    CHECK_NEAR(out[3], 2 / r, 1e-6);
}

static void test_rope_rotates_pairs(void)
{
    float x[8] = {1, 0, 1, 0, 0.5f, 0.5f, 2, -1};
    float y[8];
    memcpy(y, x, sizeof x);
    kern_rope(y, 8, 8, 0, 10000.0f, 0);
    for (int i = 0; i < 8; i++)
        CHECK_NEAR(y[i], x[i], 1e-7); /* position 0 is the identity */
    memcpy(y, x, sizeof x);
    kern_rope(y, 8, 8, 3, 10000.0f, 0);
    for (int i = 0; i < 4; i++) {
        double th = 3.0 * pow(10000.0, -2.0 * i / 8.0);
        CHECK_NEAR(y[2 * i], x[2 * i] * cos(th) - x[2 * i + 1] * sin(th), 1e-5);
        CHECK_NEAR(y[2 * i + 1], x[2 * i] * sin(th) + x[2 * i + 1] * cos(th), 1e-5);
    }
    /* norms are preserved; dims past n_rot untouched */
    memcpy(y, x, sizeof x);
    kern_rope(y, 8, 4, 1000, 10000.0f, 0);
    CHECK_NEAR(y[0] * y[0] + y[1] * y[1], 1.0, 1e-5);
    CHECK(y[4] == x[4] && y[7] == x[7]);
}

/* The table form (one row's angles for all its heads) gives kern_rope's
 * bits: both layouts, partial rotation, large positions. */
static void test_rope_table_matches_rope(void)
{
    const int dims[][2] = {{64, 64}, {128, 128}, {64, 32}, {80, 64}};
    const int32_t poss[] = {0, 1, 511, 8191, 123457};
    for (size_t s = 0; s < sizeof dims / sizeof dims[0]; s++)
        for (size_t p = 0; p < sizeof poss / sizeof poss[0]; p++)
            for (int neox = 0; neox < 2; neox++) {
                const int d = dims[s][0], n_rot = dims[s][1];
                float a[128], b[128], cs[KERN_ROPE_MAX_DIM];
                for (int i = 0; i < d; i++)
                    a[i] = b[i] = sinf((float)(i * 37 + (int)p)) * 3.0f;
                kern_rope(a, d, n_rot, poss[p], 100000.0f, neox);
                kern_rope_table(cs, n_rot, poss[p], 100000.0f);
                kern_rope_apply(b, d, n_rot, cs, neox);
                CHECK(memcmp(a, b, (size_t)d * sizeof *a) == 0);
            }
}

static void test_swiglu(void)
{
    float g[3] = {0, 1, -2}, u[3] = {5, 2, 3};
    kern_swiglu(g, u, 3);
    CHECK_NEAR(g[0], 0, 1e-7);
    CHECK_NEAR(g[1], 2.0 / (1 + exp(-1.0)), 1e-6);
    CHECK_NEAR(g[2], 3.0 * -2.0 / (1 + exp(2.0)), 1e-6);
}

int main(void)
{
    RUN_TEST(test_pool_runs_every_part_once);
    RUN_TEST(test_split_range_covers_exactly);
    RUN_TEST(test_sha256_known_vectors);
    RUN_TEST(test_f16_round_trip);
    RUN_TEST(test_f16_bulk_matches_scalar);
    RUN_TEST(test_dtype_row_bytes);
    RUN_TEST(test_rmsnorm);
    RUN_TEST(test_rope_rotates_pairs);
    RUN_TEST(test_rope_table_matches_rope);
    RUN_TEST(test_swiglu);
    return TEST_EXIT();
}

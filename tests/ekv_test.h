/*
 * ekv_test.h - the minimal assertion macros every C test uses.
 *
 * A failed check prints file:line and the values, counts as a failure, and
 * the test keeps going; EKV_TEST_MAIN's exit status is the failure count.
 */
#ifndef EKV_TEST_H
#define EKV_TEST_H

#include <math.h>
#include <stdio.h>
#include <string.h>

static int ekv_test_failures;

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);       \
            ekv_test_failures++;                                                           \
        }                                                                                  \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                                 \
    do {                                                                                   \
        long long va_ = (long long)(a), vb_ = (long long)(b);                              \
        if (va_ != vb_) {                                                                  \
            fprintf(stderr, "%s:%d: %s == %s failed: %lld != %lld\n", __FILE__, __LINE__,  \
                    #a, #b, va_, vb_);                                                     \
            ekv_test_failures++;                                                           \
        }                                                                                  \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                              \
    do {                                                                                   \
        double va_ = (double)(a), vb_ = (double)(b);                                       \
        if (!(fabs(va_ - vb_) <= (tol))) {                                                 \
            fprintf(stderr, "%s:%d: |%s - %s| <= %g failed: %.9g vs %.9g\n", __FILE__,     \
                    __LINE__, #a, #b, (double)(tol), va_, vb_);                            \
            ekv_test_failures++;                                                           \
        }                                                                                  \
    } while (0)

#define CHECK_STR(a, b)                                                                    \
    do {                                                                                   \
        const char *sa_ = (a), *sb_ = (b);                                                 \
        if (strcmp(sa_, sb_) != 0) {                                                       \
            fprintf(stderr, "%s:%d: %s == %s failed: \"%s\" != \"%s\"\n", __FILE__,        \
                    __LINE__, #a, #b, sa_, sb_);                                           \
            ekv_test_failures++;                                                           \
        }                                                                                  \
    } while (0)

#define RUN_TEST(fn)                                                                       \
    do {                                                                                   \
        int before_ = ekv_test_failures;                                                   \
        fn();                                                                              \
        fprintf(stderr, "%s %s\n", ekv_test_failures == before_ ? "ok  " : "FAIL", #fn);   \
    } while (0)

#define TEST_EXIT() (ekv_test_failures ? 1 : 0)

#endif

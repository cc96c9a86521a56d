/*
 * test_cuda_compress.c - the compression kernels against compress/:
 * observation-window scores (kvc_window_scores) over ragged, empty and
 * one-token heads; truncated entropy (kvc_gram_add + kvc_entropy) for
 * head_dim 32 (Jacobi), 64 and 128, and the degenerate one-row case;
 * SnapKV selection (kvc_select_snap) exactly, budgets 1 .. n with ties;
 * block compaction against kv_seq_keep; block gather / scatter through
 * pinned host memory.
 */
#include "kv_fixture.h"

#include "compress_internal.h"

/* ---- window scores ---- */

static void check_window(int n_seq, int n_kv, int group, int d, const int32_t *lens, int sparse)
{
    heads_fixture f;
    fixture_make(&f, n_seq, n_kv, d, lens, sparse);
    const int H = n_seq * n_kv, W = KVC_WINDOW, nr = W * group;
    float *wq = malloc((size_t)H * nr * d * 4);
    int32_t *qpos = malloc((size_t)H * W * 4), *soff = malloc((size_t)H * 4);
    rnd_fill(wq, (size_t)H * nr * d, -2, 2);
    int32_t total = 0;
    for (int i = 0; i < H; i++) {
        soff[i] = total;
        total += f.len[i];
        const int32_t next = kv_seq_next_pos(f.seqs[i / n_kv]);
        for (int r = 0; r < W; r++) /* the prompt's last W positions */
            qpos[i * W + r] = next - W + r;
    }
    float *ref = malloc(((size_t)total + 1) * 4), *got = malloc(((size_t)total + 1) * 4);
    float *scratch = malloc(((size_t)nr * (f.max_len + 1)) * 4);
    for (int i = 0; i < H; i++) {
        kern_kv_view view;
        kv_seq_view(f.seqs[i / n_kv], 0, i % n_kv, &view);
        kvc_window_scores(&view, wq + (size_t)i * nr * d, (size_t)group * d, W, group,
                          qpos + i * W, ref + soff[i], scratch);
    }
    float *dwq = dev_from(wq, (size_t)H * nr * d * 4), *dscores = dev_zero(((size_t)total + 1) * 4);
    int32_t *dqpos = dev_from(qpos, (size_t)H * W * 4), *dsoff = dev_from(soff, (size_t)H * 4);
    void *ws = dev_zero(ekv_cuda_window_workspace(H, W, group));
    CHECK_OK(ekv_cuda_window_scores(g_ctx, f.dpool, &f.dev, dwq, W, group, dqpos, f.max_len, dsoff,
                                    dscores, ws, &g_err));
    dev_to_host(got, dscores, (size_t)total * 4);
    char what[96];
    snprintf(what, sizeof what, "window scores H=%d g=%d d=%d sparse=%d", H, group, d, sparse);
    near_all(what, got, ref, (size_t)total, 1e-6, 1e-4);
    ekv_cuda_free(dwq);
    ekv_cuda_free(dscores);
    ekv_cuda_free(dqpos);
    ekv_cuda_free(dsoff);
    ekv_cuda_free(ws);
    fixture_free(&f);
    free(wq);
    free(qpos);
    free(soff);
    free(ref);
    free(got);
    free(scratch);
}

static void test_window_scores_match_cpu(void)
{
    const int32_t lens[] = {0, 1, 17, 300, 9, 16, 1000, 8};
    check_window(2, 4, 4, 128, lens, 0);
    check_window(2, 4, 4, 128, lens, 1);
    check_window(1, 8, 1, 64, lens, 0);
    const int32_t big[] = {4096, 4000};
    check_window(1, 2, 4, 128, big, 0);
}

/* ---- entropy ---- */

static void check_entropy(int n_heads, int n, int d)
{
    const size_t rn = (size_t)n_heads * n * d;
    float *rows = malloc(rn * 4 + 4);
    /* a few strong directions plus noise, different per head */
    for (int h = 0; h < n_heads; h++)
        for (int t = 0; t < n; t++)
            for (int j = 0; j < d; j++) {
                const float base = (j % (h + 2) == 0) ? 3.0f * sinf((float)(t + 1) * (j + 1)) : 0.0f;
                rows[((size_t)h * n + t) * d + j] = base + rnd_f(-0.5f, 0.5f);
            }
    const int k = kvc_entropy_rank(d);
    double *ref = malloc((size_t)n_heads * sizeof *ref), *got = malloc((size_t)n_heads * sizeof *got);
    double *A = malloc((size_t)d * d * sizeof *A);
    for (int h = 0; h < n_heads; h++) {
        memset(A, 0, (size_t)d * d * sizeof *A);
        kvc_gram_add(A, rows + (size_t)h * n * d, n, d, d);
        ekv_error e;
        if (kvc_entropy(A, d, k, &ref[h], &e) != EKV_OK)
            ref[h] = NAN;
    }
    float *drows = dev_from(rows, rn * 4 + 4);
    double *dent = dev_zero((size_t)n_heads * sizeof *dent);
    CHECK_OK(ekv_cuda_entropy(g_ctx, drows, n_heads, n, d, k, dent, &g_err));
    dev_to_host(got, dent, (size_t)n_heads * sizeof *got);
    for (int h = 0; h < n_heads; h++) {
        if (isnan(ref[h])) {
            CHECK(isnan(got[h]));
            continue;
        }
        if (!(fabs(got[h] - ref[h]) <= 1e-3 * fabs(ref[h]) + 1e-5)) {
            fprintf(stderr, "entropy n=%d d=%d head %d: gpu %.8f cpu %.8f\n", n, d, h, got[h], ref[h]);
            ekv_test_failures++;
        }
    }
    ekv_cuda_free(drows);
    ekv_cuda_free(dent);
    free(rows);
    free(ref);
    free(got);
    free(A);
}

static void test_entropy_matches_cpu(void)
{
    check_entropy(6, 40, 32);   /* syevjBatched */
    check_entropy(9, 200, 64);  /* XsyevBatched, the demo model's heads */
    check_entropy(32, 300, 128);
    check_entropy(3, 1, 128);   /* one row: zero Gram, NaN like the CPU's EINVAL */
    check_entropy(2, 0, 64);
    setenv("EKV_CUDA_EIG_LOOP", "1", 1); /* the per-head syevd path too */
    check_entropy(5, 100, 128);
    unsetenv("EKV_CUDA_EIG_LOOP");
}

/* ---- selection ---- */

static void test_select_matches_cpu_exactly(void)
{
    enum { H = 9 };
    const int32_t lens[H] = {1, 2, 16, 17, 100, 1000, 5000, 0, 33};
    const int32_t budg[H] = {1, 1, 16, 3, 10, 100, 1, 0, 32};
    int32_t soff[H], koff[H], total = 0, ktotal = 0;
    for (int i = 0; i < H; i++) {
        soff[i] = total;
        koff[i] = ktotal;
        total += lens[i];
        ktotal += budg[i];
    }
    float *scores = malloc((size_t)total * 4);
    for (int32_t t = 0; t < total; t++) /* coarse values: many ties */
        scores[t] = (float)(rnd_u32() % 50) / 64.0f;
    int32_t *ref = malloc((size_t)ktotal * 4 + 4), *got = malloc((size_t)ktotal * 4 + 4);
    float *scratch = malloc((size_t)2 * 5000 * 4);
    for (int i = 0; i < H; i++) {
        if (!lens[i])
            continue;
        kvc_ctx c = {0};
        c.n_tokens = lens[i];
        kvc_select_snap(&c, scores + soff[i], budg[i], ref + koff[i], scratch);
    }
    float *ds = dev_from(scores, (size_t)total * 4);
    int32_t *dso = dev_from(soff, sizeof soff), *dlen = dev_from(lens, sizeof lens);
    int32_t *db = dev_from(budg, sizeof budg), *dko = dev_from(koff, sizeof koff);
    int32_t *dkeep = dev_zero((size_t)ktotal * 4 + 4);
    void *ws = dev_zero(ekv_cuda_select_workspace(total));
    CHECK_OK(ekv_cuda_select_snap(g_ctx, H, ds, dso, dlen, db, dkeep, dko, ws, &g_err));
    dev_to_host(got, dkeep, (size_t)ktotal * 4);
    int bad = 0;
    for (int32_t i = 0; i < ktotal; i++)
        bad += got[i] != ref[i];
    CHECK_EQ_INT(bad, 0);
    ekv_cuda_free(ds);
    ekv_cuda_free(dso);
    ekv_cuda_free(dlen);
    ekv_cuda_free(db);
    ekv_cuda_free(dko);
    ekv_cuda_free(dkeep);
    ekv_cuda_free(ws);
    free(scores);
    free(ref);
    free(got);
    free(scratch);
}

/* ---- compaction, gather / scatter ---- */

static void test_compact_matches_kv_seq_keep(void)
{
    const int n_kv = 4, d = 64;
    const int32_t lens[] = {1, 40, 16, 333};
    heads_fixture f;
    fixture_make(&f, 1, n_kv, d, lens, 0);
    int32_t keep[400], koff[4], nkeep[4], dst_off[4], dst_tab[64], total = 0, nblk = 0, maxk = 0;
    for (int h = 0; h < n_kv; h++) {
        koff[h] = total;
        dst_off[h] = nblk;
        nkeep[h] = 0;
        for (int32_t t = 0; t < lens[h]; t++)
            if (t == 0 || rnd_u32() % 3 == 0)
                keep[total + nkeep[h]++] = t;
        total += nkeep[h];
        CHECK_OK(ekv_cuda_kv_alloc(f.dpool, (nkeep[h] + 15) / 16, dst_tab + nblk, &g_err));
        nblk += (nkeep[h] + 15) / 16;
        maxk = nkeep[h] > maxk ? nkeep[h] : maxk;
    }
    int32_t *dkeep = dev_from(keep, (size_t)total * 4), *dko = dev_from(koff, sizeof koff);
    int32_t *dnk = dev_from(nkeep, sizeof nkeep), *dtab = dev_from(dst_tab, (size_t)nblk * 4);
    int32_t *ddo = dev_from(dst_off, sizeof dst_off);
    CHECK_OK(ekv_cuda_kv_compact(g_ctx, f.dpool, &f.dev, dkeep, dko, dnk, dtab, ddo, maxk, &g_err));
    CHECK_OK(ekv_cuda_sync(g_ctx, &g_err));
    ekv_f16 k[16 * 64], v[16 * 64];
    int32_t pos[16];
    int bad = 0;
    for (int h = 0; h < n_kv; h++) {
        CHECK_OK(kv_seq_keep(f.seqs[0], 0, h, keep + koff[h], nkeep[h], &g_err));
        kern_kv_view view;
        kv_seq_view(f.seqs[0], 0, h, &view);
        CHECK_EQ_INT(view.n_tokens, nkeep[h]);
        for (int32_t b = 0; b * 16 < nkeep[h]; b++) {
            CHECK_OK(ekv_cuda_kv_download_block(f.dpool, dst_tab[dst_off[h] + b], k, v, pos, &g_err));
            for (int r = 0; r < 16 && b * 16 + r < nkeep[h]; r++) {
                bad += pos[r] != view.pos_blocks[b][r];
                for (int j = 0; j < d; j++)
                    bad += k[j * 16 + r] != view.k_blocks[b][j * 16 + r] ||
                           v[r * d + j] != view.v_blocks[b][r * d + j];
            }
        }
    }
    CHECK_EQ_INT(bad, 0);
    ekv_cuda_free(dkeep);
    ekv_cuda_free(dko);
    ekv_cuda_free(dnk);
    ekv_cuda_free(dtab);
    ekv_cuda_free(ddo);
    fixture_free(&f);
}

static void test_gather_scatter_through_pinned_memory(void)
{
    const int32_t lens[] = {50};
    heads_fixture f;
    fixture_make(&f, 1, 1, 128, lens, 0);
    const int32_t n = 4; /* the head's blocks */
    const size_t bb = ekv_cuda_kv_block_bytes(f.dpool);
    CHECK_EQ_INT(bb, 2 * 16 * 128 * 2 + 64);
    uint8_t *host = NULL;
    CHECK_OK(ekv_cuda_host_alloc(n * bb, (void **)&host, &g_err));
    if (!host)
        return;
    CHECK_OK(ekv_cuda_kv_gather(g_ctx, f.dpool, f.dev.table, n, host, &g_err));
    CHECK_OK(ekv_cuda_sync(g_ctx, &g_err));
    kern_kv_view view;
    kv_seq_view(f.seqs[0], 0, 0, &view);
    int bad = 0;
    for (int b = 0; b < n; b++) /* K is the block's first 16 x 128 halves */
        bad += memcmp(host + b * bb, view.k_blocks[b], 16 * 128 * 2) != 0;
    CHECK_EQ_INT(bad, 0);
    /* restore into fresh blocks and read one back */
    int32_t ids[4];
    CHECK_OK(ekv_cuda_kv_alloc(f.dpool, n, ids, &g_err));
    int32_t *dids = dev_from(ids, sizeof ids);
    CHECK_OK(ekv_cuda_kv_scatter(g_ctx, f.dpool, dids, n, host, &g_err));
    CHECK_OK(ekv_cuda_sync(g_ctx, &g_err));
    ekv_f16 k[16 * 128], v[16 * 128];
    int32_t pos[16];
    CHECK_OK(ekv_cuda_kv_download_block(f.dpool, ids[3], k, v, pos, &g_err));
    CHECK(memcmp(v, view.v_blocks[3], 2 * 128 * 2) == 0); /* rows 48, 49 */
    CHECK_EQ_INT(pos[1], 49);
    CHECK_EQ_INT(pos[2], INT32_MAX); /* past the head's end */
    ekv_cuda_free(dids);
    ekv_cuda_host_free(host);
    fixture_free(&f);
}

int main(void)
{
    CUDA_TEST_INIT();
    kern_init();
    RUN_TEST(test_window_scores_match_cpu);
    RUN_TEST(test_entropy_matches_cpu);
    RUN_TEST(test_select_matches_cpu_exactly);
    RUN_TEST(test_compact_matches_kv_seq_keep);
    RUN_TEST(test_gather_scatter_through_pinned_memory);
    CUDA_TEST_EXIT();
}

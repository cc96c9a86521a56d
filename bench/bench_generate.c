/*
 * bench_generate.c - `entrokv bench generate`: prefill and decode tokens/s at
 * several context lengths against llama.cpp's own llama-bench (same GGUF,
 * same thread count, flash attention on and off, the faster taken per shape),
 * the two engines alternating over --reps repetitions; and each decode point
 * as a fraction of the machine's memory-bandwidth bound, measured in the
 * same run (bench_bandwidth.c).
 *
 * Prompts are real text (Debian's GPL-3, repeated when a context needs more
 * tokens than it has). A context of N means a prompt of N - n_decode tokens
 * followed by n_decode greedy decode steps, so the last step attends over N
 * tokens; for llama-bench that is `-p N-n_decode` and `-n n_decode -d
 * N-n_decode`. Output on stdout, one JSON object a line: every repetition
 * ("generate"), then the run's versions, flags and bandwidth
 * ("generate_meta"), median/min/max per engine and context with the decode
 * bound ("generate_summary") and the ratios of the medians
 * ("generate_ratio"). A human summary goes to stderr.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_ref.h"
#include "cli.h"
#include "entrokv/generate.h"
#include "entrokv/compress.h"
#include "entrokv/kvcache.h"
#include "entrokv/kvrecall.h"
#include "entrokv/model.h"
#include "entrokv/tokenizer.h"
#ifdef EKV_HAVE_CUDA
#include "entrokv/model_cuda.h"
#endif

#ifndef EKV_SOURCE_DIR
#define EKV_SOURCE_DIR "."
#endif

#define MAX_CONTEXTS 16
#define MAX_REPS 100

typedef struct bench_opts {
    cli_kv_opts kv; /* --kv-method, --kv-budget, --recall ...: entrokv's prompt compression */
    const char *model, *text, *llama_bench;
    const char *device; /* "cpu" or "cuda": where entrokv's forward runs */
    const char *variants; /* --decode-variants (bench_variants.c), NULL: off */
    int32_t threads, n_decode, chunk, reps, bw_mib;
    int32_t contexts[MAX_CONTEXTS];
    int n_contexts;
    bool reference, fa_on, fa_off;
} bench_opts;

typedef struct bench_result {
    double prefill_tps, decode_tps;
    /* with --recall: the store's counters after the decode steps */
    int64_t recall_blocks, recall_bytes, recall_evicted, rank_bytes, rank_k_blocks;
    double recall_select_s;
    int64_t kv_bytes; /* the sequence's resident KV after the decode steps */
} bench_result;

/* Every repetition of one context: [0] entrokv, [1] llama.cpp FA on, [2] off. */
enum { ENG_OURS, ENG_FA_ON, ENG_FA_OFF, ENG_N };
typedef struct ctx_runs {
    bench_result r[ENG_N][MAX_REPS];
    int n[ENG_N];
} ctx_runs;

typedef struct stat3 {
    double median, min, max;
} stat3;

static int parse_contexts(const char *s, bench_opts *o)
{
    o->n_contexts = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 2 || v > (1 << 20) || o->n_contexts == MAX_CONTEXTS)
            return -1;
        o->contexts[o->n_contexts++] = (int32_t)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return o->n_contexts ? 0 : -1;
}

static int parse(int argc, char **argv, bench_opts *o)
{
    *o = (bench_opts){.text = "/usr/share/common-licenses/GPL-3", .threads = 2, .n_decode = 64,
                      .chunk = 512, .reps = 5, .bw_mib = 1024, .reference = true,
                      .fa_on = true, .fa_off = true, .device = "cpu"};
    parse_contexts("128,512,2048,8192", o);
    cli_kv_defaults(&o->kv);
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *s;
        bool ok = true;
        const int kv = cli_kv_take(argc, argv, &i, &o->kv);
        if (kv < 0)
            return CLI_USAGE;
        if (kv)
            continue;
        if (!strcmp(a, "--model"))
            ok = cli_take_str(argc, argv, &i, &o->model);
        else if (!strcmp(a, "--text"))
            ok = cli_take_str(argc, argv, &i, &o->text);
        else if (!strcmp(a, "--threads"))
            ok = cli_take_int(argc, argv, &i, 1, 1024, &o->threads);
        else if (!strcmp(a, "--device"))
            ok = cli_take_str(argc, argv, &i, &o->device);
        else if (!strcmp(a, "--n-decode"))
            ok = cli_take_int(argc, argv, &i, 1, 100000, &o->n_decode);
        else if (!strcmp(a, "--chunk"))
            ok = cli_take_int(argc, argv, &i, 1, 4096, &o->chunk);
        else if (!strcmp(a, "--reps"))
            ok = cli_take_int(argc, argv, &i, 1, MAX_REPS, &o->reps);
        else if (!strcmp(a, "--bw-mib"))
            ok = cli_take_int(argc, argv, &i, 0, 65536, &o->bw_mib);
        else if (!strcmp(a, "--llama-bench"))
            ok = cli_take_str(argc, argv, &i, &o->llama_bench);
        else if (!strcmp(a, "--decode-variants"))
            ok = cli_take_str(argc, argv, &i, &o->variants);
        else if (!strcmp(a, "--no-reference"))
            o->reference = false;
        else if (!strcmp(a, "--json"))
            ; /* JSON lines are always printed on stdout */
        else if (!strcmp(a, "--flash-attn")) {
            ok = cli_take_str(argc, argv, &i, &s);
            if (ok && strcmp(s, "on") && strcmp(s, "off") && strcmp(s, "both")) {
                cli_error("bench", "--flash-attn expects on, off or both");
                return CLI_USAGE;
            }
            if (ok) {
                o->fa_on = strcmp(s, "off") != 0;
                o->fa_off = strcmp(s, "on") != 0;
            }
        } else if (!strcmp(a, "--contexts")) {
            ok = cli_take_str(argc, argv, &i, &s);
            if (ok && parse_contexts(s, o)) {
                cli_error("bench", "--contexts expects a list like 128,512");
                return CLI_USAGE;
            }
        } else {
            cli_error("bench", "unknown flag '%s'", a);
            return CLI_USAGE;
        }
        if (!ok)
            return CLI_USAGE;
    }
    if (!o->model) {
        cli_error("bench", "--model is required");
        return CLI_USAGE;
    }
    if (strcmp(o->device, "cpu") && strcmp(o->device, "cuda")) {
        cli_error("bench", "--device: 'cpu' or 'cuda', not '%s'", o->device);
        return CLI_USAGE;
    }
    if (!strcmp(o->device, "cuda") && o->reference) {
        cli_error("bench", "--device cuda takes --no-reference (the reference is llama.cpp on "
                           "the CPU)");
        return CLI_USAGE;
    }
    if (o->bw_mib > 0 && o->bw_mib < 16) {
        cli_error("bench", "--bw-mib must be 0 (off) or at least 16");
        return CLI_USAGE;
    }
    for (int i = 0; i < o->n_contexts; i++)
        if (o->contexts[i] <= o->n_decode) {
            cli_error("bench", "context %d must exceed --n-decode %d", o->contexts[i], o->n_decode);
            return CLI_USAGE;
        }
    return 0;
}
/* n ids of real text: the file's tokens, repeated as often as needed. */
static int32_t *text_tokens(const ekv_tokenizer *tok, const char *path, int32_t n, ekv_error *err)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        ekv_error_set(err, EKV_EIO, "%s: %s", path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(1 << 22);
    size_t len = buf ? fread(buf, 1, (1 << 22) - 1, f) : 0;
    fclose(f);
    int32_t *ids = NULL, *out = malloc((size_t)n * sizeof *out);
    size_t n_ids = 0;
    if (!buf || !out || tok_encode(tok, buf, len, false, false, &ids, &n_ids, err) || !n_ids) {
        if (!n_ids)
            ekv_error_set(err, EKV_EINVAL, "%s holds no text", path);
        free(out);
        out = NULL;
        goto done;
    }
    for (int32_t i = 0; i < n; i++)
        out[i] = ids[i % n_ids];
done:
    free(buf);
    free(ids);
    return out;
}

static int32_t argmax(const float *x, int32_t n)
{
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* With EKV_PERF_MARKS set, each phase's start and end on CLOCK_MONOTONIC
 * go to stderr ("perf-mark prefill 123.456789 123.999999"), so a profile
 * taken with `perf record -k CLOCK_MONOTONIC` splits by phase (`perf report
 * --time START,END`; docs/ARCHITECTURE.md, "Where the time goes"). */
static void perf_mark(const char *phase, double start, double end)
{
    if (getenv("EKV_PERF_MARKS"))
        fprintf(stderr, "perf-mark %s %.6f %.6f\n", phase, start, end);
}

/* Prefill n_prompt ids (compressed with pol unless NULL, the compression
 * timed with the prefill), then n_decode greedy steps, timing each phase. */
static ekv_status measure(ekv_runtime *rt, kv_pool *kv, const kvc_policy *pol,
                          const int32_t *prompt, int32_t n_prompt, int32_t n_decode,
                          bench_result *r, ekv_error *err)
{
    const ekv_model *m = model_runtime_model(rt);
    const ekv_model_config *c = model_config(m);
    float *logits = malloc((size_t)c->n_vocab * sizeof *logits);
    kv_seq *seq = kv_seq_create(kv, c->n_layers, c->n_kv_heads, err);
    kvc_capture *cap = NULL;
    ekv_status rc = EKV_OK;
    *r = (bench_result){0};
    if (!logits || !seq) {
        rc = seq ? ekv_error_set(err, EKV_ENOMEM, "out of memory") : err->code;
        goto out;
    }
    double t0 = gen_now();
    if (pol && !(cap = kvc_capture_create(pol, m, n_prompt, 0, err))) {
        rc = err->code;
        goto out;
    }
    rc = model_prefill(rt, seq, prompt, n_prompt, 0, cap ? kvc_capture_tap(cap, seq) : NULL,
                       logits, err);
    kvc_report rep;
    if (!rc && cap)
        rc = kvc_capture_compress(cap, rt, seq, &rep, err);
    double t1 = gen_now();
    for (int32_t i = 0; i < n_decode && !rc; i++) {
        int32_t id = argmax(logits, c->n_vocab), p = n_prompt + i;
        model_batch b = {.n = 1, .tokens = &id, .pos = &p, .seqs = &seq};
        rc = model_forward(rt, &b, logits, err);
    }
    double t2 = gen_now();
    perf_mark("prefill", t0, t1);
    perf_mark("decode", t1, t2);
    r->prefill_tps = n_prompt / (t1 - t0);
    r->decode_tps = n_decode / (t2 - t1);
    r->kv_bytes = kv_seq_bytes(seq);
    if (kv_seq_recall(seq)) {
        kv_recall_stats st;
        kv_recall_get_stats(kv_seq_recall(seq), &st);
        r->recall_blocks = st.blocks_recalled;
        r->recall_bytes = st.bytes_recalled;
        r->recall_evicted = st.evicted_tokens;
        r->recall_select_s = st.select_s;
        r->rank_bytes = st.rank_bytes;
        r->rank_k_blocks = st.rank_k_blocks;
    }
out:
    kvc_capture_free(cap);
    model_runtime_forget_seq(rt, seq);
    kv_seq_free(seq);
    free(logits);
    return rc;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median (the mean of the middle two for an even count), min and max. */
static stat3 stats(const bench_result *r, int n, bool decode)
{
    double v[MAX_REPS];
    for (int i = 0; i < n; i++)
        v[i] = decode ? r[i].decode_tps : r[i].prefill_tps;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return (stat3){.median = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2, .min = v[0],
                   .max = v[n - 1]};
}

static void print_stat(const char *key, stat3 s)
{
    printf(",\"%s\":{\"median\":%.2f,\"min\":%.2f,\"max\":%.2f}", key, s.median, s.min, s.max);
}

/* One repetition of llama-bench at one context: the prompt, then generation
 * at the prompt's depth, with each flash attention setting asked for. */
static bool reference(const bench_opts *o, const char *llama_bench, int32_t n_prompt, int round,
                      ctx_runs *cr, llamacpp_info *info)
{
    llamacpp_row pp[2], tg[2];
    /* llama-bench's warm-up repeats the whole prompt; past 1k tokens the
     * first pass's page faults are far below 1% of it, so it is skipped */
    int npp = llamacpp_bench(llama_bench, o->model, o->threads, o->fa_on, o->fa_off, n_prompt, 0,
                             0, n_prompt < 1024, pp, 2, info);
    int ntg = npp > 0 ? llamacpp_bench(llama_bench, o->model, o->threads, o->fa_on, o->fa_off, 0,
                                       o->n_decode, n_prompt, true, tg, 2, info)
                      : -1;
    if (npp <= 0 || ntg != npp)
        return false;
    for (int k = 0; k < npp; k++) {
        if (pp[k].flash_attn != tg[k].flash_attn || pp[k].n_prompt != n_prompt ||
            tg[k].n_gen != o->n_decode || tg[k].n_depth != n_prompt)
            return false;
        int e = pp[k].flash_attn ? ENG_FA_ON : ENG_FA_OFF;
        bench_result *r = &cr->r[e][cr->n[e]++];
        *r = (bench_result){.prefill_tps = pp[k].tokens_per_s, .decode_tps = tg[k].tokens_per_s};
        printf("{\"bench\":\"generate\",\"engine\":\"llama.cpp\",\"round\":%d,\"context\":%d,"
               "\"prompt_tokens\":%d,\"decode_tokens\":%d,\"threads\":%d,\"flash_attn\":\"%s\","
               "\"prefill_tokens_per_s\":%.2f,\"decode_tokens_per_s\":%.2f}\n",
               round, n_prompt + o->n_decode, n_prompt, o->n_decode, o->threads,
               pp[k].flash_attn ? "on" : "off", r->prefill_tps, r->decode_tps);
    }
    return true;
}

/* Prints the file's JSON object as the value of key, if it parses. */
static void print_json_file(const char *key, const char *path)
{
    FILE *f = fopen(path, "rb");
    char buf[4096];
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f)
        fclose(f);
    buf[n] = 0;
    cJSON *j = n ? cJSON_Parse(buf) : NULL;
    char *s = cJSON_IsObject(j) ? cJSON_PrintUnformatted(j) : NULL;
    if (s)
        printf(",\"%s\":%s", key, s);
    free(s);
    cJSON_Delete(j);
}

static void print_meta(const bench_opts *o, const char *llama_bench, const llamacpp_info *info,
                       const double bw[6], uint64_t weight_bytes)
{
    char *git[] = {"git", "-C", EKV_SOURCE_DIR, "describe", "--always", "--dirty", NULL};
    char *commit = bench_capture(git, true);
    if (commit)
        commit[strcspn(commit, "\n")] = 0;
    char date[32];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    printf("{\"bench\":\"generate_meta\",\"date\":\"%s\",\"entrokv_commit\":\"%s\","
           "\"model\":\"%s\",\"threads\":%d,\"reps\":%d,\"n_decode\":%d,\"chunk\":%d,"
           "\"text\":\"%s\",\"device\":\"%s\"",
           date, commit ? commit : "unknown", o->model, o->threads, o->reps, o->n_decode, o->chunk,
           o->text, o->device);
    free(commit);
    if (bw[0] > 0)
        printf(",\"read_bandwidth\":{\"threads\":%d,\"buffer_mib\":%d,\"passes\":5,"
               "\"best_gb_per_s\":%.2f,\"before\":{\"best\":%.2f,\"median\":%.2f},"
               "\"after\":{\"best\":%.2f,\"median\":%.2f},\"weights_sized\":{\"bytes\":%llu,"
               "\"best\":%.2f,\"median\":%.2f}}",
               o->threads, o->bw_mib, (bw[0] > bw[2] ? bw[0] : bw[2]) / 1e9, bw[0] / 1e9,
               bw[1] / 1e9, bw[2] / 1e9, bw[3] / 1e9, (unsigned long long)weight_bytes,
               bw[4] / 1e9, bw[5] / 1e9);
    if (llama_bench && info->build_commit[0]) {
        printf(",\"llama_cpp\":{\"tool\":\"llama-bench\",\"path\":\"%s\",\"build_commit\":\"%s\","
               "\"build_number\":%lld,\"cpu_info\":\"%s\",\"type_k\":\"%s\",\"n_batch\":%d,"
               "\"n_ubatch\":%d,\"flash_attn_tried\":\"%s\",\"args\":\"-t %d -fa %s -r 1 -o jsonl; "
               "prefill: -p P -n 0 -d 0 (--no-warmup when P >= 1024); decode: -p 0 -n %d -d P\"",
               llama_bench, info->build_commit, (long long)info->build_number, info->cpu_info,
               info->type_k, info->n_batch, info->n_ubatch,
               o->fa_on && o->fa_off ? "on,off" : o->fa_on ? "on" : "off", o->threads,
               o->fa_on && o->fa_off ? "on,off" : o->fa_on ? "on" : "off", o->n_decode);
        char path[4096];
        snprintf(path, sizeof path, "%s", llama_bench);
        char *slash = strrchr(path, '/');
        if (slash && (size_t)(slash - path) + 20 < sizeof path) {
            strcpy(slash, "/../version.json");
            print_json_file("setup", path);
        }
        printf("}");
    }
    printf("}\n");
}

/* Decode reads every weight and the K and V (fp16) of every cached token once
 * per step; step i attends over n_prompt + i + 1 tokens. */
static double decode_bytes_per_token(const ekv_model *m, int32_t n_prompt, int32_t n_decode)
{
    const ekv_model_config *c = model_config(m);
    const double kv_per_token = 2.0 * c->n_layers * c->n_kv_heads * c->head_dim * 2;
    return (double)model_weight_bytes(m) + kv_per_token * (n_prompt + (n_decode + 1) / 2.0);
}

static void summarize(const bench_opts *o, const ekv_model *m, const ctx_runs *runs,
                      double bw_best)
{
    fprintf(stderr, "\n%-8s %-26s %-26s %-12s %s\n", "context", "prefill tok/s median (x)",
            "decode tok/s median (x)", "llama FA p/d", "decode / bound (ours, llama)");
    for (int i = 0; i < o->n_contexts; i++) {
        const ctx_runs *cr = &runs[i];
        const int32_t ctx = o->contexts[i], n_prompt = ctx - o->n_decode;
        const double bytes = decode_bytes_per_token(m, n_prompt, o->n_decode);
        const double bound = bw_best > 0 ? bw_best / bytes : 0;
        stat3 s[ENG_N][2];
        for (int e = 0; e < ENG_N; e++)
            for (int d = 0; d < 2 && cr->n[e]; d++)
                s[e][d] = stats(cr->r[e], cr->n[e], d);
        /* llama.cpp's figure per phase: the faster flash attention setting */
        int best[2] = {0, 0};
        for (int d = 0; d < 2; d++) {
            best[d] = !cr->n[ENG_FA_ON]    ? ENG_FA_OFF
                      : !cr->n[ENG_FA_OFF] ? ENG_FA_ON
                      : s[ENG_FA_ON][d].median >= s[ENG_FA_OFF][d].median ? ENG_FA_ON
                                                                          : ENG_FA_OFF;
        }
        const bool have_ref = cr->n[ENG_FA_ON] || cr->n[ENG_FA_OFF];
        for (int e = 0; e < (have_ref ? 2 : 1); e++) {
            const stat3 *pp = e ? &s[best[0]][0] : &s[ENG_OURS][0];
            const stat3 *tg = e ? &s[best[1]][1] : &s[ENG_OURS][1];
            printf("{\"bench\":\"generate_summary\",\"engine\":\"%s\",\"context\":%d,"
                   "\"prompt_tokens\":%d,\"decode_tokens\":%d,\"threads\":%d,\"reps\":%d",
                   e ? "llama.cpp" : "entrokv", ctx, n_prompt, o->n_decode, o->threads,
                   cr->n[e ? best[1] : ENG_OURS]);
            print_stat("prefill_tokens_per_s", *pp);
            print_stat("decode_tokens_per_s", *tg);
            if (e) {
                printf(",\"prefill_flash_attn\":\"%s\",\"decode_flash_attn\":\"%s\"",
                       best[0] == ENG_FA_ON ? "on" : "off", best[1] == ENG_FA_ON ? "on" : "off");
                for (int f = ENG_FA_ON; f <= ENG_FA_OFF; f++)
                    if (cr->n[f])
                        printf(",\"flash_attn_%s\":{\"prefill_median\":%.2f,\"decode_median\":%.2f}",
                               f == ENG_FA_ON ? "on" : "off", s[f][0].median, s[f][1].median);
            }
            printf(",\"decode_bytes_per_token\":%.0f", bytes);
            if (bound > 0)
                printf(",\"decode_bound_tokens_per_s\":%.2f,\"decode_fraction_of_bound\":%.3f",
                       bound, tg->median / bound);
            printf("}\n");
        }
        const stat3 *ours = s[ENG_OURS];
        if (have_ref) {
            const double pr = ours[0].median / s[best[0]][0].median,
                         dr = ours[1].median / s[best[1]][1].median;
            printf("{\"bench\":\"generate_ratio\",\"ratio_vs\":\"llama.cpp\",\"context\":%d,"
                   "\"prefill_ratio\":%.3f,\"decode_ratio\":%.3f}\n", ctx, pr, dr);
            fprintf(stderr, "%-8d %8.1f (%5.2fx)           %8.1f (%5.2fx)           %-3s/%-3s      "
                            "%.2f, %.2f\n", ctx, ours[0].median, pr, ours[1].median, dr,
                    best[0] == ENG_FA_ON ? "on" : "off", best[1] == ENG_FA_ON ? "on" : "off",
                    bound > 0 ? ours[1].median / bound : 0,
                    bound > 0 ? s[best[1]][1].median / bound : 0);
        } else {
            fprintf(stderr, "%-8d %8.1f                   %8.1f                   -            %.2f\n",
                    ctx, ours[0].median, ours[1].median, bound > 0 ? ours[1].median / bound : 0);
        }
    }
    fflush(stdout);
}

/* bw[0] best, bw[1] median of five passes over a buffer of `bytes`. */
static bool read_bandwidth(const bench_opts *o, const char *when, size_t bytes, double bw[2])
{
    if (!bench_read_bandwidth(o->threads, bytes, 5, &bw[0], &bw[1])) {
        cli_error("bench", "the read-bandwidth kernel could not run (%zu MiB)", bytes >> 20);
        return false;
    }
    fprintf(stderr, "read bandwidth %s (%d threads, %zu MiB): best %.1f GB/s, median %.1f GB/s\n",
            when, o->threads, bytes >> 20, bw[0] / 1e9, bw[1] / 1e9);
    return true;
}

static int bench_generate(const bench_opts *o)
{
    ekv_error err = {0};
    int ret = CLI_FAIL;
    int32_t max_ctx = 0;
    for (int i = 0; i < o->n_contexts; i++)
        if (o->contexts[i] > max_ctx)
            max_ctx = o->contexts[i];
    ekv_runtime *rt = NULL;
    kv_pool *kv = NULL;
    kvc_profile *prof = NULL;
    int32_t *ids = NULL;
    ctx_runs *runs = calloc((size_t)o->n_contexts, sizeof *runs);
    llamacpp_info info = {0};
    /* best and median: before the rounds, after them, and over a buffer the
     * size of the weights (which a last-level cache may hold) */
    double bw[6] = {0};
    const char *llama_bench = o->reference ? llamacpp_find_bench(o->llama_bench) : NULL;
    if (o->reference && !llama_bench) {
        cli_error("bench", "no llama-bench found%s%s: run scripts/setup.sh --bench, or pass "
                           "--llama-bench PATH or --no-reference",
                  o->llama_bench ? " at " : "", o->llama_bench ? o->llama_bench : "");
        free(runs);
        return CLI_FAIL;
    }
    ekv_model *m = runs ? model_load(o->model, &err) : NULL;
    if (!m)
        goto fail;
    /* variants: the full prompt, its compressed clones and the one decoding */
    kv = model_kv_pool_create(m, o->variants ? 3 * max_ctx : max_ctx, &err);
    if (kv && !strcmp(o->device, "cuda")) {
#ifdef EKV_HAVE_CUDA
        rt = model_runtime_create_cuda(m, o->chunk, max_ctx, 0, max_ctx, &err);
#else
        ekv_error_set(&err, EKV_EUNSUPPORTED, "--device cuda: this build has no CUDA backend");
#endif
    } else if (kv) {
        rt = model_runtime_create(m, o->chunk, max_ctx, o->threads, &err);
    }
    ids = rt ? text_tokens(model_tokenizer(m), o->text, max_ctx, &err) : NULL;
    if (!ids)
        goto fail;
    if (o->bw_mib > 0 && !read_bandwidth(o, "before", (size_t)o->bw_mib << 20, &bw[0]))
        goto out;
    bench_result warm;
    if (measure(rt, kv, NULL, ids, 32, 4, &warm, &err))
        goto fail;
    kvc_policy pol;
    const bool compress = strcmp(o->kv.method, "full") != 0 || o->kv.recall > 0;
    if (compress && (ret = cli_kv_policy("bench", &o->kv, m, o->model, &pol, &prof)) != CLI_OK)
        goto out;
    ret = CLI_FAIL;
    if (o->variants) {
        if (!compress) {
            cli_error("bench", "--decode-variants needs --kv-method and --kv-budget");
            goto out;
        }
        for (int i = 0; i < o->n_contexts; i++)
            if (bench_decode_variants(rt, kv, &pol, ids, o->contexts[i] - o->n_decode,
                                      o->n_decode, o->reps, o->variants, o->threads, &err))
                goto fail;
        ret = CLI_OK;
        goto out;
    }
    /* Rounds outermost, engines alternating inside each (and which goes first
     * alternating between rounds), so drift in the machine's speed falls on
     * both engines alike. */
    for (int round = 0; round < o->reps; round++) {
        for (int i = 0; i < o->n_contexts; i++) {
            const int32_t ctx = o->contexts[i], n_prompt = ctx - o->n_decode;
            for (int turn = 0; turn < 2; turn++) {
                if ((turn + round) % 2) {
                    if (llama_bench && !reference(o, llama_bench, n_prompt, round, &runs[i], &info)) {
                        cli_error("bench", "the llama.cpp reference failed at context %d", ctx);
                        goto out;
                    }
                    continue;
                }
                bench_result *r = &runs[i].r[ENG_OURS][runs[i].n[ENG_OURS]++];
                if (measure(rt, kv, compress ? &pol : NULL, ids, n_prompt, o->n_decode, r, &err))
                    goto fail;
                printf("{\"bench\":\"generate\",\"engine\":\"entrokv\",\"round\":%d,\"context\":%d,"
                       "\"prompt_tokens\":%d,\"decode_tokens\":%d,\"threads\":%d,"
                       "\"prefill_tokens_per_s\":%.2f,\"decode_tokens_per_s\":%.2f",
                       round, ctx, n_prompt, o->n_decode, o->threads, r->prefill_tps,
                       r->decode_tps);
                /* what attention reads per token besides recalled blocks */
                printf(",\"kv_resident_bytes\":%lld", (long long)r->kv_bytes);
                if (compress)
                    printf(",\"kv_method\":\"%s\",\"kv_budget\":%g,\"recall\":%d", o->kv.method,
                           o->kv.budget, o->kv.recall);
                if (o->kv.recall > 0) /* the mode that ran (cli.h: --recall-gather) */
                    printf(",\"recall_mode\":\"%s\",\"recall_gather\":%d",
                           o->kv.recall_gather ? "tokens" : "blocks", o->kv.recall_gather);
                if (o->kv.recall > 0) /* per decode step (one token): what recall moved */
                    printf(",\"recall_blocks\":%lld,\"recall_bytes\":%lld,"
                           "\"recall_bytes_per_token\":%.1f,\"recall_evicted_tokens\":%lld,"
                           "\"recall_select_s\":%.6f,\"recall_rank_bytes_per_token\":%.1f,"
                           "\"recall_rank_k_blocks\":%lld",
                           (long long)r->recall_blocks, (long long)r->recall_bytes,
                           (double)r->recall_bytes / o->n_decode, (long long)r->recall_evicted,
                           r->recall_select_s, (double)r->rank_bytes / o->n_decode,
                           (long long)r->rank_k_blocks);
                printf("}\n");
            }
            fflush(stdout);
        }
        fprintf(stderr, "round %d/%d done\n", round + 1, o->reps);
    }
    /* bandwidth again after the rounds: the bound is the better of the two */
    if (o->bw_mib > 0 && !read_bandwidth(o, "after", (size_t)o->bw_mib << 20, &bw[2]))
        goto out;
    if (o->bw_mib > 0 && !read_bandwidth(o, "weights-sized", model_weight_bytes(m), &bw[4]))
        goto out;
    print_meta(o, llama_bench, &info, bw, model_weight_bytes(m));
    summarize(o, m, runs, bw[0] > bw[2] ? bw[0] : bw[2]);
    ret = CLI_OK;
    goto out;
fail:
    cli_error("bench", "%s", err.msg);
out:
    kvc_profile_free(prof);
    free(runs);
    free(ids);
    model_runtime_free(rt);
    kv_pool_destroy(kv);
    model_free(m);
    return ret;
}

int cmd_bench(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fprintf(argc < 2 ? stderr : stdout,
                "usage: entrokv bench generate --model PATH [--contexts 128,512,2048,8192]\n"
                "       [--threads 2] [--n-decode 64] [--chunk 512] [--text FILE] [--reps 5]\n"
                "       [--device cpu|cuda] (cuda: the forward on GPU 0, with --no-reference)\n"
                "       [--flash-attn both|on|off] [--bw-mib 1024] [--llama-bench PATH]\n"
                "       [--no-reference] [--json] [--kv-method M --kv-budget B [--recall R]]\n"
                "       (entrokv's prompt compressed with M at B, recall R per head and step;\n"
                "       the JSON lines then carry recall_bytes_per_token)\n"
                "       [--decode-variants full,norecall,16:fast,16:scalar,0:fast,...]\n"
                "       (one prefill per context, then --n-decode steps per variant on clones,\n"
                "       --reps rounds: full KV, the policy without recall, recall ranking with\n"
                "       M exact channels, batched and pruned or one block at a time)\n"
                "       entrokv bench serve|membound|kvstore|restore|soak|tp --help\n");
        return argc < 2 ? CLI_USAGE : CLI_OK;
    }
    if (!strcmp(argv[1], "kvstore"))
        return bench_kvstore(argc - 1, argv + 1);
    if (!strcmp(argv[1], "restore"))
        return bench_restore(argc - 1, argv + 1);
    if (!strcmp(argv[1], "serve"))
        return bench_serve(argc - 1, argv + 1);
    if (!strcmp(argv[1], "soak"))
        return bench_soak(argc - 1, argv + 1);
    if (!strcmp(argv[1], "tp"))
        return bench_tp(argc - 1, argv + 1);
    if (!strcmp(argv[1], "membound"))
        return bench_membound(argc - 1, argv + 1);
#ifdef EKV_HAVE_CUDA
    if (!strcmp(argv[1], "cuda-attention")) {
        int bench_cuda(int argc, char **argv); /* bench/bench_cuda.c */
        return bench_cuda(argc - 1, argv + 1);
    }
#endif
    if (strcmp(argv[1], "generate") != 0) {
        cli_error("bench", "unknown benchmark '%s' (available: generate, kvstore, membound, "
                  "restore, serve, soak, tp)",
                  argv[1]);
        return CLI_USAGE;
    }
    bench_opts o;
    int rc = parse(argc, argv, &o);
    if (rc)
        return rc;
    return bench_generate(&o);
}

/* Runs bench/<script> with the project's .venv Python (else python3),
 * --entrokv this binary and argv[1..]; returns only when it cannot. */
static int run_script(const char *script, int argc, char **argv)
{
    static const char *pythons[] = {".venv/bin/python", EKV_SOURCE_DIR "/.venv/bin/python"};
    const char *python = "python3";
    for (size_t i = 0; i < sizeof pythons / sizeof pythons[0]; i++)
        if (access(pythons[i], X_OK) == 0) {
            python = pythons[i];
            break;
        }
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        cli_error("bench", "cannot find this binary's path");
        return CLI_FAIL;
    }
    self[n] = 0;
    char **args = calloc((size_t)argc + 8, sizeof *args);
    if (!args)
        return CLI_FAIL;
    int k = 0;
    args[k++] = (char *)python;
    args[k++] = (char *)script;
    args[k++] = "--entrokv";
    args[k++] = self;
    for (int i = 1; i < argc; i++)
        args[k++] = argv[i];
    args[k] = NULL;
    execvp(args[0], args);
    cli_error("bench", "cannot run %s: %s", args[0], strerror(errno));
    free(args);
    return CLI_FAIL;
}

/* `entrokv bench serve`: bench/bench_serve.py drives this binary's server and
 * llama.cpp's llama-server with real HTTP clients (it needs only Python's
 * standard library). */
int bench_serve(int argc, char **argv)
{
    return run_script(EKV_SOURCE_DIR "/bench/bench_serve.py", argc, argv);
}

/* `entrokv bench soak --minutes N`: bench/bench_soak.py runs a coordinator
 * and two workers of this binary under faults (issue 21); it needs grpcio
 * and grpcio-tools (the project's .venv). */
int bench_soak(int argc, char **argv)
{
    return run_script(EKV_SOURCE_DIR "/bench/bench_soak.py", argc, argv);
}

/* `entrokv bench membound`: bench/bench_membound.py, serving with long
 * prompts and a KV pool of a few full sequences, full KV against
 * compressed (issue 22); it needs grpcio-tools and, for --plot, matplotlib. */
int bench_membound(int argc, char **argv)
{
    return run_script(EKV_SOURCE_DIR "/bench/bench_membound.py", argc, argv);
}

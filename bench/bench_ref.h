/*
 * bench_ref.h - what `entrokv bench generate` shares between its files:
 * llama.cpp's own llama-bench as the reference (bench_llamacpp.c) and the
 * machine's streaming-read bandwidth (bench_bandwidth.c).
 */
#ifndef ENTROKV_BENCH_REF_H
#define ENTROKV_BENCH_REF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "entrokv/compress.h"
#include "entrokv/kvcache.h"
#include "entrokv/model.h"

/* Runs argv and returns its stdout (malloc'd, NUL-terminated), or NULL if it
 * could not start or exited non-zero; its stderr is discarded when quiet. */
char *bench_capture(char *const argv[], bool quiet);

/* The llama-bench to use: explicit (must be executable), else the one
 * scripts/setup.sh --bench builds (build/llamacpp/bin/ under the current
 * directory or the source tree). NULL when none is found. */
const char *llamacpp_find_bench(const char *explicit_path);

/* One llama-bench test: a prompt of n_prompt tokens, or n_gen generated
 * tokens after n_depth tokens of context, with flash attention on or off. */
typedef struct llamacpp_row {
    bool flash_attn;
    int32_t n_prompt, n_gen, n_depth;
    double tokens_per_s; /* avg_ts of one repetition */
} llamacpp_row;

typedef struct llamacpp_info {
    char build_commit[48], cpu_info[128], type_k[16];
    int64_t build_number;
    int32_t n_batch, n_ubatch;
} llamacpp_info;

/* Runs `llama-bench -m model -t threads -fa <fa list> -r 1 -o jsonl` for one
 * shape: a prompt (n_gen == 0) or generation at a depth (n_prompt == 0).
 * fa_on/fa_off choose the flash attention settings. Fills up to max_rows
 * rows and *info (from the first row); returns the row count, -1 on failure
 * (the command line is printed on stderr). */
int llamacpp_bench(const char *llama_bench, const char *model, int32_t threads, bool fa_on,
                   bool fa_off, int32_t n_prompt, int32_t n_gen, int32_t n_depth, bool warmup,
                   llamacpp_row *rows, int max_rows, llamacpp_info *info);

/* Streaming read bandwidth: `threads` threads each sum their share of a
 * buffer of `bytes` bytes, `passes` times; bytes per second of the best and
 * the median pass. Returns false when the buffer cannot be allocated. */
bool bench_read_bandwidth(int threads, size_t bytes, int passes, double *best, double *median);

/* --decode-variants (bench_variants.c): one prefill of n_prompt ids with
 * pol's capture, then n_decode greedy steps per variant of list on clones,
 * for rounds rounds, one JSON line a run on stdout. */
ekv_status bench_decode_variants(ekv_runtime *rt, kv_pool *kv, const kvc_policy *pol,
                                 const int32_t *prompt, int32_t n_prompt, int32_t n_decode,
                                 int rounds, const char *list, int threads, ekv_error *err);

#endif

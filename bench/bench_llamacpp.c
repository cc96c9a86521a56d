/*
 * bench_llamacpp.c - llama.cpp's own llama-bench as the reference for
 * `entrokv bench generate`: finds the binary scripts/setup.sh --bench builds,
 * runs one shape per call (-r 1, so the caller can alternate engines between
 * repetitions) and reads its JSON lines (-o jsonl).
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench_ref.h"

#ifndef EKV_SOURCE_DIR
#define EKV_SOURCE_DIR "."
#endif

extern char **environ;

char *bench_capture(char *const argv[], bool quiet)
{
    int fds[2];
    if (pipe(fds) != 0)
        return NULL;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fds[1], STDOUT_FILENO);
    posix_spawn_file_actions_addclose(&fa, fds[0]);
    if (quiet)
        posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
    pid_t pid;
    int rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(fds[1]);
    if (rc != 0) {
        close(fds[0]);
        return NULL;
    }
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    ssize_t n;
    while (buf && (n = read(fds[0], buf + len, cap - len - 1)) > 0) {
        len += (size_t)n;
        if (len + 1 == cap) {
            char *b2 = realloc(buf, cap *= 2);
            if (!b2)
                free(buf);
            buf = b2;
        }
    }
    close(fds[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (!buf || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        free(buf);
        return NULL;
    }
    buf[len] = 0;
    return buf;
}

const char *llamacpp_find_bench(const char *explicit_path)
{
    static const char *candidates[] = {"build/llamacpp/bin/llama-bench",
                                       EKV_SOURCE_DIR "/build/llamacpp/bin/llama-bench"};
    if (explicit_path)
        return access(explicit_path, X_OK) == 0 ? explicit_path : NULL;
    for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++)
        if (access(candidates[i], X_OK) == 0)
            return candidates[i];
    return NULL;
}

static void copy_str(char *dst, size_t cap, const cJSON *j)
{
    snprintf(dst, cap, "%s", cJSON_IsString(j) ? j->valuestring : "unknown");
}

static int32_t get_int(const cJSON *row, const char *key)
{
    const cJSON *j = cJSON_GetObjectItemCaseSensitive(row, key);
    return cJSON_IsNumber(j) ? (int32_t)j->valuedouble : -1;
}

/* One JSON line of llama-bench into *r; false when a field is missing. */
static bool parse_row(const cJSON *row, llamacpp_row *r, llamacpp_info *info, bool first)
{
    const cJSON *ts = cJSON_GetObjectItemCaseSensitive(row, "avg_ts");
    const int32_t fa = get_int(row, "flash_attn");
    if (!cJSON_IsNumber(ts) || ts->valuedouble <= 0 || (fa != 0 && fa != 1))
        return false;
    *r = (llamacpp_row){.flash_attn = fa == 1, .n_prompt = get_int(row, "n_prompt"),
                        .n_gen = get_int(row, "n_gen"), .n_depth = get_int(row, "n_depth"),
                        .tokens_per_s = ts->valuedouble};
    if (first) {
        copy_str(info->build_commit, sizeof info->build_commit,
                 cJSON_GetObjectItemCaseSensitive(row, "build_commit"));
        copy_str(info->cpu_info, sizeof info->cpu_info,
                 cJSON_GetObjectItemCaseSensitive(row, "cpu_info"));
        copy_str(info->type_k, sizeof info->type_k,
                 cJSON_GetObjectItemCaseSensitive(row, "type_k"));
        const cJSON *bn = cJSON_GetObjectItemCaseSensitive(row, "build_number");
        info->build_number = cJSON_IsNumber(bn) ? (int64_t)bn->valuedouble : -1;
        info->n_batch = get_int(row, "n_batch");
        info->n_ubatch = get_int(row, "n_ubatch");
    }
    return true;
}

int llamacpp_bench(const char *llama_bench, const char *model, int32_t threads, bool fa_on,
                   bool fa_off, int32_t n_prompt, int32_t n_gen, int32_t n_depth, bool warmup,
                   llamacpp_row *rows, int max_rows, llamacpp_info *info)
{
    char t[16], p[16], n[16], d[16];
    snprintf(t, sizeof t, "%d", threads);
    snprintf(p, sizeof p, "%d", n_prompt);
    snprintf(n, sizeof n, "%d", n_gen);
    snprintf(d, sizeof d, "%d", n_depth);
    const char *fa = fa_on && fa_off ? "on,off" : fa_on ? "on" : "off";
    char *argv[] = {(char *)llama_bench, "-m", (char *)model, "-t", t, "-fa", (char *)fa,
                    "-p", p, "-n", n, "-d", d, "-r", "1", "-o", "jsonl",
                    warmup ? NULL : "--no-warmup", NULL};
    char *out = bench_capture(argv, true);
    int count = 0;
    for (char *line = out, *next; out && line && *line && count < max_rows; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        cJSON *row = cJSON_Parse(line);
        /* a JSON line without the fields is a format this code does not know */
        if (!row || !parse_row(row, &rows[count], info, count == 0)) {
            cJSON_Delete(row);
            count = -1;
            break;
        }
        cJSON_Delete(row);
        count++;
    }
    if (!out || count <= 0) {
        fprintf(stderr, "entrokv bench: llama-bench failed or printed no result: %s -m %s -t %s "
                        "-fa %s -p %s -n %s -d %s -r 1 -o jsonl%s\n",
                llama_bench, model, t, fa, p, n, d, warmup ? "" : " --no-warmup");
        count = -1;
    }
    free(out);
    return count;
}

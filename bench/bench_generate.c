/*
 * bench_generate.c - `entrokv bench generate`: prefill and decode tokens/s at
 * several context lengths, with llama.cpp (llama-cpp-python on the same GGUF
 * and thread count) measured in the same run as the reference.
 *
 * Prompts are real text (Debian's GPL-3, repeated when a context needs more
 * tokens than it has). A context of N means a prompt of N - n_decode tokens
 * followed by n_decode greedy decode steps, so the last step attends over N
 * tokens. Output: one JSON line per measurement and per ratio on stdout, a
 * human summary on stderr.
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

#include "cli.h"
#include "entrokv/generate.h"
#include "entrokv/kvcache.h"
#include "entrokv/model.h"
#include "entrokv/tokenizer.h"

#ifndef EKV_SOURCE_DIR
#define EKV_SOURCE_DIR "."
#endif

#define MAX_CONTEXTS 16

extern char **environ;

typedef struct bench_opts {
    const char *model, *text, *ref_script, *python;
    int32_t threads, n_decode, chunk;
    int32_t contexts[MAX_CONTEXTS];
    int n_contexts;
    bool reference;
} bench_opts;

typedef struct bench_result {
    double prefill_tps, decode_tps;
} bench_result;

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
    *o = (bench_opts){.text = "/usr/share/common-licenses/GPL-3",
                      .ref_script = EKV_SOURCE_DIR "/bench/llamacpp_ref.py",
                      .threads = 2, .n_decode = 64, .chunk = 512, .reference = true};
    parse_contexts("128,512,2048,8192", o);
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *s;
        bool ok = true;
        if (!strcmp(a, "--model"))
            ok = cli_take_str(argc, argv, &i, &o->model);
        else if (!strcmp(a, "--text"))
            ok = cli_take_str(argc, argv, &i, &o->text);
        else if (!strcmp(a, "--threads"))
            ok = cli_take_int(argc, argv, &i, 1, 1024, &o->threads);
        else if (!strcmp(a, "--n-decode"))
            ok = cli_take_int(argc, argv, &i, 1, 100000, &o->n_decode);
        else if (!strcmp(a, "--chunk"))
            ok = cli_take_int(argc, argv, &i, 1, 4096, &o->chunk);
        else if (!strcmp(a, "--ref-script"))
            ok = cli_take_str(argc, argv, &i, &o->ref_script);
        else if (!strcmp(a, "--python"))
            ok = cli_take_str(argc, argv, &i, &o->python);
        else if (!strcmp(a, "--no-reference"))
            o->reference = false;
        else if (!strcmp(a, "--json"))
            ; /* JSON lines are always printed on stdout */
        else if (!strcmp(a, "--contexts")) {
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

/* Prefill n_prompt ids, then n_decode greedy steps, timing each phase. */
static ekv_status measure(ekv_runtime *rt, kv_pool *kv, const int32_t *prompt, int32_t n_prompt,
                          int32_t n_decode, bench_result *r, ekv_error *err)
{
    const ekv_model_config *c = model_config(model_runtime_model(rt));
    float *logits = malloc((size_t)c->n_vocab * sizeof *logits);
    kv_seq *seq = kv_seq_create(kv, c->n_layers, c->n_kv_heads, err);
    ekv_status rc = EKV_OK;
    if (!logits || !seq) {
        rc = seq ? ekv_error_set(err, EKV_ENOMEM, "out of memory") : err->code;
        goto out;
    }
    double t0 = gen_now();
    rc = model_prefill(rt, seq, prompt, n_prompt, 0, NULL, logits, err);
    double t1 = gen_now();
    for (int32_t i = 0; i < n_decode && !rc; i++) {
        int32_t id = argmax(logits, c->n_vocab), p = n_prompt + i;
        model_batch b = {.n = 1, .tokens = &id, .pos = &p, .seqs = &seq};
        rc = model_forward(rt, &b, logits, err);
    }
    double t2 = gen_now();
    r->prefill_tps = n_prompt / (t1 - t0);
    r->decode_tps = n_decode / (t2 - t1);
out:
    kv_seq_free(seq);
    free(logits);
    return rc;
}

/* Runs argv and returns its stdout (malloc'd), or NULL if it failed; its
 * stderr is discarded when quiet. */
static char *capture(char *const argv[], bool quiet)
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
            if (!b2) {
                free(buf);
                buf = NULL;
            }
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

/* The first interpreter that can import llama_cpp. */
static const char *find_python(const bench_opts *o)
{
    static const char *candidates[] = {".venv/bin/python", EKV_SOURCE_DIR "/.venv/bin/python",
                                       "python3"};
    if (o->python)
        return o->python;
    for (size_t i = 0; i < sizeof candidates / sizeof candidates[0]; i++) {
        char *argv[] = {(char *)candidates[i], "-c", "import llama_cpp", NULL};
        char *outp = capture(argv, true);
        if (outp) {
            free(outp);
            return candidates[i];
        }
    }
    return NULL;
}

static bool reference(const bench_opts *o, const char *python, const int32_t *prompt,
                      int32_t n_prompt, bench_result *r)
{
    char path[] = "/tmp/entrokv-bench-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0)
        return false;
    FILE *f = fdopen(fd, "w");
    for (int32_t i = 0; f && i < n_prompt; i++)
        fprintf(f, "%d ", prompt[i]);
    if (f)
        fclose(f);
    char threads[16], n_decode[16];
    snprintf(threads, sizeof threads, "%d", o->threads);
    snprintf(n_decode, sizeof n_decode, "%d", o->n_decode);
    char *argv[] = {(char *)python, (char *)o->ref_script, "--model", (char *)o->model,
                    "--tokens-file", path, "--threads", threads, "--n-decode", n_decode, NULL};
    char *out = capture(argv, false);
    unlink(path);
    if (!out)
        return false;
    cJSON *j = cJSON_Parse(out);
    free(out);
    const cJSON *p = cJSON_GetObjectItem(j, "prefill_tokens_per_s");
    const cJSON *d = cJSON_GetObjectItem(j, "decode_tokens_per_s");
    bool ok = cJSON_IsNumber(p) && cJSON_IsNumber(d);
    if (ok) {
        r->prefill_tps = p->valuedouble;
        r->decode_tps = d->valuedouble;
    }
    cJSON_Delete(j);
    return ok;
}

static void print_line(const char *engine, int32_t ctx, int32_t n_prompt, const bench_opts *o,
                       const bench_result *r)
{
    printf("{\"bench\":\"generate\",\"engine\":\"%s\",\"context\":%d,\"prompt_tokens\":%d,"
           "\"decode_tokens\":%d,\"threads\":%d,\"prefill_tokens_per_s\":%.2f,"
           "\"decode_tokens_per_s\":%.2f}\n",
           engine, ctx, n_prompt, o->n_decode, o->threads, r->prefill_tps, r->decode_tps);
    fflush(stdout);
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
    int32_t *ids = NULL;
    ekv_model *m = model_load(o->model, &err);
    if (!m)
        goto fail;
    kv = model_kv_pool_create(m, max_ctx, &err);
    rt = kv ? model_runtime_create(m, o->chunk, max_ctx, o->threads, &err) : NULL;
    ids = rt ? text_tokens(model_tokenizer(m), o->text, max_ctx, &err) : NULL;
    if (!ids)
        goto fail;
    const char *python = o->reference ? find_python(o) : NULL;
    if (o->reference && !python) {
        cli_error("bench", "no Python with llama_cpp found: run scripts/setup.sh --bench, or "
                           "pass --python or --no-reference");
        goto out;
    }
    bench_result warm;
    if (measure(rt, kv, ids, 32, 4, &warm, &err))
        goto fail;
    fprintf(stderr, "%-8s %-22s %-22s %s\n", "context", "prefill tok/s (ratio)",
            "decode tok/s (ratio)", "threads");
    for (int i = 0; i < o->n_contexts; i++) {
        const int32_t ctx = o->contexts[i], n_prompt = ctx - o->n_decode;
        bench_result ours, ref = {0};
        if (measure(rt, kv, ids, n_prompt, o->n_decode, &ours, &err))
            goto fail;
        print_line("entrokv", ctx, n_prompt, o, &ours);
        bool have_ref = python && reference(o, python, ids, n_prompt, &ref);
        if (python && !have_ref)
            fprintf(stderr, "entrokv bench: the llama.cpp reference failed at context %d\n", ctx);
        if (have_ref) {
            print_line("llama.cpp", ctx, n_prompt, o, &ref);
            printf("{\"bench\":\"generate\",\"ratio_vs\":\"llama.cpp\",\"context\":%d,"
                   "\"prefill_ratio\":%.3f,\"decode_ratio\":%.3f}\n",
                   ctx, ours.prefill_tps / ref.prefill_tps, ours.decode_tps / ref.decode_tps);
            fprintf(stderr, "%-8d %8.1f (%5.2fx)      %8.1f (%5.2fx)      %d\n", ctx,
                    ours.prefill_tps, ours.prefill_tps / ref.prefill_tps, ours.decode_tps,
                    ours.decode_tps / ref.decode_tps, o->threads);
        } else {
            fprintf(stderr, "%-8d %8.1f               %8.1f               %d\n", ctx,
                    ours.prefill_tps, ours.decode_tps, o->threads);
        }
        fflush(stdout);
    }
    ret = CLI_OK;
    goto out;
fail:
    cli_error("bench", "%s", err.msg);
out:
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
                "       [--threads 2] [--n-decode 64] [--chunk 512] [--text FILE]\n"
                "       [--python PY] [--ref-script PATH] [--no-reference] [--json]\n");
        return argc < 2 ? CLI_USAGE : CLI_OK;
    }
    if (!strcmp(argv[1], "kvstore"))
        return bench_kvstore(argc - 1, argv + 1);
    if (!strcmp(argv[1], "restore"))
        return bench_restore(argc - 1, argv + 1);
    if (!strcmp(argv[1], "serve"))
        return bench_serve(argc - 1, argv + 1);
#ifdef EKV_HAVE_CUDA
    if (!strcmp(argv[1], "cuda-attention")) {
        int bench_cuda(int argc, char **argv); /* bench/bench_cuda.c */
        return bench_cuda(argc - 1, argv + 1);
    }
#endif
    if (strcmp(argv[1], "generate") != 0) {
        cli_error("bench", "unknown benchmark '%s' (available: generate, kvstore, restore, serve)",
                  argv[1]);
        return CLI_USAGE;
    }
    bench_opts o;
    int rc = parse(argc, argv, &o);
    if (rc)
        return rc;
    return bench_generate(&o);
}

/* `entrokv bench serve`: bench/bench_serve.py drives this binary's server and
 * llama.cpp's (llama-cpp-python[server]) with real HTTP clients. */
int bench_serve(int argc, char **argv)
{
    bench_opts o = {0};
    const char *python = find_python(&o);
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
    args[k++] = (char *)(python ? python : "python3");
    args[k++] = EKV_SOURCE_DIR "/bench/bench_serve.py";
    args[k++] = "--entrokv";
    args[k++] = self;
    if (python) {
        args[k++] = "--python";
        args[k++] = (char *)python;
    }
    for (int i = 1; i < argc; i++)
        args[k++] = argv[i];
    args[k] = NULL;
    execvp(args[0], args);
    cli_error("bench", "cannot run %s: %s", args[0], strerror(errno));
    free(args);
    return CLI_FAIL;
}

/*
 * fixture_parse.h - reading the llama.cpp fixtures in tests/fixtures (format:
 * tests/fixtures/README.md). Header-only; tests include it once.
 */
#ifndef EKV_FIXTURE_PARSE_H
#define EKV_FIXTURE_PARSE_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FIX_TOPK 10

typedef struct fix_prompt {
    char *text;          /* decoded from hex, NUL-terminated */
    int parse_special;
    int32_t *ids;
    int32_t n_ids;
    /* logits.txt: top-10 (id, logit) per position, and the log-sum-exp of
     * the whole row (NAN where the file has none) */
    int32_t (*top_id)[FIX_TOPK];
    float (*top_logit)[FIX_TOPK];
    double *lse;
    /* greedy.txt: the continuation and llama.cpp's top1 - top2 logit gap
     * at each of its steps */
    int32_t *gen;
    int32_t n_gen;
    float *margins;
} fix_prompt;

static char *fix_unhex(const char *h)
{
    size_t n = strlen(h) / 2;
    char *s = malloc(n + 1);
    for (size_t i = 0; i < n; i++) {
        unsigned v;
        sscanf(h + 2 * i, "%2x", &v);
        s[i] = (char)v;
    }
    s[n] = 0;
    return s;
}

/* Parses logits.txt, logits_long.txt or greedy.txt into *out (n prompts).
 * Returns -1 if the file cannot be read. */
static int fix_load(const char *path, fix_prompt **out, int *n_out)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t cap = 1 << 20;
    char *line = malloc(cap);
    fix_prompt *ps = NULL;
    int n = 0;
    while (fgets(line, (int)cap, f)) {
        if (!strncmp(line, "# margins ", 10) && n && ps[n - 1].n_gen) {
            fix_prompt *p = &ps[n - 1];
            p->margins = calloc((size_t)p->n_gen, sizeof *p->margins);
            char *save = NULL, *tok = strtok_r(line + 10, " \n", &save);
            for (int32_t i = 0; tok && i < p->n_gen; i++, tok = strtok_r(NULL, " \n", &save))
                p->margins[i] = strtof(tok, NULL);
            continue;
        }
        if (line[0] == '#' || line[0] == '\n')
            continue;
        char *save = NULL, *tok = strtok_r(line, " \n", &save);
        if (!tok)
            continue;
        if (!strcmp(tok, "prompt")) {
            ps = realloc(ps, (size_t)(n + 1) * sizeof *ps);
            fix_prompt *p = &ps[n++];
            memset(p, 0, sizeof *p);
            p->text = fix_unhex(strtok_r(NULL, " \n", &save));
            p->parse_special = atoi(strtok_r(NULL, " \n", &save));
            p->n_ids = atoi(strtok_r(NULL, " \n", &save));
            p->ids = malloc((size_t)p->n_ids * sizeof *p->ids);
            p->top_id = calloc((size_t)p->n_ids, sizeof *p->top_id);
            p->top_logit = calloc((size_t)p->n_ids, sizeof *p->top_logit);
            p->lse = malloc((size_t)p->n_ids * sizeof *p->lse);
            for (int32_t i = 0; i < p->n_ids; i++)
                p->lse[i] = NAN;
            for (int32_t i = 0; i < p->n_ids; i++)
                p->ids[i] = atoi(strtok_r(NULL, " \n", &save));
        } else if (!strcmp(tok, "pos") && n) {
            fix_prompt *p = &ps[n - 1];
            int32_t i = atoi(strtok_r(NULL, " \n", &save));
            for (int k = 0; k < FIX_TOPK && i >= 0 && i < p->n_ids; k++) {
                char *pair = strtok_r(NULL, " \n", &save);
                p->top_id[i][k] = atoi(pair);
                p->top_logit[i][k] = strtof(strchr(pair, ':') + 1, NULL);
            }
            char *key = strtok_r(NULL, " \n", &save);
            if (key && !strcmp(key, "lse") && i >= 0 && i < p->n_ids)
                p->lse[i] = strtod(strtok_r(NULL, " \n", &save), NULL);
        } else if (!strcmp(tok, "gen") && n) {
            fix_prompt *p = &ps[n - 1];
            p->n_gen = atoi(strtok_r(NULL, " \n", &save));
            p->gen = malloc((size_t)p->n_gen * sizeof *p->gen);
            for (int32_t i = 0; i < p->n_gen; i++)
                p->gen[i] = atoi(strtok_r(NULL, " \n", &save));
        }
    }
    free(line);
    fclose(f);
    *out = ps;
    *n_out = n;
    return 0;
}

static void fix_free(fix_prompt *ps, int n)
{
    for (int i = 0; i < n; i++) {
        free(ps[i].text);
        free(ps[i].ids);
        free(ps[i].top_id);
        free(ps[i].top_logit);
        free(ps[i].lse);
        free(ps[i].gen);
        free(ps[i].margins);
    }
    free(ps);
}

#endif

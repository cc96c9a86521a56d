/*
 * profile.c - UNComp's offline head groups: calibration votes and the
 * profile file (specs/uncomp.md section 2).
 *
 * The file is text, one fact per line, so it diffs and reviews well:
 *   entrokv-uncomp-profile 1
 *   model <arch> <n_layers> <n_heads> <n_kv_heads> <head_dim> <n_vocab> <name...>
 *   samples <n>
 *   layer <l> votes <v_0> ... <v_{HKV-1}> entropy <e_0> ... <e_{HKV-1}>   (one per layer)
 * The model line must match the model it is loaded for.
 */
#include "compress_internal.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PROFILE_MAGIC "entrokv-uncomp-profile 1"
#define PROFILE_MAX_HEADS 256

struct kvc_profile {
    int32_t n_layers, n_kv_heads;
    int *high; /* [layer][kv head] */
};

struct kvc_calibration {
    ekv_model_config cfg;
    int32_t samples;
    int32_t *votes;  /* [layer][kv head] */
    double *sum_e;   /* [layer][kv head] */
};

int kvc_profile_is_high(const kvc_profile *p, int32_t layer, int32_t head)
{
    return p->high[(size_t)layer * p->n_kv_heads + head];
}

void kvc_profile_free(kvc_profile *p)
{
    if (!p)
        return;
    free(p->high);
    free(p);
}

static void model_line(const ekv_model_config *c, char *out, size_t cap)
{
    snprintf(out, cap, "model %s %d %d %d %d %d %s", c->arch, c->n_layers, c->n_heads,
             c->n_kv_heads, c->head_dim, c->n_vocab, c->name[0] ? c->name : "-");
}

/* Picks the n_high heads with the most votes (ties: higher mean entropy, then
 * the lower index). */
static void groups_from_votes(const int32_t *votes, const double *e, int32_t n, int *high)
{
    const int32_t n_high = n / 2 > 0 ? n / 2 : 1;
    for (int32_t i = 0; i < n; i++) {
        int32_t above = 0;
        for (int32_t j = 0; j < n; j++)
            if (votes[j] > votes[i] || (votes[j] == votes[i] && (e[j] > e[i] ||
                                                                  (e[j] == e[i] && j < i))))
                above++;
        high[i] = above < n_high;
    }
}

kvc_profile *kvc_profile_load(const char *path, const ekv_model *m, ekv_error *err)
{
    const ekv_model_config *cfg = model_config(m);
    const int32_t L = cfg->n_layers, HKV = cfg->n_kv_heads;
    FILE *f = fopen(path, "r");
    kvc_profile *p = NULL;
    int32_t *votes = NULL;
    double *e = NULL;
    char line[1024], want[512];
    if (!f) {
        ekv_error_set(err, EKV_EIO, "profile %s: %s", path, strerror(errno));
        return NULL;
    }
    if (HKV > PROFILE_MAX_HEADS) {
        ekv_error_set(err, EKV_EUNSUPPORTED, "profile: more than %d KV heads", PROFILE_MAX_HEADS);
        goto fail;
    }
    p = calloc(1, sizeof *p);
    votes = calloc((size_t)L * HKV, sizeof *votes);
    e = calloc((size_t)L * HKV, sizeof *e);
    if (p)
        p->high = calloc((size_t)L * HKV, sizeof *p->high);
    if (!p || !p->high || !votes || !e) {
        ekv_error_set(err, EKV_ENOMEM, "profile: out of memory");
        goto fail;
    }
    p->n_layers = L;
    p->n_kv_heads = HKV;
    if (!fgets(line, sizeof line, f) || strncmp(line, PROFILE_MAGIC, strlen(PROFILE_MAGIC))) {
        ekv_error_set(err, EKV_EFORMAT, "profile %s: not an entrokv UNComp profile", path);
        goto fail;
    }
    model_line(cfg, want, sizeof want);
    if (!fgets(line, sizeof line, f) || (line[strcspn(line, "\n")] = 0, strcmp(line, want))) {
        ekv_error_set(err, EKV_EINVAL, "profile %s was made for another model (%.200s; this is %.200s)",
                      path, line, want);
        goto fail;
    }
    int seen_layers = 0;
    while (fgets(line, sizeof line, f)) {
        int l, off = 0;
        if (!strncmp(line, "samples ", 8) || line[0] == '\n' || line[0] == '#')
            continue;
        if (sscanf(line, "layer %d votes%n", &l, &off) != 1 || l < 0 || l >= L) {
            ekv_error_set(err, EKV_EFORMAT, "profile %s: bad line '%.80s'", path, line);
            goto fail;
        }
        const char *s = line + off;
        for (int32_t h = 0; h < HKV; h++) {
            int n = 0, v;
            if (sscanf(s, "%d%n", &v, &n) != 1 || v < 0)
                goto bad_layer;
            votes[(size_t)l * HKV + h] = v;
            s += n;
        }
        int n = 0;
        if (sscanf(s, " entropy%n", &n) != 0 || n == 0)
            goto bad_layer;
        s += n;
        for (int32_t h = 0; h < HKV; h++) {
            double v;
            if (sscanf(s, "%lf%n", &v, &n) != 1)
                goto bad_layer;
            e[(size_t)l * HKV + h] = v;
            s += n;
        }
        seen_layers++;
        continue;
    bad_layer:
        ekv_error_set(err, EKV_EFORMAT, "profile %s: layer %d needs %d votes and %d entropies",
                      path, l, HKV, HKV);
        goto fail;
    }
    if (seen_layers != L) {
        ekv_error_set(err, EKV_EFORMAT, "profile %s: %d layer lines, the model has %d layers", path,
                      seen_layers, L);
        goto fail;
    }
    for (int32_t l = 0; l < L; l++)
        groups_from_votes(votes + (size_t)l * HKV, e + (size_t)l * HKV, HKV,
                          p->high + (size_t)l * HKV);
    fclose(f);
    free(votes);
    free(e);
    return p;
fail:
    fclose(f);
    free(votes);
    free(e);
    kvc_profile_free(p);
    return NULL;
}

kvc_calibration *kvc_calibration_create(const ekv_model *m, ekv_error *err)
{
    const ekv_model_config *cfg = model_config(m);
    kvc_calibration *c = calloc(1, sizeof *c);
    if (c) {
        c->cfg = *cfg;
        c->votes = calloc((size_t)cfg->n_layers * cfg->n_kv_heads, sizeof *c->votes);
        c->sum_e = calloc((size_t)cfg->n_layers * cfg->n_kv_heads, sizeof *c->sum_e);
    }
    if (!c || !c->votes || !c->sum_e || cfg->n_kv_heads > PROFILE_MAX_HEADS) {
        kvc_calibration_free(c);
        ekv_error_set(err, EKV_ENOMEM, "calibration: out of memory");
        return NULL;
    }
    return c;
}

void kvc_calibration_free(kvc_calibration *c)
{
    if (!c)
        return;
    free(c->votes);
    free(c->sum_e);
    free(c);
}

void kvc_calibration_add(kvc_calibration *c, const float *entropy)
{
    const int32_t L = c->cfg.n_layers, H = c->cfg.n_heads, HKV = c->cfg.n_kv_heads, G = H / HKV;
    const int32_t n_high = HKV / 2 > 0 ? HKV / 2 : 1;
    float kv[PROFILE_MAX_HEADS];
    for (int32_t l = 0; l < L; l++) {
        for (int32_t g = 0; g < HKV; g++) {
            double s = 0;
            for (int32_t i = 0; i < G; i++)
                s += entropy[l * H + g * G + i];
            kv[g] = (float)(s / G);
            c->sum_e[l * HKV + g] += kv[g];
        }
        /* a vote for each head at or above the n_high-th largest (ties may
         * vote more than n_high heads, as in the reference) */
        for (int32_t g = 0; g < HKV; g++) {
            int32_t above = 0;
            for (int32_t j = 0; j < HKV; j++)
                above += kv[j] > kv[g];
            c->votes[l * HKV + g] += above < n_high;
        }
    }
    c->samples++;
}

ekv_status kvc_calibration_save(const kvc_calibration *c, const char *path, ekv_error *err)
{
    const int32_t L = c->cfg.n_layers, HKV = c->cfg.n_kv_heads;
    if (c->samples == 0)
        return ekv_error_set(err, EKV_EINVAL, "calibration: no samples");
    char tmp[4096], model[512];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f)
        return ekv_error_set(err, EKV_EIO, "profile %s: %s", tmp, strerror(errno));
    model_line(&c->cfg, model, sizeof model);
    fprintf(f, "%s\n%s\nsamples %d\n", PROFILE_MAGIC, model, c->samples);
    for (int32_t l = 0; l < L; l++) {
        fprintf(f, "layer %d votes", l);
        for (int32_t h = 0; h < HKV; h++)
            fprintf(f, " %d", c->votes[l * HKV + h]);
        fprintf(f, " entropy");
        for (int32_t h = 0; h < HKV; h++)
            fprintf(f, " %.6f", c->sum_e[l * HKV + h] / c->samples);
        fprintf(f, "\n");
    }
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        remove(tmp);
        return ekv_error_set(err, EKV_EIO, "profile %s: %s", path, strerror(errno));
    }
    return EKV_OK;
}

/*
 * grammar_schema.c - JSON Schema (and OpenAI's response_format) to the
 * nodes grammar.c runs, and the process-wide cache of compiled grammars
 * (see grammar.h for what a schema may say).
 *
 * The compiler walks the schema once, depth first, with the JSON pointer of
 * the current subschema in b->path for error messages. A $ref is expanded
 * in place (compiled again at each use), with the refs being expanded kept
 * on a stack so a cycle is refused instead of recursing forever; the node
 * limit bounds what a schema of many refs can expand to.
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "entrokv/sha256.h"
#include "grammar_internal.h"

typedef struct builder {
    ekv_grammar *g;
    int32_t cap_nodes, cap_props, cap_lits, cap_alts;
    uint32_t cap_text;
    const cJSON *root;
    const char *refs[GRAMMAR_MAX_DEPTH]; /* $refs being expanded */
    int n_refs;
    char path[512];
    ekv_error *err;
} builder;

static const char *const ANNOTATIONS[] = {"title", "description", "default", "examples",
                                          "$schema", "$id", "$comment", "$defs", "definitions"};
static const char *const KEYWORDS[] = {"type", "properties", "required", "additionalProperties",
                                       "items", "minItems", "maxItems", "minLength", "maxLength",
                                       "enum", "const", "anyOf", "oneOf", "$ref"};

static bool in_list(const char *s, const char *const *list, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strcmp(s, list[i]))
            return true;
    return false;
}

#define N_OF(a) (sizeof(a) / sizeof *(a))

static int fail(builder *b, ekv_status code, const char *fmt, const char *arg)
{
    char what[300];
    snprintf(what, sizeof what, fmt, arg);
    ekv_error_set(b->err, code, "json schema at #%s: %s", b->path, what);
    return -1;
}

static bool grow(void **p, int32_t *cap, int32_t need, size_t size)
{
    if (need <= *cap)
        return true;
    int32_t c = *cap ? *cap * 2 : 16;
    while (c < need)
        c *= 2;
    void *q = realloc(*p, (size_t)c * size);
    if (!q)
        return false;
    *p = q;
    *cap = c;
    return true;
}

static int32_t new_node(builder *b, gtype type)
{
    ekv_grammar *g = b->g;
    if (g->n_nodes >= GRAMMAR_MAX_NODES)
        return fail(b, EKV_EUNSUPPORTED, "the schema expands to more than %s nodes", "4096");
    if (!grow((void **)&g->nodes, &b->cap_nodes, g->n_nodes + 1, sizeof *g->nodes)) {
        ekv_error_set(b->err, EKV_ENOMEM, "json schema: out of memory");
        return -1;
    }
    gnode *nd = &g->nodes[g->n_nodes];
    memset(nd, 0, sizeof *nd);
    nd->type = (uint8_t)type;
    nd->max = GRAMMAR_UNBOUNDED;
    return g->n_nodes++;
}

static void set_bit(uint8_t *set, uint8_t c)
{
    set[c >> 3] |= (uint8_t)(1u << (c & 7));
}

static void set_first_chars(gnode *nd, const char *chars)
{
    for (const char *c = chars; *c; c++)
        set_bit(nd->first, (uint8_t)*c);
}

/* Appends text[0..len) as a literal; its index, or -1. */
static int32_t add_lit(builder *b, const char *text, size_t len)
{
    ekv_grammar *g = b->g;
    if (len == 0 || len > GRAMMAR_MAX_SCHEMA || g->n_text + len > 4u * GRAMMAR_MAX_SCHEMA)
        return fail(b, EKV_EUNSUPPORTED, "%s", "a value is too long");
    int32_t cap_text = (int32_t)b->cap_text;
    if (!grow((void **)&g->text, &cap_text, (int32_t)(g->n_text + len), 1) ||
        !grow((void **)&g->lits, &b->cap_lits, g->n_lits + 1, sizeof *g->lits)) {
        ekv_error_set(b->err, EKV_ENOMEM, "json schema: out of memory");
        return -1;
    }
    b->cap_text = (uint32_t)cap_text;
    memcpy(g->text + g->n_text, text, len);
    g->lits[g->n_lits] = (glit){.off = g->n_text, .len = (uint32_t)len};
    g->n_text += (uint32_t)len;
    return g->n_lits++;
}

static int32_t add_json_lit(builder *b, const cJSON *v)
{
    char *s = cJSON_PrintUnformatted(v);
    if (!s) {
        ekv_error_set(b->err, EKV_ENOMEM, "json schema: out of memory");
        return -1;
    }
    const int32_t i = add_lit(b, s, strlen(s));
    free(s);
    return i;
}

/* Pushes "/part" onto the path; returns the length to restore. */
static size_t path_push(builder *b, const char *part)
{
    const size_t mark = strlen(b->path);
    snprintf(b->path + mark, sizeof b->path - mark, "/%s", part);
    return mark;
}

static int32_t compile(builder *b, const cJSON *s, int depth);

static bool count_of(builder *b, const cJSON *s, const char *kw, uint32_t *out)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(s, kw);
    if (!v)
        return true;
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble != floor(v->valuedouble) ||
        v->valuedouble >= 4294967295.0) {
        fail(b, EKV_EINVAL, "'%s' must be a non-negative integer", kw);
        return false;
    }
    *out = (uint32_t)v->valuedouble;
    return true;
}

/* The JSON type name of a value, as "type" spells it. */
static bool value_has_type(const cJSON *v, const char *type)
{
    if (!strcmp(type, "integer"))
        return cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) &&
               isfinite(v->valuedouble);
    return (!strcmp(type, "number") && cJSON_IsNumber(v)) ||
           (!strcmp(type, "string") && cJSON_IsString(v)) ||
           (!strcmp(type, "boolean") && cJSON_IsBool(v)) ||
           (!strcmp(type, "null") && cJSON_IsNull(v)) ||
           (!strcmp(type, "object") && cJSON_IsObject(v)) ||
           (!strcmp(type, "array") && cJSON_IsArray(v));
}

static bool value_allowed_by_type(const cJSON *v, const cJSON *type)
{
    if (!type)
        return true;
    if (cJSON_IsString(type))
        return value_has_type(v, type->valuestring);
    const cJSON *t;
    cJSON_ArrayForEach(t, type)
    {
        if (cJSON_IsString(t) && value_has_type(v, t->valuestring))
            return true;
    }
    return false;
}

static void literal_first(ekv_grammar *g, gnode *nd)
{
    for (int32_t i = 0; i < nd->n; i++)
        set_bit(nd->first, (uint8_t)g->text[g->lits[nd->a0 + i].off]);
}

/* enum / const: the allowed values (of the allowed types) as compact JSON. */
static int32_t compile_literals(builder *b, const cJSON *s)
{
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(s, "enum");
    const cJSON *cn = cJSON_GetObjectItemCaseSensitive(s, "const");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(s, "type");
    if (en && (!cJSON_IsArray(en) || cJSON_GetArraySize(en) == 0))
        return fail(b, EKV_EINVAL, "%s", "'enum' must be a non-empty array");
    if (en && cJSON_GetArraySize(en) > GRAMMAR_MAX_CHOICES)
        return fail(b, EKV_EUNSUPPORTED, "'enum' with more than %s values", "64");
    const int32_t node = new_node(b, G_LITERALS);
    if (node < 0)
        return -1;
    const int32_t a0 = b->g->n_lits;
    int32_t n = 0;
    const cJSON *v;
    if (cn) {
        if (en)
            return fail(b, EKV_EUNSUPPORTED, "%s", "'enum' and 'const' together");
        if (value_allowed_by_type(cn, type) && add_json_lit(b, cn) < 0)
            return -1;
        n = b->g->n_lits - a0;
    } else {
        cJSON_ArrayForEach(v, en)
        {
            if (!value_allowed_by_type(v, type))
                continue;
            if (add_json_lit(b, v) < 0)
                return -1;
            n++;
        }
    }
    if (n == 0)
        return fail(b, EKV_EINVAL, "%s", "no value of 'enum'/'const' has an allowed 'type'");
    gnode *nd = &b->g->nodes[node];
    nd->a0 = a0;
    nd->n = n;
    literal_first(b->g, nd);
    return node;
}

static int32_t compile_object(builder *b, const cJSON *s, int depth)
{
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(s, "properties");
    const cJSON *req = cJSON_GetObjectItemCaseSensitive(s, "required");
    const cJSON *addl = cJSON_GetObjectItemCaseSensitive(s, "additionalProperties");
    if (props && !cJSON_IsObject(props))
        return fail(b, EKV_EINVAL, "%s", "'properties' must be an object");
    if (req && !cJSON_IsArray(req))
        return fail(b, EKV_EINVAL, "%s", "'required' must be an array of names");
    if (addl && !cJSON_IsBool(addl) && !cJSON_IsObject(addl))
        return fail(b, EKV_EINVAL, "%s", "'additionalProperties' must be a boolean or a schema");
    const int n_props = props ? cJSON_GetArraySize(props) : 0;
    if (n_props > GRAMMAR_MAX_CHOICES)
        return fail(b, EKV_EUNSUPPORTED, "an object with more than %s properties", "64");
    if (n_props == 0) {
        if (cJSON_IsObject(addl) && cJSON_GetArraySize(addl) > 0)
            return fail(b, EKV_EUNSUPPORTED, "%s",
                        "'additionalProperties' as a schema (a map) without 'properties'");
        if (req && cJSON_GetArraySize(req) > 0)
            return fail(b, EKV_EINVAL, "required property '%s' is not in 'properties'",
                        cJSON_IsString(req->child) ? req->child->valuestring : "?");
        /* additionalProperties false: only {}; else any object */
        const int32_t node = new_node(b, cJSON_IsFalse(addl) ? G_OBJECT : G_ANY);
        if (node >= 0)
            set_first_chars(&b->g->nodes[node], "{");
        return node;
    }
    /* properties sit contiguously in g->props: reserve them before the
     * children compile (their own properties go after) */
    ekv_grammar *g = b->g;
    const int32_t a0 = g->n_props;
    if (!grow((void **)&g->props, &b->cap_props, a0 + n_props, sizeof *g->props)) {
        ekv_error_set(b->err, EKV_ENOMEM, "json schema: out of memory");
        return -1;
    }
    g->n_props += n_props;
    int32_t i = 0;
    const cJSON *p;
    cJSON_ArrayForEach(p, props)
    {
        for (const cJSON *q = props->child; q != p; q = q->next)
            if (!strcmp(q->string, p->string))
                return fail(b, EKV_EINVAL, "property '%s' is declared twice", p->string);
        cJSON *name = cJSON_CreateString(p->string);
        const int32_t lit = name ? add_json_lit(b, name) : -1;
        cJSON_Delete(name);
        if (lit < 0)
            return name ? -1 : fail(b, EKV_ENOMEM, "%s", "out of memory");
        const size_t m1 = path_push(b, "properties");
        const size_t m2 = path_push(b, p->string);
        const int32_t child = compile(b, p, depth + 1);
        b->path[m2] = 0;
        b->path[m1] = 0;
        if (child < 0)
            return -1;
        b->g->props[a0 + i] = (gprop){.lit = lit, .node = child, .required = false};
        i++;
    }
    const cJSON *r;
    cJSON_ArrayForEach(r, req)
    {
        if (!cJSON_IsString(r))
            return fail(b, EKV_EINVAL, "%s", "'required' must be an array of names");
        int32_t k = 0;
        const cJSON *q = props->child;
        while (q && strcmp(q->string, r->valuestring))
            q = q->next, k++;
        if (!q)
            return fail(b, EKV_EINVAL, "required property '%s' is not in 'properties'",
                        r->valuestring);
        b->g->props[a0 + k].required = true;
    }
    const int32_t node = new_node(b, G_OBJECT);
    if (node < 0)
        return -1;
    gnode *nd = &b->g->nodes[node];
    nd->a0 = a0;
    nd->n = n_props;
    set_first_chars(nd, "{");
    return node;
}

static int32_t compile_array(builder *b, const cJSON *s, int depth)
{
    const cJSON *items = cJSON_GetObjectItemCaseSensitive(s, "items");
    uint32_t min = 0, max = GRAMMAR_UNBOUNDED;
    if (!count_of(b, s, "minItems", &min) || !count_of(b, s, "maxItems", &max))
        return -1;
    if (min > max)
        return fail(b, EKV_EINVAL, "%s", "minItems > maxItems");
    if (items && cJSON_IsArray(items))
        return fail(b, EKV_EUNSUPPORTED, "%s", "'items' as an array (tuples)");
    int32_t child = b->g->any;
    if (items) {
        const size_t mark = path_push(b, "items");
        child = compile(b, items, depth + 1);
        b->path[mark] = 0;
        if (child < 0)
            return -1;
    }
    const int32_t node = new_node(b, G_ARRAY);
    if (node < 0)
        return -1;
    gnode *nd = &b->g->nodes[node];
    nd->items = child;
    nd->min = min;
    nd->max = max;
    set_first_chars(nd, "[");
    return node;
}

static int32_t compile_type(builder *b, const cJSON *s, const char *type, int depth)
{
    if (!strcmp(type, "object"))
        return compile_object(b, s, depth);
    if (!strcmp(type, "array"))
        return compile_array(b, s, depth);
    int32_t node;
    if (!strcmp(type, "string")) {
        uint32_t min = 0, max = GRAMMAR_UNBOUNDED;
        if (!count_of(b, s, "minLength", &min) || !count_of(b, s, "maxLength", &max))
            return -1;
        if (min > max)
            return fail(b, EKV_EINVAL, "%s", "minLength > maxLength");
        if ((node = new_node(b, G_STRING)) >= 0) {
            b->g->nodes[node].min = min;
            b->g->nodes[node].max = max;
            set_first_chars(&b->g->nodes[node], "\"");
        }
        return node;
    }
    if (!strcmp(type, "integer") || !strcmp(type, "number")) {
        if ((node = new_node(b, type[0] == 'i' ? G_INTEGER : G_NUMBER)) >= 0)
            set_first_chars(&b->g->nodes[node], "-0123456789");
        return node;
    }
    if (!strcmp(type, "boolean") || !strcmp(type, "null")) {
        if ((node = new_node(b, G_LITERALS)) < 0)
            return -1;
        const int32_t a0 = b->g->n_lits;
        if (type[0] == 'b' ? add_lit(b, "true", 4) < 0 || add_lit(b, "false", 5) < 0
                           : add_lit(b, "null", 4) < 0)
            return -1;
        gnode *nd = &b->g->nodes[node];
        nd->a0 = a0;
        nd->n = b->g->n_lits - a0;
        literal_first(b->g, nd);
        return node;
    }
    return fail(b, EKV_EINVAL, "unknown type '%s'", type);
}

/* Alternatives into one G_ANYOF node, nested ones flattened; their first
 * bytes must not overlap (the automaton picks one by the first byte). */
static int32_t make_anyof(builder *b, const int32_t *alts, int n_alts)
{
    ekv_grammar *g = b->g;
    int32_t flat[GRAMMAR_MAX_CHOICES];
    int n = 0;
    for (int i = 0; i < n_alts; i++) {
        const gnode *a = &g->nodes[alts[i]];
        const int k = a->type == G_ANYOF ? a->n : 1;
        if (n + k > GRAMMAR_MAX_CHOICES)
            return fail(b, EKV_EUNSUPPORTED, "more than %s alternatives", "64");
        for (int j = 0; j < k; j++)
            flat[n++] = a->type == G_ANYOF ? g->alts[a->a0 + j] : alts[i];
    }
    if (n == 1)
        return flat[0];
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            for (int c = 0; c < 256; c++)
                if (gbit(g->nodes[flat[i]].first, (uint8_t)c) &&
                    gbit(g->nodes[flat[j]].first, (uint8_t)c)) {
                    char what[8];
                    snprintf(what, sizeof what, "%c", c);
                    return fail(b, EKV_EUNSUPPORTED,
                                "anyOf/oneOf (or a type list) whose alternatives can both start "
                                "with '%s': entrokv needs alternatives of different JSON types",
                                what);
                }
    const int32_t node = new_node(b, G_ANYOF);
    if (node < 0 || !grow((void **)&g->alts, &b->cap_alts, g->n_alts + n, sizeof *g->alts))
        return node < 0 ? -1 : fail(b, EKV_ENOMEM, "%s", "out of memory");
    memcpy(g->alts + g->n_alts, flat, (size_t)n * sizeof *flat);
    gnode *nd = &g->nodes[node];
    nd->a0 = g->n_alts;
    nd->n = n;
    g->n_alts += n;
    for (int i = 0; i < n; i++)
        for (int w = 0; w < 32; w++)
            nd->first[w] |= g->nodes[flat[i]].first[w];
    return node;
}

static int32_t compile_ref(builder *b, const char *ref, int depth)
{
    const char *name = NULL, *defs = NULL;
    if (!strncmp(ref, "#/$defs/", 8))
        defs = "$defs", name = ref + 8;
    else if (!strncmp(ref, "#/definitions/", 14))
        defs = "definitions", name = ref + 14;
    const cJSON *target = NULL;
    if (name && !strchr(name, '/') && !strchr(name, '~'))
        target = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(b->root, defs), name);
    if (!target)
        return fail(b, EKV_EUNSUPPORTED,
                    "'$ref' to '%s' (only \"#/$defs/NAME\" and \"#/definitions/NAME\" of the "
                    "same schema)",
                    ref);
    for (int i = 0; i < b->n_refs; i++)
        if (!strcmp(b->refs[i], ref))
            return fail(b, EKV_EUNSUPPORTED, "'$ref' cycle through '%s' (recursive schemas)", ref);
    if (b->n_refs == GRAMMAR_MAX_DEPTH)
        return fail(b, EKV_EUNSUPPORTED, "%s", "'$ref' nested too deeply");
    b->refs[b->n_refs++] = ref;
    const int32_t node = compile(b, target, depth);
    b->n_refs--;
    return node;
}

static int32_t compile(builder *b, const cJSON *s, int depth)
{
    if (depth > GRAMMAR_MAX_DEPTH)
        return fail(b, EKV_EUNSUPPORTED, "nested deeper than %s levels", "32");
    if (cJSON_IsBool(s)) {
        if (cJSON_IsFalse(s))
            return fail(b, EKV_EINVAL, "%s", "the schema false allows no value");
        return b->g->any;
    }
    if (!cJSON_IsObject(s))
        return fail(b, EKV_EINVAL, "%s", "a schema must be an object or a boolean");
    int n_constraints = 0;
    const cJSON *kw;
    cJSON_ArrayForEach(kw, s)
    {
        if (in_list(kw->string, ANNOTATIONS, N_OF(ANNOTATIONS)))
            continue;
        if (!in_list(kw->string, KEYWORDS, N_OF(KEYWORDS)))
            return fail(b, EKV_EUNSUPPORTED, "the keyword '%s' is not supported", kw->string);
        n_constraints++;
    }
    const cJSON *ref = cJSON_GetObjectItemCaseSensitive(s, "$ref");
    if (ref) {
        if (!cJSON_IsString(ref))
            return fail(b, EKV_EINVAL, "%s", "'$ref' must be a string");
        if (n_constraints > 1)
            return fail(b, EKV_EUNSUPPORTED, "%s", "keywords beside '$ref'");
        return compile_ref(b, ref->valuestring, depth);
    }
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(s, "type");
    if (cJSON_GetObjectItemCaseSensitive(s, "enum") || cJSON_GetObjectItemCaseSensitive(s, "const")) {
        /* the values are written as given: no other constraint may cut them */
        if (n_constraints > 1 + (type != NULL))
            return fail(b, EKV_EUNSUPPORTED, "%s", "keywords beside 'enum'/'const' other than 'type'");
        return compile_literals(b, s);
    }
    const cJSON *any_of = cJSON_GetObjectItemCaseSensitive(s, "anyOf");
    const char *which = any_of ? "anyOf" : "oneOf";
    if (!any_of)
        any_of = cJSON_GetObjectItemCaseSensitive(s, "oneOf");
    if (any_of) {
        if (n_constraints > 1)
            return fail(b, EKV_EUNSUPPORTED, "keywords beside '%s'", which);
        const int n = cJSON_GetArraySize(any_of);
        if (!cJSON_IsArray(any_of) || n == 0)
            return fail(b, EKV_EINVAL, "'%s' must be a non-empty array", which);
        if (n > GRAMMAR_MAX_CHOICES)
            return fail(b, EKV_EUNSUPPORTED, "'%s' with more than 64 alternatives", which);
        int32_t alts[GRAMMAR_MAX_CHOICES];
        int i = 0;
        const cJSON *a;
        cJSON_ArrayForEach(a, any_of)
        {
            char idx[16];
            snprintf(idx, sizeof idx, "%d", i);
            const size_t m1 = path_push(b, which);
            path_push(b, idx);
            alts[i] = compile(b, a, depth);
            if (alts[i] < 0)
                return -1;
            b->path[m1] = 0;
            i++;
        }
        return make_anyof(b, alts, n);
    }
    if (cJSON_IsString(type))
        return compile_type(b, s, type->valuestring, depth);
    if (cJSON_IsArray(type)) {
        const int n = cJSON_GetArraySize(type);
        if (n == 0 || n > 7)
            return fail(b, EKV_EINVAL, "%s", "'type' must list one to seven type names");
        int32_t alts[8];
        int i = 0;
        const cJSON *t;
        cJSON_ArrayForEach(t, type)
        {
            if (!cJSON_IsString(t))
                return fail(b, EKV_EINVAL, "%s", "'type' must be a name or an array of names");
            if ((alts[i++] = compile_type(b, s, t->valuestring, depth)) < 0)
                return -1;
        }
        return make_anyof(b, alts, n);
    }
    if (type)
        return fail(b, EKV_EINVAL, "%s", "'type' must be a name or an array of names");
    /* no type: what the constraints imply, or any value */
    static const char *const obj_kw[] = {"properties", "required", "additionalProperties"};
    static const char *const arr_kw[] = {"items", "minItems", "maxItems"};
    static const char *const str_kw[] = {"minLength", "maxLength"};
    cJSON_ArrayForEach(kw, s)
    {
        if (in_list(kw->string, obj_kw, N_OF(obj_kw)))
            return compile_type(b, s, "object", depth);
        if (in_list(kw->string, arr_kw, N_OF(arr_kw)))
            return compile_type(b, s, "array", depth);
        if (in_list(kw->string, str_kw, N_OF(str_kw)))
            return compile_type(b, s, "string", depth);
    }
    return b->g->any;
}

/* ---- the grammar object ---- */

static void grammar_free(ekv_grammar *g)
{
    if (!g)
        return;
    free(g->nodes);
    free(g->props);
    free(g->lits);
    free(g->alts);
    free(g->text);
    free(g->source);
    free(g);
}

void grammar_retain(ekv_grammar *g)
{
    if (g)
        atomic_fetch_add(&g->refs, 1);
}

void grammar_release(ekv_grammar *g)
{
    if (g && atomic_fetch_sub(&g->refs, 1) == 1)
        grammar_free(g);
}

const char *grammar_source(const ekv_grammar *g)
{
    return g && g->source ? g->source : "";
}

/* The four shared nodes every grammar has (grammar_internal.h). */
static bool add_shared_nodes(builder *b)
{
    ekv_grammar *g = b->g;
    if ((g->any = new_node(b, G_ANY)) < 0 || (g->str_any = new_node(b, G_STRING)) < 0 ||
        (g->num_any = new_node(b, G_NUMBER)) < 0 || (g->lit_tfn = new_node(b, G_LITERALS)) < 0)
        return false;
    const int32_t a0 = g->n_lits;
    if (add_lit(b, "true", 4) < 0 || add_lit(b, "false", 5) < 0 || add_lit(b, "null", 4) < 0)
        return false;
    set_first_chars(&g->nodes[g->any], "{[\"-0123456789tfn");
    set_first_chars(&g->nodes[g->str_any], "\"");
    set_first_chars(&g->nodes[g->num_any], "-0123456789");
    g->nodes[g->lit_tfn].a0 = a0;
    g->nodes[g->lit_tfn].n = 3;
    literal_first(g, &g->nodes[g->lit_tfn]);
    return true;
}

/* schema NULL: any object. */
static ekv_grammar *compile_parsed(const cJSON *schema, ekv_error *err)
{
    builder b = {.err = err, .root = schema};
    if (!(b.g = calloc(1, sizeof *b.g))) {
        ekv_error_set(err, EKV_ENOMEM, "json schema: out of memory");
        return NULL;
    }
    atomic_init(&b.g->refs, 1);
    if (!add_shared_nodes(&b))
        goto fail;
    if (schema) {
        b.g->root = compile(&b, schema, 1);
    } else if ((b.g->root = new_node(&b, G_ANY)) >= 0) {
        set_first_chars(&b.g->nodes[b.g->root], "{");
    }
    if (b.g->root < 0)
        goto fail;
    return b.g;
fail:
    grammar_free(b.g);
    return NULL;
}

ekv_grammar *grammar_compile_json(const char *schema_json, ekv_error *err)
{
    if (!schema_json)
        return compile_parsed(NULL, err);
    if (strlen(schema_json) > GRAMMAR_MAX_SCHEMA) {
        ekv_error_set(err, EKV_EINVAL, "json schema: longer than %d bytes", GRAMMAR_MAX_SCHEMA);
        return NULL;
    }
    cJSON *j = cJSON_Parse(schema_json);
    if (!j) {
        ekv_error_set(err, EKV_EINVAL, "json schema: not valid JSON");
        return NULL;
    }
    ekv_grammar *g = compile_parsed(j, err);
    cJSON_Delete(j);
    return g;
}

static const char *unknown_key(const cJSON *o, const char *const *known, size_t n)
{
    const cJSON *k;
    cJSON_ArrayForEach(k, o)
    {
        if (!in_list(k->string, known, n))
            return k->string;
    }
    return NULL;
}

/* compile_parsed for response_format: the schema's messages name where. */
static ekv_status compile_schema_of(const cJSON *schema, ekv_grammar **out, ekv_error *err)
{
    ekv_error e = {0};
    if ((*out = compile_parsed(schema, &e)))
        return EKV_OK;
    return ekv_error_set(err, e.code, "response_format: %s", e.msg);
}

/* response_format -> a grammar, or *out NULL for "text". */
static ekv_status compile_response_format(const char *text, size_t len, ekv_grammar **out,
                                          ekv_error *err)
{
    *out = NULL;
    cJSON *j = cJSON_ParseWithLength(text, len);
    ekv_status rc = EKV_EINVAL;
    static const char *const top_keys[] = {"type", "json_schema"};
    static const char *const js_keys[] = {"name", "description", "schema", "strict"};
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(j, "type");
    const cJSON *js = cJSON_GetObjectItemCaseSensitive(j, "json_schema");
    const char *extra;
    if (!cJSON_IsObject(j)) {
        ekv_error_set(err, rc, "response_format must be a JSON object");
    } else if ((extra = unknown_key(j, top_keys, N_OF(top_keys)))) {
        ekv_error_set(err, rc, "response_format.%s is not supported", extra);
    } else if (!cJSON_IsString(type)) {
        ekv_error_set(err, rc, "response_format.type must be a string");
    } else if (!strcmp(type->valuestring, "text") || !strcmp(type->valuestring, "json_object")) {
        if (js)
            ekv_error_set(err, rc, "response_format.json_schema needs type \"json_schema\"");
        else if (type->valuestring[0] == 't')
            rc = EKV_OK;
        else
            rc = compile_schema_of(NULL, out, err);
    } else if (strcmp(type->valuestring, "json_schema")) {
        ekv_error_set(err, rc,
                      "response_format.type must be \"text\", \"json_object\" or \"json_schema\"");
    } else if (!cJSON_IsObject(js)) {
        ekv_error_set(err, rc, "response_format.json_schema must be an object");
    } else if ((extra = unknown_key(js, js_keys, N_OF(js_keys)))) {
        ekv_error_set(err, rc, "response_format.json_schema.%s is not supported", extra);
    } else {
        const cJSON *strict = cJSON_GetObjectItemCaseSensitive(js, "strict");
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(js, "name");
        if (strict && !cJSON_IsBool(strict) && !cJSON_IsNull(strict))
            ekv_error_set(err, rc, "response_format.json_schema.strict must be a boolean");
        else if (name && !cJSON_IsString(name))
            ekv_error_set(err, rc, "response_format.json_schema.name must be a string");
        else
            rc = compile_schema_of(cJSON_GetObjectItemCaseSensitive(js, "schema"), out, err);
    }
    cJSON_Delete(j);
    return rc;
}

/* ---- the cache: a few compiled grammars, least recently used out ---- */

#define CACHE_SLOTS 32

static struct {
    uint8_t key[32];
    ekv_grammar *g; /* holds one reference */
    uint64_t used;
} cache[CACHE_SLOTS];
static pthread_mutex_t cache_mu = PTHREAD_MUTEX_INITIALIZER;
static uint64_t cache_clock;

ekv_status grammar_get(const char *text, size_t len, ekv_grammar **out, ekv_error *err)
{
    *out = NULL;
    if (len > GRAMMAR_MAX_SCHEMA)
        return ekv_error_set(err, EKV_EINVAL, "response_format is longer than %d bytes",
                             GRAMMAR_MAX_SCHEMA);
    uint8_t key[32];
    ekv_sha256 h;
    sha256_init(&h);
    sha256_update(&h, text, len);
    sha256_final(&h, key);
    pthread_mutex_lock(&cache_mu);
    for (int i = 0; i < CACHE_SLOTS; i++)
        if (cache[i].g && !memcmp(cache[i].key, key, 32)) {
            cache[i].used = ++cache_clock;
            grammar_retain(cache[i].g);
            *out = cache[i].g;
            pthread_mutex_unlock(&cache_mu);
            return EKV_OK;
        }
    pthread_mutex_unlock(&cache_mu);

    ekv_grammar *g = NULL;
    ekv_status rc = compile_response_format(text, len, &g, err);
    if (rc || !g)
        return rc; /* errors and "text" are not cached: both are cheap */
    if (!(g->source = malloc(len + 1))) {
        grammar_release(g);
        return ekv_error_set(err, EKV_ENOMEM, "out of memory");
    }
    memcpy(g->source, text, len);
    g->source[len] = 0;

    pthread_mutex_lock(&cache_mu);
    int slot = 0;
    for (int i = 0; i < CACHE_SLOTS; i++) {
        if (cache[i].g && !memcmp(cache[i].key, key, 32)) { /* compiled meanwhile */
            slot = -1;
            break;
        }
        if (!cache[i].g || cache[i].used < cache[slot].used)
            slot = i;
        if (!cache[i].g)
            break;
    }
    ekv_grammar *evicted = NULL;
    if (slot >= 0) {
        evicted = cache[slot].g;
        memcpy(cache[slot].key, key, 32);
        cache[slot].g = g;
        cache[slot].used = ++cache_clock;
        grammar_retain(g);
    }
    pthread_mutex_unlock(&cache_mu);
    grammar_release(evicted);
    *out = g;
    return EKV_OK;
}

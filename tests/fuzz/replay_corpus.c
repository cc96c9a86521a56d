/*
 * replay_corpus.c - runs a libFuzzer target over its committed corpus
 * without libFuzzer, so every build (Release, ASan + UBSan) checks the
 * seeds and the regression inputs as an ordinary test.
 *
 * Usage: replay_<name> CORPUS_DIR   (tests/CMakeLists.txt registers
 * fuzz.replay_<name> for the targets it lists). Each file is one input; the
 * target aborts on a broken invariant, so the exit status is 0 only when
 * every input passed. An empty or missing corpus is a failure too.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
        return 2;
    }
    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&argc, &argv);
    DIR *d = opendir(argv[1]);
    if (!d) {
        fprintf(stderr, "%s: cannot open %s\n", argv[0], argv[1]);
        return 1;
    }
    char *names[4096];
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) && n < 4096)
        if (de->d_name[0] != '.')
            names[n++] = strdup(de->d_name);
    closedir(d);
    qsort(names, (size_t)n, sizeof *names, cmp_names);
    for (int i = 0; i < n; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", argv[1], names[i]);
        FILE *f = fopen(path, "rb");
        uint8_t *buf = NULL;
        long len = -1;
        if (f && fseek(f, 0, SEEK_END) == 0 && (len = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0) {
            buf = malloc(len ? (size_t)len : 1);
            if (buf && fread(buf, 1, (size_t)len, f) != (size_t)len)
                len = -1;
        }
        if (f)
            fclose(f);
        if (!buf || len < 0) {
            fprintf(stderr, "%s: cannot read %s\n", argv[0], path);
            return 1;
        }
        fprintf(stderr, "%s\n", names[i]); /* the last name printed is the one that failed */
        LLVMFuzzerTestOneInput(buf, (size_t)len);
        free(buf);
        free(names[i]);
    }
    printf("%s: %d inputs passed\n", argv[0], n);
    return n > 0 ? 0 : 1;
}

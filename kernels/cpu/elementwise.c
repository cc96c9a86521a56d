/*
 * elementwise.c - RMSNorm, RoPE, SwiGLU and residual add on float rows.
 *
 * These are a few percent of the forward pass; they are written plainly and
 * left to the compiler's vectoriser. Their rounding follows ggml's CPU ops
 * (double accumulation in RMSNorm, RoPE angles advanced by repeated float
 * multiplication) so logits stay close to llama.cpp's.
 */
#include <math.h>

#include "entrokv/kernels.h"

void kern_rmsnorm(float *out, const float *x, const float *w, int n, float eps)
{
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += (double)(x[i] * x[i]);
    const float scale = 1.0f / sqrtf((float)(sum / n) + eps);
    for (int i = 0; i < n; i++)
        out[i] = (x[i] * scale) * w[i];
}

/*
 * theta_i = pos * base^(-2i/n_rot) for pair i (RoFormer, eq. 34). The angle
 * is advanced multiplicatively in float as ggml does, not recomputed with
 * powf, to keep the same rounding. Dimensions past n_rot are not rotated.
 * The table holds (cos, sin) of pair i at cs[2i], cs[2i + 1]: one row's
 * heads all share it, so a forward computes n_rot/2 sines and cosines per
 * row rather than per head.
 */
void kern_rope_table(float *cs, int n_rot, int32_t pos, float freq_base)
{
    const float theta_scale = powf(freq_base, -2.0f / (float)n_rot);
    float theta = (float)pos;
    for (int i0 = 0; i0 < n_rot; i0 += 2) {
        cs[i0] = cosf(theta);
        cs[i0 + 1] = sinf(theta);
        theta *= theta_scale;
    }
}

void kern_rope_apply(float *x, int d, int n_rot, const float *cs, int neox)
{
    for (int i0 = 0; i0 < n_rot && i0 < d; i0 += 2) {
        const float c = cs[i0], s = cs[i0 + 1];
        const int a = neox ? i0 / 2 : i0;
        const int b = neox ? i0 / 2 + n_rot / 2 : i0 + 1;
        const float x0 = x[a], x1 = x[b];
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
    }
}

void kern_rope(float *x, int d, int n_rot, int32_t pos, float freq_base, int neox)
{
    const float theta_scale = powf(freq_base, -2.0f / (float)n_rot);
    float theta = (float)pos;
    for (int i0 = 0; i0 < n_rot && i0 < d; i0 += 2) {
        const float c = cosf(theta), s = sinf(theta);
        const int a = neox ? i0 / 2 : i0;
        const int b = neox ? i0 / 2 + n_rot / 2 : i0 + 1;
        const float x0 = x[a], x1 = x[b];
        x[a] = x0 * c - x1 * s;
        x[b] = x0 * s + x1 * c;
        theta *= theta_scale;
    }
}

void kern_swiglu(float *g, const float *u, int n)
{
    for (int i = 0; i < n; i++)
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void kern_add(float *x, const float *y, int n)
{
    for (int i = 0; i < n; i++)
        x[i] += y[i];
}

/* Fused CPU kernels for training the ai.bnncc ops whose torch composition costs a pass over
 * memory per elementwise op. Built and loaded by cpu_kernels.py.
 *
 * Tensors are float32 with the channel axis innermost: a channels-last (N, C, H, W) tensor is
 * read as ROWS = N*H*W rows of C channels. The file is compiled with -ffp-contract=off, so every
 * product and sum rounds where the torch ops round (and -fno-trapping-math, so that selects
 * between two computed values vectorize); sums over rows are left as per-block partial
 * sums, which the caller adds up (torch's pairwise sum keeps their rounding error small).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Rows per partial-sum block: large enough to amortise a block, small enough that a float sum
 * of one block loses little (and that 2 threads share a small tensor). */
#define BLOCK_ROWS 256

int64_t bnncc_block_rows(void) { return BLOCK_ROWS; }

/* DPReLU times a gate per (image, channel), for `images` images of `pixels` rows each:
 *     y = gate[n, c] * ((t >= 0 ? pos : neg) * t - bias_y),   t = x - bias_x
 * (a PokeConv's DPReLU and its SE gate's Mul). An ungated DPReLU passes a row of ones with
 * gate_stride 0: times 1 is exact. */
void bnncc_dprelu_forward(const float *restrict x, float *restrict y, int64_t images, int64_t pixels,
                          int64_t channels, const float *restrict bias_x, const float *restrict bias_y,
                          const float *restrict pos, const float *restrict neg,
                          const float *restrict gate, int64_t gate_stride, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < images * pixels; ++r) {
        const float *restrict xr = x + r * channels;
        const float *restrict gr = gate + r / pixels * gate_stride;
        float *restrict yr = y + r * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
            float t = xr[c] - bias_x[c];
            float slope = t >= 0.0f ? pos[c] : neg[c];
            yr[c] = (slope * t - bias_y[c]) * gr[c];
        }
    }
}

/* Its backward, with dd = grad * gate: dx = dd * (t > 0 ? pos : neg), and per block of at most
 * BLOCK_ROWS rows of one image the partial sums (5 rows of `channels` each) of dx, dd,
 * dd * max(t, 0), dd * min(t, 0) and grad * DPReLU(x): the gradients of bias_x (negated),
 * bias_y (negated), pos, neg and, added up over an image's blocks, the gate. */
void bnncc_dprelu_backward(const float *restrict grad, const float *restrict x, float *restrict dx,
                           int64_t images, int64_t pixels, int64_t channels,
                           const float *restrict bias_x, const float *restrict bias_y,
                           const float *restrict pos, const float *restrict neg,
                           const float *restrict gate, int64_t gate_stride, float *restrict partial,
                           int threads) {
    int64_t chunks = (pixels + BLOCK_ROWS - 1) / BLOCK_ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < images * chunks; ++b) {
        int64_t n = b / chunks, begin = n * pixels + b % chunks * BLOCK_ROWS;
        int64_t end = begin + BLOCK_ROWS < (n + 1) * pixels ? begin + BLOCK_ROWS : (n + 1) * pixels;
        const float *restrict gn = gate + n * gate_stride;
        float *restrict sum_dx = partial + 5 * b * channels;
        float *restrict sum_dd = sum_dx + channels;
        float *restrict sum_pos = sum_dd + channels;
        float *restrict sum_neg = sum_pos + channels;
        float *restrict sum_gate = sum_neg + channels;
        for (int64_t c = 0; c < 5 * channels; ++c)
            sum_dx[c] = 0.0f;
        for (int64_t r = begin; r < end; ++r) {
            const float *restrict gr = grad + r * channels;
            const float *restrict xr = x + r * channels;
            float *restrict dxr = dx + r * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
                float g = gr[c], dd = g * gn[c];
                float t = xr[c] - bias_x[c];
                float positive = t > 0.0f ? t : 0.0f;
                float d = dd * (t > 0.0f ? pos[c] : neg[c]);
                dxr[c] = d;
                sum_dx[c] += d;
                sum_dd[c] += dd;
                sum_pos[c] += dd * positive;
                sum_neg[c] += dd * (t - positive);
                sum_gate[c] += g * ((t >= 0.0f ? pos[c] : neg[c]) * t - bias_y[c]);
            }
        }
    }
}

/* The activation quantizer's grid (quant.py): signed m = 2^(bits-1) - 1 on [-m, m] with a half
 * added before the floor, unsigned m = 2^bits on [0, m - 1]. The scale is 1 / bound * m, as
 * torch computes m / bound; a channel whose bound is <= 0 passes through (scale 0 marks it). */
typedef struct {
    float m, lo, hi, half;
} grid;

static grid act_grid(int bits, int is_signed) {
    float m = is_signed ? (float)((1 << (bits - 1)) - 1) : (float)(1 << bits);
    return is_signed ? (grid){m, -m, m, 0.5f} : (grid){m, 0.0f, m - 1.0f, 0.0f};
}

static void act_scales(const float *restrict bound, float *restrict scale, int64_t channels, grid g) {
    for (int64_t c = 0; c < channels; ++c)
        scale[c] = bound[c] > 0.0f ? 1.0f / bound[c] * g.m : 0.0f;
}

/* q = quantize(relu ? max(x, 0) : x), per channel (the innermost axis). */
void bnncc_quantize_acts(const float *restrict x, float *restrict q, int64_t rows, int64_t channels,
                         const float *restrict bound, int bits, int is_signed, int relu, int threads) {
    grid g = act_grid(bits, is_signed);
    const float lower = relu ? 0.0f : -INFINITY, lo = g.lo, hi = g.hi, half = g.half;
    float *restrict scale = malloc(channels * sizeof(float));
    act_scales(bound, scale, channels, g);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * channels > 32768)
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict xr = x + r * channels;
        float *restrict qr = q + r * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
            float xv = xr[c], s = scale[c];
            float v = xv < lower ? lower : xv;
            float level = floorf(v * s + half);
            level = level < lo ? lo : level > hi ? hi : level;
            qr[c] = s > 0.0f ? level / s : v;
        }
    }
    free(scale);
}

/* The quantizer's clipped straight-through gradient: grad where the level before the clip lies
 * in [lo, hi] (or the channel passes through) and, with relu, where x > 0; else 0. */
void bnncc_quantize_acts_backward(const float *restrict grad, const float *restrict x,
                                  float *restrict dx, int64_t rows, int64_t channels,
                                  const float *restrict bound, int bits, int is_signed, int relu,
                                  int threads) {
    grid g = act_grid(bits, is_signed);
    const float lower = relu ? 0.0f : -INFINITY, lo = g.lo, hi = g.hi, half = g.half;
    float *restrict scale = malloc(channels * sizeof(float));
    act_scales(bound, scale, channels, g);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * channels > 32768)
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict gr = grad + r * channels, *restrict xr = x + r * channels;
        float *restrict dxr = dx + r * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
            float xv = xr[c], gv = gr[c], s = scale[c];
            float v = xv < lower ? lower : xv;
            float level = floorf(v * s + half);
            int inside = !(s > 0.0f) | ((level >= lo) & (level <= hi));
            dxr[c] = inside & (xv > lower) ? gv : 0.0f;
        }
    }
    free(scale);
}

/* Symmetric per-row weight quantizer (quant.py): m = 2^(bits-1) - 1, s = 1 / max|w[r]| * m
 * (1 in place of a zero max), q = clamp(floor(w * s + 0.5), -m, m) / s. */
void bnncc_quantize_weights(const float *restrict w, float *restrict q, int64_t rows, int64_t cols,
                            int bits, int threads) {
    float m = (float)((1 << (bits - 1)) - 1);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols > 32768)
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict wr = w + r * cols;
        float *restrict qr = q + r * cols;
        float wmax = 0.0f;
#pragma omp simd reduction(max : wmax)
        for (int64_t c = 0; c < cols; ++c) {
            float a = fabsf(wr[c]);
            wmax = a > wmax ? a : wmax;  /* a compare, not fmaxf: fmaxf's NaN rule does not vectorize */
        }
        float s = 1.0f / (wmax > 0.0f ? wmax : 1.0f) * m;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c) {
            float level = floorf(wr[c] * s + 0.5f);
            qr[c] = (level < -m ? -m : level > m ? m : level) / s;
        }
    }
}

/* BinarizeAct: y = x >= 0 ? B/2 : -B/2 (zero of either sign gives +B/2). */
void bnncc_binarize_acts(const float *restrict x, float *restrict y, int64_t size, float clip_bound,
                         int threads) {
    float half = 0.5f * clip_bound;
#pragma omp parallel for simd num_threads(threads) schedule(static) if (size > 32768)
    for (int64_t i = 0; i < size; ++i)
        y[i] = x[i] >= 0.0f ? half : -half;
}

/* Fused CPU kernels for training the ai.bnncc ops whose torch composition costs a pass over
 * memory per elementwise op. Built and loaded by cpu_kernels.py.
 *
 * Tensors are float32 with the channel axis innermost: a channels-last (N, C, H, W) tensor is
 * read as ROWS = N*H*W rows of C channels. The file is compiled with -ffp-contract=off, so every
 * product and sum rounds where the torch ops round (and -fno-trapping-math, so that selects
 * between two computed values vectorize). Sums over rows are float sums of blocks of rows
 * that the kernels add up in double (batch norm's statistics and the gradients' sums); the SE
 * gate's mean is summed in double throughout.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Rows per partial-sum block: large enough to amortise a block, small enough that a float sum
 * of one block loses little (and that 2 threads share a small tensor). */
#define BLOCK_ROWS 256

/* A batch norm folded into the DPReLU before it: y = (x - mean) * scale + beta per channel, as
 * bnncc_batch_norm_forward normalises. All NULL for none. */
typedef struct {
    const float *mean, *scale, *beta;
} norm;

/* The input of a DPReLU at x[i] (channel c): x, normalised when `nm` has a mean, plus up to two
 * shortcuts (ReshapeAdd's adds, in that order). Computed in the loop rather than into a row
 * buffer: the buffer's round trip cost more than the row's arithmetic at 16 channels. */
static inline __attribute__((always_inline)) float input_value(const float *restrict x, norm nm,
                                                               const float *restrict r1, const float *restrict r2,
                                                               int64_t i, int64_t c) {
    float v = x[i];
    if (nm.mean != NULL)
        v = (v - nm.mean[c]) * nm.scale[c] + nm.beta[c];
    if (r1 != NULL)
        v = v + r1[i];
    if (r2 != NULL)
        v = v + r2[i];
    return v;
}

/* DPReLU of x (normalised, + r1 (+ r2)) times a gate per (image, channel), for `images` images
 * of `pixels` rows each:
 *     y = gate[n, c] * ((t >= 0 ? pos : neg) * t - bias_y),   t = x - bias_x
 * (a PokeConv's batch norm, shortcut adds, DPReLU and SE gate's Mul). An ungated DPReLU passes a
 * row of ones with gate_stride 0: times 1 is exact. */
void bnncc_dprelu_forward(const float *restrict x, const float *norm_mean, const float *norm_scale,
                          const float *norm_beta, const float *restrict r1, const float *restrict r2,
                          float *restrict y, int64_t images, int64_t pixels, int64_t channels,
                          const float *restrict bias_x, const float *restrict bias_y,
                          const float *restrict pos, const float *restrict neg,
                          const float *restrict gate, int64_t gate_stride, int threads) {
    norm nm = {norm_mean, norm_scale, norm_beta};
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < images; ++n) {
        const float *restrict gn = gate + n * gate_stride;
        for (int64_t r = n * pixels; r < (n + 1) * pixels; ++r) {
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
                float t = input_value(x, nm, r1, r2, r * channels + c, c) - bias_x[c];
                float slope = t >= 0.0f ? pos[c] : neg[c];
                y[r * channels + c] = (slope * t - bias_y[c]) * gn[c];
            }
        }
    }
}

/* Its backward, with dd = grad * gate: dx = dd * (t > 0 ? pos : neg) (the gradient of the
 * DPReLU's input: of the batch norm's output and of each shortcut), and the parameters' gradients,
 * summed over the rows: into d_params (4 rows of `channels`) -sum dx, -sum dd, sum dd * max(t, 0)
 * and sum dd * min(t, 0) (bias_x, bias_y, pos, neg); into d_gate (images rows, when gated) the sum
 * over each image of grad * DPReLU(x); into norm_sums (with a norm, in double) sum dx and
 * sum dx * (x - mean), the batch norm backward's two sums. Each block of at most BLOCK_ROWS rows of
 * one image sums in float, the blocks add up in double. */
void bnncc_dprelu_backward(const float *restrict grad, const float *restrict x, const float *norm_mean,
                           const float *norm_scale, const float *norm_beta, const float *restrict r1,
                           const float *restrict r2, float *restrict dx, int64_t images, int64_t pixels,
                           int64_t channels, const float *restrict bias_x, const float *restrict bias_y,
                           const float *restrict pos, const float *restrict neg,
                           const float *restrict gate, int64_t gate_stride, float *restrict d_params,
                           float *restrict d_gate, double *restrict norm_sums, int threads) {
    norm nm = {norm_mean, norm_scale, norm_beta};
    int64_t chunks = (pixels + BLOCK_ROWS - 1) / BLOCK_ROWS;
    float *partial = malloc(images * chunks * 6 * channels * sizeof(float));
#pragma omp parallel num_threads(threads)
    {
        /* the row's inputs first: computed in the loop below, they leave it too long to keep in registers */
        float *buf = malloc(channels * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t b = 0; b < images * chunks; ++b) {
            int64_t n = b / chunks, begin = n * pixels + b % chunks * BLOCK_ROWS;
            int64_t end = begin + BLOCK_ROWS < (n + 1) * pixels ? begin + BLOCK_ROWS : (n + 1) * pixels;
            const float *restrict gn = gate + n * gate_stride;
            float *restrict sum_dx = partial + 6 * b * channels;
            float *restrict sum_dd = sum_dx + channels;
            float *restrict sum_pos = sum_dd + channels;
            float *restrict sum_neg = sum_pos + channels;
            float *restrict sum_gate = sum_neg + channels;
            float *restrict sum_norm = sum_gate + channels;
            for (int64_t c = 0; c < 6 * channels; ++c)
                sum_dx[c] = 0.0f;
            for (int64_t r = begin; r < end; ++r) {
                const float *restrict gr = grad + r * channels;
                const float *restrict xr = x + r * channels;
                float *restrict dxr = dx + r * channels;
                if (nm.mean != NULL || r1 != NULL) {
#pragma omp simd
                    for (int64_t c = 0; c < channels; ++c)
                        buf[c] = input_value(x, nm, r1, r2, r * channels + c, c);
                    xr = buf;
                }
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
                if (nm.mean != NULL) {
                    const float *restrict raw = x + r * channels;
#pragma omp simd
                    for (int64_t c = 0; c < channels; ++c)
                        sum_norm[c] += dxr[c] * (raw[c] - nm.mean[c]);
                }
            }
        }
        free(buf);
    }
    double *total = calloc(6 * channels, sizeof(double));
    for (int64_t b = 0; b < images * chunks; ++b) {
        const float *restrict part = partial + 6 * b * channels;
        double *restrict gate_sum = total + 4 * channels;  /* this image's, reset at its first block */
        if (b % chunks == 0)
            memset(gate_sum, 0, channels * sizeof(double));
#pragma omp simd
        for (int64_t c = 0; c < 6 * channels; ++c)
            total[c] += part[c];
        if (d_gate != NULL && b % chunks == chunks - 1)
            for (int64_t c = 0; c < channels; ++c)
                d_gate[b / chunks * channels + c] = (float)gate_sum[c];
    }
    for (int64_t c = 0; c < channels; ++c) {
        d_params[c] = (float)-total[c];
        d_params[channels + c] = (float)-total[channels + c];
        d_params[2 * channels + c] = (float)total[2 * channels + c];
        d_params[3 * channels + c] = (float)total[3 * channels + c];
        if (norm_sums != NULL) {
            norm_sums[c] = total[c];
            norm_sums[channels + c] = total[5 * channels + c];
        }
    }
    free(total);
    free(partial);
}

/* The activation quantizer's grid (quant.py): signed m = 2^(bits-1) - 1 on [-m, m] with a half
 * added before the floor, unsigned m = 2^bits on [0, m - 1]; with relu, inputs below `lower` = 0
 * become 0. The scale is m / bound, a division as in the ONNX function; a channel whose bound is
 * <= 0 passes through (scale 0 marks it). */
typedef struct {
    float lo, hi, half, lower;
    float *scale; /* per channel, malloc'd: free it */
} grid;

static grid act_grid(const float *restrict bound, int64_t channels, int bits, int is_signed, int relu) {
    float m = is_signed ? (float)((1 << (bits - 1)) - 1) : (float)(1 << bits);
    grid g = is_signed ? (grid){-m, m, 0.5f, 0.0f, NULL} : (grid){0.0f, m - 1.0f, 0.0f, 0.0f, NULL};
    g.lower = relu ? 0.0f : -INFINITY;
    g.scale = malloc(channels * sizeof(float));
    for (int64_t c = 0; c < channels; ++c)
        g.scale[c] = bound[c] > 0.0f ? m / bound[c] : 0.0f;
    return g;
}

/* One row of q = quantize(relu ? max(x, 0) : x), per channel. */
static inline void quantize_row(const float *restrict xr, float *restrict qr, int64_t channels, const grid *g) {
    const float lower = g->lower, lo = g->lo, hi = g->hi, half = g->half, *restrict scale = g->scale;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
        float xv = xr[c], s = scale[c];
        float v = xv < lower ? lower : xv;
        float level = floorf(v * s + half);
        level = level < lo ? lo : level > hi ? hi : level;
        qr[c] = s > 0.0f ? level / s : v;
    }
}

/* q = quantize(relu ? max(x, 0) : x), per channel (the innermost axis). */
void bnncc_quantize_acts(const float *restrict x, float *restrict q, int64_t rows, int64_t channels,
                         const float *restrict bound, int bits, int is_signed, int relu, int threads) {
    grid g = act_grid(bound, channels, bits, is_signed, relu);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * channels > 32768)
    for (int64_t r = 0; r < rows; ++r)
        quantize_row(x + r * channels, q + r * channels, channels, &g);
    free(g.scale);
}

/* An SE gate's squeeze: m[n, c] = the mean of x over image n's `pixels` rows (summed in double,
 * rounded once), and q = quantize(m). */
void bnncc_mean_quantize_acts(const float *restrict x, float *restrict m, float *restrict q, int64_t images,
                              int64_t pixels, int64_t channels, const float *restrict bound, int bits,
                              int is_signed, int threads) {
    grid g = act_grid(bound, channels, bits, is_signed, 0);
#pragma omp parallel num_threads(threads) if (images * pixels * channels > 32768)
    {
        double *sum = malloc(channels * sizeof(double));
#pragma omp for schedule(static)
        for (int64_t n = 0; n < images; ++n) {
            const float *restrict xn = x + n * pixels * channels;
            memset(sum, 0, channels * sizeof(double));
            for (int64_t p = 0; p < pixels; ++p) {
#pragma omp simd
                for (int64_t c = 0; c < channels; ++c)
                    sum[c] += xn[p * channels + c];
            }
            float *restrict mn = m + n * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c)
                mn[c] = (float)(sum[c] / (double)pixels);
            quantize_row(mn, q + n * channels, channels, &g);
        }
        free(sum);
    }
    free(g.scale);
}

/* The quantizer's clipped straight-through gradient: grad where the level before the clip lies
 * in [lo, hi] (or the channel passes through) and, with relu, where x > 0; else 0; divided by
 * `divisor` (1, or a mean's count when the mean's backward is folded in). */
void bnncc_quantize_acts_backward(const float *restrict grad, const float *restrict x,
                                  float *restrict dx, int64_t rows, int64_t channels,
                                  const float *restrict bound, int bits, int is_signed, int relu,
                                  float divisor, int threads) {
    grid g = act_grid(bound, channels, bits, is_signed, relu);
    const float lower = g.lower, lo = g.lo, hi = g.hi, half = g.half, *restrict scale = g.scale;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * channels > 32768)
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict gr = grad + r * channels, *restrict xr = x + r * channels;
        float *restrict dxr = dx + r * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
            float xv = xr[c], gv = gr[c], s = scale[c];
            float v = xv < lower ? lower : xv;
            float level = floorf(v * s + half);
            int inside = (s <= 0.0f) | ((level >= lo) & (level <= hi));
            dxr[c] = (inside & (xv > lower) ? gv : 0.0f) / divisor;
        }
    }
    free(g.scale);
}

/* max |w[c]| over a row of weights (0 for none). */
static inline float abs_max(const float *restrict wr, int64_t cols) {
    float wmax = 0.0f;
#pragma omp simd reduction(max : wmax)
    for (int64_t c = 0; c < cols; ++c) {
        float a = fabsf(wr[c]);
        wmax = a > wmax ? a : wmax;  /* a compare, not fmaxf: fmaxf's NaN rule does not vectorize */
    }
    return wmax;
}

/* Symmetric per-row weight quantizer (quant.py): m = 2^(bits-1) - 1, s = m / max|w[r]|
 * (1 in place of a zero max), q = clamp(floor(w * s + 0.5), -m, m) / s. */
void bnncc_quantize_weights(const float *restrict w, float *restrict q, int64_t rows, int64_t cols,
                            int bits, int threads) {
    float m = (float)((1 << (bits - 1)) - 1);
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols > 32768)
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict wr = w + r * cols;
        float *restrict qr = q + r * cols;
        float wmax = abs_max(wr, cols);
        float s = m / (wmax > 0.0f ? wmax : 1.0f);
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

/* Its clipped straight-through gradient: dx = grad, but 0 where x <= -B or x >= B (hardtanh's
 * backward; a NaN x passes the gradient, as there). */
void bnncc_binarize_acts_backward(const float *restrict grad, const float *restrict x, float *restrict dx,
                                  int64_t size, float clip_bound, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static) if (size > 32768)
    for (int64_t i = 0; i < size; ++i)
        dx[i] = (x[i] <= -clip_bound) | (x[i] >= clip_bound) ? 0.0f : grad[i];
}

/* Binary weights per row: s = max|w[r]| * 0.5, q = w >= 0 ? s : -s (zero of either sign gives +s). */
void bnncc_binarize_weights(const float *restrict w, float *restrict q, int64_t rows, int64_t cols, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * cols > 32768)
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict wr = w + r * cols;
        float *restrict qr = q + r * cols;
        float wmax = abs_max(wr, cols);
        float s = wmax * 0.5f;
#pragma omp simd
        for (int64_t c = 0; c < cols; ++c)
            qr[c] = wr[c] >= 0.0f ? s : -s;
    }
}

/* Two per-channel sums over all rows, in float blocks of BLOCK_ROWS rows (vectorized) added up
 * in double: with d = x - shift, kind 0 sums d and d * d, kind 1 sums y and y * d. */
static void two_sums(const float *restrict x, const float *restrict y, int64_t rows, int64_t channels,
                     const float *restrict shift, int kind, double *restrict out, int threads) {
    int64_t blocks = (rows + BLOCK_ROWS - 1) / BLOCK_ROWS;
    float *partial = malloc(blocks * 2 * channels * sizeof(float));
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        float *restrict s0 = partial + 2 * b * channels, *restrict s1 = s0 + channels;
        for (int64_t c = 0; c < 2 * channels; ++c)
            s0[c] = 0.0f;
        int64_t end = (b + 1) * BLOCK_ROWS < rows ? (b + 1) * BLOCK_ROWS : rows;
        for (int64_t r = b * BLOCK_ROWS; r < end; ++r) {
            const float *restrict xr = x + r * channels, *restrict yr = y + r * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) {
                float d = xr[c] - shift[c];
                float w = kind == 0 ? d : yr[c];
                s0[c] += w;
                s1[c] += w * d;
            }
        }
    }
    for (int64_t c = 0; c < 2 * channels; ++c)
        out[c] = 0.0;
    for (int64_t b = 0; b < blocks; ++b)
        for (int64_t c = 0; c < 2 * channels; ++c)
            out[c] += partial[2 * b * channels + c];
    free(partial);
}

/* BatchNormalization's statistics in training, over the rows: batch mean and biased variance per
 * channel from one pass of sums shifted by the first row (a sample of the channel, so the
 * variance's subtraction loses little), scale = gamma / sqrt(var + eps), and
 * running = (1 - momentum) * running + momentum * batch with the unbiased variance. */
void bnncc_batch_norm_stats(const float *restrict x, int64_t rows, int64_t channels, const float *restrict gamma,
                            float eps, float momentum, float *restrict running_mean, float *restrict running_var,
                            float *restrict mean, float *restrict var, float *restrict scale, int threads) {
    double *sums = malloc(2 * channels * sizeof(double));
    two_sums(x, x, rows, channels, x, 0, sums, threads);
    for (int64_t c = 0; c < channels; ++c) {
        double d = sums[c] / rows, v = sums[channels + c] / rows - d * d;
        mean[c] = (float)(x[c] + d);
        var[c] = (float)(v > 0.0 ? v : 0.0);
        scale[c] = gamma[c] / sqrtf(var[c] + eps);
        running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mean[c];
        running_var[c] = (1.0f - momentum) * running_var[c] + momentum * (float)(var[c] * (double)rows / (rows - 1));
    }
    free(sums);
}

/* BatchNormalization in training: the statistics, then y = (x - mean) * scale + beta. */
void bnncc_batch_norm_forward(const float *restrict x, float *restrict y, int64_t rows, int64_t channels,
                              const float *restrict gamma, const float *restrict beta, float eps,
                              float momentum, float *restrict running_mean, float *restrict running_var,
                              float *restrict mean, float *restrict var, int threads) {
    float *scale = malloc(channels * sizeof(float));
    bnncc_batch_norm_stats(x, rows, channels, gamma, eps, momentum, running_mean, running_var, mean, var, scale,
                           threads);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict xr = x + r * channels;
        float *restrict yr = y + r * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c)
            yr[c] = (xr[c] - mean[c]) * scale[c] + beta[c];
    }
    free(scale);
}

/* Its backward: with xhat = (x - mean) * invstd over M rows, d_beta = sum dy,
 * d_gamma = sum dy * xhat, dx = gamma * invstd * (dy - d_beta / M - xhat * d_gamma / M).
 * `given`, when not NULL, holds sum dy and sum dy * (x - mean) already (2 rows of channels). */
void bnncc_batch_norm_backward(const float *restrict grad, const float *restrict x, float *restrict dx,
                               int64_t rows, int64_t channels, const float *restrict gamma,
                               const float *restrict mean, const float *restrict var, float eps,
                               const double *restrict given, float *restrict d_gamma, float *restrict d_beta,
                               int threads) {
    double *sums = malloc(2 * channels * sizeof(double));
    float *k = malloc(3 * channels * sizeof(float));
    float *k_dy = k, *k_mean = k + channels, *k_x = k + 2 * channels;
    if (given != NULL)
        memcpy(sums, given, 2 * channels * sizeof(double));
    else
        two_sums(x, grad, rows, channels, mean, 1, sums, threads);
    for (int64_t c = 0; c < channels; ++c) {
        double invstd = 1.0 / sqrt((double)var[c] + eps);
        d_beta[c] = (float)sums[c];
        d_gamma[c] = (float)(sums[channels + c] * invstd);
        k_dy[c] = (float)(gamma[c] * invstd);
        k_mean[c] = (float)(gamma[c] * invstd * sums[c] / rows);
        k_x[c] = (float)(gamma[c] * invstd * invstd * sums[channels + c] * invstd / rows);
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *restrict gr = grad + r * channels, *restrict xr = x + r * channels;
        float *restrict dxr = dx + r * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c)
            dxr[c] = k_dy[c] * gr[c] - k_mean[c] - k_x[c] * (xr[c] - mean[c]);
    }
    free(sums);
    free(k);
}

/* ReshapeAdd's channel steps (reshape_add.py) on rows of channels, adding in the torch
 * composition's order, so the results are the same bits. Group mean: out[c] is the mean of
 * r[c*k .. c*k+k-1] for c < co. */
void bnncc_group_mean(const float *restrict r, float *restrict out, int64_t rows, int64_t ci, int64_t co,
                      int64_t k, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        const float *restrict rr = r + row * ci;
        float *restrict o = out + row * co;
        for (int64_t c = 0; c < co; ++c)
            o[c] = rr[c * k];
        for (int64_t j = 1; j < k; ++j)
            for (int64_t c = 0; c < co; ++c)
                o[c] += rr[c * k + j];
        for (int64_t c = 0; c < co; ++c)
            o[c] /= (float)k;
    }
}

void bnncc_group_mean_backward(const float *restrict grad, float *restrict dr, int64_t rows, int64_t ci,
                               int64_t co, int64_t k, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        const float *restrict g = grad + row * co;
        float *restrict d = dr + row * ci;
        for (int64_t c = 0; c < co; ++c)
            for (int64_t j = 0; j < k; ++j)
                d[c * k + j] = g[c] / (float)k;
        for (int64_t c = co * k; c < ci; ++c)
            d[c] = 0.0f;
    }
}

/* Tile: out[c] = r[c mod ci] for c < co; its backward adds the blocks' gradients in order. */
void bnncc_tile(const float *restrict r, float *restrict out, int64_t rows, int64_t ci, int64_t co,
                int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; ++row)
        for (int64_t begin = 0; begin < co; begin += ci)
            memcpy(out + row * co + begin, r + row * ci, (co - begin < ci ? co - begin : ci) * sizeof(float));
}

void bnncc_tile_backward(const float *restrict grad, float *restrict dr, int64_t rows, int64_t ci, int64_t co,
                         int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < rows; ++row) {
        const float *restrict g = grad + row * co;
        float *restrict d = dr + row * ci;
        for (int64_t c = 0; c < ci; ++c)
            d[c] = c < co ? g[c] : 0.0f;
        for (int64_t begin = ci; begin < co; begin += ci)
#pragma omp simd
            for (int64_t c = 0; c < (co - begin < ci ? co - begin : ci); ++c)
                d[c] += g[begin + c];
    }
}

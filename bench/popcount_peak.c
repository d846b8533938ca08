/* Peak binary-MAC rate of this CPU: xor + popcount + add on registers, no memory traffic to speak of.
 *
 * Each thread keeps 8 weight vectors and 8 accumulators in registers and streams one activation
 * vector per step from a 1 KiB array (L1), like the inner loop of a register-tiled binary conv;
 * reloading it stops the compiler from hoisting the popcounts out of the loop.
 * Usage: popcount_peak THREADS STEPS -> prints binary MACs per second (all threads together).
 */
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef __AVX512VPOPCNTDQ__
#include <immintrin.h>
#define BITS 512
typedef __m512i word;
#define LOAD(p) _mm512_load_si512((const void *)(p))
#define SET1(v) _mm512_set1_epi32((int)(v))
#define STEP(acc, x, w) acc = _mm512_add_epi32(acc, _mm512_popcnt_epi32(_mm512_xor_si512(x, w)))
#define SUM(acc) ((uint64_t)_mm512_reduce_add_epi32(acc))
#define ZERO _mm512_setzero_si512()
#else
#define BITS 64
typedef uint64_t word;
#define LOAD(p) (*(const uint64_t *)(p))
#define SET1(v) ((uint64_t)(v) * 0x0101010101010101ull)
#define STEP(acc, x, w) acc += (uint64_t)__builtin_popcountll((x) ^ (w))
#define SUM(acc) (acc)
#define ZERO 0
#endif

static uint64_t run(long steps, uint32_t seed) {
    uint32_t data[256] __attribute__((aligned(64)));
    for (int i = 0; i < 256; i++) data[i] = (seed + 1u) * 2654435761u + (uint32_t)i * 40503u;
    const int words_in_data = 256 * 32 / BITS;
    word w0 = SET1(seed + 1), w1 = SET1(seed + 3), w2 = SET1(seed + 5), w3 = SET1(seed + 7);
    word w4 = SET1(seed + 11), w5 = SET1(seed + 13), w6 = SET1(seed + 17), w7 = SET1(seed + 19);
    word a0 = ZERO, a1 = ZERO, a2 = ZERO, a3 = ZERO, a4 = ZERO, a5 = ZERO, a6 = ZERO, a7 = ZERO;
    for (long i = 0; i < steps; i++) {
        word x = LOAD(data + (i % words_in_data) * (BITS / 32));
        STEP(a0, x, w0); STEP(a1, x, w1); STEP(a2, x, w2); STEP(a3, x, w3);
        STEP(a4, x, w4); STEP(a5, x, w5); STEP(a6, x, w6); STEP(a7, x, w7);
    }
    return SUM(a0) + SUM(a1) + SUM(a2) + SUM(a3) + SUM(a4) + SUM(a5) + SUM(a6) + SUM(a7);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s THREADS STEPS\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[1]);
    long steps = atol(argv[2]);
    uint64_t checksum = 0;
    double start = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : checksum)
    checksum += run(steps, (uint32_t)omp_get_thread_num());
    double seconds = omp_get_wtime() - start;
    printf("%.6e %d %llu\n", (double)threads * steps * 8 * BITS / seconds, BITS, (unsigned long long)checksum);
    return 0;
}

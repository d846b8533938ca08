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
#define FLUSH(acc)
#elif defined(__AVX2__)
/* No vector popcount: per-byte counts from two vpshufb nibble lookups, added in byte lanes; every
 * 31 steps (at most 8 a step, below 256) vpsadbw adds the bytes into the four 64-bit sums. */
#include <immintrin.h>
#define BITS 256
typedef struct { __m256i bytes, sums; } word_acc;
typedef __m256i word;
#define ACC word_acc
#define LOAD(p) _mm256_load_si256((const __m256i *)(p))
#define SET1(v) _mm256_set1_epi32((int)(v))
#define NIBBLES _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4)
#define LOW4 _mm256_set1_epi8(0x0f)
#define STEP(acc, x, w) do { __m256i v_ = _mm256_xor_si256(x, w); \
    acc.bytes = _mm256_add_epi8(acc.bytes, _mm256_add_epi8(_mm256_shuffle_epi8(NIBBLES, _mm256_and_si256(v_, LOW4)), \
        _mm256_shuffle_epi8(NIBBLES, _mm256_and_si256(_mm256_srli_epi16(v_, 4), LOW4)))); } while (0)
#define FLUSH(acc) do { acc.sums = _mm256_add_epi64(acc.sums, _mm256_sad_epu8(acc.bytes, _mm256_setzero_si256())); \
    acc.bytes = _mm256_setzero_si256(); } while (0)
#define SUM(acc) ((uint64_t)_mm256_extract_epi64(acc.sums, 0) + (uint64_t)_mm256_extract_epi64(acc.sums, 1) + \
    (uint64_t)_mm256_extract_epi64(acc.sums, 2) + (uint64_t)_mm256_extract_epi64(acc.sums, 3))
#define ZERO ((word_acc){_mm256_setzero_si256(), _mm256_setzero_si256()})
#else
#define BITS 64
typedef uint64_t word;
#define LOAD(p) (*(const uint64_t *)(p))
#define SET1(v) ((uint64_t)(v) * 0x0101010101010101ull)
#define STEP(acc, x, w) acc += (uint64_t)__builtin_popcountll((x) ^ (w))
#define SUM(acc) (acc)
#define ZERO 0
#define FLUSH(acc)
#endif
#ifndef ACC
#define ACC word
#endif

static uint64_t run(long steps, uint32_t seed) {
    uint32_t data[256] __attribute__((aligned(64)));
    for (int i = 0; i < 256; i++) data[i] = (seed + 1u) * 2654435761u + (uint32_t)i * 40503u;
    const int words_in_data = 256 * 32 / BITS;
    word w0 = SET1(seed + 1), w1 = SET1(seed + 3), w2 = SET1(seed + 5), w3 = SET1(seed + 7);
    word w4 = SET1(seed + 11), w5 = SET1(seed + 13), w6 = SET1(seed + 17), w7 = SET1(seed + 19);
    ACC a0 = ZERO, a1 = ZERO, a2 = ZERO, a3 = ZERO, a4 = ZERO, a5 = ZERO, a6 = ZERO, a7 = ZERO;
    for (long i = 0; i < steps; i++) {
        word x = LOAD(data + (i % words_in_data) * (BITS / 32));
        STEP(a0, x, w0); STEP(a1, x, w1); STEP(a2, x, w2); STEP(a3, x, w3);
        STEP(a4, x, w4); STEP(a5, x, w5); STEP(a6, x, w6); STEP(a7, x, w7);
        if (i % 31 == 30) {
            FLUSH(a0); FLUSH(a1); FLUSH(a2); FLUSH(a3); FLUSH(a4); FLUSH(a5); FLUSH(a6); FLUSH(a7);
        }
    }
    FLUSH(a0); FLUSH(a1); FLUSH(a2); FLUSH(a3); FLUSH(a4); FLUSH(a5); FLUSH(a6); FLUSH(a7);
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

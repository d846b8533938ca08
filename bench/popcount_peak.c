/* Peak binary-MAC rate of this CPU, per popcount method: xor + popcount + add on registers, no
 * memory traffic to speak of.
 *
 * Every method computes the same sum: each thread keeps 8 weight words (32-bit values broadcast to
 * the vector) in registers and streams one activation vector per step from a 1 KiB array (L1),
 * like the inner loop of a register-tiled binary conv; the sum is popcount(x xor w) over every step
 * and weight. Reloading x stops the compiler from hoisting the popcounts out of the loop.
 *
 * Methods (each function carries its own target attribute, so one binary holds them all and runs
 * those this CPU has):
 *   avx512-vpopcntdq  512-bit vpopcntd into 32-bit counters (AVX-512 VPOPCNTDQ)
 *   avx2-bytes        per-byte counts from two vpshufb nibble lookups added in byte lanes; every 31
 *                     steps (at most 8 a step, so below 256) vpsadbw widens the bytes to 64 bits
 *   avx2-harley-seal  a carry-save-adder tree over 16 vectors (two steps) leaves one vector of
 *                     'sixteens' to count (nibble lookups + vpsadbw); the ones, twos, fours and
 *                     eights it carries are counted once at the end
 *   avx2-nibble-agreements
 *                     the AVX2 conv kernels' own form: both operands split into nibbles ahead (the
 *                     streamed vector's halves in memory, each weight word's halves broadcast from
 *                     memory), one vpshufb lookup a half of (agreements - mismatches) / 2 of its
 *                     4 bits, added in signed byte lanes; every 31 steps (at most 4 a step, so
 *                     within int8) vpmaddubsw + vpmaddwd widen the bytes to 32 bits. A 256-bit
 *                     slice's popcount is 128 minus its sum
 *   avx2-weight-tables
 *                     one 16-byte table a weight nibble, of its popcounts against the 16 nibble values,
 *                     looked up by vpshufb at 32 activation nibbles split ahead into planes of bytes:
 *                     a lookup and an add a 128 bit-products, where the nibble agreements take an xor
 *                     more. The tables are 32 times the bits they stand for, built ahead of the loop
 *                     (in the timed region, as the other methods' splits are: some 3000 scalar steps,
 *                     microseconds of the seconds timed): a peak, not a kernel's loop (bench/RESULTS.md)
 *   avx512bw-nibble-agreements
 *                     the same with 512-bit vectors (AVX-512BW's vpshufb, vpmaddubsw, vpmaddwd): the
 *                     kernels of an AVX-512 CPU without VPOPCNTDQ (Skylake-SP, Cascade Lake)
 *   avx512bw-weight-tables
 *                     the same with 512-bit vectors (AVX-512BW's vpshufb)
 *   scalar-popcnt     64-bit popcnt into 8 counters
 *
 * Usage: popcount_peak METHOD THREADS STEPS -> prints "binary MACs per second (all threads
 * together), bits per vector, checksum"; exit 3 when this CPU lacks the method's instructions.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { WEIGHTS = 8, DATA_WORDS = 256, FLUSH_STEPS = 31 };
static const uint32_t WEIGHT_OFFSETS[WEIGHTS] = {1, 3, 5, 7, 11, 13, 17, 19};

/* The activation array of the thread with this seed (the test computes the same values). */
static void fill(uint32_t *data, uint32_t seed) {
    for (uint32_t i = 0; i < DATA_WORDS; i++) data[i] = (seed + 1u) * 2654435761u + i * 40503u;
}

__attribute__((target("avx512f,avx512vpopcntdq")))
static uint64_t avx512_vpopcntdq(const uint32_t *data, uint32_t seed, long steps) {
    __m512i w[WEIGHTS], acc[WEIGHTS];
#pragma GCC unroll 8
    for (int j = 0; j < WEIGHTS; j++) {
        w[j] = _mm512_set1_epi32((int)(seed + WEIGHT_OFFSETS[j]));
        acc[j] = _mm512_setzero_si512();
    }
    for (long i = 0; i < steps; i++) {
        __m512i x = _mm512_load_si512((const void *)(data + (i % (DATA_WORDS / 16)) * 16));
#pragma GCC unroll 8
        for (int j = 0; j < WEIGHTS; j++) acc[j] = _mm512_add_epi32(acc[j], _mm512_popcnt_epi32(_mm512_xor_si512(x, w[j])));
    }
    uint64_t sum = 0;  /* 32-bit lanes hold at most 32 * STEPS; the total is summed in 64 bits */
    for (int j = 0; j < WEIGHTS; j++) {
        uint32_t lanes[16];
        _mm512_storeu_si512((void *)lanes, acc[j]);
        for (int k = 0; k < 16; k++) sum += lanes[k];
    }
    return sum;
}

/* Four 64-bit sums of the byte popcounts of v: two nibble lookups, vpsadbw. */
__attribute__((target("avx2")))
static inline __m256i bytes_popcount(__m256i v) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    return _mm256_add_epi8(_mm256_shuffle_epi8(table, _mm256_and_si256(v, low4)),
                           _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4)));
}

__attribute__((target("avx2")))
static inline __m256i widen(__m256i bytes) { return _mm256_sad_epu8(bytes, _mm256_setzero_si256()); }

__attribute__((target("avx2")))
static inline uint64_t sum64(__m256i v) {
    return (uint64_t)_mm256_extract_epi64(v, 0) + (uint64_t)_mm256_extract_epi64(v, 1) +
           (uint64_t)_mm256_extract_epi64(v, 2) + (uint64_t)_mm256_extract_epi64(v, 3);
}

__attribute__((target("avx2")))
static uint64_t avx2_bytes(const uint32_t *data, uint32_t seed, long steps) {
    __m256i w[WEIGHTS], bytes[WEIGHTS], sums[WEIGHTS];
#pragma GCC unroll 8
    for (int j = 0; j < WEIGHTS; j++) {
        w[j] = _mm256_set1_epi32((int)(seed + WEIGHT_OFFSETS[j]));
        bytes[j] = sums[j] = _mm256_setzero_si256();
    }
    for (long i = 0; i < steps; i++) {
        __m256i x = _mm256_load_si256((const __m256i *)(data + (i % (DATA_WORDS / 8)) * 8));
#pragma GCC unroll 8
        for (int j = 0; j < WEIGHTS; j++) bytes[j] = _mm256_add_epi8(bytes[j], bytes_popcount(_mm256_xor_si256(x, w[j])));
        if (i % FLUSH_STEPS == FLUSH_STEPS - 1) {
#pragma GCC unroll 8
            for (int j = 0; j < WEIGHTS; j++) {
                sums[j] = _mm256_add_epi64(sums[j], widen(bytes[j]));
                bytes[j] = _mm256_setzero_si256();
            }
        }
    }
    uint64_t sum = 0;
    for (int j = 0; j < WEIGHTS; j++) sum += sum64(_mm256_add_epi64(sums[j], widen(bytes[j])));
    return sum;
}

/* Carry-save adder: a + b + c = 2 * high + low, bit by bit. */
__attribute__((target("avx2")))
static inline void csa(__m256i *high, __m256i *low, __m256i a, __m256i b, __m256i c) {
    __m256i u = _mm256_xor_si256(a, b);
    *high = _mm256_or_si256(_mm256_and_si256(a, b), _mm256_and_si256(u, c));
    *low = _mm256_xor_si256(u, c);
}

/* Adds the 8 vectors x xor w[j] into (ones, twos, fours); returns the eights carried out. */
__attribute__((target("avx2")))
static inline __m256i add8(__m256i *ones, __m256i *twos, __m256i *fours, __m256i x, const __m256i *w) {
    __m256i twos_a, twos_b, fours_a, fours_b, eights;
    csa(&twos_a, ones, *ones, _mm256_xor_si256(x, w[0]), _mm256_xor_si256(x, w[1]));
    csa(&twos_b, ones, *ones, _mm256_xor_si256(x, w[2]), _mm256_xor_si256(x, w[3]));
    csa(&fours_a, twos, *twos, twos_a, twos_b);
    csa(&twos_a, ones, *ones, _mm256_xor_si256(x, w[4]), _mm256_xor_si256(x, w[5]));
    csa(&twos_b, ones, *ones, _mm256_xor_si256(x, w[6]), _mm256_xor_si256(x, w[7]));
    csa(&fours_b, twos, *twos, twos_a, twos_b);
    csa(&eights, fours, *fours, fours_a, fours_b);
    return eights;
}

__attribute__((target("avx2")))
static uint64_t avx2_harley_seal(const uint32_t *data, uint32_t seed, long steps) {
    __m256i w[WEIGHTS];
#pragma GCC unroll 8
    for (int j = 0; j < WEIGHTS; j++) w[j] = _mm256_set1_epi32((int)(seed + WEIGHT_OFFSETS[j]));
    __m256i ones = _mm256_setzero_si256(), twos = ones, fours = ones, eights = ones, sixteens_count = ones;
    long i = 0;
    for (; i + 1 < steps; i += 2) {  /* 16 vectors: two steps of 8 weights */
        __m256i x0 = _mm256_load_si256((const __m256i *)(data + (i % (DATA_WORDS / 8)) * 8));
        __m256i x1 = _mm256_load_si256((const __m256i *)(data + ((i + 1) % (DATA_WORDS / 8)) * 8));
        __m256i eights_a = add8(&ones, &twos, &fours, x0, w);
        __m256i eights_b = add8(&ones, &twos, &fours, x1, w);
        __m256i sixteens;
        csa(&sixteens, &eights, eights, eights_a, eights_b);
        sixteens_count = _mm256_add_epi64(sixteens_count, widen(bytes_popcount(sixteens)));
    }
    /* the final reduction: each carried vector counted once, at its weight */
    __m256i total = _mm256_slli_epi64(sixteens_count, 4);
    total = _mm256_add_epi64(total, _mm256_slli_epi64(widen(bytes_popcount(eights)), 3));
    total = _mm256_add_epi64(total, _mm256_slli_epi64(widen(bytes_popcount(fours)), 2));
    total = _mm256_add_epi64(total, _mm256_slli_epi64(widen(bytes_popcount(twos)), 1));
    total = _mm256_add_epi64(total, widen(bytes_popcount(ones)));
    if (i < steps) {  /* an odd step count: the last step's 8 vectors counted directly */
        __m256i x = _mm256_load_si256((const __m256i *)(data + (i % (DATA_WORDS / 8)) * 8));
        for (int j = 0; j < WEIGHTS; j++) total = _mm256_add_epi64(total, widen(bytes_popcount(_mm256_xor_si256(x, w[j]))));
    }
    return sum64(total);
}

/* Tables of the weights' nibbles indexed by the activations' nibbles, in vectors of BYTES bytes: tables[j][n][v] =
 * popcount(v xor nibble n of w[j]) for v = 0..15, in every 128-bit lane, and each activation word's 8 nibbles
 * in 8 planes of bytes (plane n: nibble n of BYTES words side by side, split ahead like the nibble-agreement
 * loop's halves). One vpshufb looks BYTES words' nibble n up in one weight's table: the bit-products of the
 * nibble agreements' lookup without their xor. A register tile of 4 weights' tables meets 2 slices' planes
 * read from memory (8 byte counters, flushed by vpsadbw every 7 steps); each tile runs through all the steps.
 * A step is 2 slices of BYTES words. P, SI, V as in NIBBLE_AGREEMENTS; BROADCAST puts a 128-bit table in
 * every lane. */
enum { PLANES = 8, TILE_WEIGHTS = 4, TILE_SLICES = 2, TABLE_FLUSH = 7 };  /* a byte adds <= 7 * 8 * 4 < 256 */
#define WEIGHT_TABLES(P, SI, V, BYTES, BROADCAST)                                                                \
    enum { SLICES = DATA_WORDS / (BYTES) };                                                                     \
    uint8_t planes[SLICES][PLANES][BYTES] __attribute__((aligned(64)));                                         \
    uint8_t tables[WEIGHTS][PLANES][16] __attribute__((aligned(16)));                                           \
    for (int i = 0; i < DATA_WORDS; i++)                                                                        \
        for (int n = 0; n < PLANES; n++) planes[i / (BYTES)][n][i % (BYTES)] = (data[i] >> (4 * n)) & 15u;       \
    for (int j = 0; j < WEIGHTS; j++)                                                                           \
        for (int n = 0; n < PLANES; n++)                                                                        \
            for (int v = 0; v < 16; v++)                                                                        \
                tables[j][n][v] = (uint8_t)__builtin_popcount((((seed + WEIGHT_OFFSETS[j]) >> (4 * n)) & 15u) ^ v); \
    V sums = P##_setzero_##SI();                                                                                \
    for (int tile = 0; tile < WEIGHTS; tile += TILE_WEIGHTS) {                                                  \
        V bytes[TILE_SLICES][TILE_WEIGHTS];                                                                     \
        for (int s = 0; s < TILE_SLICES; s++)                                                                   \
            for (int j = 0; j < TILE_WEIGHTS; j++) bytes[s][j] = P##_setzero_##SI();                            \
        for (long i = 0; i < steps; i++) {                                                                      \
            _Pragma("GCC unroll 8") for (int n = 0; n < PLANES; n++) {                                          \
                V table[TILE_WEIGHTS];                                                                          \
                for (int j = 0; j < TILE_WEIGHTS; j++) {                                                        \
                    table[j] = BROADCAST(_mm_load_si128((const __m128i *)tables[tile + j][n]));                 \
                    /* loaded each step, as a kernel's would be: gcc otherwise keeps all 32 of the tile's */    \
                    /* tables out of the loop, on the stack, and spills the counters with them */               \
                    __asm__ volatile("" : "+x"(table[j]));                                                      \
                }                                                                                               \
                for (int s = 0; s < TILE_SLICES; s++) {                                                         \
                    V index = P##_load_##SI((const void *)planes[(i * TILE_SLICES + s) % SLICES][n]);           \
                    for (int j = 0; j < TILE_WEIGHTS; j++) {                                                    \
                        bytes[s][j] = P##_add_epi8(bytes[s][j], P##_shuffle_epi8(table[j], index));             \
                        __asm__("" : "+x"(bytes[s][j])); /* into its counter: gcc otherwise adds pairs first */ \
                    }                                                                                           \
                }                                                                                               \
            }                                                                                                   \
            if (i % TABLE_FLUSH == TABLE_FLUSH - 1 || i == steps - 1) {                                         \
                for (int s = 0; s < TILE_SLICES; s++)                                                           \
                    for (int j = 0; j < TILE_WEIGHTS; j++) {                                                    \
                        sums = P##_add_epi64(sums, P##_sad_epu8(bytes[s][j], P##_setzero_##SI()));              \
                        bytes[s][j] = P##_setzero_##SI();                                                       \
                    }                                                                                           \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    uint64_t lanes[BYTES / 8];                                                                                  \
    P##_storeu_##SI((void *)lanes, sums);                                                                       \
    uint64_t total = 0;                                                                                         \
    for (int k = 0; k < BYTES / 8; k++) total += lanes[k];                                                      \
    return total;

__attribute__((target("avx2")))
static uint64_t avx2_weight_tables(const uint32_t *data, uint32_t seed, long steps) {
    WEIGHT_TABLES(_mm256, si256, __m256i, 32, _mm256_broadcastsi128_si256)
}

__attribute__((target("avx512f,avx512bw")))
static uint64_t avx512bw_weight_tables(const uint32_t *data, uint32_t seed, long steps) {
    WEIGHT_TABLES(_mm512, si512, __m512i, 64, _mm512_broadcast_i32x4)
}

/* Both operands split into nibbles ahead, as the kernels take them: the thread's array and its weights. */
static void split_nibbles(const uint32_t *data, uint32_t seed, uint32_t *low, uint32_t *high, uint32_t *w_low,
                          uint32_t *w_high) {
    for (int i = 0; i < DATA_WORDS; i++) {
        low[i] = data[i] & 0x0f0f0f0fu;
        high[i] = (data[i] >> 4) & 0x0f0f0f0fu;
    }
    for (int j = 0; j < WEIGHTS; j++) {
        w_low[j] = (seed + WEIGHT_OFFSETS[j]) & 0x0f0f0f0fu;
        w_high[j] = ((seed + WEIGHT_OFFSETS[j]) >> 4) & 0x0f0f0f0fu;
    }
}

/* The nibble-agreement loop in vectors of LANES 32-bit lanes, written once for both widths: P is the
 * intrinsics' prefix (_mm256, _mm512), SI their whole-register suffix (si256, si512), V the vector
 * type and table the vector holding, in every 128-bit lane, 2 - popcount(v) of v = 0..15 as signed
 * bytes. A LANES * 32-bit slice's popcount is LANES * 16 minus its sum. */
#define NIBBLE_AGREEMENTS(P, SI, V, LANES)                                                                    \
    const V ones8 = P##_set1_epi8(1), ones16 = P##_set1_epi16(1);                                           \
    uint32_t low[DATA_WORDS] __attribute__((aligned(64))), high[DATA_WORDS] __attribute__((aligned(64)));    \
    uint32_t w_low[WEIGHTS], w_high[WEIGHTS];                                                               \
    split_nibbles(data, seed, low, high, w_low, w_high);                                                    \
    V bytes[WEIGHTS], sums = P##_setzero_##SI();                                                            \
    _Pragma("GCC unroll 8") for (int j = 0; j < WEIGHTS; j++) bytes[j] = P##_setzero_##SI();               \
    for (long i = 0; i < steps; i++) {                                                                      \
        long at = (i % (DATA_WORDS / LANES)) * LANES;                                                       \
        V x_low = P##_load_##SI((const void *)(low + at)), x_high = P##_load_##SI((const void *)(high + at)); \
        _Pragma("GCC unroll 8") for (int j = 0; j < WEIGHTS; j++) {                                         \
            V a = P##_shuffle_epi8(table, P##_xor_##SI(x_low, P##_set1_epi32((int)w_low[j])));              \
            V b = P##_shuffle_epi8(table, P##_xor_##SI(x_high, P##_set1_epi32((int)w_high[j])));            \
            bytes[j] = P##_add_epi8(bytes[j], P##_add_epi8(a, b));                                          \
        }                                                                                                   \
        if (i % FLUSH_STEPS == FLUSH_STEPS - 1 || i == steps - 1) {                                         \
            _Pragma("GCC unroll 8") for (int j = 0; j < WEIGHTS; j++) {                                     \
                sums = P##_add_epi32(sums, P##_madd_epi16(P##_maddubs_epi16(ones8, bytes[j]), ones16));     \
                bytes[j] = P##_setzero_##SI();                                                              \
            }                                                                                               \
        }                                                                                                   \
    }                                                                                                       \
    int32_t lanes[LANES];                                                                                   \
    P##_storeu_##SI((void *)lanes, sums);                                                                   \
    int64_t total = 0;                                                                                      \
    for (int k = 0; k < LANES; k++) total += lanes[k];                                                      \
    return (uint64_t)(LANES * 16 * (int64_t)steps * WEIGHTS - total);

#define NIBBLE_TABLE 2, 1, 1, 0, 1, 0, 0, -1, 1, 0, 0, -1, 0, -1, -1, -2

__attribute__((target("avx2")))
static uint64_t avx2_nibble_agreements(const uint32_t *data, uint32_t seed, long steps) {
    const __m256i table = _mm256_setr_epi8(NIBBLE_TABLE, NIBBLE_TABLE);
    NIBBLE_AGREEMENTS(_mm256, si256, __m256i, 8)
}

__attribute__((target("avx512f,avx512bw")))
static uint64_t avx512bw_nibble_agreements(const uint32_t *data, uint32_t seed, long steps) {
    const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(NIBBLE_TABLE));
    NIBBLE_AGREEMENTS(_mm512, si512, __m512i, 16)
}

__attribute__((target("popcnt")))
static uint64_t scalar_popcnt(const uint32_t *data, uint32_t seed, long steps) {
    uint64_t w[WEIGHTS], acc[WEIGHTS];
    const uint64_t *words = (const uint64_t *)data;
#pragma GCC unroll 8
    for (int j = 0; j < WEIGHTS; j++) {
        w[j] = (uint64_t)(seed + WEIGHT_OFFSETS[j]) * 0x100000001ull;  /* the 32-bit value in both halves */
        acc[j] = 0;
    }
    for (long i = 0; i < steps; i++) {
        uint64_t x = words[i % (DATA_WORDS / 2)];
#pragma GCC unroll 8
        for (int j = 0; j < WEIGHTS; j++) acc[j] += (uint64_t)__builtin_popcountll(x ^ w[j]);
    }
    uint64_t sum = 0;
    for (int j = 0; j < WEIGHTS; j++) sum += acc[j];
    return sum;
}

struct method {
    const char *name;
    int bits;
    int supported;
    uint64_t (*run)(const uint32_t *, uint32_t, long);
};

int main(int argc, char **argv) {
    __builtin_cpu_init();
    const struct method methods[] = {
        {"avx512-vpopcntdq", 512, __builtin_cpu_supports("avx512vpopcntdq"), avx512_vpopcntdq},
        {"avx2-bytes", 256, __builtin_cpu_supports("avx2"), avx2_bytes},
        {"avx2-harley-seal", 256, __builtin_cpu_supports("avx2"), avx2_harley_seal},
        {"avx2-nibble-agreements", 256, __builtin_cpu_supports("avx2"), avx2_nibble_agreements},
        {"avx2-weight-tables", 2048, __builtin_cpu_supports("avx2"), avx2_weight_tables},
        {"avx512bw-nibble-agreements", 512, __builtin_cpu_supports("avx512bw"), avx512bw_nibble_agreements},
        {"avx512bw-weight-tables", 4096, __builtin_cpu_supports("avx512bw"), avx512bw_weight_tables},
        {"scalar-popcnt", 64, __builtin_cpu_supports("popcnt"), scalar_popcnt},
    };
    const int count = sizeof methods / sizeof methods[0];
    const struct method *method = NULL;
    for (int m = 0; argc == 4 && m < count; m++)
        if (!strcmp(argv[1], methods[m].name)) method = &methods[m];
    if (method == NULL) {
        fprintf(stderr, "usage: %s METHOD THREADS STEPS; METHOD one of:", argv[0]);
        for (int m = 0; m < count; m++) fprintf(stderr, " %s", methods[m].name);
        fprintf(stderr, "\n");
        return 2;
    }
    if (!method->supported) {
        fprintf(stderr, "%s: this CPU lacks its instructions\n", method->name);
        return 3;
    }
    int threads = atoi(argv[2]);
    long steps = atol(argv[3]);
    uint64_t checksum = 0;
    double start = omp_get_wtime();
#pragma omp parallel num_threads(threads) reduction(+ : checksum)
    {
        uint32_t data[DATA_WORDS] __attribute__((aligned(64)));
        uint32_t seed = (uint32_t)omp_get_thread_num();
        fill(data, seed);
        checksum += method->run(data, seed, steps);
    }
    double seconds = omp_get_wtime() - start;
    printf("%.6e %d %llu\n", (double)threads * steps * WEIGHTS * method->bits / seconds, method->bits,
           (unsigned long long)checksum);
    return 0;
}

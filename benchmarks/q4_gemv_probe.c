// How close can a 4-bit GEMV (batch-1 decode's matrix-vector product) come to this CPU's memory-read bound?
//
// A measurement probe, not product code: gptx runs ONNX Runtime's MatMulNBits. This hand-written AVX2 kernel is
// the best simple design for a CPU without AVX-512/VNNI, as an upper bound to compare MatMulNBits and llama.cpp's
// q4_0 with (benchmarks/README.md, "Why 1.5x llama.cpp's q4_0 is out of reach on this CPU"):
//   weights: blocks of 64 4-bit values (32 bytes: low nibbles = elements 0-31, high = 32-63), an fp32 scale
//            per block and a zero point of 8 (the -8 folded into a per-block activation sum);
//   activations: int8 per block of 64 with an fp32 scale (quantized once per call, as MatMulNBits's
//            accuracy_level 4 and llama.cpp's q8 activations do);
//   dot: vpmaddubsw (unsigned 4-bit x signed 8-bit) then vpmaddwd, one fp32 FMA per block, two rows at a time;
//   prefetch: optionally, software prefetch of both rows PREFETCH_BYTES ahead.
// It prints, for the given matrix shape, the kernel's rate with the weights in DRAM (many copies, larger than
// the L3 cache) without and with prefetch, and in cache (one copy), against a plain read of 200 MB of floats
// with the same threads.
//
//   gcc -O3 -march=native -fopenmp benchmarks/q4_gemv_probe.c -o /tmp/q4_gemv_probe
//   OMP_NUM_THREADS=2 /tmp/q4_gemv_probe 3072 768      # rows (N) x columns (K); K a multiple of 64
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { BLOCK = 64, BLOCK_BYTES = BLOCK / 2 + 4, PREFETCH_BYTES = 4096 };  // packed nibbles + fp32 scale

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_hadd_ps(a, a);
    a = _mm_hadd_ps(a, a);
    return _mm_cvtss_f32(a);
}

// y[n] = sum_k w[n, k] x[k] for 4-bit w (zero point 8) and int8 x; rows taken two at a time (N even).
static void q4_gemv(int n_rows, int k, const uint8_t *w, const float *w_scale, const int8_t *x, const float *x_scale,
                    const float *x_correction, float *y, int prefetch) {
    const int blocks = k / BLOCK;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < n_rows; n += 2) {
        const uint8_t *w0 = w + (size_t)n * blocks * 32, *w1 = w0 + (size_t)blocks * 32;
        const float *s0 = w_scale + (size_t)n * blocks, *s1 = s0 + blocks;
        const __m256i low4 = _mm256_set1_epi8(0xF), ones = _mm256_set1_epi16(1);
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        float c0 = 0, c1 = 0;
        for (int b = 0; b < blocks; b++) {
            __m256i a_lo = _mm256_load_si256((const __m256i *)(x + b * BLOCK));
            __m256i a_hi = _mm256_load_si256((const __m256i *)(x + b * BLOCK + 32));
            if (prefetch) {  // reads past a row's end only prefetch the next rows, which are read next
                _mm_prefetch((const char *)(w0 + b * 32 + PREFETCH_BYTES), _MM_HINT_T0);
                _mm_prefetch((const char *)(w1 + b * 32 + PREFETCH_BYTES), _MM_HINT_T0);
            }
            __m256i p0 = _mm256_loadu_si256((const __m256i *)(w0 + b * 32));
            __m256i p1 = _mm256_loadu_si256((const __m256i *)(w1 + b * 32));
            // two products of at most 15 x 127 per int16 lane, added once: no overflow
            __m256i d0 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(p0, low4), a_lo),
                                          _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(p0, 4), low4), a_hi));
            __m256i d1 = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(p1, low4), a_lo),
                                          _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(p1, 4), low4), a_hi));
            acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d0, ones)), _mm256_set1_ps(s0[b] * x_scale[b]), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(d1, ones)), _mm256_set1_ps(s1[b] * x_scale[b]), acc1);
            c0 += s0[b] * x_correction[b];
            c1 += s1[b] * x_correction[b];
        }
        y[n] = hsum(acc0) + c0;
        y[n + 1] = hsum(acc1) + c1;
    }
}

static float read_all(const float *a, size_t n) {
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#pragma omp for
        for (size_t i = 0; i < n; i += 32) {
            s0 = _mm256_add_ps(s0, _mm256_load_ps(a + i));
            s1 = _mm256_add_ps(s1, _mm256_load_ps(a + i + 8));
            s2 = _mm256_add_ps(s2, _mm256_load_ps(a + i + 16));
            s3 = _mm256_add_ps(s3, _mm256_load_ps(a + i + 24));
        }
        total += hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    }
    return total;
}

// Best seconds per GEMV over `reps` passes through `copies` weight copies (each pass reads every copy once).
static double time_gemv(int n_rows, int k, int copies, int reps, uint8_t **w, float **ws, const int8_t *x,
                        const float *xs, const float *xc, float *y, int prefetch) {
    double best = 1e9;
    for (int r = 0; r < reps; r++) {
        double t = now();
        for (int c = 0; c < copies; c++) q4_gemv(n_rows, k, w[c], ws[c], x, xs, xc, y, prefetch);
        t = (now() - t) / copies;
        if (t < best) best = t;
    }
    return best;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s ROWS COLS   (ROWS even, COLS a multiple of %d)\n", argv[0], BLOCK);
        return 2;
    }
    const int n_rows = atoi(argv[1]), k = atoi(argv[2]), reps = 7;
    if (n_rows <= 0 || n_rows % 2 || k <= 0 || k % BLOCK) {
        fprintf(stderr, "ROWS must be even and COLS a multiple of %d\n", BLOCK);
        return 2;
    }
    const int blocks = k / BLOCK;
    const size_t packed = (size_t)n_rows * blocks * 32, scales = (size_t)n_rows * blocks;
    const double bytes = (double)n_rows * blocks * BLOCK_BYTES;
    const int copies = (int)(256e6 / bytes) + 1;  // together well past the L3 cache
    uint8_t **w = malloc(copies * sizeof *w);
    float **ws = malloc(copies * sizeof *ws);
    for (int c = 0; c < copies; c++) {
        w[c] = aligned_alloc(64, (packed + 63) / 64 * 64);
        ws[c] = aligned_alloc(64, (scales * 4 + 63) / 64 * 64);
        for (size_t i = 0; i < packed; i++) w[c][i] = (uint8_t)rand();
        for (size_t i = 0; i < scales; i++) ws[c][i] = 1e-3f;
    }
    int8_t *x = aligned_alloc(64, k);
    float *xs = malloc(blocks * sizeof *xs), *xc = malloc(blocks * sizeof *xc), *y = malloc(n_rows * sizeof *y);
    for (int i = 0; i < k; i++) x[i] = (int8_t)(rand() % 255 - 127);
    for (int b = 0; b < blocks; b++) {
        int sum = 0;
        for (int j = 0; j < BLOCK; j++) sum += x[b * BLOCK + j];
        xs[b] = 1e-2f;
        xc[b] = -8.0f * sum * xs[b];  // the zero point's share: -8 * sum(x) per block
    }
    const double dram = time_gemv(n_rows, k, copies, reps, w, ws, x, xs, xc, y, 0);
    const double dram_prefetch = time_gemv(n_rows, k, copies, reps, w, ws, x, xs, xc, y, 1);
    const double cached = time_gemv(n_rows, k, 1, 50 * reps, w, ws, x, xs, xc, y, 0);

    const size_t floats = (size_t)(200e6 / 4) / 32 * 32;
    float *big = aligned_alloc(64, floats * 4);
    for (size_t i = 0; i < floats; i++) big[i] = 1.0f;
    double bound = 1e9;
    volatile float sink = 0;
    for (int r = 0; r < reps; r++) {
        double t = now();
        sink += read_all(big, floats);
        t = now() - t;
        if (t < bound) bound = t;
    }
    const double bound_gbs = floats * 4 / bound / 1e9;
    printf("%d x %d, %d threads, weights %.2f MB, read bound %.1f GB/s. q4 GEMV from DRAM: %.3f ms = %.1f GB/s "
           "(%.0f%%), with prefetch %.3f ms = %.1f GB/s (%.0f%%); in cache %.3f ms = %.1f GB/s (%.0f%%)\n",
           n_rows, k, omp_get_max_threads(), bytes / 1e6, bound_gbs,
           dram * 1e3, bytes / dram / 1e9, 100 * bytes / dram / 1e9 / bound_gbs,
           dram_prefetch * 1e3, bytes / dram_prefetch / 1e9, 100 * bytes / dram_prefetch / 1e9 / bound_gbs,
           cached * 1e3, bytes / cached / 1e9, 100 * bytes / cached / 1e9 / bound_gbs);
    return sink == 12345.0f;  // keep the read from being optimized away
}

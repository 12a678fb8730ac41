/* Dequantize int4 weights straight into the (K, N) float matrix a prefill GEMM reads.
 *
 * Why this exists: with many rows (a prefill chunk) one bf16 GEMM on a dequantized weight beats
 * the packed int4 kernels, but doing the dequantization with a chain of PyTorch ops makes several
 * passes over memory (about 2 ms for a 4864 x 896 weight on this CPU, a third of the GEMM). One
 * pass in C, written so that gcc vectorizes the inner loops, reads the 4-bit weight once and
 * writes each output value once.
 *
 * int4 input is PyTorch's CPU packed layout (_convert_weight_to_int4pack_for_cpu): blocks of 64
 * output rows; for each input column k, 32 bytes whose low nibbles are rows 0..31 of the block and
 * high nibbles rows 32..63. scales_and_zeros is (K/G, N, 2): w = (q - 8) * scale + zero.
 * Scales are float32 or bf16; the arithmetic is float32, rounded once to the output type.
 * (int8 weights need no kernel: PyTorch's one multiply is a single pass already.)
 *
 * Work can be split over `threads` POSIX threads by column range (each writes disjoint output);
 * the model uses one (see dequantize_int4_t in __init__.py for why).
 * Plain C, no PyTorch headers: built at first use by qwen2/kernels/__init__.py and called through
 * ctypes (which releases the GIL).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const uint8_t *packed;   /* int4: (N/64, K, 32) */
    const void *sz;          /* int4: (K/G, N, 2) */
    void *out;               /* (K, N), float32 or bf16 */
    int64_t N, K, G;
    int64_t k_begin, k_end;
    int bf16;                /* output is bf16 (else float32) */
    int params_bf16;         /* sz is bf16 (else float32) */
    int status;              /* 0 = done; 2 = out of memory */
} job_t;

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even; weights are finite */
    return (uint16_t)(u >> 16);
}

static inline float param(const void *p, int64_t i, int is_bf16) {
    if (!is_bf16) return ((const float *)p)[i];
    uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void *int4_worker(void *arg) {
    /* Row by row of the output (k outer): each output row is written once, contiguously, which
     * matters more than the read order (the output is 4x the input). The scale / offset of every
     * column of the current group are kept in a per-thread buffer (2N floats). */
    job_t *j = (job_t *)arg;
    const int64_t N = j->N, K = j->K, G = j->G;
    float *scale = malloc(sizeof(float) * 2 * N);
    if (scale == NULL) {
        j->status = 2;
        return NULL;
    }
    float *offset = scale + N;
    for (int64_t k = j->k_begin; k < j->k_end; k++) {
        if (k == j->k_begin || k % G == 0) {
            const int64_t s = (k / G) * N * 2;
            for (int64_t n = 0; n < N; n++) {
                scale[n] = param(j->sz, s + 2 * n, j->params_bf16);
                offset[n] = param(j->sz, s + 2 * n + 1, j->params_bf16) - 8.0f * scale[n];
            }
        }
        for (int64_t b = 0; b < N / 64; b++) {
            const uint8_t *p = j->packed + (b * K + k) * 32;
            const float *sc = scale + b * 64, *of = offset + b * 64;
            float row[64];
            for (int i = 0; i < 32; i++) {
                row[i] = (float)(p[i] & 0xF) * sc[i] + of[i];
                row[i + 32] = (float)(p[i] >> 4) * sc[i + 32] + of[i + 32];
            }
            if (j->bf16) {
                uint16_t *o = (uint16_t *)j->out + k * N + b * 64;
                for (int i = 0; i < 64; i++) o[i] = to_bf16(row[i]);
            } else {
                memcpy((float *)j->out + k * N + b * 64, row, sizeof row);
            }
        }
    }
    free(scale);
    return NULL;
}

static int run(job_t base, int threads, int64_t k_step, void *(*worker)(void *)) {
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    job_t jobs[64];
    pthread_t tids[64];
    int started[64] = {0};
    /* split K into `threads` ranges on k_step boundaries */
    const int64_t steps = (base.K + k_step - 1) / k_step;
    for (int t = 0; t < threads; t++) {
        jobs[t] = base;
        jobs[t].k_begin = steps * t / threads * k_step;
        jobs[t].k_end = steps * (t + 1) / threads * k_step;
        if (jobs[t].k_end > base.K) jobs[t].k_end = base.K;
    }
    for (int t = 1; t < threads; t++)
        started[t] = jobs[t].k_begin < jobs[t].k_end && pthread_create(&tids[t], NULL, worker, &jobs[t]) == 0;
    for (int t = 1; t < threads; t++)
        if (!started[t] && jobs[t].k_begin < jobs[t].k_end) worker(&jobs[t]); /* could not spawn: do it here */
    worker(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(tids[t], NULL);
        if (jobs[t].status) status = jobs[t].status;
    }
    return status;
}

int qwen2_dequant_int4(const uint8_t *packed, const void *sz, void *out, int64_t N, int64_t K, int64_t G,
                       int bf16, int params_bf16, int threads) {
    if (N % 64 != 0 || G <= 0 || K % G != 0) return 1;
    job_t base = {packed, sz, out, N, K, G, 0, K, bf16, params_bf16, 0};
    return run(base, threads, G, int4_worker);
}

/* CPU kernels for mixture-of-experts layers: grouped single-precision matrix products (x86-64,
 * AVX2 + FMA), top-k selection of router probabilities, and the dispatch's sort by expert.
 *
 * One call runs every expert's product on its own block of rows, so 64 small experts cost one
 * call instead of 64 BLAS calls, each of which packs its operands and pays its own set-up.
 * Compiled and loaded at run time by uncurl/model/kernels.py, which falls back to torch where this
 * file cannot be built or the CPU lacks AVX2/FMA.
 *
 * Products are C = A @ B (+ bias) with A and B read through arbitrary element strides and C
 * row-major. The summation order depends only on the shapes, so results are deterministic.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>

#define MR 6    /* rows of C per register tile */
#define NR 16   /* columns of C per register tile: two 8-float registers */
#define KC 256  /* depth per pass, so that a panel of B stays in L1/L2 */
#define KERNEL __attribute__((target("avx2,fma")))

/* One MR x NR tile of C over depth K: C (+)= A[:, :K] @ P, P being K rows of NR floats at stride
 * ldp. Rows past mr and columns past nr are computed on repeats/zeros and not stored. */
KERNEL static inline void tile(int64_t K, const float *A, int64_t sai, int64_t sak,
                               const float *P, int64_t ldp, const float *bias, int accumulate,
                               float *C, int64_t ldc, int mr, int nr) {
    float t[MR][NR];
    int direct = nr == NR;
    float *rows[MR];
    for (int r = 0; r < MR; r++) rows[r] = direct && r < mr ? C + r * ldc : t[r];
    if (accumulate && !direct)
        for (int r = 0; r < mr; r++) memcpy(t[r], C + r * ldc, nr * sizeof(float));
    __m256 b0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    __m256 b1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#define INIT(r) __m256 c##r##0 = b0, c##r##1 = b1; \
    if (accumulate && r < mr) { c##r##0 = _mm256_loadu_ps(rows[r]); \
                                c##r##1 = _mm256_loadu_ps(rows[r] + 8); }
    INIT(0) INIT(1) INIT(2) INIT(3) INIT(4) INIT(5)
#undef INIT
    /* rows past mr re-read row 0, which is always valid */
    const float *a0 = A, *a1 = A + (mr > 1) * sai, *a2 = A + (mr > 2) * 2 * sai,
                *a3 = A + (mr > 3) * 3 * sai, *a4 = A + (mr > 4) * 4 * sai,
                *a5 = A + (mr > 5) * 5 * sai;
    for (int64_t k = 0, o = 0; k < K; k++, o += sak, P += ldp) {
        __m256 p0 = _mm256_loadu_ps(P), p1 = _mm256_loadu_ps(P + 8), x;
#define ROW(r) x = _mm256_broadcast_ss(a##r + o); \
        c##r##0 = _mm256_fmadd_ps(x, p0, c##r##0); c##r##1 = _mm256_fmadd_ps(x, p1, c##r##1);
        ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5)
#undef ROW
    }
#define STORE(r) if (r < mr) { _mm256_storeu_ps(rows[r], c##r##0); \
                               _mm256_storeu_ps(rows[r] + 8, c##r##1); }
    STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
#undef STORE
    if (!direct)
        for (int r = 0; r < mr; r++) memcpy(C + r * ldc, t[r], nr * sizeof(float));
}

/* Copies an operand into the layouts the tiles read: B (K x N) into panels of NR columns, each K
 * rows of NR floats, zero-padded; A (M x K), when its rows are not contiguous, into blocks of MR
 * rows, each K columns of MR floats. Both are read in memory order: a panel or block read in
 * place at a stride of a power of two thrashes the L1 cache and brings each expert's weights in
 * one cache miss at a time. */
KERNEL static void pack_b(int64_t N, int64_t K, const float *B, int64_t sbk, int64_t sbj,
                          float *out) {
    int64_t panels = (N + NR - 1) / NR;
    if (N % NR) memset(out, 0, panels * K * NR * sizeof(float));
    if (sbj == 1)
        for (int64_t k = 0; k < K; k++)
            for (int64_t p = 0; p < panels; p++)
                memcpy(out + (p * K + k) * NR, B + k * sbk + p * NR,
                       (N - p * NR < NR ? N - p * NR : NR) * sizeof(float));
    else
        for (int64_t j = 0; j < N; j++)
            for (int64_t k = 0; k < K; k++)
                out[((j / NR) * K + k) * NR + j % NR] = B[k * sbk + j * sbj];
}

KERNEL static void pack_a(int64_t M, int64_t K, const float *A, int64_t sai, int64_t sak,
                          float *out) {
    for (int64_t k = 0; k < K; k++)
        for (int64_t i = 0; i < M; i += MR) {
            float *dst = out + (i / MR * K + k) * MR;
            const float *src = A + i * sai + k * sak;
            for (int r = 0; r < MR && i + r < M; r++) dst[r] = src[r * sai];
        }
}

/* C (M x N, row stride ldc) = A (M x K) @ B (K x N) + bias (N, or NULL), using `scratch` (at
 * least K * (roundup(N, NR) + roundup(M, MR)) floats) for packed operands; and, unless b_sums is
 * NULL, b_sums (N) = the sum of B's rows (the bias gradient, when B is an output gradient). */
KERNEL static void gemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t sai, int64_t sak,
                        const float *B, int64_t sbk, int64_t sbj, const float *bias, float *C,
                        int64_t ldc, float *scratch, float *b_sums) {
    int64_t panels = (N + NR - 1) / NR;
    pack_b(N, K, B, sbk, sbj, scratch);
    for (int64_t p = 0; b_sums && p < panels; p++) {  /* from the copy, while it is in cache */
        float sum[NR] = {0};
        for (int64_t k = 0; k < K; k++)
            for (int j = 0; j < NR; j++) sum[j] += scratch[(p * K + k) * NR + j];
        memcpy(b_sums + p * NR, sum, (N - p * NR < NR ? N - p * NR : NR) * sizeof(float));
    }
    int packed_a = sai < sak;  /* a transposed operand, as in weight gradients */
    float *Ap = scratch + panels * K * NR;
    if (packed_a) pack_a(M, K, A, sai, sak, Ap);
    float padded_bias[NR];
    for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += KC) {
        int64_t kc = K - k0 < KC ? K - k0 : KC;
        for (int64_t i = 0; i < M; i += MR) {
            int mr = M - i < MR ? (int)(M - i) : MR;
            const float *a = packed_a ? Ap + (i / MR * K + k0) * MR : A + i * sai + k0 * sak;
            for (int64_t p = 0; p < panels; p++) {
                int nr = N - p * NR < NR ? (int)(N - p * NR) : NR;
                const float *b = bias ? bias + p * NR : NULL;
                if (b && nr < NR) {
                    memset(padded_bias, 0, sizeof padded_bias);
                    memcpy(padded_bias, b, nr * sizeof(float));
                    b = padded_bias;
                }
                tile(kc, a, packed_a ? 1 : sai, packed_a ? MR : sak, scratch + (p * K + k0) * NR,
                     NR, k0 ? NULL : b, k0 > 0, C + i * ldc + p * NR, ldc, mr, nr);
            }
        }
    }
}

/* Index of the first largest of p[0..E), E >= 8: a vector maximum, then a vector search for it. */
KERNEL static int64_t argmax8(const float *p, int64_t E) {
    __m256 m = _mm256_loadu_ps(p);
    int64_t e = 8;
    for (; e + 8 <= E; e += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(p + e));
    float lanes[8], best;
    _mm256_storeu_ps(lanes, m);
    best = lanes[0];
    for (int i = 1; i < 8; i++) best = lanes[i] > best ? lanes[i] : best;
    for (; e < E; e++) best = p[e] > best ? p[e] : best;
    __m256 b = _mm256_set1_ps(best);
    for (e = 0; e + 8 <= E; e += 8) {
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + e), b, _CMP_EQ_OQ));
        if (mask) return e + __builtin_ctz(mask);
    }
    for (; e < E; e++)
        if (p[e] == best) return e;
    return -1;  /* NaNs: left to the scalar path */
}

static int gemm_supported = -1;

int uncurl_gemm_supported(void) {
    if (gemm_supported >= 0) return gemm_supported;
    __builtin_cpu_init();
    return gemm_supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* For each expert e, one product on its block. sizes[e] rows of the sorted tokens belong to e;
 * they are the M dimension of e's product when k_grouped is 0, its K dimension when it is 1.
 * Along the grouped dimension, operands advance by those rows; otherwise by their per-expert
 * strides be, ce, biase. With k_grouped, b_sums (E x N, or NULL) gets the sum of each expert's
 * rows of B. Returns 0, or -1 if scratch memory ran out. */
KERNEL int uncurl_grouped_gemm(int64_t E, const int64_t *sizes, int k_grouped,
                               int64_t M, int64_t N, int64_t K,
                               const float *A, int64_t sai, int64_t sak,
                               const float *B, int64_t sbk, int64_t sbj, int64_t be,
                               const float *bias, int64_t biase,
                               float *C, int64_t ldc, int64_t ce, float *b_sums) {
    int64_t largest = 1;
    for (int64_t e = 0; e < E; e++) largest = sizes[e] > largest ? sizes[e] : largest;
    int64_t depth = k_grouped ? largest : K, rows = k_grouped ? M : largest;
    int64_t width = (N + NR - 1) / NR * NR + (rows + MR - 1) / MR * MR;  /* B panels, A blocks */
    float *scratch = malloc((depth > 0 ? depth : 1) * width * sizeof(float));
    if (!scratch) return -1;
    for (int64_t e = 0, row = 0; e < E; row += sizes[e++]) {
        const float *be_bias = bias ? bias + e * biase : NULL;
        if (!k_grouped)
            gemm(sizes[e], N, K, A + row * sai, sai, sak, B + e * be, sbk, sbj, be_bias,
                 C + row * ldc, ldc, scratch, NULL);
        else  /* an expert with no rows gets bias or zeros */
            gemm(M, N, sizes[e], A + row * sak, sai, sak, B + row * sbk + e * be, sbk,
                 sbj, be_bias, C + e * ce, ldc, scratch, b_sums ? b_sums + e * N : NULL);
    }
    free(scratch);
    return 0;
}

#else
int uncurl_gemm_supported(void) { return 0; }
static int64_t argmax8(const float *p, int64_t E) { (void)p, (void)E; return -1; }
#endif

/* The k largest of each row of P (N x E, row-major), largest first, ties to the lower index.
 * torch.topk reduces each row of 64 experts several times slower than this single pass. */
void uncurl_topk(int64_t N, int64_t E, int64_t k, const float *restrict P, float *restrict values,
                 int64_t *restrict indices) {
    for (int64_t n = 0; n < N; n++, P += E, values += k, indices += k) {
        if (k == 1 && E >= 8 && uncurl_gemm_supported()
            && (indices[0] = argmax8(P, E)) >= 0) {  /* the common case, vectorised */
            values[0] = P[indices[0]];
            continue;
        }
        if (k == 1) {
            float best = P[0];
            int64_t arg = 0;
            for (int64_t e = 1; e < E; e++)
                if (P[e] > best) best = P[e], arg = e;
            values[0] = best, indices[0] = arg;
            continue;
        }
        int64_t filled = 0;
        for (int64_t e = 0; e < E; e++) {
            float v = P[e];
            if (filled == k && !(v > values[k - 1])) continue;
            int64_t j = filled < k ? filled++ : k - 1;  /* insert v, keeping values descending */
            for (; j > 0 && v > values[j - 1]; j--) {
                values[j] = values[j - 1];
                indices[j] = indices[j - 1];
            }
            values[j] = v;
            indices[j] = e;
        }
    }
}

/* Top-k routing's dispatch: slots s = j * N + n (token n's j-th choice, choices major) sorted by
 * expert, stably, keeping each expert's first `capacity` (all if capacity < 0). Writes the kept
 * slots in that order to kept (returns their number, or -1 if out of memory), tokens routed and
 * kept per expert to counts and sizes (E), and 1 for each dropped slot to dropped (k * N). A
 * counting sort: one pass to count, one to place. */
int64_t uncurl_dispatch(int64_t N, int64_t k, int64_t E, const int64_t *restrict experts,
                        int64_t capacity, int64_t *restrict kept, int64_t *restrict counts,
                        int64_t *restrict sizes, uint8_t *restrict dropped) {
    int64_t *next = malloc(2 * E * sizeof(int64_t)), *end = next + E, total = 0;
    if (!next) return -1;
    memset(counts, 0, E * sizeof(int64_t));
    for (int64_t i = 0; i < N * k; i++) counts[experts[i]]++;
    for (int64_t e = 0; e < E; e++) {
        sizes[e] = capacity >= 0 && counts[e] > capacity ? capacity : counts[e];
        next[e] = total;
        end[e] = total += sizes[e];
    }
    for (int64_t s = 0; s < N * k; s++) {
        int64_t e = experts[(s % N) * k + s / N];
        dropped[s] = next[e] == end[e];
        if (!dropped[s]) kept[next[e]++] = s;
    }
    free(next);
    return total;
}

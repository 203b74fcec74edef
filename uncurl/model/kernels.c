/* CPU kernels for mixture-of-experts layers: grouped single-precision matrix products (x86-64,
 * AVX2 + FMA, AVX-512 tiles where the CPU has them) with GELU or its gradient applied as rows
 * leave them, causal attention of small heads, top-k selection of router probabilities, and the
 * dispatch's sort by expert.
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
#include <math.h>  /* INFINITY */
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

#define MR512 12  /* rows of C per AVX-512 tile: one 16-float register per row */
#define KERNEL512 __attribute__((target("avx2,fma,avx512f")))

/* The same tile on CPUs with AVX-512: MR512 rows (row r of A at rows[r]) of one 16-float register
 * each. Every element is the same sum in the same order as in `tile` (bias or C, then one FMA
 * per k), so both give the same bits; this one twice the floats per instruction. */
KERNEL512 static inline void tile512(int64_t K, const float *const *a, int64_t sak,
                                     const float *P, int64_t ldp, const float *bias,
                                     int accumulate, float *C, int64_t ldc, int mr, int nr) {
    __mmask16 cols = (__mmask16)((1u << nr) - 1);
    __m512 init = bias ? _mm512_maskz_loadu_ps(cols, bias) : _mm512_setzero_ps();
    __m512 c[MR512];
    for (int r = 0; r < MR512; r++)
        c[r] = accumulate && r < mr ? _mm512_maskz_loadu_ps(cols, C + r * ldc) : init;
    for (int64_t k = 0, o = 0; k < K; k++, o += sak, P += ldp) {
        __m512 p = _mm512_loadu_ps(P);
        for (int r = 0; r < MR512; r++)
            c[r] = _mm512_fmadd_ps(_mm512_set1_ps(a[r][o]), p, c[r]);
    }
    for (int r = 0; r < mr; r++) _mm512_mask_storeu_ps(C + r * ldc, cols, c[r]);
}

/* tile512 on two panels side by side (32 columns; nr > 16 of them are C's): each element of A
 * feeds two FMAs, so that a tile is bound by its FMAs, not by its loads. The same sums in the
 * same order, so the same bits. */
KERNEL512 static inline void tile512x2(int64_t K, const float *const *a, int64_t sak,
                                       const float *P, int64_t panel, const float *bias,
                                       int accumulate, float *C, int64_t ldc, int mr, int nr) {
    __mmask16 cols = (__mmask16)((1u << (nr - 16)) - 1);
    __m512 init0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
    __m512 init1 = bias ? _mm512_maskz_loadu_ps(cols, bias + 16) : _mm512_setzero_ps();
    __m512 c0[MR512], c1[MR512];
    for (int r = 0; r < MR512; r++) {
        int load = accumulate && r < mr;
        c0[r] = load ? _mm512_loadu_ps(C + r * ldc) : init0;
        c1[r] = load ? _mm512_maskz_loadu_ps(cols, C + r * ldc + 16) : init1;
    }
    for (int64_t k = 0, o = 0; k < K; k++, o += sak, P += NR) {
        __m512 p0 = _mm512_loadu_ps(P), p1 = _mm512_loadu_ps(P + panel);
        for (int r = 0; r < MR512; r++) {
            __m512 x = _mm512_set1_ps(a[r][o]);
            c0[r] = _mm512_fmadd_ps(x, p0, c0[r]);
            c1[r] = _mm512_fmadd_ps(x, p1, c1[r]);
        }
    }
    for (int r = 0; r < mr; r++) {
        _mm512_storeu_ps(C + r * ldc, c0[r]);
        _mm512_mask_storeu_ps(C + r * ldc + 16, cols, c1[r]);
    }
}

static int avx512 = -1;  /* whether gemm uses tile512: the CPU's answer, unless set */

static int use_avx512(void) {
    if (avx512 < 0) {
        __builtin_cpu_init();
        avx512 = __builtin_cpu_supports("avx512f");
    }
    return avx512;
}

/* Whether products use the AVX-512 tiles; `on` 0 or 1 sets it (tests compare both), -1 asks. */
int uncurl_avx512(int on) {
    if (on >= 0) avx512 = on && __builtin_cpu_supports("avx512f");
    return use_avx512();
}

/* e^x (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, 2^n by the exponent bits);
 * within 2 ulp on [EXP_LO, EXP_HI], 0 below. Its constants, for both widths: */
#define EXP_LO -87.3365f
#define EXP_HI 88.3762f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f  /* ln 2 in two parts, so that n ln2 is exact to float */
#define LN2_LO -2.12194440e-4f
static const float EXP_POLY[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                  4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

/* e^x for 8 floats. */
KERNEL static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(EXP_LO), hi = _mm256_set1_ps(EXP_HI);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 y = _mm256_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(EXP_POLY[i]));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

/* Lanes j0 .. j0 + 7 below n (keys 0 .. n - 1, a row's n columns). */
KERNEL static inline __m256 below(int64_t j0, int64_t n) {
    __m256i j = _mm256_add_epi32(_mm256_set1_epi32((int)j0), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), j));
}

/* e^x for 16 floats: exp8 lane by lane. */
KERNEL512 static inline __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(EXP_LO), hi = _mm512_set1_ps(EXP_HI);
    __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    __m512 y = _mm512_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(EXP_POLY[i]));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mul_ps(~under, y, _mm512_castsi512_ps(e));
}

/* GELU, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2, and its derivative Phi(x) + x phi(x), on 8 or
 * 16 floats with the same bits: erf by Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7, the
 * formula of torch's vectorised erf), Phi(x) for x < 0 straight from the formula's tail rather
 * than as 1 + erf, which cancels. */
#define INV_SQRT2 0.70710678118654752f
#define INV_SQRT_2PI 0.39894228040143268f
#define ERF_P 0.3275911f
static const float ERF_POLY[5] = {1.061405429f, -1.453152027f, 1.421413741f, -0.284496736f,
                                  0.254829592f};

/* Phi(x) into *cdf, and e^(-x^2 / 2) returned. */
KERNEL static inline __m256 normal_cdf8(__m256 x, __m256 *cdf) {
    __m256 z = _mm256_mul_ps(x, _mm256_set1_ps(INV_SQRT2));
    __m256 az = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z);
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f),
                             _mm256_fmadd_ps(_mm256_set1_ps(ERF_P), az, _mm256_set1_ps(1.0f)));
    __m256 y = _mm256_set1_ps(ERF_POLY[0]);
    for (int i = 1; i < 5; i++) y = _mm256_fmadd_ps(y, t, _mm256_set1_ps(ERF_POLY[i]));
    __m256 e = exp8(_mm256_mul_ps(z, _mm256_sub_ps(_mm256_setzero_ps(), z)));
    __m256 tail = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(t, y), e), _mm256_set1_ps(0.5f));
    *cdf = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), tail), tail,
                            _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ));
    return e;
}

KERNEL512 static inline __m512 normal_cdf16(__m512 x, __m512 *cdf) {
    __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(INV_SQRT2));
    __m512 az = _mm512_abs_ps(z);
    __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f),
                             _mm512_fmadd_ps(_mm512_set1_ps(ERF_P), az, _mm512_set1_ps(1.0f)));
    __m512 y = _mm512_set1_ps(ERF_POLY[0]);
    for (int i = 1; i < 5; i++) y = _mm512_fmadd_ps(y, t, _mm512_set1_ps(ERF_POLY[i]));
    __m512 e = exp16(_mm512_mul_ps(z, _mm512_sub_ps(_mm512_setzero_ps(), z)));
    __m512 tail = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(t, y), e), _mm512_set1_ps(0.5f));
    *cdf = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ),
                                _mm512_sub_ps(_mm512_set1_ps(1.0f), tail), tail);
    return e;
}

/* What a product's rows go through as they leave the tiles: nothing; act = GELU(C); or
 * C *= GELU'(pre), C being the gradient of GELU's output. */
enum { EPILOGUE_NONE, EPILOGUE_GELU, EPILOGUE_GELU_GRAD };

/* The epilogue on n floats of one row: c, and act or pre (aux). */
KERNEL static void epilogue8(int mode, int64_t n, float *c, float *aux) {
    for (int64_t j = 0; j < n; j += 8) {
        __m256i m = _mm256_castps_si256(below(j, n));
        __m256 cv = _mm256_maskload_ps(c + j, m), cdf;
        if (mode == EPILOGUE_GELU) {
            normal_cdf8(cv, &cdf);
            _mm256_maskstore_ps(aux + j, m, _mm256_mul_ps(cv, cdf));
        } else {
            __m256 x = _mm256_maskload_ps(aux + j, m);
            __m256 e = normal_cdf8(x, &cdf);
            __m256 d = _mm256_fmadd_ps(x, _mm256_mul_ps(e, _mm256_set1_ps(INV_SQRT_2PI)), cdf);
            _mm256_maskstore_ps(c + j, m, _mm256_mul_ps(cv, d));
        }
    }
}

KERNEL512 static void epilogue16(int mode, int64_t n, float *c, float *aux) {
    for (int64_t j = 0; j < n; j += 16) {
        __mmask16 m = n - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j)) - 1);
        __m512 cv = _mm512_maskz_loadu_ps(m, c + j), cdf;
        if (mode == EPILOGUE_GELU) {
            normal_cdf16(cv, &cdf);
            _mm512_mask_storeu_ps(aux + j, m, _mm512_mul_ps(cv, cdf));
        } else {
            __m512 x = _mm512_maskz_loadu_ps(m, aux + j);
            __m512 e = normal_cdf16(x, &cdf);
            __m512 d = _mm512_fmadd_ps(x, _mm512_mul_ps(e, _mm512_set1_ps(INV_SQRT_2PI)), cdf);
            _mm512_mask_storeu_ps(c + j, m, _mm512_mul_ps(cv, d));
        }
    }
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
            for (int64_t p = 0; p < panels; p++) {
                float *dst = out + (p * K + k) * NR;
                const float *src = B + k * sbk + p * NR;
                if (N - p * NR >= NR) {  /* a whole panel row: two registers, not a call */
                    _mm256_storeu_ps(dst, _mm256_loadu_ps(src));
                    _mm256_storeu_ps(dst + 8, _mm256_loadu_ps(src + 8));
                } else
                    memcpy(dst, src, (N - p * NR) * sizeof(float));
            }
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
            if (sai == 1 && i + MR <= M)  /* a block's row in one copy (A^T of a row-major A) */
                memcpy(dst, src, MR * sizeof(float));
            else
                for (int r = 0; r < MR && i + r < M; r++) dst[r] = src[r * sai];
        }
}

/* C (M x N, row stride ldc) = A (M x K) @ B (K x N) + bias (N, or NULL), using `scratch` (at
 * least K * (roundup(N, NR) + roundup(M, MR)) floats) for packed operands; and, unless b_sums is
 * NULL, b_sums (N) = the sum of B's rows (the bias gradient, when B is an output gradient). Each
 * block of rows goes through the epilogue `mode` (aux: rows as C's) as its last pass ends, while
 * it is in cache. */
KERNEL static void gemm(int64_t M, int64_t N, int64_t K, const float *A, int64_t sai, int64_t sak,
                        const float *B, int64_t sbk, int64_t sbj, const float *bias, float *C,
                        int64_t ldc, float *scratch, float *b_sums, int mode, float *aux) {
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
        int wide = use_avx512();
        for (int64_t i = 0; i < M; i += wide ? MR512 : MR) {
            int mr = M - i < MR ? (int)(M - i) : MR;
            const float *a = packed_a ? Ap + (i / MR * K + k0) * MR : A + i * sai + k0 * sak;
            const float *rows[MR512];
            int mr512 = M - i < MR512 ? (int)(M - i) : MR512;
            for (int r = 0; wide && r < MR512; r++) {  /* rows past M re-read row i */
                int64_t at = i + (r < mr512 ? r : 0);
                rows[r] = packed_a ? Ap + (at / MR * K + k0) * MR + at % MR : A + at * sai + k0 * sak;
            }
            for (int64_t p = 0; p < panels; p++) {
                int nr = N - p * NR < NR ? (int)(N - p * NR) : NR;
                const float *b = bias ? bias + p * NR : NULL;
                if (b && nr < NR) {
                    memset(padded_bias, 0, sizeof padded_bias);
                    memcpy(padded_bias, b, nr * sizeof(float));
                    b = padded_bias;
                }
                if (wide && p + 1 < panels) {  /* two panels at once */
                    nr = N - p * NR < 2 * NR ? (int)(N - p * NR) : 2 * NR;
                    tile512x2(kc, rows, packed_a ? MR : sak, scratch + (p * K + k0) * NR, K * NR,
                              k0 || !bias ? NULL : bias + p * NR, k0 > 0, C + i * ldc + p * NR, ldc, mr512,
                              nr);
                    p++;
                } else if (wide)
                    tile512(kc, rows, packed_a ? MR : sak, scratch + (p * K + k0) * NR, NR,
                            k0 ? NULL : b, k0 > 0, C + i * ldc + p * NR, ldc, mr512, nr);
                else
                    tile(kc, a, packed_a ? 1 : sai, packed_a ? MR : sak,
                         scratch + (p * K + k0) * NR, NR, k0 ? NULL : b, k0 > 0,
                         C + i * ldc + p * NR, ldc, mr, nr);
            }
            for (int r = 0; mode && k0 + KC >= K && r < (wide ? mr512 : mr); r++)
                (wide ? epilogue16 : epilogue8)(mode, N, C + (i + r) * ldc, aux + (i + r) * ldc);
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
 * rows of B; without, C's rows go through the epilogue `mode` (aux: M rows as C's). Returns 0,
 * or -1 if scratch memory ran out. */
KERNEL int uncurl_grouped_gemm(int64_t E, const int64_t *sizes, int k_grouped,
                               int64_t M, int64_t N, int64_t K,
                               const float *A, int64_t sai, int64_t sak,
                               const float *B, int64_t sbk, int64_t sbj, int64_t be,
                               const float *bias, int64_t biase,
                               float *C, int64_t ldc, int64_t ce, float *b_sums, int mode,
                               float *aux) {
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
                 C + row * ldc, ldc, scratch, NULL, mode, mode ? aux + row * ldc : NULL);
        else  /* an expert with no rows gets bias or zeros */
            gemm(M, N, sizes[e], A + row * sak, sai, sak, B + row * sbk + e * be, sbk,
                 sbj, be_bias, C + e * ce, ldc, scratch, b_sums ? b_sums + e * N : NULL,
                 EPILOGUE_NONE, NULL);
    }
    free(scratch);
    return 0;
}

/* Causal self-attention of small heads, on token rows: qkv holds B * T rows of 3C floats (the
 * queries, keys and values of every head: head h's D columns at h * D of each third), out B * T
 * rows of C floats. Flash attention kernels pay their block set-up per 16-float head; here each
 * query's scores are 8 keys per instruction (keys packed transposed) and each key's weighted
 * value one D-wide FMA. Two passes per query (scores, then the exact softmax), so results are
 * deterministic and independent of T's blocking. */

KERNEL static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* rows T of D floats at stride ld, transposed into D rows of tp floats (zero beyond T). */
KERNEL static void transpose_rows(int64_t T, int64_t D, const float *x, int64_t ld, int64_t tp,
                                  float *out) {
    memset(out, 0, D * tp * sizeof(float));
    for (int64_t j = 0; j < T; j++)
        for (int64_t d = 0; d < D; d++) out[d * tp + j] = x[j * ld + d];
}

/* s[j] = scale * q . key j for keys 0 .. n - 1 (rounded up to 8), from keys transposed; four
 * blocks of 8 keys at a time, so that four sums are in flight instead of one chain of FMAs. */
KERNEL static void scores(int64_t n, int64_t D, const float *q, const float *kt, int64_t tp,
                          float scale, float *s) {
    __m256 sc = _mm256_set1_ps(scale);
    int64_t j0 = 0;
    for (; j0 + 32 <= (n + 7) / 8 * 8; j0 += 32) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D; d++) {
            __m256 x = _mm256_broadcast_ss(q + d);
            const float *row = kt + d * tp + j0;
            a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row), a0);
            a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 8), a1);
            a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 16), a2);
            a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(row + 24), a3);
        }
        _mm256_storeu_ps(s + j0, _mm256_mul_ps(a0, sc));
        _mm256_storeu_ps(s + j0 + 8, _mm256_mul_ps(a1, sc));
        _mm256_storeu_ps(s + j0 + 16, _mm256_mul_ps(a2, sc));
        _mm256_storeu_ps(s + j0 + 24, _mm256_mul_ps(a3, sc));
    }
    for (; j0 < n; j0 += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d++)
            acc = _mm256_fmadd_ps(_mm256_broadcast_ss(q + d), _mm256_loadu_ps(kt + d * tp + j0), acc);
        _mm256_storeu_ps(s + j0, _mm256_mul_ps(acc, sc));
    }
}

/* The sum over j < n of w[j * sw] * rows[j * ld + 0 .. 8): four partial sums in flight. */
KERNEL static inline __m256 weighted_rows(int64_t n, const float *w, int64_t sw, const float *rows,
                                          int64_t ld) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + j * sw), _mm256_loadu_ps(rows + j * ld), a0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + (j + 1) * sw),
                             _mm256_loadu_ps(rows + (j + 1) * ld), a1);
        a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + (j + 2) * sw),
                             _mm256_loadu_ps(rows + (j + 2) * ld), a2);
        a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + (j + 3) * sw),
                             _mm256_loadu_ps(rows + (j + 3) * ld), a3);
    }
    for (; j < n; j++)
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(w + j * sw), _mm256_loadu_ps(rows + j * ld), a0);
    return _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
}

/* The steps of one query that run on 8 or 16 floats per instruction. Both widths make every
 * element's sum in the same order (a score over d in order; exponentials lane by lane; the
 * softmax sum in blocks of 8 keys; a weighted sum over keys in four partial sums by key mod 4), so
 * they give the same bits; `ops` picks the CPU's. */
typedef struct {
    void (*scores)(int64_t n, int64_t D, const float *q, const float *kt, int64_t tp, float scale,
                   float *s);
    float (*exp_sum)(int64_t n, float m, float *p);  /* p[j] = e^(p[j] - m), j < n; their sum */
    void (*softmax_grad)(int64_t n, float m, float inv, float di, float scale, float *p, float *ds);
    void (*weighted)(int64_t n, int64_t D, const float *w, int64_t sw, const float *rows,
                     int64_t ld, float scale, float *out);  /* out = scale * weighted_rows */
    /* scores and weighted of nq <= 4 queries at once, each as alone: query r's row at q + r * ldq
     * (its scores to s + r * tp, keys up to the last query's n), or its weights at w + r * tp
     * (n[r] keys) and its output at out + r * ldo */
    void (*scores4)(int64_t nq, int64_t n, int64_t D, const float *q, int64_t ldq, const float *kt,
                    int64_t tp, float scale, float *s);
    void (*weighted4)(int64_t nq, const int64_t *n, int64_t D, const float *w, int64_t tp,
                      const float *rows, int64_t ld, const float *scale, float *out, int64_t ldo);
    /* weighted of nk <= 4 keys at once, each as alone: key c's n0 - c weights down a column,
     * from w + c * (tp + 1) by tp, its rows from rows + c * ld, its output at out + c * ldo */
    void (*key_weighted4)(int64_t nk, int64_t n0, int64_t D, const float *w, int64_t tp,
                          const float *rows, int64_t ld, float *out, int64_t ldo);
} attention_ops;

/* The largest of s[0 .. n): order does not change a maximum. */
KERNEL static float row_max(int64_t n, const float *s) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < n; j0 += 8)
        m8 = _mm256_max_ps(m8, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(s + j0),
                                                below(j0, n)));
    float lanes[8], m = -INFINITY;
    _mm256_storeu_ps(lanes, m8);
    for (int l = 0; l < 8; l++) m = lanes[l] > m ? lanes[l] : m;
    return m;
}

KERNEL static float exp_sum8(int64_t n, float m, float *p) {
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
        __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j0), _mm256_set1_ps(m))),
                                 below(j0, n));
        _mm256_storeu_ps(p + j0, e);
        sum = _mm256_add_ps(sum, e);
    }
    return hsum8(sum);
}

/* p[j] = e^(p[j] - m) * inv (the softmax), ds[j] = p[j] * (ds[j] - di) * scale (its gradient). */
KERNEL static void softmax_grad8(int64_t n, float m, float inv, float di, float scale, float *p,
                                 float *ds) {
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
        __m256 pj = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j0), _mm256_set1_ps(m))),
                                  below(j0, n));
        pj = _mm256_mul_ps(pj, _mm256_set1_ps(inv));
        _mm256_storeu_ps(p + j0, pj);
        _mm256_storeu_ps(ds + j0, _mm256_mul_ps(_mm256_mul_ps(pj, _mm256_sub_ps(_mm256_loadu_ps(ds + j0),
                                                                                _mm256_set1_ps(di))),
                                                _mm256_set1_ps(scale)));
    }
}

KERNEL static void weighted8(int64_t n, int64_t D, const float *w, int64_t sw, const float *rows,
                             int64_t ld, float scale, float *out) {
    for (int64_t d0 = 0; d0 < D; d0 += 8)
        _mm256_storeu_ps(out + d0, _mm256_mul_ps(weighted_rows(n, w, sw, rows + d0, ld),
                                                 _mm256_set1_ps(scale)));
}

KERNEL static void scores8x4(int64_t nq, int64_t n, int64_t D, const float *q, int64_t ldq,
                             const float *kt, int64_t tp, float scale, float *s) {
    for (int64_t r = 0; r < nq; r++) scores(n, D, q + r * ldq, kt, tp, scale, s + r * tp);
}

KERNEL static void weighted8x4(int64_t nq, const int64_t *n, int64_t D, const float *w, int64_t tp,
                               const float *rows, int64_t ld, const float *scale, float *out,
                               int64_t ldo) {
    for (int64_t r = 0; r < nq; r++)
        weighted8(n[r], D, w + r * tp, 1, rows, ld, scale[r], out + r * ldo);
}

KERNEL static void key_weighted8x4(int64_t nk, int64_t n0, int64_t D, const float *w, int64_t tp,
                                   const float *rows, int64_t ld, float *out, int64_t ldo) {
    for (int64_t c = 0; c < nk; c++)
        weighted8(n0 - c, D, w + c * (tp + 1), tp, rows + c * ld, ld, 1.0f, out + c * ldo);
}

static const attention_ops ops8 = {scores,    exp_sum8,    softmax_grad8,  weighted8,
                                   scores8x4, weighted8x4, key_weighted8x4};

/* The same steps on 16 floats: keys 16 at a time, value columns 16 at a time (a head's last 8
 * columns, if any, on 8). */
static inline __mmask16 below16(int64_t j0, int64_t n) {
    return n - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - j0)) - 1);
}

/* scores on 16 keys per register; kt's rows hold tp >= n rounded up to 16 floats. */
KERNEL512 static void scores16(int64_t n, int64_t D, const float *q, const float *kt, int64_t tp,
                               float scale, float *s) {
    __m512 sc = _mm512_set1_ps(scale);
    int64_t j0 = 0, end = (n + 15) / 16 * 16;
    for (; j0 + 64 <= end; j0 += 64) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < D; d++) {
            __m512 x = _mm512_set1_ps(q[d]);
            const float *row = kt + d * tp + j0;
            a0 = _mm512_fmadd_ps(x, _mm512_loadu_ps(row), a0);
            a1 = _mm512_fmadd_ps(x, _mm512_loadu_ps(row + 16), a1);
            a2 = _mm512_fmadd_ps(x, _mm512_loadu_ps(row + 32), a2);
            a3 = _mm512_fmadd_ps(x, _mm512_loadu_ps(row + 48), a3);
        }
        _mm512_storeu_ps(s + j0, _mm512_mul_ps(a0, sc));
        _mm512_storeu_ps(s + j0 + 16, _mm512_mul_ps(a1, sc));
        _mm512_storeu_ps(s + j0 + 32, _mm512_mul_ps(a2, sc));
        _mm512_storeu_ps(s + j0 + 48, _mm512_mul_ps(a3, sc));
    }
    for (; j0 < end; j0 += 16) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d++)
            acc = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_loadu_ps(kt + d * tp + j0), acc);
        _mm512_storeu_ps(s + j0, _mm512_mul_ps(acc, sc));
    }
}

/* The sum in exp_sum8's order: each 16 keys' lower 8, then their upper 8. Keys past n add
 * zeros, which leave a sum of non-negative terms as it is. */
KERNEL512 static float exp_sum16(int64_t n, float m, float *p) {
    __m256 sum = _mm256_setzero_ps();
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        __m512 e = _mm512_maskz_mov_ps(below16(j0, n),
                                       exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j0), _mm512_set1_ps(m))));
        _mm512_storeu_ps(p + j0, e);
        sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
        sum = _mm256_add_ps(sum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
    }
    return hsum8(sum);
}

KERNEL512 static void softmax_grad16(int64_t n, float m, float inv, float di, float scale,
                                     float *p, float *ds) {
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        __m512 pj = _mm512_maskz_mov_ps(below16(j0, n),
                                        exp16(_mm512_sub_ps(_mm512_loadu_ps(p + j0), _mm512_set1_ps(m))));
        pj = _mm512_mul_ps(pj, _mm512_set1_ps(inv));
        _mm512_storeu_ps(p + j0, pj);
        _mm512_storeu_ps(ds + j0, _mm512_mul_ps(_mm512_mul_ps(pj, _mm512_sub_ps(_mm512_loadu_ps(ds + j0),
                                                                                _mm512_set1_ps(di))),
                                                _mm512_set1_ps(scale)));
    }
}

/* weighted16's sum over keys j .. n - 1 added to its four partial sums a0 .. a3 (key j mod 4
 * in a[j mod 4] in whole groups of 4, the rest in a0), then the partial sums added up. */
KERNEL512 static inline __m512 rest16(int64_t n, int64_t j, const float *w, int64_t sw,
                                      const float *r, int64_t ld, __m512 a0, __m512 a1, __m512 a2,
                                      __m512 a3) {
    for (; j + 4 <= n; j += 4) {
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[j * sw]), _mm512_loadu_ps(r + j * ld), a0);
        a1 = _mm512_fmadd_ps(_mm512_set1_ps(w[(j + 1) * sw]), _mm512_loadu_ps(r + (j + 1) * ld), a1);
        a2 = _mm512_fmadd_ps(_mm512_set1_ps(w[(j + 2) * sw]), _mm512_loadu_ps(r + (j + 2) * ld), a2);
        a3 = _mm512_fmadd_ps(_mm512_set1_ps(w[(j + 3) * sw]), _mm512_loadu_ps(r + (j + 3) * ld), a3);
    }
    for (; j < n; j++)
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[j * sw]), _mm512_loadu_ps(r + j * ld), a0);
    return _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
}

KERNEL512 static void weighted16(int64_t n, int64_t D, const float *w, int64_t sw,
                                 const float *rows, int64_t ld, float scale, float *out) {
    int64_t d0 = 0;
    for (; d0 + 16 <= D; d0 += 16) {
        __m512 z = _mm512_setzero_ps();
        __m512 sum = rest16(n, 0, w, sw, rows + d0, ld, z, z, z, z);
        _mm512_storeu_ps(out + d0, _mm512_mul_ps(sum, _mm512_set1_ps(scale)));
    }
    if (d0 < D) weighted8(n, D - d0, w, sw, rows + d0, ld, scale, out + d0);
}

/* Four queries' scores: each key register loaded once for the four. */
KERNEL512 static void scores16x4(int64_t nq, int64_t n, int64_t D, const float *q, int64_t ldq,
                                 const float *kt, int64_t tp, float scale, float *s) {
    if (nq < 4) {
        for (int64_t r = 0; r < nq; r++) scores16(n, D, q + r * ldq, kt, tp, scale, s + r * tp);
        return;
    }
    __m512 sc = _mm512_set1_ps(scale);
    int64_t j0 = 0, end = (n + 15) / 16 * 16;
    for (; j0 + 64 <= end; j0 += 64) {
        __m512 a[4][4];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) a[r][c] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d++) {
            const float *row = kt + d * tp + j0;
            __m512 k[4];
            for (int c = 0; c < 4; c++) k[c] = _mm512_loadu_ps(row + 16 * c);
            for (int r = 0; r < 4; r++) {
                __m512 x = _mm512_set1_ps(q[r * ldq + d]);
                for (int c = 0; c < 4; c++) a[r][c] = _mm512_fmadd_ps(x, k[c], a[r][c]);
            }
        }
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++)
                _mm512_storeu_ps(s + r * tp + j0 + 16 * c, _mm512_mul_ps(a[r][c], sc));
    }
    for (; j0 < end; j0 += 16) {
        __m512 a[4];
        for (int r = 0; r < 4; r++) a[r] = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d++) {
            __m512 k = _mm512_loadu_ps(kt + d * tp + j0);
            for (int r = 0; r < 4; r++) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r * ldq + d]), k, a[r]);
        }
        for (int r = 0; r < 4; r++) _mm512_storeu_ps(s + r * tp + j0, _mm512_mul_ps(a[r], sc));
    }
}

/* Four queries' weighted sums: each row register loaded once for the four while every query
 * has whole groups of 4 keys left, then each query's own rest. */
KERNEL512 static void weighted16x4(int64_t nq, const int64_t *n, int64_t D, const float *w,
                                   int64_t tp, const float *rows, int64_t ld, const float *scale,
                                   float *out, int64_t ldo) {
    int64_t m = n[0], d0 = 0;
    for (int64_t r = 1; r < nq; r++) m = n[r] < m ? n[r] : m;
    if (nq < 4) m = 0;
    for (; d0 + 16 <= D; d0 += 16) {
        const float *v = rows + d0;
        __m512 a[4][4];
        for (int r = 0; r < 4; r++)
            for (int c = 0; c < 4; c++) a[r][c] = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 4 <= m; j += 4) {
            __m512 x[4];
            for (int c = 0; c < 4; c++) x[c] = _mm512_loadu_ps(v + (j + c) * ld);
            for (int r = 0; r < 4; r++)
                for (int c = 0; c < 4; c++)
                    a[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(w[r * tp + j + c]), x[c], a[r][c]);
        }
        for (int r = 0; r < 4 && r < nq; r++) {
            __m512 sum = rest16(n[r], j, w + r * tp, 1, v, ld, a[r][0], a[r][1], a[r][2], a[r][3]);
            _mm512_storeu_ps(out + r * ldo + d0, _mm512_mul_ps(sum, _mm512_set1_ps(scale[r])));
        }
    }
    for (int64_t r = 0; d0 < D && r < nq; r++)
        weighted8(n[r], D - d0, w + r * tp, 1, rows + d0, ld, scale[r], out + r * ldo + d0);
}

/* Terms t0 .. t1 - 1 of weighted16's sum of n terms into its partial sums a (as rest16). */
KERNEL512 static inline void terms16(int64_t t0, int64_t t1, int64_t n, const float *w, int64_t sw,
                                     const float *r, int64_t ld, __m512 *a) {
    for (int64_t t = t0, full = n & ~(int64_t)3; t < t1; t++) {
        int x = t < full ? (int)(t & 3) : 0;
        a[x] = _mm512_fmadd_ps(_mm512_set1_ps(w[t * sw]), _mm512_loadu_ps(r + t * ld), a[x]);
    }
}

/* Four keys' weighted sums down the columns: each row register loaded once for the four. Key c's
 * term t (row c + t) goes to its partial sum t mod 4, so rows 3, 7, ... start a group of every
 * key's, the sums rotated by key; rows before the first group and after the last whole one go
 * term by term. */
KERNEL512 static void key_weighted16x4(int64_t nk, int64_t n0, int64_t D, const float *w,
                                       int64_t tp, const float *rows, int64_t ld, float *out,
                                       int64_t ldo) {
    if (nk < 4) {
        for (int64_t c = 0; c < nk; c++)
            weighted16(n0 - c, D, w + c * (tp + 1), tp, rows + c * ld, ld, 1.0f, out + c * ldo);
        return;
    }
    int64_t end = n0 & ~(int64_t)3, d0 = 0;  /* rows of whole groups for every key end here */
    for (int64_t c = 1; c < 4; c++) {
        int64_t e = c + ((n0 - c) & ~(int64_t)3);
        end = e < end ? e : end;
    }
    for (; d0 + 16 <= D; d0 += 16) {
        __m512 part[4][4], a[4][4];
        for (int c = 0; c < 4; c++) {
            for (int x = 0; x < 4; x++) part[c][x] = _mm512_setzero_ps();
            int64_t n = n0 - c;
            terms16(0, 3 - c < n ? 3 - c : n, n, w + c * (tp + 1), tp, rows + c * ld + d0, ld,
                    part[c]);
        }
        for (int c = 0; c < 4; c++)
            for (int x = 0; x < 4; x++) a[c][x] = part[c][x];
        int64_t q = 3;
        for (; q + 4 <= end; q += 4)
            for (int u = 0; u < 4; u++) {
                __m512 x = _mm512_loadu_ps(rows + (q + u) * ld + d0);
                const float *wq = w + (q + u) * tp;
                for (int c = 0; c < 4; c++) {
                    __m512 *acc = &a[c][(3 - c + u) & 3];
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(wq[c]), x, *acc);
                }
            }
        for (int c = 0; c < 4; c++) {
            for (int x = 0; x < 4; x++) part[c][x] = a[c][x];
            int64_t n = n0 - c;
            terms16(q - c, n, n, w + c * (tp + 1), tp, rows + c * ld + d0, ld, part[c]);
            _mm512_storeu_ps(out + c * ldo + d0, _mm512_add_ps(_mm512_add_ps(part[c][0], part[c][1]),
                                                               _mm512_add_ps(part[c][2], part[c][3])));
        }
    }
    for (int64_t c = 0; d0 < D && c < 4; c++)
        weighted8(n0 - c, D - d0, w + c * (tp + 1), tp, rows + c * ld + d0, ld, 1.0f,
                  out + c * ldo + d0);
}

static const attention_ops ops16 = {scores16,     exp_sum16,  softmax_grad16,  weighted16,
                                    scores16x4, weighted16x4, key_weighted16x4};

static const attention_ops *ops(void) { return use_avx512() ? &ops16 : &ops8; }

/* Each sequence's outputs, and each query's softmax maximum and inverse sum in stats (2, B, H,
 * T: the backward's softmax is the forward's, to the bit). Returns 0, or -1 without memory. */
KERNEL int uncurl_attention_forward(int64_t B, int64_t T, int64_t H, int64_t D, float scale,
                                    const float *qkv, float *out, float *stats) {
    const attention_ops *op = ops();
    int64_t C = H * D, ld = 3 * C, tp = (T + 15) / 16 * 16;
    float *kt = malloc((D + 4) * tp * sizeof(float)), *p = kt + D * tp;
    if (!kt) return -1;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const float *rows = qkv + b * T * ld, *k = rows + C + h * D, *v = rows + 2 * C + h * D;
            transpose_rows(T, D, k, ld, tp, kt);
            for (int64_t i = 0; i < T; i += 4) {  /* four queries at a time */
                int64_t nq = T - i < 4 ? T - i : 4, n[4];
                float inv[4];
                op->scores4(nq, i + nq, D, rows + i * ld + h * D, ld, kt, tp, scale, p);
                for (int64_t r = 0; r < nq; r++) {
                    n[r] = i + r + 1;
                    float m = row_max(n[r], p + r * tp), l = op->exp_sum(n[r], m, p + r * tp);
                    inv[r] = 1.0f / l;
                    stats[(b * H + h) * T + i + r] = m;
                    stats[(B * H + b * H + h) * T + i + r] = inv[r];
                }
                op->weighted4(nq, n, D, p, tp, v, ld, inv, out + (b * T + i) * C + h * D, C);
            }
        }
    free(kt);
    return 0;
}

/* Gradients of the queries, keys and values (grad_qkv, rows as qkv) from the outputs' (grad_out,
 * rows as out): the softmax recomputed from the forward's stats. Returns 0, or -1. */
KERNEL int uncurl_attention_backward(int64_t B, int64_t T, int64_t H, int64_t D, float scale,
                                     const float *qkv, const float *out, const float *grad_out,
                                     const float *stats, float *grad_qkv) {
    const attention_ops *op = ops();
    int64_t C = H * D, ld = 3 * C, tp = (T + 15) / 16 * 16;
    float *kt = malloc((2 * D * tp + 2 * T * tp) * sizeof(float));
    if (!kt) return -1;
    float *vt = kt + D * tp, *P = vt + D * tp, *S = P + T * tp;  /* softmax, scaled dS, by query */
    const float ones[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            const float *rows = qkv + b * T * ld, *k = rows + C + h * D, *v = rows + 2 * C + h * D;
            const float *go = grad_out + b * T * C + h * D, *o = out + b * T * C + h * D;
            float *g = grad_qkv + b * T * ld + h * D;
            transpose_rows(T, D, k, ld, tp, kt);
            transpose_rows(T, D, v, ld, tp, vt);
            for (int64_t i = 0; i < T; i += 4) {  /* by four queries: P, dS and dQ */
                int64_t nq = T - i < 4 ? T - i : 4, n[4];
                float *p = P + i * tp, *ds = S + i * tp;
                op->scores4(nq, i + nq, D, rows + i * ld + h * D, ld, kt, tp, scale, p);
                op->scores4(nq, i + nq, D, go + i * C, C, vt, tp, 1.0f, ds);  /* grad_out_i . v_j */
                for (int64_t r = 0; r < nq; r++) {
                    const float *gr = go + (i + r) * C, *orow = o + (i + r) * C;
                    __m256 dot = _mm256_setzero_ps();
                    for (int64_t d0 = 0; d0 < D; d0 += 8)
                        dot = _mm256_fmadd_ps(_mm256_loadu_ps(gr + d0), _mm256_loadu_ps(orow + d0),
                                              dot);
                    n[r] = i + r + 1;
                    op->softmax_grad(n[r], stats[(b * H + h) * T + i + r],
                                     stats[(B * H + b * H + h) * T + i + r], hsum8(dot), scale,
                                     p + r * tp, ds + r * tp);
                }
                op->weighted4(nq, n, D, ds, tp, k, ld, ones, g + i * ld, ld);
            }
            for (int64_t j = 0; j < T; j += 4) {  /* by four keys: dK = dS^T Q, dV = P^T dO */
                int64_t nk = T - j < 4 ? T - j : 4;  /* (queries i >= j) */
                const float *q = rows + j * ld + h * D;
                op->key_weighted4(nk, T - j, D, S + j * tp + j, tp, q, ld, g + j * ld + C, ld);
                op->key_weighted4(nk, T - j, D, P + j * tp + j, tp, go + j * C, C, g + j * ld + 2 * C,
                                  ld);
            }
        }
    free(kt);
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

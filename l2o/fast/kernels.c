/* Fused passes of the chunked no-grad step (l2o/fast), called through ctypes
 * by l2o/fast/native.py.
 *
 * The torch version of a pass streams every intermediate of an entry ([DE]
 * or [HID] floats) through memory once per op. Here an entry's whole chain --
 * statistics, encode, message, aggregate, read-out -- stays in registers, so
 * a pass reads an entry's inputs once and writes its outputs once.
 * Vectorised across TC neighbouring entries (for an edge pass: neighbouring
 * columns of one row of a dense block, see l2o/graph/blocks.py, where edge
 * (i, j) sits at flat index i * C + j, the row fixing one end node, the
 * column the other).
 *
 * Widths are compile-time so the small loops unroll fully: -DNF (features)
 * always, -DDE -DHID for the GMN's passes, -DMH for the per-parameter MLP's;
 * native.py builds one library per set of widths. Tables are feature-major:
 * row d of a [D, n] table starts at t + d * ld.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

/* The feature layout is not written here: native.py passes l2o/features.py's
 * (NUM_ENTRY_FEATURES, the number of momenta and the ROW_* indices) as -D
 * defines, and checks l2o_layout() against it when it loads a library. */
#if !defined(NF) || !defined(NM) || !defined(ROW_P) || !defined(ROW_G) || !defined(ROW_M0) || !defined(ROW_ADAM) || \
    !defined(ROW_SQRT_V)
#error "compile with the feature layout of l2o/features.py: -DNF -DNM -DROW_P -DROW_G -DROW_M0 -DROW_ADAM -DROW_SQRT_V"
#endif

/* ------------------------------------------------------------ vectors */

/* VB lanes (GCC/clang vector extension: one AVX register for VB = 8, one
 * AVX-512 register for VB = 16; narrower targets split it), T vectors per
 * tile: TC entries (on AVX-512 CPUs native.py builds with VB = 16, T = 1
 * for the GMN's library, T = 2 for the MLP's). */
#ifndef VB
#define VB 8
#endif
#ifndef T
#define T 2
#endif
#define TC (T * VB)
#define INLINE static inline __attribute__((always_inline))

typedef float vf __attribute__((vector_size(VB * sizeof(float))));
typedef int vi __attribute__((vector_size(VB * sizeof(int))));

/* A partial tile (a row's end) goes through zero-padded copies. */
INLINE vf load(const float *p, int nv) {
    vf r = {0};
    memcpy(&r, p, (size_t)nv * sizeof(float));
    return r;
}
INLINE void store(float *p, vf v, int nv) { memcpy(p, &v, (size_t)nv * sizeof(float)); }
/* scalar - vector broadcasts the scalar (a lane-by-lane fill compiles to
 * stores and a reload: a store-forwarding stall per call); x - 0 == x exactly */
INLINE vf splat(float x) { return x - (vf){0}; }
/* max(x, 0) that keeps NaN, as torch.relu does: a diverging metanetwork must show */
INLINE vf relu(vf x) { return (vf)((vi)x & ~(x < 0)); }
INLINE vf blend(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
/* lanes [0, n) kept, the rest zeroed (padded lanes of a partial tile) */
INLINE vf first_lanes(vf x, int n) {
    vi index;
    for (int v = 0; v < VB; v++) index[v] = v;
    return blend(index < n, x, (vf){0});
}
INLINE vf vsqrt(vf x) {
    for (int v = 0; v < VB; v++) x[v] = __builtin_sqrtf(x[v]); /* vsqrtps with -fno-math-errno */
    return x;
}
INLINE int lanes(int nv, int t) { return nv - t * VB < 0 ? 0 : nv - t * VB > VB ? VB : nv - t * VB; }

/* Kept edge states may be stored as IEEE half floats (l2o/fast/gmn.py,
 * edge_states="float16"): half the memory traffic of float32 states between
 * passes. Values beyond the half range saturate to +-65504 instead of
 * becoming inf, so a large state stays finite. HALF_STATES is 0 when this
 * compiler and target have no half type; l2o_gmn_pass then refuses half states. */
#define HALF_MAX 65504.f
/* NaN stays NaN (the comparisons are false): a diverging metanetwork must show */
INLINE vf saturate_half(vf x) { return blend(x > HALF_MAX, splat(HALF_MAX), blend(x < -HALF_MAX, splat(-HALF_MAX), x)); }
#if defined(__AVX512F__) && VB == 16
#include <immintrin.h>
typedef __m256i half_vec;
#define HALF_TO_FLOAT _mm512_cvtph_ps
#define FLOAT_TO_HALF(x) _mm512_cvtps_ph((__m512)(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define STREAM_HALF(p, h) _mm256_stream_si256((__m256i *)(p), h)
#elif defined(__F16C__) && VB == 8
#include <immintrin.h>
typedef __m128i half_vec;
#define HALF_TO_FLOAT _mm256_cvtph_ps
#define FLOAT_TO_HALF(x) _mm256_cvtps_ph((__m256)(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define STREAM_HALF(p, h) _mm_stream_si128((__m128i *)(p), h)
#endif
#ifdef HALF_TO_FLOAT /* one conversion instruction per vector */
#define HALF_STATES 1
typedef unsigned short half;
INLINE vf load_half(const half *p, int nv) {
    half_vec h;
    memset(&h, 0, sizeof h);
    memcpy(&h, p, (size_t)nv * sizeof(half));
    return (vf)HALF_TO_FLOAT(h);
}
INLINE void store_half(half *p, vf x, int nv, int stream) {
    const half_vec h = FLOAT_TO_HALF(saturate_half(x));
    if (stream && nv == VB && ((unsigned long)p & (sizeof h - 1)) == 0)
        STREAM_HALF(p, h);
    else
        memcpy(p, &h, (size_t)nv * sizeof(half));
}
#elif defined(__FLT16_MAX__) /* the compiler's _Float16, lane by lane */
#define HALF_STATES 1
typedef _Float16 half;
INLINE vf load_half(const half *p, int nv) {
    vf r = {0};
    for (int v = 0; v < nv; v++) r[v] = (float)p[v];
    return r;
}
INLINE void store_half(half *p, vf x, int nv, int stream) {
    (void)stream;
    x = saturate_half(x);
    for (int v = 0; v < nv; v++) p[v] = (half)x[v];
}
#else
#define HALF_STATES 0
typedef unsigned short half;
INLINE vf load_half(const half *p, int nv) { (void)p; (void)nv; return (vf){0}; }
INLINE void store_half(half *p, vf x, int nv, int stream) { (void)p; (void)x; (void)nv; (void)stream; }
#endif

/* exp over the lanes (libm's expf does not vectorise portably): Cody-Waite
 * range reduction x = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-6
 * minimax polynomial for e^r; relative error ~2 ulp. */
INLINE vf vexp(vf x) {
#if VB == 8 && defined(__AVX__) /* the same in fewer instructions (the update formula's time 0.8x) */
    /* max(lo, x) and min(hi, .) return their second operand when it is NaN */
    x = (vf)_mm256_min_ps(_mm256_set1_ps(88.f), _mm256_max_ps(_mm256_set1_ps(-87.f), (__m256)x));
    const vf n = (vf)_mm256_floor_ps((__m256)(x * 1.44269504088896341f + 0.5f));
#else
    x = blend(x > 88.f, splat(88.f), blend(x < -87.f, splat(-87.f), x));
    vf fx = x * 1.44269504088896341f + 0.5f;
    vf n = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
    n = blend(n > fx, n - 1.f, n); /* floor */
#endif
    x = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf y = 1.9875691500e-4f * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23; /* 2^n */
    return y * (vf)bits;
}

/* The learned optimizers' update formula (LearnedOptimizer.finish_update_)
 * from the folded head's outputs: (d - w_nom adam) exp(2c sigmoid(s') - c),
 * which is c tanh(s / c) with the 2 / c folded into s'. */
INLINE vf finish(vf dir, vf log_step, vf adam, float nominal, float c) {
    return (dir - nominal * adam) * vexp(2.f * c / (1.f + vexp(-log_step)) - c);
}

/* A pass streams ~20 rows at once, more than the hardware prefetchers
 * follow: each tile asks for the same rows PREFETCH floats further on. */
#ifndef PREFETCH
#define PREFETCH (4 * TC)
#endif

/* Output units per register block: a divisor of the layer's width, at most
 * 4, so 4 x T accumulators (plus an input vector and a weight) fit the 16
 * AVX registers. */
#define GROUP_OF(width) ((width) % 4 == 0 ? 4 : (width) % 2 == 0 ? 2 : 1)

/* acc[g] += sum_k w[row0 + g, k] in[k] for g < G, over one tile. `in` holds K
 * rows at stride in_ld and is read from memory (the frame itself, or a small
 * buffer): tile-sized arrays of vectors would make the compiler juggle them in
 * registers and spill. w is row-major [rows][K]. */
INLINE void dot_block_ld(const int G, const int K, const float *restrict w, int w_ld, int row0, const float *in,
                         long in_ld, vf acc[][T]) {
#pragma GCC unroll 64
    for (int k = 0; k < K; k++)
        for (int t = 0; t < T; t++) {
            const vf xk = load(in + k * in_ld + t * VB, VB);
#pragma GCC unroll 16
            for (int g = 0; g < G; g++) acc[g][t] += w[(row0 + g) * w_ld + k] * xk;
        }
}
INLINE void dot_block(const int G, const int K, const float *restrict w, int row0, const float *in, long in_ld,
                      vf acc[][T]) {
    dot_block_ld(G, K, w, K, row0, in, in_ld, acc);
}

/* The last, partial tile of a row: its first n entries of rows [0, k) of
 * `src` (stride ld) copied into a zero-padded tile buffer (stride TC). */
INLINE const float *stage_tail(int k, const float *src, long ld, long n, float pad[][TC]) {
    memset(pad, 0, (size_t)k * TC * sizeof(float));
    for (int r = 0; r < k; r++) memcpy(pad[r], src + r * ld, (size_t)n * sizeof(float));
    return &pad[0][0];
}

/* The two-output head of both learned optimizers on one tile: starts at its
 * bias, then takes each register block of hidden units as it is produced,
 * dir += w[0, h] relu(z_h), log_step += w[1, h] relu(z_h) (w is [2][width]). */
INLINE void head_start(float b0, float b1, vf dir[T], vf log_step[T]) {
    for (int t = 0; t < T; t++) {
        dir[t] = splat(b0);
        log_step[t] = splat(b1);
    }
}
INLINE void head_add(const int G, const int width, const float *w, int h0, vf acc[][T], vf dir[T],
                     vf log_step[T]) {
#pragma GCC unroll 16
    for (int g = 0; g < G; g++)
        for (int t = 0; t < T; t++) {
            const vf z = relu(acc[g][t]);
            dir[t] += w[h0 + g] * z;
            log_step[t] += w[width + h0 + g] * z;
        }
}

/* Where a pass puts its update u of a tile: written to `update`, or, with
 * apply_p, applied at once (apply_p = p decay + lr u, p the entries'
 * parameters before the step), so the update is never written and read back.
 * As l2o_apply drops a non-finite u, an entry whose lr u is not finite counts
 * in *nonfinite (one counter per lane) and keeps p decay: lr carries the sink's gains (a relative
 * update's scale can be inf), so it is the product that must be checked. */
typedef struct {
    float *update;
    float *apply_p;
    float lr, decay;
} update_out;

/* u and p of the nv entries at `at` (a tile's vector t) */
INLINE void put_update(const update_out *o, long at, int nv, vf u, vf p, vi *nonfinite) {
    if (!o->apply_p) {
        store(o->update + at, u, nv);
        return;
    }
    const vf step = o->lr * u;
    const vi finite = (step - step) == 0; /* NaN and inf give NaN */
    vi bad = ~finite; /* -1 in the lanes to count: counted lane by lane, summed by the caller at the end */
    if (nv < VB) {
        vi index;
        for (int v = 0; v < VB; v++) index[v] = v;
        bad &= index < nv;
    }
    *nonfinite -= bad;
    store(o->apply_p + at, (o->decay == 1.f ? p : p * o->decay) + blend(finite, step, splat(0.f)), nv);
}

/* ------------------------------------------------------------ threads */

#define MAX_THREADS 64
/* starting a thread costs tens of microseconds: one per MIN_WORK_PER_THREAD entries at most */
#ifndef MIN_WORK_PER_THREAD
#define MIN_WORK_PER_THREAD 32768
#endif

typedef void (*range_fn)(const void *args, long r0, long r1, int thread);
typedef struct {
    range_fn fn;
    const void *args;
    long r0, r1;
    int thread;
} job;

static void *run_job(void *p) {
    const job *j = p;
    j->fn(j->args, j->r0, j->r1, j->thread);
    return NULL;
}

/* How many threads parallel_for will use for `n` units of `work` entries in all. */
static int thread_count(long n, long work, int threads) {
    if (threads > work / MIN_WORK_PER_THREAD) threads = (int)(work / MIN_WORK_PER_THREAD);
    if (threads > n) threads = (int)n;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    return threads < 1 ? 1 : threads;
}

/* fn over [0, n) in `threads` contiguous slices (the caller passes torch's
 * thread count through thread_count); the calling thread takes the first.
 *
 * Built with -DL2O_OPENMP (native.py links torch's own OpenMP runtime, the
 * one already loaded in the process) the slices run on torch's intra-op
 * thread pool: after a torch op its workers spin-wait for the next parallel
 * region, and a thread of our own would share a core with one of them
 * (the step takes 0.8-0.86x the own-threads build's time on this project's
 * 2-core machine: bench/kernel_threads.py). */
#ifdef L2O_OPENMP
int omp_get_thread_num(void);
int omp_get_num_threads(void);
static void parallel_for(range_fn fn, const void *args, long n, int threads) {
    job jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) jobs[t] = (job){fn, args, n * t / threads, n * (t + 1) / threads, t};
    if (threads == 1) { /* no parallel region for a small pass */
        run_job(&jobs[0]);
        return;
    }
#pragma omp parallel num_threads(threads)
    { /* a runtime that gives fewer threads than asked: each takes every got-th slice */
        const int got = omp_get_num_threads();
        for (int t = omp_get_thread_num(); t < threads; t += got) run_job(&jobs[t]);
    }
}
#else
static void parallel_for(range_fn fn, const void *args, long n, int threads) {
    job jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started = 0;
    for (int t = 0; t < threads; t++) jobs[t] = (job){fn, args, n * t / threads, n * (t + 1) / threads, t};
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tid[t], NULL, run_job, &jobs[t]) != 0) break;
        started = t;
    }
    run_job(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(tid[t], NULL);
    for (int t = started + 1; t < threads; t++) run_job(&jobs[t]); /* threads that failed to start */
}
#endif

/* ------------------------------------------------------------ statistics */

/* One step of the momenta and second moment of a tensor's entries, and their
 * features (l2o/fast/features.py: update_statistics_):
 *   m_k = beta_k m_k + (1 - beta_k) g,  v = b2 v + (1 - b2) g^2,
 *   rows p, g, m_k, adam = adam_scale m_adam / (sqrt(v) + adam_eps), sqrt(v).
 * With write_back == 0 the state m, v is only read (the chunked step
 * recomputes an entry's features in every pass from the state before the
 * step and writes the new state back once, in its last pass). */
typedef struct {
    const float *p, *g; /* g NULL: a zero gradient */
    float *m, *v;
    long m_ld;
    const float *betas;
    float b2, one_minus_b2, sqrt_eps, adam_scale, adam_eps;
    int adam_m, write_back;
} stat_in;

/* The features of the nv entries at i into row[NF] (padded lanes: p = g = m =
 * adam = 0, sqrt(v) = sqrt(eps)). */
INLINE void features_vec(const stat_in *s, long i, int nv, vf row[NF]) {
    const vf g = s->g ? load(s->g + i, nv) : splat(0.f);
    row[ROW_P] = load(s->p + i, nv);
    row[ROW_G] = g;
#pragma GCC unroll 16
    for (int k = 0; k < NM; k++) {
        float *mk = s->m + k * s->m_ld + i;
        const float beta = s->betas[k];
        row[ROW_M0 + k] = load(mk, nv) * beta + g * (1.f - beta);
        if (s->write_back) store(mk, row[ROW_M0 + k], nv);
    }
    const vf v = load(s->v + i, nv) * s->b2 + g * g * s->one_minus_b2;
    if (s->write_back) store(s->v + i, v, nv);
    row[ROW_SQRT_V] = vsqrt(v + s->sqrt_eps);
    row[ROW_ADAM] = row[ROW_M0 + s->adam_m] / (row[ROW_SQRT_V] + s->adam_eps) * s->adam_scale;
}

/* The state streams of the entries PREFETCH floats on from i. */
INLINE void prefetch_state(const stat_in *s, long i) {
    if (s->g) __builtin_prefetch(s->g + i + PREFETCH, 0, 0);
    __builtin_prefetch(s->p + i + PREFETCH, 0, 0);
    __builtin_prefetch(s->v + i + PREFETCH, 1, 0);
    for (int k = 0; k < NM; k++) __builtin_prefetch(s->m + k * s->m_ld + i + PREFETCH, 1, 0);
}

/* The statistics pass over n entries: the features into x (NF rows at stride
 * x_ld; NULL: not stored) and each row's sum of squares. p, g and m may
 * already be rows of x: then they are not copied. With ctl_m >= 0 also the
 * step-size controller's sums over the state before the step (LearnedOptimizer.
 * advance_log_lr): sum g m, sum m m of momentum ctl_m, and sum v. */
#define NCTL 3
typedef struct {
    stat_in s;
    float *x;
    long x_ld;
    int ctl_m;
    double sums[MAX_THREADS][NF];
    double ctl[MAX_THREADS][NCTL];
} stats_args;

/* The nv entries at i: their features, stored into x where asked, and their
 * squares added to sq. Called with nv == VB a compile-time constant for whole
 * vectors: a variable nv compiles every load and store to a memcpy call
 * (the pass then ran at half the memory bandwidth). */
INLINE void stats_vec(const stats_args *a, long i, int nv, int copy_p, int copy_g, int copy_m, vf sq[NF],
                      vf ctl[NCTL]) {
    const stat_in *s = &a->s;
    float *const x = a->x;
    const long ld = a->x_ld;
    if (a->ctl_m >= 0) { /* before features_vec, which may write the state back */
        const vf g = s->g ? load(s->g + i, nv) : splat(0.f), m = load(s->m + a->ctl_m * s->m_ld + i, nv);
        ctl[0] += g * m;
        ctl[1] += m * m;
        ctl[2] += load(s->v + i, nv);
    }
    vf row[NF];
    features_vec(s, i, nv, row);
    if (x) {
        if (copy_p) store(x + ROW_P * ld + i, row[ROW_P], nv);
        if (copy_g) store(x + ROW_G * ld + i, row[ROW_G], nv);
        if (copy_m)
            for (int k = 0; k < NM; k++) store(x + (ROW_M0 + k) * ld + i, row[ROW_M0 + k], nv);
        store(x + ROW_ADAM * ld + i, row[ROW_ADAM], nv);
        store(x + ROW_SQRT_V * ld + i, row[ROW_SQRT_V], nv);
    }
    if (nv < VB) row[ROW_SQRT_V] = first_lanes(row[ROW_SQRT_V], nv); /* padded: sqrt(0 + eps), not 0 */
    for (int f = 0; f < NF; f++) sq[f] += row[f] * row[f];
}

static void stats_range(const void *args, long i0, long i1, int thread) {
    const stats_args *a = args;
    const stat_in *s = &a->s;
    float *const x = a->x;
    const long ld = a->x_ld;
    const int copy_p = x && s->p != x + ROW_P * ld, copy_g = x && s->g != x + ROW_G * ld,
              copy_m = x && s->m != x + ROW_M0 * ld;
    double *sums = ((stats_args *)a)->sums[thread], *ctl_sums = ((stats_args *)a)->ctl[thread];
    for (int f = 0; f < NF; f++) sums[f] = 0.0;
    for (int c = 0; c < NCTL; c++) ctl_sums[c] = 0.0;
    /* float partial sums per block of entries, flushed to double: accurate
     * to float resolution however long the tensor */
    for (long b0 = i0; b0 < i1; b0 += 64 * TC) {
        const long b1 = b0 + 64 * TC < i1 ? b0 + 64 * TC : i1;
        vf sq[NF], ctl[NCTL];
        for (int f = 0; f < NF; f++) sq[f] = splat(0.f);
        for (int c = 0; c < NCTL; c++) ctl[c] = splat(0.f);
        for (long i = b0; i < b1; i += VB) {
            if (((i - b0) & (TC - 1)) == 0) { /* once per cache line of each stream */
                prefetch_state(s, i);
                if (x) {
                    __builtin_prefetch(x + ROW_ADAM * ld + i + PREFETCH, 1, 0);
                    __builtin_prefetch(x + ROW_SQRT_V * ld + i + PREFETCH, 1, 0);
                }
            }
            if (b1 - i >= VB)
                stats_vec(a, i, VB, copy_p, copy_g, copy_m, sq, ctl);
            else
                stats_vec(a, i, (int)(b1 - i), copy_p, copy_g, copy_m, sq, ctl);
        }
        for (int f = 0; f < NF; f++)
            for (int v = 0; v < VB; v++) sums[f] += sq[f][v];
        for (int c = 0; c < NCTL; c++)
            for (int v = 0; v < VB; v++) ctl_sums[c] += ctl[c][v];
    }
}

int l2o_stats(long n, const float *p, const float *g, float *m, long m_ld, float *v, const float *betas, float b2,
              float one_minus_b2, float sqrt_eps, float adam_scale, float adam_eps, int adam_m, int write_back,
              float *x, long x_ld, double *sums, int ctl_m, double *ctl_sums, int threads) {
    if (ctl_m >= NM || (ctl_m >= 0 && !ctl_sums)) return -2;
    stats_args *a = malloc(sizeof *a);
    if (!a) return -1;
    *a = (stats_args){{p, g, m, v, m_ld, betas, b2, one_minus_b2, sqrt_eps, adam_scale, adam_eps, adam_m, write_back},
                      x, x_ld, ctl_m, {{0}}, {{0}}};
    threads = thread_count(n, n, threads);
    parallel_for(stats_range, a, n, threads);
    for (int f = 0; f < NF; f++) {
        sums[f] = 0.0;
        for (int t = 0; t < threads; t++) sums[f] += a->sums[t][f];
    }
    for (int c = 0; c < NCTL && ctl_m >= 0; c++) {
        ctl_sums[c] = 0.0;
        for (int t = 0; t < threads; t++) ctl_sums[c] += a->ctl[t][c];
    }
    free(a);
    return 0;
}

/* ------------------------------------------------------------ GMN */
#ifdef DE

#define MAX_LAYERS 16

/* With 8 edge states and AVX (+ F16C for half states) the round passes run
 * edge by edge (round_chunk): an edge's 8 states are one vector, W e is 8 FMAs
 * of a weight column (all 8 kept in registers through the pass) by a broadcast
 * state, and the messages' sums to a column and to the row are vector adds:
 * 0.8x the time of the tiled round passes on a 2-core EPYC (bench/kernel_ab.py).
 * Kept states are then stored edge by edge (load_kept_em). The read-out, whose
 * 16 hidden units' weights would not stay in registers, and other widths and
 * targets run on tiles of TC neighbouring edges (pass_tile). */
#if DE == 8 && defined(__AVX__) && defined(__F16C__) && defined(HALF_TO_FLOAT)
#define EDGE_MAJOR 1
typedef float ve __attribute__((vector_size(DE * sizeof(float))));
_Static_assert(TC % 8 == 0, "load_kept_tile transposes 8 edges at a time");
#else
#define EDGE_MAJOR 0
#endif

/* One pass of the GMN's chunked step over one dense block of rows x cols
 * edges (edge (i, j) at flat index i * cols + j of the block's state), every
 * intermediate of an edge kept in a tile buffer, nothing edge-sized written
 * but the outputs. Per edge:
 *   x          = its features (statistics section)
 *   e          = relu(W_enc x + static)                      if first == 0,
 *                the kept edge states after `first` rounds    else
 *   for l in [first, stop):
 *     m_l = relu(W_msg[l] e + row_t[l][:, i] + col_t[l][:, g(i) * C + j]),  e = e + m_l
 * then either (a round pass, readout == 0) m_{stop-1} summed onto
 *   row_acc[:, i] and col_acc[:, g(i) * C + j], and e written to the kept
 *   states (if any), or (the read-out)
 *   z = relu(W_z [e; x] + z_row[:, i] + z_col[:, g(i) * C + j]),
 *   (d, s) = head_w z + head_b,  u = finish(d, s, x[adam]) (put_update),
 * where g(i) = i / per_group is the row's group (grouped convolutions). */
typedef struct {
    stat_in s;
    const float *w_enc;       /* [DE][NF] */
    const float *stat;        /* static encoder term of edge (i, j) at stat[d * stat_ld + i * stat_rs + j] */
    long stat_ld, stat_rs;
    int first, stop;
    const float *const *w_msg; /* per layer [DE][DE] */
    const float *const *row_t; /* per layer [DE][R] */
    const float *const *col_t; /* per layer [DE][G * C], bias folded in */
    void *kept;                /* the edge states (load_kept_em or load_kept), or NULL */
    int kept_half;             /* kept holds half floats, else floats */
    float *row_acc;              /* [DE][R], added to */
    float *col_acc[MAX_THREADS]; /* [DE][G * C] per thread; [0] is the caller's, added to */
    const float *w_z;            /* [HID][DE + NF] */
    const float *z_row, *z_col;  /* [HID][R], [HID][G * C], bias folded in */
    const float *head_w;         /* [2][HID] */
    float head_b0, head_b1, nominal, c;
    int readout;
    update_out out;
    long nonfinite[MAX_THREADS]; /* per thread: entries whose lr u was not finite */
    long rows, cols, per_group;
#if EDGE_MAJOR
    /* the round passes' tables, edge-major (prepared by l2o_gmn_pass): column
     * k of a weight as one vector, a column's DE terms as one vector */
    const float *w_enc_cols;                /* [NF][DE]: w_enc transposed */
    const float *w_msg_cols[MAX_LAYERS];    /* [DE][DE]: w_msg[l] transposed */
    const float *col_em[MAX_LAYERS];        /* [G * C][DE]: col_t[l] transposed */
    const float *stat_em;                   /* [C][DE]: stat transposed when its row stride is 0 */
    float *col_acc_em[MAX_THREADS];         /* per thread [G * C][DE], zeroed: the column sums */
#endif
} pass_args;

#define EGROUP GROUP_OF(DE)
#define RGROUP GROUP_OF(HID)

/* Kept edge states are stored edge by edge where the round passes run edge
 * by edge (EDGE_MAJOR: load_kept_em), else tile by tile: the DE states of the tile of nv
 * edges at flat index `at` (a row's tiles start at its multiples of TC, so
 * the tiles of a block tile its whole index range) lie together, state d of
 * its lane v at DE * at + d * nv + v. A pass then reads and writes them as
 * one stream of whole cache lines; DE rows of stride n would be DE streams
 * written a few bytes at a time (at strides that can alias in the L1: 1.27x
 * the time of the first round's pass, which writes them, on a 2-core EPYC;
 * its streaming stores another 1.17x). */
INLINE long kept_at(long at, int d, int t, int nv) { return DE * at + (long)d * nv + t * VB; }
#if EDGE_MAJOR
/* edge-major kept states: edge at's DE states at DE * at */
INLINE ve load_kept_em(const pass_args *a, long at) {
    ve r;
    if (!a->kept_half) {
        memcpy(&r, (const float *)a->kept + DE * at, sizeof r);
        return r;
    }
    __m128i h;
    memcpy(&h, (const half *)a->kept + DE * at, sizeof h);
    return (ve)_mm256_cvtph_ps(h);
}
INLINE void store_kept_em(const pass_args *a, long at, ve x) {
    if (!a->kept_half) {
        memcpy((float *)a->kept + DE * at, &x, sizeof x);
        return;
    }
    /* saturated: max(lo, x), then min(hi, .), return their second operand when it is NaN */
    const __m256 s = _mm256_min_ps(_mm256_set1_ps(HALF_MAX), _mm256_max_ps(_mm256_set1_ps(-HALF_MAX), (__m256)x));
    const __m128i h = _mm256_cvtps_ph(s, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    half *p = (half *)a->kept + DE * at;
    if (a->first == 0 && ((unsigned long)p & (sizeof h - 1)) == 0) /* streamed past the cache: round 0 writes states it did not read */
        _mm_stream_si128((__m128i *)p, h);
    else
        memcpy(p, &h, sizeof h);
}
/* the read-out's tile of kept states, row d of ex[d][TC] the state d of its nv edges (padding 0) */
INLINE void load_kept_tile(const pass_args *a, long at, int nv, float ex[DE][TC]) {
    for (int b = 0; b < TC; b += 8) { /* 8 edges' states, 8 x 8, transposed in registers */
        __m256 r[8];
        for (int v = 0; v < 8; v++) r[v] = b + v < nv ? (__m256)load_kept_em(a, at + b + v) : _mm256_setzero_ps();
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]),
                     t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]),
                     t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]),
                     t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                     s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                     s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                     s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        _mm256_storeu_ps(&ex[0][b], _mm256_permute2f128_ps(s0, s4, 0x20));
        _mm256_storeu_ps(&ex[1][b], _mm256_permute2f128_ps(s1, s5, 0x20));
        _mm256_storeu_ps(&ex[2][b], _mm256_permute2f128_ps(s2, s6, 0x20));
        _mm256_storeu_ps(&ex[3][b], _mm256_permute2f128_ps(s3, s7, 0x20));
        _mm256_storeu_ps(&ex[4][b], _mm256_permute2f128_ps(s0, s4, 0x31));
        _mm256_storeu_ps(&ex[5][b], _mm256_permute2f128_ps(s1, s5, 0x31));
        _mm256_storeu_ps(&ex[6][b], _mm256_permute2f128_ps(s2, s6, 0x31));
        _mm256_storeu_ps(&ex[7][b], _mm256_permute2f128_ps(s3, s7, 0x31));
    }
}
#endif
INLINE vf load_kept(const pass_args *a, long at, int d, int t, int nv) {
    const long k = kept_at(at, d, t, nv);
    return a->kept_half ? load_half((const half *)a->kept + k, lanes(nv, t)) : load((const float *)a->kept + k, lanes(nv, t));
}
INLINE void store_kept(const pass_args *a, long at, int d, int t, int nv, vf x) {
    const long k = kept_at(at, d, t, nv);
    if (a->kept_half)
        /* streamed (past the cache) where the pass writes states it did not read: round 0;
         * a line just read is cheaper rewritten in the cache (round 1 took 1.25x streamed) */
        store_half((half *)a->kept + k, x, lanes(nv, t), a->first == 0);
    else
        store((float *)a->kept + k, x, lanes(nv, t));
}

/* Whether a pass computes its edges' features: all but a round pass from kept states */
INLINE int pass_reads_state(const pass_args *a) { return a->first == 0 || a->readout || a->s.write_back; }

/* acc[g][t] = row[(d0 + g) * rows + i] + col[(d0 + g) * col_ld + c0 + t * VB]: a row plus a column term */
INLINE void node_terms(const int G, const float *row, long rows, long i, const float *col, long col_ld, long c0,
                       int d0, int nv, vf acc[][T]) {
    for (int g = 0; g < G; g++)
        for (int t = 0; t < T; t++)
            acc[g][t] = row[(d0 + g) * rows + i] + load(col + (d0 + g) * col_ld + c0 + t * VB, lanes(nv, t));
}

/* A row is processed in chunks of CH columns (a multiple of TC): features and
 * the read-out's update formula chunk by chunk (chunk_features), the edges tile
 * by tile or, in a round pass, edge by edge (round_chunk) in between. */
#ifndef CH
#define CH 64
#endif
/* One tile of nv <= TC edges at row i, columns j0...; x its features (NF rows at
 * stride CH); rsum [DE][TC] and col_acc collect a round pass's messages; the
 * read-out's head outputs go to head_out (2 rows at stride CH). */
INLINE void pass_tile(const pass_args *a, long i, long j0, long row_gc, int nv, float *col_acc, float rsum[DE][TC],
                      const float *xin, float *head_out) {
    const long col_ld = (a->rows / a->per_group) * a->cols, gc = row_gc + j0;
    const long at = i * a->cols + j0;
    float ex[DE][TC];
    const float(*x)[CH] = (const float(*)[CH])xin;
    if (a->first == 0) { /* e = relu(W_enc x + static) */
#pragma GCC unroll 1
        for (int d0 = 0; d0 < DE; d0 += EGROUP) {
            vf acc[EGROUP][T];
            for (int g = 0; g < EGROUP; g++)
                for (int t = 0; t < T; t++)
                    acc[g][t] = load(a->stat + (d0 + g) * a->stat_ld + i * a->stat_rs + j0 + t * VB, lanes(nv, t));
            dot_block(EGROUP, NF, a->w_enc, d0, &x[0][0], CH, acc);
            for (int g = 0; g < EGROUP; g++)
                for (int t = 0; t < T; t++) store(&ex[d0 + g][t * VB], relu(acc[g][t]), VB);
        }
    } else {
#if EDGE_MAJOR
        load_kept_tile(a, at, nv, ex);
#else
        for (int d = 0; d < DE; d++)
            for (int t = 0; t < T; t++) store(&ex[d][t * VB], load_kept(a, at, d, t, nv), VB);
#endif
    }
    float m[DE][TC];
    for (int l = a->first; l < a->stop; l++) {
#pragma GCC unroll 1
        for (int d0 = 0; d0 < DE; d0 += EGROUP) { /* m = relu(W_msg e + node terms) */
            vf acc[EGROUP][T];
            node_terms(EGROUP, a->row_t[l], a->rows, i, a->col_t[l], col_ld, gc, d0, nv, acc);
            dot_block(EGROUP, DE, a->w_msg[l], d0, &ex[0][0], TC, acc);
            for (int g = 0; g < EGROUP; g++)
                for (int t = 0; t < T; t++) store(&m[d0 + g][t * VB], relu(acc[g][t]), VB);
        }
        for (int d = 0; d < DE; d++) /* only now: every message read the old e */
            for (int t = 0; t < T; t++) store(&ex[d][t * VB], load(&ex[d][t * VB], VB) + load(&m[d][t * VB], VB), VB);
    }
    if (!a->readout) { /* a round pass: the last round's messages to both ends, e kept */
        for (int d = 0; d < DE; d++) {
            float *ca = col_acc + d * col_ld + gc;
            for (int t = 0; t < T; t++) {
                const int n = lanes(nv, t);
                vf mv = load(&m[d][t * VB], VB);
                if (n < VB) mv = first_lanes(mv, n); /* padded lanes stay out of the sums */
                store(&rsum[d][t * VB], load(&rsum[d][t * VB], VB) + mv, VB);
                store(ca + t * VB, load(ca + t * VB, n) + mv, n);
                if (a->kept) store_kept(a, at, d, t, nv, load(&ex[d][t * VB], VB));
            }
        }
        return;
    }
    /* the read-out: hidden units RGROUP at a time, folded into the head at once */
    vf dir[T], ls[T];
    head_start(a->head_b0, a->head_b1, dir, ls);
#pragma GCC unroll 1
    for (int h0 = 0; h0 < HID; h0 += RGROUP) {
        vf acc[RGROUP][T];
        node_terms(RGROUP, a->z_row, a->rows, i, a->z_col, col_ld, gc, h0, nv, acc);
        dot_block_ld(RGROUP, DE, a->w_z, DE + NF, h0, &ex[0][0], TC, acc);
        dot_block_ld(RGROUP, NF, a->w_z + DE, DE + NF, h0, &x[0][0], CH, acc);
        head_add(RGROUP, HID, a->head_w, h0, acc, dir, ls);
    }
    for (int t = 0; t < T; t++) {
        store(head_out + t * VB, dir[t], VB);
        store(head_out + CH + t * VB, ls[t], VB);
    }
}

/* The features of the n entries of a chunk at flat index `at` into x (NF rows
 * at stride CH; a partial last vector zero-padded as features_vec pads it).
 * Computed for a whole chunk before its edges use them, and the read-out's
 * update formula run over a whole chunk after (chunk_finish): each is a loop
 * of independent vectors whose long latency chains (square root, divisions,
 * exponentials) overlap, where one tile's at a time would wait on them. */
INLINE void chunk_features(const pass_args *a, long at, long n, float x[NF][CH]) {
    long v = 0;
    for (; v + VB <= n; v += VB) { /* nv a constant: whole-vector loads and stores */
        if ((v & (TC - 1)) == 0) prefetch_state(&a->s, at + v);
        vf row[NF];
        features_vec(&a->s, at + v, VB, row);
        for (int f = 0; f < NF; f++) store(&x[f][v], row[f], VB);
    }
    for (; v < n; v += VB) {
        vf row[NF];
        features_vec(&a->s, at + v, (int)(n - v), row);
        for (int f = 0; f < NF; f++) store(&x[f][v], row[f], VB);
    }
}

/* the read-out's updates of the n entries of a chunk from their head outputs */
INLINE void chunk_finish(const pass_args *a, long at, long n, float x[NF][CH], float head[2][CH], vi *nonfinite) {
    long v = 0;
    for (; v + VB <= n; v += VB)
        put_update(&a->out, at + v, VB,
                   finish(load(&head[0][v], VB), load(&head[1][v], VB), load(&x[ROW_ADAM][v], VB), a->nominal, a->c),
                   load(&x[ROW_P][v], VB), nonfinite);
    for (; v < n; v += VB)
        put_update(&a->out, at + v, (int)(n - v),
                   finish(load(&head[0][v], VB), load(&head[1][v], VB), load(&x[ROW_ADAM][v], VB), a->nominal, a->c),
                   load(&x[ROW_P][v], VB), nonfinite);
}

#if EDGE_MAJOR
INLINE ve ve_load(const float *p) {
    ve r;
    memcpy(&r, p, sizeof r);
    return r;
}
INLINE void ve_store(float *p, ve x) { memcpy(p, &x, sizeof x); }
/* an edge's states where the next layer broadcasts them one by one: stored in
 * halves of 4, as a 4-byte load is not forwarded from a pending 32-byte store
 * (on Zen 3 it then waits for the store: 1.5x the round's time) */
INLINE void es_store(float *p, ve x) {
    _mm_storeu_ps(p, _mm256_castps256_ps128((__m256)x));
    _mm_storeu_ps(p + 4, _mm256_extractf128_ps((__m256)x, 1));
}
/* max(0, x) returns its second operand x when x is NaN: a diverging metanetwork must show */
INLINE ve ve_relu(ve x) { return (ve)_mm256_max_ps(_mm256_setzero_ps(), (__m256)x); }

/* s + sum_k w[k] in[k * ld]: K weight columns by broadcast inputs, in two
 * independent chains of FMAs (one chain of K would wait on their latency) */
INLINE ve matvec(const int K, const ve *w, const float *in, long ld, ve s) {
    ve s1 = {0};
#pragma GCC unroll 16
    for (int k = 0; k + 1 < K; k += 2) {
        s += w[k] * in[k * ld];
        s1 += w[k + 1] * in[(k + 1) * ld];
    }
    if (K % 2) s += w[K - 1] * in[(K - 1) * ld];
    return s + s1;
}

/* A round pass over the n edges of row i from column j0 (x: their features,
 * NF rows at stride CH, where the pass reads them), edge by edge:
 *   e = relu(W_enc x + static) (first == 0) or the kept states,
 *   for l in [first, stop): m = relu(W_msg[l] e + row_t[l][:, i] + col_t[l][:, g(i) C + j]), e = e + m,
 * the last m added to *rsum (the row's sum) and to col_acc[g(i) C + j][:]. */
INLINE void round_chunk(const pass_args *a, long i, long j0, long n, const float x[NF][CH], ve *rsum,
                        float *col_acc) {
    const long at = i * a->cols + j0, gc = (i / a->per_group) * a->cols + j0;
    float es[CH][DE] __attribute__((aligned(64))); /* the states a layer reads, broadcast one by one */
    if (a->first == 0) {
        ve w[NF];
        for (int k = 0; k < NF; k++) w[k] = ve_load(a->w_enc_cols + k * DE);
        for (long v = 0; v < n; v++) {
            ve s;
            if (a->stat_em)
                s = ve_load(a->stat_em + (j0 + v) * DE);
            else
                for (int d = 0; d < DE; d++) s[d] = a->stat[d * a->stat_ld + i * a->stat_rs + j0 + v];
            es_store(es[v], ve_relu(matvec(NF, w, &x[0][v], CH, s)));
        }
    } else
        for (long v = 0; v < n; v++) es_store(es[v], load_kept_em(a, at + v));
    for (int l = a->first; l < a->stop; l++) {
        ve w[DE], row;
        for (int k = 0; k < DE; k++) w[k] = ve_load(a->w_msg_cols[l] + k * DE);
        for (int d = 0; d < DE; d++) row[d] = a->row_t[l][d * a->rows + i];
        const float *col = a->col_em[l] + gc * DE;
        if (l < a->stop - 1) {
            for (long v = 0; v < n; v++) {
                const ve msg = ve_relu(matvec(DE, w, es[v], 1, row + ve_load(col + v * DE)));
                es_store(es[v], ve_load(es[v]) + msg);
            }
            continue;
        }
        /* the last round: its messages summed to both ends, the states kept */
        ve rs = *rsum; /* in a register: a sum through memory would chain every edge on a store and a reload */
        for (long v = 0; v < n; v++) {
            const ve msg = ve_relu(matvec(DE, w, es[v], 1, row + ve_load(col + v * DE)));
            rs += msg;
            ve_store(col_acc + (gc + v) * DE, ve_load(col_acc + (gc + v) * DE) + msg);
            if (a->kept) store_kept_em(a, at + v, ve_load(es[v]) + msg);
        }
        *rsum = rs;
        return;
    }
}

static void round_range(const pass_args *a, long r0, long r1, int thread) {
    float *col_acc = a->col_acc_em[thread];
    for (long i = r0; i < r1; i++) {
        ve rsum = {0};
        for (long j0 = 0; j0 < a->cols; j0 += CH) {
            const long n = a->cols - j0 < CH ? a->cols - j0 : CH;
            float x[NF][CH] __attribute__((aligned(64)));
            if (pass_reads_state(a)) chunk_features(a, i * a->cols + j0, n, x);
            round_chunk(a, i, j0, n, x, &rsum, col_acc);
        }
        for (int d = 0; d < DE; d++) a->row_acc[d * a->rows + i] += rsum[d];
    }
}
#endif

static void pass_range(const void *args, long r0, long r1, int thread) {
    const pass_args *a = args;
#if EDGE_MAJOR
    if (!a->readout) {
        round_range(a, r0, r1, thread);
#ifdef HALF_TO_FLOAT
        _mm_sfence();
#endif
        return;
    }
#endif
    float *col_acc = a->col_acc[thread];
    vi nonfinite = {0}; /* lane by lane; here, not in a->nonfinite: the threads' counters share a cache line */
    float rsum[DE][TC];
    for (long i = r0; i < r1; i++) {
        memset(rsum, 0, sizeof rsum);
        const long row_gc = (i / a->per_group) * a->cols; /* the row's group's first column term */
        for (long j0 = 0; j0 < a->cols; j0 += CH) {
            const long n = a->cols - j0 < CH ? a->cols - j0 : CH;
            float x[NF][CH] __attribute__((aligned(64)));
            float head[2][CH] __attribute__((aligned(64)));
            if (pass_reads_state(a)) chunk_features(a, i * a->cols + j0, n, x);
            long j = 0;
            for (; j + TC <= n; j += TC) /* nv a constant: whole-vector loads and stores */
                pass_tile(a, i, j0 + j, row_gc, TC, col_acc, rsum, &x[0][j], &head[0][j]);
            if (j < n) pass_tile(a, i, j0 + j, row_gc, (int)(n - j), col_acc, rsum, &x[0][j], &head[0][j]);
            if (a->readout) chunk_finish(a, i * a->cols + j0, n, x, head, &nonfinite);
        }
        if (!a->readout)
            for (int d = 0; d < DE; d++) {
                float s = 0.f;
                for (int v = 0; v < TC; v++) s += rsum[d][v];
                a->row_acc[d * a->rows + i] += s;
            }
    }
    long count = 0;
    for (int v = 0; v < VB; v++) count += nonfinite[v];
    ((pass_args *)a)->nonfinite[thread] = count;
#ifdef HALF_TO_FLOAT
    _mm_sfence(); /* streaming stores are weakly ordered: make them visible before the pass returns */
#endif
}

int l2o_gmn_pass(long rows, long cols, long per_group, const float *p, const float *g, float *m, long m_ld, float *v,
                 const float *betas, float b2, float one_minus_b2, float sqrt_eps, float adam_scale, float adam_eps,
                 int adam_m, int write_back, const float *w_enc, const float *stat, long stat_ld, long stat_rs,
                 int first, int stop, const float *const *w_msg, const float *const *row_t,
                 const float *const *col_t, void *kept, int kept_half, float *row_acc, float *col_acc,
                 const float *w_z, const float *z_row, const float *z_col, const float *head_w, float head_b0,
                 float head_b1, float nominal, float c, float *update, float *apply_p, float lr, float decay,
                 long *nonfinite, int threads) {
    if (stop > MAX_LAYERS || first < 0 || first > stop || (first > 0 && !kept) || (apply_p && !nonfinite) ||
        (!(update || apply_p) && first == stop)) /* a round pass runs a round */
        return -2;
    if (kept_half && !HALF_STATES) return -3;
    pass_args *a = malloc(sizeof *a);
    if (!a) return -1;
    *a = (pass_args){{p, g, m, v, m_ld, betas, b2, one_minus_b2, sqrt_eps, adam_scale, adam_eps, adam_m, write_back},
                     w_enc, stat, stat_ld, stat_rs, first, stop, w_msg, row_t, col_t, kept, kept_half, row_acc,
                     {col_acc}, w_z, z_row, z_col, head_w, head_b0, head_b1, nominal, c, update || apply_p,
                     {update, apply_p, lr, decay}, {0}, rows, cols, per_group};
    threads = thread_count(rows, rows * cols, threads);
#if EDGE_MAJOR
    if (!a->readout) {
        const long gcols = (rows / per_group) * cols;
        const long need = (long)NF * DE + (long)(stop - first) * (DE * DE + gcols * DE) +
                          (first == 0 && stat_rs == 0 ? cols * DE : 0) + (long)threads * gcols * DE;
        float *work = calloc((size_t)need, sizeof(float));
        if (!work) {
            free(a);
            return -1;
        }
        float *w = work;
        for (int k = 0; k < NF; k++)
            for (int d = 0; d < DE; d++) w[k * DE + d] = w_enc[d * NF + k];
        a->w_enc_cols = w;
        w += NF * DE;
        for (int l = first; l < stop; l++) {
            for (int k = 0; k < DE; k++)
                for (int d = 0; d < DE; d++) w[k * DE + d] = w_msg[l][d * DE + k];
            a->w_msg_cols[l] = w;
            w += DE * DE;
            for (long c = 0; c < gcols; c++)
                for (int d = 0; d < DE; d++) w[c * DE + d] = col_t[l][d * gcols + c];
            a->col_em[l] = w;
            w += gcols * DE;
        }
        a->stat_em = NULL;
        if (first == 0 && stat_rs == 0) {
            for (long c = 0; c < cols; c++)
                for (int d = 0; d < DE; d++) w[c * DE + d] = stat[d * stat_ld + c];
            a->stat_em = w;
            w += cols * DE;
        }
        for (int t = 0; t < threads; t++, w += gcols * DE) a->col_acc_em[t] = w;
        parallel_for(pass_range, a, rows, threads);
        for (int t = 0; t < threads; t++)
            for (long c = 0; c < gcols; c++)
                for (int d = 0; d < DE; d++) col_acc[d * gcols + c] += a->col_acc_em[t][c * DE + d];
        free(work);
        free(a);
        return 0;
    }
#endif
    /* the other threads sum their columns privately, added in after the join */
    const long col_len = a->readout ? 0 : DE * (rows / per_group) * cols;
    float *priv = threads > 1 && col_len ? calloc((size_t)(threads - 1) * col_len, sizeof(float)) : NULL;
    if (col_len && !priv) threads = 1;
    for (int t = 1; t < threads; t++) a->col_acc[t] = priv + (size_t)(t - 1) * col_len;
    parallel_for(pass_range, a, rows, threads);
    for (int t = 1; t < threads && col_len; t++)
        for (long k = 0; k < col_len; k++) col_acc[k] += a->col_acc[t][k];
    if (apply_p) {
        *nonfinite = 0;
        for (int t = 0; t < threads; t++) *nonfinite += a->nonfinite[t];
    }
    free(priv);
    free(a);
    return 0;
}
#endif /* DE */

/* ------------------------------------------------------------ per-parameter MLP */
#ifdef MH

/* The graph-free learned optimizer on the entries of one tensor:
 *   z1 = relu(W_in x + b_in),  z2 = relu(W_mid z1 + b_mid),
 *   (d, s) = head_w z2 + head_b,  u = finish(d, s, x[adam]) (put_update)
 */
typedef struct {
    const float *x; /* NF feature rows (stride ld) */
    long ld;
    const float *w_in, *b_in;   /* [MH][NF], [MH] */
    const float *w_mid, *b_mid; /* [MH][MH], [MH] */
    const float *head_w;        /* [2][MH] */
    float head_b0, head_b1, nominal, c;
    update_out out;
    long n;
    long nonfinite[MAX_THREADS]; /* per thread: entries whose lr u was not finite */
} mlp_args;

#define MGROUP GROUP_OF(MH)

/* One tile of TC entries at i; `in` its NF feature rows at stride in_ld (the
 * feature block itself, or a zero-padded copy for the last, partial tile). */
INLINE void mlp_tile(const mlp_args *a, long i, int nv, const float *in, long in_ld, vi *nonfinite) {
    float z1[MH][TC];
#pragma GCC unroll 1
    for (int h0 = 0; h0 < MH; h0 += MGROUP) {
        vf acc[MGROUP][T];
        for (int g = 0; g < MGROUP; g++)
            for (int t = 0; t < T; t++) acc[g][t] = splat(a->b_in[h0 + g]);
        dot_block(MGROUP, NF, a->w_in, h0, in, in_ld, acc);
        for (int g = 0; g < MGROUP; g++)
            for (int t = 0; t < T; t++) store(&z1[h0 + g][t * VB], relu(acc[g][t]), VB);
    }
    vf dir[T], ls[T];
    head_start(a->head_b0, a->head_b1, dir, ls);
#pragma GCC unroll 1
    for (int h0 = 0; h0 < MH; h0 += MGROUP) {
        vf acc[MGROUP][T];
        for (int g = 0; g < MGROUP; g++)
            for (int t = 0; t < T; t++) acc[g][t] = splat(a->b_mid[h0 + g]);
        dot_block(MGROUP, MH, a->w_mid, h0, &z1[0][0], TC, acc);
        head_add(MGROUP, MH, a->head_w, h0, acc, dir, ls);
    }
    for (int t = 0; t < T; t++)
        put_update(&a->out, i + t * VB, lanes(nv, t),
                   finish(dir[t], ls[t], load(in + ROW_ADAM * in_ld + t * VB, VB), a->nominal, a->c),
                   load(in + ROW_P * in_ld + t * VB, VB), nonfinite);
}

static void mlp_range(const void *args, long t0, long t1, int thread) {
    const mlp_args *a = args;
    const long i1 = t1 * TC < a->n ? t1 * TC : a->n;
    long i = t0 * TC;
    vi nonfinite = {0}; /* lane by lane */
    for (; i + TC <= i1; i += TC) {
        for (int k = 0; k < NF; k++) __builtin_prefetch(a->x + k * a->ld + i + PREFETCH, 0, 0);
        mlp_tile(a, i, TC, a->x + i, a->ld, &nonfinite);
    }
    if (i < i1) {
        float pad[NF][TC];
        mlp_tile(a, i, (int)(i1 - i), stage_tail(NF, a->x + i, a->ld, i1 - i, pad), TC, &nonfinite);
    }
    long count = 0;
    for (int v = 0; v < VB; v++) count += nonfinite[v];
    ((mlp_args *)a)->nonfinite[thread] = count;
}

int l2o_mlp_step(long n, const float *x, long ld, const float *w_in, const float *b_in, const float *w_mid,
                 const float *b_mid, const float *head_w, float head_b0, float head_b1, float nominal, float c,
                 float *update, float *apply_p, float lr, float decay, long *nonfinite, int threads) {
    if (apply_p && !nonfinite) return -2;
    mlp_args a = {x, ld, w_in, b_in, w_mid, b_mid, head_w, head_b0, head_b1, nominal, c, {update, apply_p, lr, decay},
                  n, {0}};
    const long tiles = (n + TC - 1) / TC; /* threads take whole tiles */
    threads = thread_count(tiles, n, threads);
    parallel_for(mlp_range, &a, tiles, threads);
    if (apply_p) {
        *nonfinite = 0;
        for (int t = 0; t < threads; t++) *nonfinite += a.nonfinite[t];
    }
    return 0;
}
#endif /* MH */

/* ------------------------------------------------------------ applying an update */

/* p = p * decay + lr * u over one run, on the calling thread (a run is small:
 * waking torch's thread pool for it costs more than the work on a shared
 * machine). Non-finite entries of u are set to 0 (and leave p unchanged apart
 * from the decay); returns how many there were. decay == 1: no decay. */
long l2o_apply(long n, float *p, float *u, float lr, float decay) {
    long bad = 0;
    for (long i = 0; i < n; i++) {
        float x = u[i];
        if (!__builtin_isfinite(x)) {
            x = 0.f;
            u[i] = 0.f;
            bad++;
        }
        p[i] = (decay == 1.f ? p[i] : p[i] * decay) + lr * x;
    }
    return bad;
}

/* The update formula alone over n entries (tests/test_step_math.py compares it
 * with l2o/update_rule.py). */
int l2o_finish(long n, const float *dir, const float *log_step, const float *adam, float nominal, float c,
               float *out) {
    for (long i = 0; i < n; i += VB) {
        const int nv = n - i < VB ? (int)(n - i) : VB;
        store(out + i, finish(load(dir + i, nv), load(log_step + i, nv), load(adam + i, nv), nominal, c), nv);
    }
    return 0;
}

/* The feature layout this library was built with, so the loader can check it. */
void l2o_layout(long *out) {
    out[0] = NF;
    out[1] = NM;
    out[2] = ROW_P;
    out[3] = ROW_G;
    out[4] = ROW_M0;
    out[5] = ROW_ADAM;
    out[6] = ROW_SQRT_V;
}

/* Whether l2o_gmn_pass can keep edge states as half floats (HALF_STATES). */
int l2o_half_states(void) { return HALF_STATES; }

/* The widths this library was built for (0: not built in), so the loader can check them. */
void l2o_sizes(long *out) {
    out[0] = NF;
#ifdef DE
    out[1] = DE;
    out[2] = HID;
#else
    out[1] = out[2] = 0;
#endif
#ifdef MH
    out[3] = MH;
#else
    out[3] = 0;
#endif
}

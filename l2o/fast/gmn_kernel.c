/* Fused dense-block passes of the chunked GMN step (l2o/fast/gmn.py).
 *
 * The torch version of a pass streams every intermediate of an edge ([DE] or
 * [HID] floats) through memory once per op. Here one edge's whole chain --
 * encode, message, aggregate, state update, or the read-out -- stays in
 * registers, so a pass reads an edge's inputs once and writes its outputs
 * once. Vectorised across VB neighbouring columns of a row of a dense block
 * (l2o/graph/blocks.py: edge (i, j) sits at flat index i * C + j; the row
 * fixes one end node, the column the other).
 *
 * Sizes are compile-time (the metanetwork's widths, -DDE -DNF -DHID), so the
 * small loops unroll fully; l2o/fast/native.py builds one library per size.
 * Feature-major layout throughout: row d of an [D, n] table at t + d * ld.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if !defined(DE) || !defined(NF) || !defined(HID)
#error "compile with -DDE=<edge_dim> -DNF=<features> -DHID=<hidden>"
#endif
#ifndef VB
#define VB 8
#endif
static const float ONES[VB] = {[0 ... VB - 1] = 1.f};

/* One message-passing round over one dense block:
 *   enc = x given ? relu(W_enc x + static) : e
 *   m   = relu(W_msg enc + row_t[:, i] + col_t[:, g(i) * C + j])
 *   e   = enc + m;  row_acc[:, i] += m;  col_acc[:, g(i) * C + j] += m
 */
typedef struct {
    const float *x;                 /* NF feature rows (stride ld), or NULL after the first round */
    const float *w_enc;             /* [DE][NF] */
    const float *stat;              /* static term at stat[d * stat_ld + i * stat_rs + j] */
    long stat_ld, stat_rs;
    const float *w_msg;             /* [DE][DE] */
    const float *row_t, *col_t;     /* [DE][R], [DE][G * C] */
    float *e;                       /* DE edge-state rows (stride ld) */
    long ld;
    float *row_acc, *col_acc;       /* [DE][R], [DE][G * C]; added to */
    long rows, cols, per_group;
} round_args;

/* Read-out over one dense block:
 *   z = relu(W_z [e; x] + row_t[:, i] + col_t[:, g(i) * C + j])
 *   (d, s) = head_w z + head_b
 *   update = (d - nominal * x[adam_row]) * exp(c * (2 sigmoid(s) - 1))
 */
typedef struct {
    const float *e, *x;             /* DE edge-state rows and NF feature rows (stride ld) */
    long ld;
    const float *w_z;               /* [HID][DE + NF] */
    const float *row_t, *col_t;     /* [HID][R], [HID][G * C] (bias folded in) */
    const float *head_w;            /* [2][HID] */
    float head_b0, head_b1, nominal, c;
    long adam_row;
    float *update;
    long rows, cols, per_group;
} readout_args;

/* VB lanes of neighbouring columns (GCC/clang vector extension: one AVX
 * register for VB = 8; narrower targets split it). A partial block at a
 * row's end goes through zero-padded copies. */
typedef float vf __attribute__((vector_size(VB * sizeof(float))));
typedef int vi __attribute__((vector_size(VB * sizeof(int))));
#define INLINE static inline __attribute__((always_inline))

INLINE vf load(const float *p, int nv) {
    vf r = {0};
    memcpy(&r, p, (size_t)nv * sizeof(float));
    return r;
}
INLINE void store(float *p, vf v, int nv) { memcpy(p, &v, (size_t)nv * sizeof(float)); }
INLINE vf splat(float x) {
    vf r;
    for (int v = 0; v < VB; v++) r[v] = x;
    return r;
}
INLINE vf relu(vf x) { return (vf)((vi)x & (x > 0)); }
INLINE vf blend(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }

/* exp over the lanes (libm's expf does not vectorise portably): Cody-Waite
 * range reduction x = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-6
 * minimax polynomial for e^r; relative error ~2 ulp. */
INLINE vf vexp(vf x) {
    x = blend(x > 88.f, splat(88.f), blend(x < -87.f, splat(-87.f), x));
    vf fx = x * 1.44269504088896341f + 0.5f;
    vf n = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
    n = blend(n > fx, n - 1.f, n);                       /* floor */
    x = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf y = 1.9875691500e-4f * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  /* 2^n */
    return y * (vf)bits;
}

/* A tile is T vectors: TC = T * VB neighbouring columns of one row. */
#ifndef T
#define T 2
#endif
#define TC (T * VB)
#ifndef GROUP
#define GROUP 2  /* output rows per register block of affine() */
#endif

INLINE int lanes(int nv, int t) { return nv - t * VB < 0 ? 0 : nv - t * VB > VB ? VB : nv - t * VB; }

/* out[d] += w[d, :] in, d < D, for one tile: GROUP output rows at a time so
 * GROUP * T accumulators stay in registers while each input vector is
 * loaded once per group (the register blocking of a GEMM micro-kernel). */
INLINE void affine(const int D, const int K, const float *restrict w, vf in[][T], vf out[][T]) {
#pragma GCC unroll 16
    for (int d0 = 0; d0 < D; d0 += GROUP) {
        const int nd = D - d0 < GROUP ? D - d0 : GROUP;
        vf acc[GROUP][T];
#pragma GCC unroll 16
        for (int dd = 0; dd < nd; dd++)
            for (int t = 0; t < T; t++) acc[dd][t] = out[d0 + dd][t];
#pragma GCC unroll 64
        for (int k = 0; k < K; k++)
#pragma GCC unroll 16
            for (int dd = 0; dd < nd; dd++) {
                const float wv = w[(d0 + dd) * K + k];
                for (int t = 0; t < T; t++) acc[dd][t] += wv * in[k][t];
            }
#pragma GCC unroll 16
        for (int dd = 0; dd < nd; dd++)
            for (int t = 0; t < T; t++) out[d0 + dd][t] = acc[dd][t];
    }
}

/* A pass streams ~20 rows at once, more than the hardware prefetchers
 * follow: each tile asks for the same rows PREFETCH floats further on. */
#ifndef PREFETCH
#define PREFETCH (4 * TC)
#endif

/* rows [0, n) of a feature-major table at p (stride ld) into a tile */
INLINE void load_rows(const int n, const float *p, long ld, int nv, vf out[][T]) {
#pragma GCC unroll 64
    for (int r = 0; r < n; r++) {
        __builtin_prefetch(p + r * ld + PREFETCH, 0, 0);
        for (int t = 0; t < T; t++) out[r][t] = load(p + r * ld + t * VB, lanes(nv, t));
    }
}

INLINE void round_tile(const round_args *a, long i, long j0, int nv, float *col_acc, vf racc[][T]) {
    const long base = i * a->cols + j0, col_ld = (a->rows / a->per_group) * a->cols;
    const long gc = (i / a->per_group) * a->cols + j0;
    vf enc[DE][T], m[DE][T];
    if (a->x) {
        vf x[NF][T];
        load_rows(NF, a->x + base, a->ld, nv, x);
        load_rows(DE, a->stat + i * a->stat_rs + j0, a->stat_ld, nv, enc);
        affine(DE, NF, a->w_enc, x, enc);
#pragma GCC unroll 64
        for (int d = 0; d < DE; d++)
            for (int t = 0; t < T; t++) enc[d][t] = relu(enc[d][t]);
    } else {
        load_rows(DE, a->e + base, a->ld, nv, enc);
    }
    load_rows(DE, a->col_t + gc, col_ld, nv, m);
#pragma GCC unroll 64
    for (int d = 0; d < DE; d++)
        for (int t = 0; t < T; t++) m[d][t] += a->row_t[d * a->rows + i];
    affine(DE, DE, a->w_msg, enc, m);
#pragma GCC unroll 64
    for (int d = 0; d < DE; d++) {
        float *ca = col_acc + d * col_ld + gc, *eo = a->e + d * a->ld + base;
        __builtin_prefetch(eo + PREFETCH, 1, 0);
        for (int t = 0; t < T; t++) {
            const int n = lanes(nv, t);
            vf mv = relu(m[d][t]);
            if (n < VB) mv *= load(ONES, n);  /* padded lanes must not reach the row sums */
            racc[d][t] += mv;
            store(ca + t * VB, load(ca + t * VB, n) + mv, n);
            store(eo + t * VB, enc[d][t] + mv, n);
        }
    }
}

static void round_rows(const round_args *a, long r0, long r1, float *col_acc) {
    for (long i = r0; i < r1; i++) {
        vf racc[DE][T];
        for (int d = 0; d < DE; d++)
            for (int t = 0; t < T; t++) racc[d][t] = splat(0.f);
        long j = 0;
        for (; j + TC <= a->cols; j += TC) round_tile(a, i, j, TC, col_acc, racc);
        if (j < a->cols) round_tile(a, i, j, (int)(a->cols - j), col_acc, racc);
        for (int d = 0; d < DE; d++) {
            vf sum = racc[d][0];
            for (int t = 1; t < T; t++) sum += racc[d][t];
            float s = 0.f;
            for (int v = 0; v < VB; v++) s += sum[v];
            a->row_acc[d * a->rows + i] += s;
        }
    }
}

INLINE void readout_tile(const readout_args *a, long i, long j0, int nv) {
    const long base = i * a->cols + j0, col_ld = (a->rows / a->per_group) * a->cols;
    const long gc = (i / a->per_group) * a->cols + j0;
    vf in[DE + NF][T], z[HID][T];
    load_rows(DE, a->e + base, a->ld, nv, in);
    load_rows(NF, a->x + base, a->ld, nv, in + DE);
    load_rows(HID, a->col_t + gc, col_ld, nv, z);
#pragma GCC unroll 64
    for (int h = 0; h < HID; h++)
        for (int t = 0; t < T; t++) z[h][t] += a->row_t[h * a->rows + i];
    affine(HID, DE + NF, a->w_z, in, z);
    vf dir[T], ls[T];
    for (int t = 0; t < T; t++) { dir[t] = splat(a->head_b0); ls[t] = splat(a->head_b1); }
#pragma GCC unroll 64
    for (int h = 0; h < HID; h++)
        for (int t = 0; t < T; t++) {
            const vf zr = relu(z[h][t]);
            dir[t] += a->head_w[h] * zr;
            ls[t] += a->head_w[HID + h] * zr;
        }
    for (int t = 0; t < T; t++) {
        const int n = lanes(nv, t);
        const long at = base + t * VB;
        /* c tanh(s / c) with the head's 2 / c folded in: 2c sigmoid(s') - c */
        const vf magnitude = vexp(2.f * a->c / (1.f + vexp(-ls[t])) - a->c);
        store(a->update + at, (dir[t] - a->nominal * load(a->x + a->adam_row * a->ld + at, n)) * magnitude, n);
    }
}

static void readout_rows(const readout_args *a, long r0, long r1) {
    for (long i = r0; i < r1; i++) {
        long j = 0;
        for (; j + TC <= a->cols; j += TC) readout_tile(a, i, j, TC);
        if (j < a->cols) readout_tile(a, i, j, (int)(a->cols - j));
    }
}

/* ------------------------------------------------------------ threading */

#ifndef MIN_EDGES_PER_THREAD
#define MIN_EDGES_PER_THREAD 32768
#endif

typedef struct {
    const void *args;
    long r0, r1;
    float *col_acc;                 /* this thread's column sums (round only) */
    int readout;
} job;

static void *run_job(void *p) {
    const job *jb = p;
    if (jb->readout)
        readout_rows(jb->args, jb->r0, jb->r1);
    else
        round_rows(jb->args, jb->r0, jb->r1, jb->col_acc);
    return NULL;
}

/* Rows split evenly over `threads` (the caller passes torch's thread count);
 * each extra thread sums its columns privately, added in after the join. */
static int run_parallel(const void *args, long rows, long cols, long col_len, float *col_acc, int readout,
                        int threads) {
    /* starting a thread costs tens of microseconds: one per MIN_EDGES_PER_THREAD edges at most */
    if (threads > rows * cols / MIN_EDGES_PER_THREAD) threads = (int)(rows * cols / MIN_EDGES_PER_THREAD);
    if (threads > rows) threads = (int)rows;
    if (threads < 1) threads = 1;
    job jobs[64];
    pthread_t tid[64];
    if (threads > 64) threads = 64;
    float *priv = NULL;
    if (!readout && threads > 1) {
        priv = calloc((size_t)(threads - 1) * col_len, sizeof(float));
        if (!priv) threads = 1;
    }
    int started = 0, status = 0;
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job){args, rows * t / threads, rows * (t + 1) / threads,
                        t == 0 || readout ? col_acc : priv + (size_t)(t - 1) * col_len, readout};
    }
    for (int t = 1; t < threads; t++) {
        if (pthread_create(&tid[t], NULL, run_job, &jobs[t]) != 0) break;
        started = t;
    }
    run_job(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(tid[t], NULL);
    for (int t = started + 1; t < threads; t++) run_job(&jobs[t]);  /* threads that failed to start */
    if (priv) {
        for (int t = 1; t < threads; t++)
            for (long k = 0; k < col_len; k++) col_acc[k] += priv[(size_t)(t - 1) * col_len + k];
        free(priv);
    }
    return status;
}

int l2o_gmn_round(const float *x, const float *w_enc, const float *stat, long stat_ld, long stat_rs,
                  const float *w_msg, const float *row_t, const float *col_t, float *e, long ld,
                  float *row_acc, float *col_acc, long rows, long cols, long per_group, int threads) {
    const round_args a = {x, w_enc, stat, stat_ld, stat_rs, w_msg, row_t, col_t, e, ld,
                          row_acc, col_acc, rows, cols, per_group};
    return run_parallel(&a, rows, cols, DE * (rows / per_group) * cols, col_acc, 0, threads);
}

int l2o_gmn_readout(const float *e, const float *x, long ld, const float *w_z, const float *row_t,
                    const float *col_t, const float *head_w, float head_b0, float head_b1, float nominal,
                    float c, long adam_row, float *update, long rows, long cols, long per_group, int threads) {
    const readout_args a = {e, x, ld, w_z, row_t, col_t, head_w, head_b0, head_b1, nominal, c, adam_row,
                            update, rows, cols, per_group};
    return run_parallel(&a, rows, cols, 0, NULL, 1, threads);
}

/* The sizes this library was built for, so the loader can check them. */
void l2o_gmn_sizes(long *out) { out[0] = DE; out[1] = NF; out[2] = HID; }

"""CUDA kernels of the CuPy backend, each the GPU version of one NumPy reference method.

| kernel                    | reference (agpt/backend/reference.py)        |
| ------------------------- | -------------------------------------------- |
| `tree_attention`          | `NumpyBackend.tree_attention`                |
| `tree_attention_backward` | `NumpyBackend.tree_attention_backward`       |
| `layernorm`               | `NumpyBackend.layernorm`                     |
| `layernorm_backward`      | `NumpyBackend.layernorm_backward`            |
| `rope`                    | `NumpyBackend.rope`                          |
| `embedding_backward`      | `NumpyBackend.scatter_add` (token rows)      |
| `add_bias`, `bias_relu`, `relu_backward`, `gather_rows` | `NumpyBackend.add_bias`, `.bias_relu`, `.relu_backward`, `.gather_rows` |
| `qkv_heads`, `qkv_heads_backward` | `NumpyBackend.qkv_heads`, `.qkv_heads_backward` |
| `linear_relu`, `relu_linear_backward`, `add_linear`, `qkv_projection` (thin_gemm) | `NumpyBackend.linear_relu`, `.relu_linear_backward`, `.add_linear`, `.qkv_projection` |
| `xent_counts`             | `NumpyBackend.xent_counts`                   |
| `optimizer_update`        | `agpt.train.optim.Optimizer.update` (generic) |

Scoped attention never gathers ancestors. It works on tiles of consecutive rows in depth-first
preorder, one block per (tile, head): the union of the contexts of rows [a, a + T) is those
rows plus a's ancestors (an ancestor before a of a tile row is an ancestor of a, subtrees being
contiguous), so a block loads the K/V of at most T + D - 1 "slots" into shared memory once and
every row walks its ancestors there, root first (the lanes of a warp then mostly read the same
slot: broadcasts). The backward keeps p and ds of every (level, row) pair in shared memory and
sums the K/V gradients level by level: in preorder the rows under one ancestor of depth j + 1
are that ancestor and the deeper rows after it, so one thread per (level, dk or dv, part of E)
sweeps the tile rows with a running sum in registers, reading each row as a broadcast, and
stores each sum once. Only ancestors of a later tile's first row (under D per tile) get
contributions from several tiles; those are summed over tiles in float64 (atomics), so their
order changes nothing at fp32 precision. The tiles (each one's first-row ancestors, the
boundary rows) are laid out on the host where a unit is prepared: agpt/gpu/tiles.py.
Kernels are compiled per (H, E, D, element type) on first use (float32 or float64).
"""

from __future__ import annotations

import functools
from typing import Any

import cupy as cp

from agpt.gpu.tiles import TileLayout

_ATTENTION = r"""
#define FULL 0xffffffffu
#define NW (TILE / 32)
static_assert(TILE % 32 == 0 && TILE <= 256, "tiles of whole warps, slots in 16 bits");
// elements per 16-byte chunk; smem rows padded by 16 bytes so that the rows read by 8
// consecutive lanes (one 128-byte wavefront of 16-byte loads) fall on distinct banks
#if VEC
#define CW (16 / (int)sizeof(T))
#define EP (E + CW)
#else
#define CW 1
#define EP (E + 1)
#endif

// one head's E values of a row, global (read-only path) or shared, into registers
__device__ __forceinline__ void ldg_row(const float* __restrict__ p, float* r) {
#if VEC
#pragma unroll
    for (int e = 0; e < E; e += 4) {
        const float4 t = __ldg(reinterpret_cast<const float4*>(p + e));
        r[e] = t.x; r[e + 1] = t.y; r[e + 2] = t.z; r[e + 3] = t.w;
    }
#else
#pragma unroll
    for (int e = 0; e < E; ++e) r[e] = __ldg(p + e);
#endif
}
__device__ __forceinline__ void ldg_row(const double* __restrict__ p, double* r) {
#if VEC
#pragma unroll
    for (int e = 0; e < E; e += 2) {
        const double2 t = __ldg(reinterpret_cast<const double2*>(p + e));
        r[e] = t.x; r[e + 1] = t.y;
    }
#else
#pragma unroll
    for (int e = 0; e < E; ++e) r[e] = __ldg(p + e);
#endif
}
__device__ __forceinline__ void lds_row(const float* p, float* r) {
#if VEC
#pragma unroll
    for (int e = 0; e < E; e += 4) {
        const float4 t = *reinterpret_cast<const float4*>(p + e);
        r[e] = t.x; r[e + 1] = t.y; r[e + 2] = t.z; r[e + 3] = t.w;
    }
#else
#pragma unroll
    for (int e = 0; e < E; ++e) r[e] = p[e];
#endif
}
__device__ __forceinline__ void lds_row(const double* p, double* r) {
#if VEC
#pragma unroll
    for (int e = 0; e < E; e += 2) {
        const double2 t = *reinterpret_cast<const double2*>(p + e);
        r[e] = t.x; r[e + 1] = t.y;
    }
#else
#pragma unroll
    for (int e = 0; e < E; ++e) r[e] = p[e];
#endif
}

__device__ __forceinline__ void stg_row(float* p, const float* r) {
#if VEC
#pragma unroll
    for (int e = 0; e < E; e += 4)
        *reinterpret_cast<float4*>(p + e) = make_float4(r[e], r[e + 1], r[e + 2], r[e + 3]);
#else
#pragma unroll
    for (int e = 0; e < E; ++e) p[e] = r[e];
#endif
}
__device__ __forceinline__ void stg_row(double* p, const double* r) {
#if VEC
#pragma unroll
    for (int e = 0; e < E; e += 2) *reinterpret_cast<double2*>(p + e) = make_double2(r[e], r[e + 1]);
#else
#pragma unroll
    for (int e = 0; e < E; ++e) p[e] = r[e];
#endif
}

// global -> shared copy of one chunk (CW elements), asynchronous where the chip has it
__device__ __forceinline__ void copy_chunk(T* dst, const T* __restrict__ src) {
#if VEC && __CUDA_ARCH__ >= 800
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(s), "l"(src));
#else
#pragma unroll
    for (int e = 0; e < CW; ++e) dst[e] = src[e];
#endif
}
__device__ __forceinline__ void copy_wait() {
#if VEC && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

__device__ __forceinline__ T dot(const T* a, const T* b) {
    T s0 = (T)0, s1 = (T)0;          // two chains: half the dependent FMA latency
#pragma unroll
    for (int e = 0; e < E; e += 2) { s0 += a[e] * b[e]; if (e + 1 < E) s1 += a[e + 1] * b[e + 1]; }
    return s0 + s1;
}

// K and V of head h of the block's slots into shared memory: slot t < TILE is row a + t
// (t < rows), slot TILE + j is a's ancestor at depth j + 1 (j < na).
__device__ __forceinline__ void load_slots(
    const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ anc,
    const long long a, const int rows, const int na, const int h, T* Ks, T* Vs)
{
    for (int c = threadIdx.x; c < (TILE + na) * (E / CW); c += TILE) {
        const int s = c / (E / CW), part = c % (E / CW);
        if (s >= rows && s < TILE) continue;
        const long long r = s < TILE ? a + s : (long long)anc[s - TILE];
        const long long off = (r * H + h) * E + part * CW;
        copy_chunk(Ks + s * EP + part * CW, k + off);
        copy_chunk(Vs + s * EP + part * CW, v + off);
    }
}

// parent slot of tile row t (depth dep, parent row p): its own tile row, a's ancestor at
// depth dep - 1 (an ancestor of t before a is an ancestor of a: subtrees are contiguous), none
__device__ __forceinline__ int parent_slot(const int p, const long long a, const int dep) {
    return p < 0 ? -1 : (p >= a ? (int)(p - a) : TILE + dep - 2);
}

// A[j * TILE + t] = the slot of tile row t's ancestor at depth j + 1 (j < dep). The walks
// then go root first: the lanes of a warp (consecutive rows in preorder) read the same
// shallow ancestors at the same step, so most shared-memory reads of K/V are broadcasts.
__device__ __forceinline__ void ancestor_table(const int* ps, const int dep, unsigned short* A) {
    int s = threadIdx.x;
    for (int j = dep - 1; j >= 0; --j) { A[j * TILE + threadIdx.x] = (unsigned short)s; s = ps[s]; }
}

// Block (tile, head): o[i,h] = softmax over i's ancestors r (and i) of (q_i . k_r) * scale,
// applied to v_r; lse[i,h] = the log of the softmax denominator. The union of the contexts
// of rows [a, a + TILE) is those rows plus a's ancestors, so each row walks its parent
// slots in shared memory, with an online softmax.
extern "C" __global__ void __launch_bounds__(TILE) tree_attn_fwd(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const int* __restrict__ parent, const int* __restrict__ depth,
    const int* __restrict__ tile_anc, const int n, const int dm, const T scale,
    T* __restrict__ o, T* __restrict__ lse)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int S = TILE + dm - 1;
    T* Ks = reinterpret_cast<T*>(smem);
    T* Vs = Ks + S * EP;
    int* ps = reinterpret_cast<int*>(Vs + S * EP);
    unsigned short* A = reinterpret_cast<unsigned short*>(ps + S);
    const int tile = blockIdx.x / H, h = blockIdx.x % H, t = threadIdx.x;
    const long long a = (long long)tile * TILE;
    const int rows = (int)min((long long)TILE, n - a);
    const int na = depth[a] - 1;
    load_slots(k, v, tile_anc + (long long)tile * dm, a, rows, na, h, Ks, Vs);
    const long long i = a + t;
    int dep = 0;
    T qr[E];
    if (t < rows) {
        dep = depth[i];
        ps[t] = parent_slot(parent[i], a, dep);
        ldg_row(q + (i * H + h) * E, qr);
    }
    for (int j = t; j < na; j += TILE) ps[TILE + j] = j ? TILE + j - 1 : -1;
    __syncthreads();
    ancestor_table(ps, dep, A);
    copy_wait();
    __syncthreads();
    if (t >= rows) return;
    T acc[E], kr[E], vr[E];
#pragma unroll
    for (int e = 0; e < E; ++e) { qr[e] *= scale; acc[e] = (T)0; }
    T m = (T)-1e30, l = (T)0;       // exp(m - s) underflows to 0 at the first slot
    for (int j = 0; j < dep; ++j) {
        const int s = A[j * TILE + t];
        lds_row(Ks + s * EP, kr);
        lds_row(Vs + s * EP, vr);
        const T sc = dot(qr, kr);
        // one exp: the new maximum rescales either the old sum (c) or the new term (p)
        const T x = exp(-fabs(sc - m));
        const bool up_m = sc > m;
        const T c = up_m ? x : (T)1, p = up_m ? (T)1 : x;
        m = up_m ? sc : m;
        l = l * c + p;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = acc[e] * c + p * vr[e];
    }
    const T inv = (T)1 / l;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= inv;
    stg_row(o + (i * H + h) * E, acc);
    lse[i * H + h] = m + log(l);
}

// Phase 2 (K/V gradients) splits E: task (level j, dk or dv, part) sums EC elements.
constexpr int NS = (E % (2 * CW) == 0) ? 2 : 1;
constexpr int EC = E / NS;
struct __align__(2 * sizeof(T)) PDs { T p, ds; };

// PD index of (level j, tile row r): rows XOR-swizzled by j so that the tasks of 8
// consecutive levels reading one row's entries hit distinct banks
__device__ __forceinline__ int pd_at(const int j, const int r) { return j * TILE + (r ^ (j & 15)); }

// EC elements (one part of a row): shared to registers, registers to global
__device__ __forceinline__ void lds_part(const T* p, T* r) {
#pragma unroll
    for (int e = 0; e < EC; e += CW) {
#if VEC
        if (sizeof(T) == 4) {
            const float4 t = *reinterpret_cast<const float4*>(p + e);
            r[e] = t.x; r[e + 1] = t.y; r[e + 2] = t.z; r[e + 3] = t.w;
        } else {
            const double2 t = *reinterpret_cast<const double2*>(p + e);
            r[e] = t.x; r[e + 1] = t.y;
        }
#else
        r[e] = p[e];
#endif
    }
}

// the complete K/V gradient part of slot s from this block: a plain store when every row
// that attends to it is in the tile (side < 0), else float64 atomics into its boundary-row slot
__device__ __forceinline__ void put_part(const int s, const T* acc, const T mul, const int h,
    const int part, const int* rowof, const int* side, T* __restrict__ dst, double* __restrict__ dstb)
{
    const int b = side[s];
    T x[EC];
#pragma unroll
    for (int e = 0; e < EC; ++e) x[e] = acc[e] * mul;
    if (b < 0) {
        T* p = dst + ((long long)rowof[s] * H + h) * E + part * EC;
#pragma unroll
        for (int e = 0; e < EC; e += CW) {
#if VEC
            if (sizeof(T) == 4)
                *reinterpret_cast<float4*>(p + e) = make_float4(x[e], x[e + 1], x[e + 2], x[e + 3]);
            else
                *reinterpret_cast<double2*>(p + e) = make_double2(x[e], x[e + 1]);
#else
            p[e] = x[e];
#endif
        }
    } else {
        double* p = dstb + ((long long)b * H + h) * E + part * EC;
#pragma unroll
        for (int e = 0; e < EC; ++e) atomicAdd(p + e, (double)x[e]);
    }
}

// Block (tile, head). Phase 1, one thread per row: each row walks its slots root first (K/V
// in shared memory, mostly broadcasts), accumulates dq and keeps p and ds of every (row,
// level) pair in shared memory (PD). Phase 2, the K/V gradients: the tile rows' Q and dO
// replace the slots' K/V in shared memory and each thread takes one (level j, dk or dv, part
// of E) task: it sweeps the tile rows in order; in depth-first preorder the rows that attend to
// one slot of level j (depth j + 1) are that row and the following rows deeper than j + 1,
// so the sum of the current slot is kept in registers, a row of depth j + 1 starts the next
// slot, and every read of a row is a broadcast. Rows whose every descendant is in the tile get
// a plain store; the others (ancestors of a tile's first row) are summed over tiles in float64
// (dkb/dvb, zeroed, indexed by bidx) and copied out by tree_attn_side. With `truncated`, row
// i's K/V get only i's own term (phase 1 stores it; no phase 2).
extern "C" __global__ void __launch_bounds__(TILE) tree_attn_bwd(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ o, const T* __restrict__ dout, const T* __restrict__ lse,
    const int* __restrict__ parent, const int* __restrict__ depth,
    const int* __restrict__ tile_anc, const int* __restrict__ bidx,
    const int n, const int dm, const T scale, const int truncated,
    T* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv,
    double* __restrict__ dkb, double* __restrict__ dvb)
{
    extern __shared__ __align__(16) unsigned char smem[];
    const int S = TILE + dm - 1;
    T* Ks = reinterpret_cast<T*>(smem);
    T* Vs = Ks + S * EP;
    // offsets from smem (not pointer casts) keep every access a shared-memory instruction
    unsigned short* A = reinterpret_cast<unsigned short*>(
        smem + ((2 * S * EP * (int)sizeof(T) + 15) & ~15));
    T* Qs = Ks;                          // phase 2: over the slots' K/V (and A); Ds shifted by
    T* Ds = Qs + TILE * E + CW;          // one chunk so that Q and dO parts use distinct banks
    PDs* PD = reinterpret_cast<PDs*>(A + dm * TILE);          // (dm, TILE), not if truncated
    int* deps = reinterpret_cast<int*>(PD + (truncated ? 0 : dm * TILE));   // 0 past the rows
    int* ps = deps + TILE;
    int* side = ps + S;
    int* rowof = side + S;

    const int tile = blockIdx.x / H, h = blockIdx.x % H, t = threadIdx.x;
    const long long a = (long long)tile * TILE;
    const int rows = (int)min((long long)TILE, n - a);
    const int na = depth[a] - 1;
    const int* anc = tile_anc + (long long)tile * dm;
    load_slots(k, v, anc, a, rows, na, h, Ks, Vs);
    const long long i = a + t;
    int dep = 0;
    T qr[E], dor[E], kr[E], vr[E], L = (T)0, di = (T)0;
    if (t < rows) {
        dep = depth[i];
        ps[t] = parent_slot(parent[i], a, dep);
        rowof[t] = (int)i;
        side[t] = truncated ? -1 : bidx[i];
        L = lse[i * H + h];
        ldg_row(q + (i * H + h) * E, qr);
        ldg_row(dout + (i * H + h) * E, dor);
        ldg_row(o + (i * H + h) * E, kr);
        di = dot(dor, kr);               // the same dot as dp: o = v exactly gives ds = 0
    }
    deps[t] = dep;
    for (int j = t; j < na; j += TILE) {
        ps[TILE + j] = j ? TILE + j - 1 : -1;
        rowof[TILE + j] = anc[j];
        side[TILE + j] = bidx[anc[j]];
    }
    __syncthreads();
    ancestor_table(ps, dep, A);
    copy_wait();
    __syncthreads();
    if (t < rows) {
        T dqa[E];
#pragma unroll
        for (int e = 0; e < E; ++e) dqa[e] = (T)0;
        for (int j = 0; j < dep; ++j) {
            const int s = A[j * TILE + t];
            lds_row(Ks + s * EP, kr);
            lds_row(Vs + s * EP, vr);
            const T p = exp(dot(qr, kr) * scale - L);
            const T ds = p * (dot(dor, vr) - di);
#pragma unroll
            for (int e = 0; e < E; ++e) dqa[e] += ds * kr[e];
            if (!truncated) {
                PDs w; w.p = p; w.ds = ds;
                PD[pd_at(j, t)] = w;
            } else if (j == dep - 1) {      // s == t: the row's own K/V term
                T ck[E], cv[E];
#pragma unroll
                for (int e = 0; e < E; ++e) { ck[e] = ds * scale * qr[e]; cv[e] = p * dor[e]; }
                stg_row(dk + (i * H + h) * E, ck);
                stg_row(dv + (i * H + h) * E, cv);
            }
        }
#pragma unroll
        for (int e = 0; e < E; ++e) dqa[e] *= scale;
        stg_row(dq + (i * H + h) * E, dqa);
    }
    if (truncated) return;               // uniform over the block
    __syncthreads();                     // K/V and A read: the rows' Q and dO go there
    if (t >= rows) {                     // rows past the last: zeros (weighted by 0 below)
#pragma unroll
        for (int e = 0; e < E; ++e) { qr[e] = (T)0; dor[e] = (T)0; }
    }
    stg_row(Qs + t * E, qr);
    stg_row(Ds + t * E, dor);
    __syncthreads();
    for (int u = t; u < dm * 2 * NS; u += TILE) {
        const int j = u / (2 * NS), kind = (u / NS) & 1, part = u % NS;   // kind 1: dv
        const T* X = (kind ? Ds : Qs) + part * EC;
        const PDs* P = PD + j * TILE;
        const int sw = j & 15;           // pd_at(j, r) == j * TILE + (r ^ sw)
        const T mul = kind ? (T)1 : scale;
        T* dst = kind ? dv : dk;
        double* dstb = kind ? dvb : dkb;
        int cur = j < na ? TILE + j : -1;
        T acc[EC];
#pragma unroll
        for (int e = 0; e < EC; ++e) acc[e] = (T)0;
        // rows not under level j (depth <= j, or past the last row) add 0 * (a finite value)
        for (int r0 = 0; r0 < rows; r0 += 4) {
            const int4 d4 = *reinterpret_cast<const int4*>(deps + r0);
            if (max(max(d4.x, d4.y), max(d4.z, d4.w)) <= j) continue;   // no row under level j
            const int dd[4] = {d4.x, d4.y, d4.z, d4.w};
            T c[4], x[4][EC];            // all loads of the 4 rows first, then the sums
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                const PDs w = P[(r0 + m) ^ sw];
                c[m] = dd[m] > j ? (kind ? w.p : w.ds) : (T)0;
                lds_part(X + (r0 + m) * E, x[m]);
            }
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                if (dd[m] == j + 1) {    // row r0 + m starts slot r0 + m of level j
                    if (cur >= 0) put_part(cur, acc, mul, h, part, rowof, side, dst, dstb);
                    cur = r0 + m;
#pragma unroll
                    for (int e = 0; e < EC; ++e) acc[e] = (T)0;
                }
#pragma unroll
                for (int e = 0; e < EC; ++e) acc[e] += c[m] * x[m][e];
            }
        }
        if (cur >= 0) put_part(cur, acc, mul, h, part, rowof, side, dst, dstb);
    }
}

// the float64 sums of the boundary rows (brow[b], b < nb) into dk, dv
extern "C" __global__ void tree_attn_side(
    const double* __restrict__ dkb, const double* __restrict__ dvb, const int* __restrict__ brow,
    const long long total, T* __restrict__ dk, T* __restrict__ dv)
{
    const long long x = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (x >= total) return;
    const long long b = x / (H * E), c = x % (H * E);
    if (brow[b] < 0) return;                 // padding (host_tiles with a fixed capacity)
    const long long off = (long long)brow[b] * (H * E) + c;
    dk[off] = (T)dkb[x];
    dv[off] = (T)dvb[x];
}
"""

_LAYERNORM = r"""
#define FULL 0xffffffffu
#define NPL ((D + 31) / 32)

__device__ __forceinline__ T warp_sum(T x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL, x, o);
    return x;
}

// one warp per row: y = xhat * g + b, xhat = (x - mean) * rstd
extern "C" __global__ void ln_fwd(
    const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ b,
    const long long n, const T eps,
    T* __restrict__ y, T* __restrict__ xhat, T* __restrict__ rstd)
{
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n) return;
    const T* xr = x + row * D;
    T t[NPL];
    T s = (T)0;
#pragma unroll
    for (int u = 0; u < NPL; ++u) {
        const int c = lane + 32 * u;
        t[u] = c < D ? xr[c] : (T)0;
        s += t[u];
    }
    const T mu = warp_sum(s) / D;
    T ss = (T)0;
#pragma unroll
    for (int u = 0; u < NPL; ++u) {
        const int c = lane + 32 * u;
        t[u] = c < D ? t[u] - mu : (T)0;
        ss += t[u] * t[u];
    }
    const T rs = (T)1 / sqrt(warp_sum(ss) / D + eps);
#pragma unroll
    for (int u = 0; u < NPL; ++u) {
        const int c = lane + 32 * u;
        if (c < D) {
            const T xh = t[u] * rs;
            xhat[row * D + c] = xh;
            y[row * D + c] = xh * g[c] + b[c];
        }
    }
    if (lane == 0) rstd[row] = rs;
}

// dx per row (one warp per row, grid-stride), written or (acc) added to dx, the residual
// stream's gradient; dg, db summed per lane, then one atomic per column per warp into them.
extern "C" __global__ void ln_bwd(
    const T* __restrict__ dy, const T* __restrict__ xhat, const T* __restrict__ rstd,
    const T* __restrict__ g, const long long n, const int acc,
    T* __restrict__ dx, T* __restrict__ dg, T* __restrict__ db)
{
    const int lane = threadIdx.x & 31;
    const long long warps = ((long long)gridDim.x * blockDim.x) >> 5;
    T ag[NPL], ab[NPL], gg[NPL];
#pragma unroll
    for (int u = 0; u < NPL; ++u) {
        const int c = lane + 32 * u;
        ag[u] = (T)0; ab[u] = (T)0; gg[u] = c < D ? g[c] : (T)0;
    }
    for (long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5; row < n;
         row += warps) {
        T d[NPL], xh[NPL];
        T s1 = (T)0, s2 = (T)0;
#pragma unroll
        for (int u = 0; u < NPL; ++u) {
            const int c = lane + 32 * u;
            const T dyv = c < D ? dy[row * D + c] : (T)0;
            xh[u] = c < D ? xhat[row * D + c] : (T)0;
            ag[u] += dyv * xh[u];
            ab[u] += dyv;
            d[u] = dyv * gg[u];
            s1 += d[u];
            s2 += d[u] * xh[u];
        }
        const T m1 = warp_sum(s1) / D, m2 = warp_sum(s2) / D, rs = rstd[row];
#pragma unroll
        for (int u = 0; u < NPL; ++u) {
            const int c = lane + 32 * u;
            if (c < D) {
                const T v = rs * (d[u] - m1 - xh[u] * m2);
                dx[row * D + c] = acc ? dx[row * D + c] + v : v;
            }
        }
    }
#pragma unroll
    for (int u = 0; u < NPL; ++u) {
        const int c = lane + 32 * u;
        if (c < D) { atomicAdd(dg + c, ag[u]); atomicAdd(db + c, ab[u]); }
    }
}
"""

_EMBEDDING = r"""
// dst[tok[row], c] += src[row, c]: summed per block in shared memory (V * D floats), then
// one global atomic per nonzero entry per block, instead of n * D atomics on V * D addresses.
extern "C" __global__ void embed_bwd(
    const long long* __restrict__ tok, const T* __restrict__ src, const long long n,
    const int V, const int D, T* __restrict__ dst)
{
    extern __shared__ T acc[];
    for (int t = threadIdx.x; t < V * D; t += blockDim.x) acc[t] = (T)0;
    __syncthreads();
    const long long total = n * D;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        atomicAdd(acc + tok[idx / D] * D + idx % D, src[idx]);
    }
    __syncthreads();
    for (int t = threadIdx.x; t < V * D; t += blockDim.x)
        if (acc[t] != (T)0) atomicAdd(dst + t, acc[t]);
}
"""

_XENT = r"""
#define FULL 0xffffffffu

// one warp per output row: d = softmax(logits) * row_coef, lt = row_coef * logsumexp
extern "C" __global__ void xent_rows(
    const T* __restrict__ logits, const T* __restrict__ row_coef, const long long m,
    const int V, T* __restrict__ d, T* __restrict__ lt)
{
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= m) return;
    const T* x = logits + row * V;
    T mx = x[0];                          // V >= 1
    for (int c = lane; c < V; c += 32) mx = fmax(mx, x[c]);
    for (int o = 16; o > 0; o >>= 1) mx = fmax(mx, __shfl_xor_sync(FULL, mx, o));
    T s = (T)0;
    for (int c = lane; c < V; c += 32) s += exp(x[c] - mx);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(FULL, s, o);
    const T f = row_coef[row] / s;
    for (int c = lane; c < V; c += 32) d[row * V + c] = exp(x[c] - mx) * f;
    if (lane == 0) lt[row] = row_coef[row] * (log(s) + mx);
}

// one thread per target (row, token), unique pairs: its logit term, and -coef on d there
extern "C" __global__ void xent_targets(
    const T* __restrict__ logits, const long long* __restrict__ row,
    const long long* __restrict__ token, const T* __restrict__ coef, const long long k,
    const int V, T* __restrict__ d, T* __restrict__ tt)
{
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= k) return;
    const long long at = row[t] * V + token[t];
    tt[t] = coef[t] * logits[at];
    d[at] -= coef[t];
}
"""


@functools.cache
def _module(source: str, **defines: Any) -> cp.RawModule:
    head = "".join(f"#define {k} {v}\n" for k, v in defines.items())
    return cp.RawModule(code=head + source, options=("--std=c++17",))


def _ctype(dtype: Any) -> str:
    if dtype == cp.float32:
        return "float"
    if dtype == cp.float64:
        return "double"
    raise TypeError(f"no kernel for {dtype}")


def _attention_module(dtype: Any, h: int, e: int, tile: int) -> cp.RawModule:
    return _module(_ATTENTION, H=h, E=e, T=_ctype(dtype), TILE=tile,
                   VEC=int(e * cp.dtype(dtype).itemsize % 16 == 0))


@functools.cache
def _attention_fn(dtype: Any, h: int, e: int, tile: int, name: str) -> Any:
    fn = _attention_module(dtype, h, e, tile).get_function(name)
    # all of L1 as shared memory: blocks per SM are bounded by shared memory, and the kernels
    # read global memory once (cp.async into shared memory), so they need little L1
    fn.preferred_shared_memory_carveout = 100
    return fn


def _blocks(threads: int, per_block: int) -> int:
    return max(1, (threads + per_block - 1) // per_block)


def _launch(fn: Any, smem: int, grid: int, block: int, args: tuple) -> None:
    if smem > 48 * 1024:        # opt in to more than the default 48 KB of shared memory
        fn.max_dynamic_shared_size_bytes = smem
    fn((grid,), (block,), args, shared_mem=smem)


def _pad(e: int, itemsize: int) -> int:       # EP of the kernel source: padded row length
    return e + 16 // itemsize if e * itemsize % 16 == 0 else e + 1


def tree_attention(q: Any, k: Any, v: Any, parent: Any, depth: Any, tiles: TileLayout):
    """(o, lse) of attention over each row's ancestors; q, k, v (N, H, E) contiguous."""
    n, h, e = q.shape
    o = cp.empty_like(q)
    lse = cp.empty((n, h), dtype=q.dtype)
    if n:
        tile, dm, isz = tiles.tile, tiles.max_depth, q.dtype.itemsize
        slots = tile + dm - 1
        smem = 2 * slots * _pad(e, isz) * isz + 4 * slots + 2 * dm * tile
        _launch(_attention_fn(q.dtype, h, e, tile, "tree_attn_fwd"), smem, len(tiles.anc) * h, tile,
                (q, k, v, parent, depth, tiles.anc, cp.int32(n), cp.int32(dm),
                 q.dtype.type(e ** -0.5), o, lse))
    return o, lse


def tree_attention_backward(do: Any, q: Any, k: Any, v: Any, o: Any, lse: Any, parent: Any,
                            depth: Any, tiles: TileLayout, truncated: bool):
    """(dq, dk, dv); dk/dv sum every descendant's contribution (or only the row's own)."""
    n, h, e = q.shape
    dq, dk, dv = cp.empty_like(q), cp.empty_like(q), cp.empty_like(q)
    if n:
        tile, dm, isz = tiles.tile, tiles.max_depth, q.dtype.itemsize
        slots, ep = tile + dm - 1, _pad(e, isz)
        nb = 0 if truncated else len(tiles.brow)
        dkb = cp.zeros((max(nb, 1), h, e), dtype=cp.float64)
        dvb = cp.zeros((max(nb, 1), h, e), dtype=cp.float64)
        pd = 0 if truncated else 2 * dm * tile        # (p, ds) of every (level, row)
        smem = isz * (2 * slots * ep + pd) + 16 + 2 * dm * tile + 4 * (3 * slots + tile)
        _launch(_attention_fn(q.dtype, h, e, tile, "tree_attn_bwd"), smem, len(tiles.anc) * h, tile,
                (q, k, v, o, do, lse, parent, depth, tiles.anc, tiles.bidx, cp.int32(n),
                 cp.int32(dm), q.dtype.type(e ** -0.5), cp.int32(int(truncated)),
                 dq, dk, dv, dkb, dvb))
        if nb:
            total = nb * h * e
            _attention_fn(q.dtype, h, e, tile, "tree_attn_side")(
                (_blocks(total, 256),), (256,), (dkb, dvb, tiles.brow, cp.int64(total), dk, dv))
    return dq, dk, dv


def layernorm(x: Any, g: Any, b: Any, eps: float):
    """(y, (xhat, rstd)) for x (N, D) contiguous, one warp per row."""
    n, d = x.shape
    y, xhat = cp.empty_like(x), cp.empty_like(x)
    rstd = cp.empty((n,), dtype=x.dtype)
    if n:
        fn = _module(_LAYERNORM, D=d, T=_ctype(x.dtype)).get_function("ln_fwd")
        fn((_blocks(n * 32, 256),), (256,),
           (x, g, b, cp.int64(n), x.dtype.type(eps), y, xhat, rstd))
    return y, (xhat, rstd)


def layernorm_backward(dy: Any, cache: tuple, g: Any, dg: Any, db: Any, dx: Any = None):
    """dx (added into `dx` when given); dg, db added into the given (D,) arrays."""
    xhat, rstd = cache
    n, d = dy.shape
    acc = dx is not None
    if dx is None:
        dx = cp.empty_like(dy)
    if n:
        fn = _module(_LAYERNORM, D=d, T=_ctype(dy.dtype)).get_function("ln_bwd")
        blocks = min(_blocks(n * 32, 256), 4 * _sm_count())
        fn((blocks,), (256,), (dy, xhat, rstd, g, cp.int64(n), cp.int32(acc), dx, dg, db))
    return dx


_ROPE_PAIR = """
    const int row = i / he2, m = i % e2, p = pos[row];
    const T c = ct[p * e2 + m], s = sign * st[p * e2 + m];
"""

_rope = cp.ElementwiseKernel(
    "raw T x, raw int32 pos, raw T ct, raw T st, int32 he2, int32 e2, T sign", "raw T y",
    _ROPE_PAIR + """
    const T a = x[2 * i], b = x[2 * i + 1];
    y[2 * i] = a * c - b * s;
    y[2 * i + 1] = a * s + b * c;
    """, "agpt_rope")


def rope(x: Any, pos: Any, cos_tab: Any, sin_tab: Any, inverse: bool) -> Any:
    """Rotate pairs of x (N, H, E) by pos * theta_m, with cos/sin tables (P, E/2)."""
    n, h, e = x.shape
    y = cp.empty_like(x)
    if n:
        _rope(x, pos, cos_tab, sin_tab, cp.int32(h * e // 2), cp.int32(e // 2),
              x.dtype.type(-1.0 if inverse else 1.0), y, size=n * h * e // 2)
    return y


# Thread i handles one adjacent pair (2c, 2c+1) of the row's 3d columns [q | k | v]; a pair
# never straddles two parts (E is even). q and k pairs rotate by pos * theta_m.
_qkv_fwd = cp.ElementwiseKernel(
    "raw T x, raw T bias, raw int32 pos, raw T ct, raw T st, int32 d, int32 e2", "raw T q, raw T k, raw T v",
    """
    const int w = 3 * d / 2, row = i / w, c = 2 * (i % w), part = c / d, cc = c % d;
    const T a = x[(long long)row * 3 * d + c] + bias[c];
    const T b = x[(long long)row * 3 * d + c + 1] + bias[c + 1];
    T y0 = a, y1 = b;
    if (part < 2) {
        const int m = (cc / 2) % e2, p = pos[row];
        const T co = ct[p * e2 + m], si = st[p * e2 + m];
        y0 = a * co - b * si;
        y1 = a * si + b * co;
    }
    T* out = part == 0 ? &q[0] : part == 1 ? &k[0] : &v[0];
    out[(long long)row * d + cc] = y0;
    out[(long long)row * d + cc + 1] = y1;
    """, "agpt_qkv_fwd")

# The inverse: gradients of q, k (rotated back), v -> one (N, 3d) array; dk and dv may be the
# attention backward's float64 accumulators (cast here instead of in a separate pass).
_qkv_bwd = cp.ElementwiseKernel(
    "raw T dq, raw K dk, raw K dv, raw int32 pos, raw T ct, raw T st, int32 d, int32 e2", "raw T g",
    """
    const int w = 3 * d / 2, row = i / w, c = 2 * (i % w), part = c / d, cc = c % d;
    const long long src = (long long)row * d + cc;
    T a, b;
    if (part == 0) { a = dq[src]; b = dq[src + 1]; }
    else if (part == 1) { a = (T)dk[src]; b = (T)dk[src + 1]; }
    else { a = (T)dv[src]; b = (T)dv[src + 1]; }
    T y0 = a, y1 = b;
    if (part < 2) {
        const int m = (cc / 2) % e2, p = pos[row];
        const T co = ct[p * e2 + m], si = st[p * e2 + m];
        y0 = a * co + b * si;
        y1 = b * co - a * si;
    }
    g[(long long)row * 3 * d + c] = y0;
    g[(long long)row * 3 * d + c + 1] = y1;
    """, "agpt_qkv_bwd")


def qkv_heads(qkv: Any, bias: Any, pos: Any, cos_tab: Any, sin_tab: Any, n_heads: int):
    """q, k, v (N, H, E) from qkv (N, 3d) contiguous: bias added, q and k rotated."""
    n, d3 = qkv.shape
    d = d3 // 3
    q, k, v = (cp.empty((n, n_heads, d // n_heads), dtype=qkv.dtype) for _ in range(3))
    if n:
        _qkv_fwd(qkv, bias, pos, cos_tab, sin_tab, cp.int32(d), cp.int32(d // n_heads // 2),
                 q, k, v, size=n * d3 // 2)
    return q, k, v


def qkv_heads_backward(dq: Any, dk: Any, dv: Any, pos: Any, cos_tab: Any, sin_tab: Any) -> Any:
    """(N, 3d) gradient of the fused projection from dq (N, H, E) and dk, dv (any float type)."""
    n, h, e = dq.shape
    g = cp.empty((n, 3 * h * e), dtype=dq.dtype)
    if n:
        _qkv_bwd(dq, dk, dv, pos, cos_tab, sin_tab, cp.int32(h * e), cp.int32(e // 2), g,
                 size=n * 3 * h * e // 2)
    return g


_ROWS = r"""
// With VEC, 16-byte vectors: a row of C columns is C / VN vectors (VN = 4 floats or 2
// doubles); else single elements (VN = 1).
#if VEC
template <typename S> struct V16;
template <> struct V16<float> { typedef float4 t; enum { n = 4 }; };
template <> struct V16<double> { typedef double2 t; enum { n = 2 }; };
typedef V16<T>::t VT;
#define VN V16<T>::n
#else
typedef T VT;
#define VN 1
#endif

// out[row, :] = table[idx[row], :] (the token embedding).
extern "C" __global__ void gather_rows(const VT* table, const long long* idx, VT* out,
                                       long long n, int cv) {
    const int c = threadIdx.x;
    for (long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y; r < n;
         r += (long long)gridDim.x * blockDim.y)
        out[r * cv + c] = table[idx[r] * cv + c];
}

// x[row, :] += b, then relu if asked, in place. Threads: (column vector, row lane).
extern "C" __global__ void add_bias(VT* x, const VT* b, long long n, int cv, int relu) {
    const int c = threadIdx.x;
    const VT bv = b[c];
    const T* q = (const T*)&bv;
    for (long long r = (long long)blockIdx.x * blockDim.y + threadIdx.y; r < n;
         r += (long long)gridDim.x * blockDim.y) {
        VT v = x[r * cv + c];
        T* p = (T*)&v;
#pragma unroll
        for (int k = 0; k < VN; ++k) {
            const T s = p[k] + q[k];
            p[k] = relu ? (s > (T)0 ? s : (T)0) : s;
        }
        x[r * cv + c] = v;
    }
}

// d = d where r > 0 else 0 (in place), and per block the column sums of the result
// (part[block, :]); the caller sums the blocks' rows. Block b owns rows [b*rpb, (b+1)*rpb).
extern "C" __global__ void relu_back_db(VT* d, const VT* r, T* part, long long n, int cv,
                                        long long rpb) {
    extern __shared__ unsigned char smem[];
    T* sh = (T*)smem;
    const int c = threadIdx.x, y = threadIdx.y;
    const long long r0 = (long long)blockIdx.x * rpb, r1 = min(n, r0 + rpb);
    T acc[VN];
#pragma unroll
    for (int k = 0; k < VN; ++k) acc[k] = (T)0;
    for (long long row = r0 + y; row < r1; row += blockDim.y) {
        VT g = d[row * cv + c];
        const VT m = r[row * cv + c];
        T* p = (T*)&g;
        const T* q = (const T*)&m;
#pragma unroll
        for (int k = 0; k < VN; ++k) {
            p[k] = q[k] > (T)0 ? p[k] : (T)0;
            acc[k] += p[k];
        }
        d[row * cv + c] = g;
    }
#pragma unroll
    for (int k = 0; k < VN; ++k) sh[(y * cv + c) * VN + k] = acc[k];
    __syncthreads();
    if (y == 0) {
#pragma unroll
        for (int k = 0; k < VN; ++k) {
            T s = (T)0;
            for (int j = 0; j < (int)blockDim.y; ++j) s += sh[(j * cv + c) * VN + k];
            part[(long long)blockIdx.x * cv * VN + c * VN + k] = s;
        }
    }
}
"""

_THIN = r"""
// Y (N, NC) = epilogue(X (N, KD) @ B), B (KD, NC) = W, or W^T for a (NC, KD) W with TRANS_B:
// products with a thin inner dimension (d_model, or d_ff for the FFN's second layer) whose
// whole B fits in shared memory, with the bandwidth-bound pass that would follow each done
// on the tile in registers:
//   EPI 1: Y = relu(acc + bias)                       (the FFN's first layer)
//   EPI 2: Y = acc where R > 0 else 0, and per block the column sums of Y in part[block, :]
//          (the gradient at that layer's pre-activation, and its bias gradient)
//   EPI 3: Y += acc + bias                            (a residual branch: wo, ff2)
//   EPI 4: acc + bias split into q | k | v (Y, Y2, Y3; NC = 3 DQ), q and k rotated by RoPE
//          (adjacent pairs, angle pos[row] * theta_m from the tables ct, st of E2 columns)
// Blocks of 4 warps loop over tiles of TM rows, reading X in chunks of KC columns. A warp's
// lanes are LR rows x LC column groups; a thread owns RT = 8 rows (interleaved by LR, so the
// LR rows a warp reads at once fall on distinct banks) and CT = CG x VW columns: group g,
// vector c at column g*LC*VW + lc*VW + c (consecutive 8- or 16-byte vectors across lanes).
#define LR (32 / LC)
#define CG (NC / (LC * VW))
#define CT (CG * VW)
#define RT 8
#define TM (4 * LR * RT)
#define KC (KD < 64 ? KD : 64)
#define XP (KC + 4)
// past 64 inner columns B is streamed in chunks of KC rows beside X's (three blocks per SM
// instead of two, whose loads and products then overlap better)
#define BCH (KD > KC)
static_assert(NC % (LC * VW) == 0 && KD % KC == 0 && KC % 4 == 0 && 32 % LC == 0 &&
              (VW == 2 || VW == 4) && !(BCH && TRANS_B), "thin_gemm shape");

__device__ __forceinline__ void ldv(const float* p, float* r) {
#if VW == 4
    const float4 t = *reinterpret_cast<const float4*>(p);
    r[0] = t.x; r[1] = t.y; r[2] = t.z; r[3] = t.w;
#else
    const float2 t = *reinterpret_cast<const float2*>(p);
    r[0] = t.x; r[1] = t.y;
#endif
}
__device__ __forceinline__ void ldgv(const float* p, float* r) {
#if VW == 4
    const float4 t = __ldg(reinterpret_cast<const float4*>(p));
    r[0] = t.x; r[1] = t.y; r[2] = t.z; r[3] = t.w;
#else
    const float2 t = __ldg(reinterpret_cast<const float2*>(p));
    r[0] = t.x; r[1] = t.y;
#endif
}
__device__ __forceinline__ void stv(float* p, const float* r) {
#if VW == 4
    *reinterpret_cast<float4*>(p) = make_float4(r[0], r[1], r[2], r[3]);
#else
    *reinterpret_cast<float2*>(p) = make_float2(r[0], r[1]);
#endif
}

extern "C" __global__ void __launch_bounds__(128)
thin_gemm(const float* __restrict__ X, const float* __restrict__ W,
          const float* __restrict__ bias, const float* __restrict__ R, float* Y,
          float* __restrict__ part, const int* __restrict__ pos, const float* __restrict__ ct,
          const float* __restrict__ st, float* __restrict__ Y2, float* __restrict__ Y3,
          long long n) {
    extern __shared__ float4 smem4[];
    float* Bs = reinterpret_cast<float*>(smem4);      // [KD or KC][NC]
    float* Xs = Bs + (BCH ? KC : KD) * NC;            // [TM][XP]
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int lc = lane % LC, lr = lane / LC;
#if BCH
#elif TRANS_B
    for (int i = tid; i < NC * KD / 4; i += 128) {
        const int j = i / (KD / 4), k = (i % (KD / 4)) * 4;
        const float4 v = __ldg(reinterpret_cast<const float4*>(W) + i);
        Bs[(k + 0) * NC + j] = v.x; Bs[(k + 1) * NC + j] = v.y;
        Bs[(k + 2) * NC + j] = v.z; Bs[(k + 3) * NC + j] = v.w;
    }
#else
    for (int i = tid; i < KD * NC / 4; i += 128)
        smem4[i] = __ldg(reinterpret_cast<const float4*>(W) + i);
#endif
#if EPI == 2
    float cs[CT];
#pragma unroll
    for (int j = 0; j < CT; ++j) cs[j] = 0.f;
#else
    float bv[CT];
#pragma unroll
    for (int g = 0; g < CG; ++g) ldgv(bias + g * LC * VW + lc * VW, bv + g * VW);
#endif
    for (long long t0 = (long long)blockIdx.x * TM; t0 < n; t0 += (long long)gridDim.x * TM) {
        float acc[RT][CT];
#pragma unroll
        for (int i = 0; i < RT; ++i)
#pragma unroll
            for (int j = 0; j < CT; ++j) acc[i][j] = 0.f;
        for (int kc = 0; kc < KD; kc += KC) {
            __syncthreads();                          // B stored; the last chunk consumed
#if BCH
            for (int i = tid; i < KC * NC / 4; i += 128)
                smem4[i] = __ldg(reinterpret_cast<const float4*>(W + kc * NC) + i);
#endif
            for (int i = tid; i < TM * KC / 4; i += 128) {
                const int r = i / (KC / 4), q = i % (KC / 4);
                float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
                if (t0 + r < n) v = __ldg(reinterpret_cast<const float4*>(X + (t0 + r) * KD + kc) + q);
                *reinterpret_cast<float4*>(Xs + r * XP + 4 * q) = v;
            }
            __syncthreads();
            const float* xw = Xs + (w * LR * RT + lr) * XP;
            const float* bw = Bs + (BCH ? 0 : kc * NC) + lc * VW;
#pragma unroll 2
            for (int k = 0; k < KC; k += 4) {
                float4 a[RT];
#pragma unroll
                for (int i = 0; i < RT; ++i) a[i] = *reinterpret_cast<const float4*>(xw + i * LR * XP + k);
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    float b[CT];
#pragma unroll
                    for (int g = 0; g < CG; ++g) ldv(bw + (k + kk) * NC + g * LC * VW, b + g * VW);
#pragma unroll
                    for (int i = 0; i < RT; ++i) {
                        const float av = reinterpret_cast<const float*>(&a[i])[kk];
#pragma unroll
                        for (int j = 0; j < CT; ++j) acc[i][j] = fmaf(av, b[j], acc[i][j]);
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < RT; ++i) {
            const long long row = t0 + w * LR * RT + i * LR + lr;
            if (row < n) {
#if EPI == 4
                const int p = pos[row];
#endif
#pragma unroll
                for (int g = 0; g < CG; ++g) {
                    const int col = g * LC * VW + lc * VW;
                    float* v = &acc[i][g * VW];
#if EPI == 1
#pragma unroll
                    for (int c = 0; c < VW; ++c) v[c] = fmaxf(v[c] + bv[g * VW + c], 0.f);
                    stv(Y + row * NC + col, v);
#elif EPI == 2
                    float m[VW];
                    ldgv(R + row * NC + col, m);
#pragma unroll
                    for (int c = 0; c < VW; ++c) {
                        v[c] = m[c] > 0.f ? v[c] : 0.f;
                        cs[g * VW + c] += v[c];
                    }
                    stv(Y + row * NC + col, v);
#elif EPI == 3
                    float y[VW];
                    ldv(Y + row * NC + col, y);
#pragma unroll
                    for (int c = 0; c < VW; ++c) v[c] = y[c] + (v[c] + bv[g * VW + c]);
                    stv(Y + row * NC + col, v);
#else
                    const int DQ = NC / 3, which = col / DQ, cc = col % DQ;
#pragma unroll
                    for (int c = 0; c < VW; ++c) v[c] += bv[g * VW + c];
                    if (which < 2) {
#pragma unroll
                        for (int c = 0; c < VW; c += 2) {
                            const int mi = ((cc + c) / 2) % E2;
                            const float co = ct[p * E2 + mi], si = st[p * E2 + mi];
                            const float a0 = v[c], a1 = v[c + 1];
                            v[c] = a0 * co - a1 * si;
                            v[c + 1] = a0 * si + a1 * co;
                        }
                    }
                    stv((which == 0 ? Y : which == 1 ? Y2 : Y3) + row * DQ + cc, v);
#endif
                }
            }
        }
    }
#if EPI == 2
#pragma unroll
    for (int j = 0; j < CT; ++j)
        for (int off = LC; off < 32; off <<= 1) cs[j] += __shfl_xor_sync(0xffffffffu, cs[j], off);
    __syncthreads();                                  // the warps' column sums, then the block's
    float* sh = Bs;
    if (lr == 0)
#pragma unroll
        for (int g = 0; g < CG; ++g)
#pragma unroll
            for (int c = 0; c < VW; ++c) sh[w * NC + g * LC * VW + lc * VW + c] = cs[g * VW + c];
    __syncthreads();
    for (int c = tid; c < NC; c += 128)
        part[(long long)blockIdx.x * NC + c] = sh[c] + sh[NC + c] + sh[2 * NC + c] + sh[3 * NC + c];
#endif
}
"""

_relu_fwd = cp.ElementwiseKernel("T f, T b", "T r", "r = f + b > (T)0 ? f + b : (T)0",
                                 "agpt_bias_relu")
_relu_back = cp.ElementwiseKernel("T d, T r", "T g", "g = r > (T)0 ? d : (T)0", "agpt_relu_back")


def _vector_rows(x: Any, *others: Any) -> tuple[int, int]:
    """(elements per row as the kernels' units, 1 if they are 16-byte vectors else 0) for the
    (N, C) array x and same-typed `others` (a bias, a mask); (0, 0) when the row kernels do
    not apply (layout, dtype, or a row wider than one block)."""
    arrays = (x, *others)
    if (x.ndim != 2 or x.dtype not in (cp.float32, cp.float64)
            or any(a.dtype != x.dtype or not a.flags.c_contiguous for a in arrays)):
        return 0, 0
    n_cols, vn = x.shape[1], 16 // x.itemsize
    if n_cols % vn == 0 and n_cols // vn <= 256 and all(a.data.ptr % 16 == 0 for a in arrays):
        return n_cols // vn, 1
    return (n_cols, 0) if 0 < n_cols <= 256 else (0, 0)


def _row_grid(n: int, cv: int, rows_per_thread: int = 4) -> tuple[tuple[int], tuple[int, int]]:
    ry = max(1, 256 // cv)
    return (max(1, min(_blocks(n, ry * rows_per_thread), 32 * _sm_count())),), (cv, ry)


def _rows_module(dtype: Any, vec: int) -> cp.RawModule:
    return _module(_ROWS, T=_ctype(dtype), VEC=vec)


def add_bias(x: Any, b: Any, relu: bool = False) -> Any:
    """x += b (broadcast over rows), then relu(x) if asked; in place, returns x."""
    cv, vec = _vector_rows(x, b)
    if not cv:
        return _relu_fwd(x, b, x) if relu else cp.add(x, b, out=x)
    if len(x):
        grid, block = _row_grid(len(x), cv)
        _rows_module(x.dtype, vec).get_function("add_bias")(
            grid, block, (x, b, cp.int64(len(x)), cp.int32(cv), cp.int32(int(relu))))
    return x


def bias_relu(f: Any, b: Any) -> Any:
    """relu(f + b), in place in f."""
    return add_bias(f, b, relu=True)


def gather_rows(table: Any, idx: Any) -> Any:
    """table[idx] for a (V, C) table and int64 indices."""
    cv, vec = _vector_rows(table)
    if not cv or idx.dtype != cp.int64:
        return table[idx]
    out = cp.empty((len(idx), table.shape[1]), dtype=table.dtype)
    if len(idx):
        grid, block = _row_grid(len(idx), cv)
        _rows_module(table.dtype, vec).get_function("gather_rows")(
            grid, block, (table, cp.ascontiguousarray(idx), out, cp.int64(len(idx)),
                          cp.int32(cv)))
    return out


def relu_backward(dr: Any, r: Any, col_sums: bool = False) -> tuple[Any, Any]:
    """(dr masked by r > 0, in place; with col_sums, per-block column sums of the result in
    the same pass, else None). The caller sums the partial sums' rows into the bias gradient
    (one small product), which keeps that sum deterministic. None also when the row kernel
    does not apply: then the caller sums the masked array itself."""
    cv, vec = _vector_rows(dr, r)
    if not col_sums or not cv or not len(dr):
        return _relu_back(dr, r, dr), None
    n = len(dr)
    ry = max(1, 256 // cv)
    blocks = max(1, min(_blocks(n, 64), 8 * _sm_count()))
    rpb = -(-n // blocks)
    blocks = -(-n // rpb)
    part = cp.empty((blocks, dr.shape[1]), dtype=dr.dtype)
    _rows_module(dr.dtype, vec).get_function("relu_back_db")(
        (blocks,), (cv, ry), (dr, r, part, cp.int64(n), cp.int32(cv), cp.int64(rpb)),
        shared_mem=ry * cv * (16 if vec else dr.itemsize))
    return dr, part


def _thin_lanes(nc: int) -> tuple[int, int] | None:
    """(VW, LC) of thin_gemm for nc output columns: 16-byte vectors across 32 lanes when
    128 | nc, 8-byte ones for other multiples of 64 (q|k|v: 192), 8 lanes x 4 rows for 64."""
    if nc == 64:
        return 4, 8
    if nc % 128 == 0:
        return 4, 32
    if nc % 64 == 0:
        return 2, 32
    return None


def _thin_geometry(kd: int, nc: int) -> tuple[int, int]:
    """(rows per tile, shared memory bytes) of thin_gemm."""
    lc = (_thin_lanes(nc) or (4, 32))[1]
    tm, kc = 4 * (32 // lc) * 8, min(kd, 64)
    return tm, 4 * (kc * nc + tm * (kc + 4))


def thin_applies(x: Any, w: Any, trans_w: bool, *others: Any) -> bool:
    """Whether thin_gemm takes x (N, K) @ w (K, C), or @ w.T for w (C, K) with trans_w:
    float32, contiguous, 16-byte aligned, K % 4 == 0 (past 64: 64 | K, no trans_w), 64 | C,
    and w (up to 64 of its rows) in shared memory at least twice per SM."""
    arrays = (x, w, *others)
    if any(a.dtype != cp.float32 or not a.flags.c_contiguous or a.data.ptr % 16 for a in arrays):
        return False
    if x.ndim != 2 or w.ndim != 2:
        return False
    kd, nc = x.shape[1], w.shape[0 if trans_w else 1]
    return (w.shape[1 if trans_w else 0] == kd and kd % 4 == 0
            and (kd <= 64 or (kd % 64 == 0 and not trans_w)) and _thin_lanes(nc) is not None
            and 2 * (_thin_geometry(kd, nc)[1] + 1024) <= _smem_per_sm())


@functools.cache
def _thin_fn(kd: int, nc: int, trans_w: bool, epi: int, e2: int = 1) -> tuple[Any, int, int, int]:
    """(kernel, rows per tile, blocks per SM, shared memory bytes)."""
    vw, lc = _thin_lanes(nc) or (4, 32)
    tm, smem = _thin_geometry(kd, nc)
    fn = _module(_THIN, KD=kd, NC=nc, TRANS_B=int(trans_w), EPI=epi, VW=vw, LC=lc,
                 E2=e2).get_function("thin_gemm")
    fn.max_dynamic_shared_size_bytes = smem
    fn.preferred_shared_memory_carveout = 100
    return fn, tm, min(3, _smem_per_sm() // (smem + 1024)), smem


def _thin(x: Any, w: Any, trans_w: bool, epi: int, y: Any = None, *, bias: Any = None,
          r: Any = None, rope: tuple = (), e2: int = 1) -> tuple[Any, Any]:
    n, kd = x.shape
    nc = w.shape[0] if trans_w else w.shape[1]
    fn, tm, per_sm, smem = _thin_fn(kd, nc, trans_w, epi, e2)
    if y is None:
        y = cp.empty((n, nc), dtype=x.dtype)
    blocks = max(1, min(_blocks(n, tm), per_sm * _sm_count()))
    part = cp.empty((blocks, nc), dtype=x.dtype) if epi == 2 else y
    pos, ct, st, y2, y3 = rope or (y, y, y, y, y)
    if n:
        fn((blocks,), (128,),
           (x, w, bias if bias is not None else y, r if r is not None else y, y, part,
            pos, ct, st, y2, y3, cp.int64(n)), shared_mem=smem)
    return y, part


def linear_relu(x: Any, w: Any, b: Any) -> Any:
    """relu(x @ w + b) in one pass (thin_applies(x, w, False, b) must hold)."""
    return _thin(x, w, False, 1, bias=b)[0]


def relu_linear_backward(dy: Any, w: Any, r: Any) -> tuple[Any, Any]:
    """((dy @ w.T) where r > 0 else 0, per-block column sums of it): the gradient at
    relu(x @ w.T + b)'s pre-activation and the partial sums of its bias gradient."""
    return _thin(dy, w, True, 2, r=r)


def add_linear(out: Any, x: Any, w: Any, b: Any) -> Any:
    """out += x @ w + b in one pass over out (thin_applies(x, w, False, b, out))."""
    return _thin(x, w, False, 3, out, bias=b)[0]


def qkv_projection(x: Any, w: Any, b: Any, pos: Any, cos_tab: Any, sin_tab: Any,
                   n_heads: int) -> tuple[Any, Any, Any]:
    """qkv_heads(x @ w, b, ...) in one pass: q, k, v (N, H, E), q and k rotated."""
    n, d = len(x), w.shape[1] // 3
    e = d // n_heads
    q, k, v = (cp.empty((n, n_heads, e), dtype=x.dtype) for _ in range(3))
    _thin(x, w, False, 4, q, bias=b, rope=(pos, cos_tab, sin_tab, k, v), e2=e // 2)
    return q, k, v


# A whole optimizer update in two kernels and a memset (reference: Optimizer.update, generic
# array code: ~10 CuPy operations, ~250 us of host time per update against ~30 us of GPU time,
# which left the GPU idle at every per-partition update). `sumsq` sums g^2 in double precision
# (one atomic per block); `update` normalises by z, clips, steps and zeroes the gradient in one
# pass, every thread forming the clip factor from that sum, and thread 0 writing the finite
# flag, the norm and the loss side by side (the host reads them back in one transfer). Scalar
# factors are formed in double precision by the caller, as in the reference. `decay` = lr x
# the decoupled weight decay (adamw, rmsprop, sgd, momentum); `l2` is adam's decay added to
# the gradient.
_UPDATE = r"""
extern "C" __global__ void sumsq(const T* __restrict__ g, long long n, double* out) {
    double s = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const double x = (double)g[i];
        s += x * x;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    __shared__ double part[32];
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        s = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (threadIdx.x == 0) atomicAdd(out, s);
    }
}

extern "C" __global__ void update(T* __restrict__ p, T* __restrict__ g, T* __restrict__ m,
        T* __restrict__ v, long long n, const double* __restrict__ ss, const T* __restrict__ loss,
        T z, T clip, T lr, T decay, T l2, T b1, T omb1, T b2, T omb2, T c1, T c2, T eps,
        double* __restrict__ stats) {
    const double s = *ss / ((double)z * (double)z);       // |g / z|^2
    const T norm = (T)sqrt(s);
    T f = (T)1;
    if (clip > (T)0) {
        const T c = clip / (norm + (T)1e-12);
        f = c < (T)1 ? c : (T)1;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        stats[0] = isfinite(*loss) && isfinite((T)s) ? 1.0 : 0.0;
        stats[1] = (double)norm;
        stats[2] = (double)*loss;
    }
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        T gi = g[i] / z;
        if (clip > (T)0) gi *= f;
        T pi = p[i];
        pi -= decay * pi;
#if OPT == 0        /* sgd */
        pi -= lr * gi;
#elif OPT == 1      /* momentum */
        const T mi = m[i] * b1 + gi;
        m[i] = mi;
        pi -= lr * mi;
#elif OPT == 2      /* adam, adamw */
        gi += l2 * pi;
        const T mi = m[i] * b1 + omb1 * gi;
        const T vi = v[i] * b2 + omb2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        pi -= lr * (mi / c1) / (sqrt(vi / c2) + eps);
#else               /* rmsprop */
        const T vi = v[i] * b2 + omb2 * gi * gi;
        v[i] = vi;
        pi -= lr * gi / (sqrt(vi / c2) + eps);
#endif
        p[i] = pi;
        g[i] = (T)0;
    }
}
"""
_OPT_CODES = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2, "rmsprop": 3}


def optimizer_update(cfg: Any, params: Any, grad: Any, slots: dict[str, Any], lr: float,
                     t: int, z: float, loss_sum: Any) -> Any:
    """Optimizer.update in place (t: this update's 1-based count): grad / z, clipped to
    cfg.clip, one step of cfg.name, grad zeroed; returns its stats (finite flag, norm of
    grad / z, loss_sum) as a float64 device array."""
    T = params.dtype.type
    mod = _module(_UPDATE, T=_ctype(params.dtype), OPT=_OPT_CODES[cfg.name])
    n = params.size
    ss = cp.zeros((), cp.float64)
    stats = cp.empty(3, cp.float64)
    blocks = min(_blocks(n, 256), 4 * _sm_count())
    mod.get_function("sumsq")((blocks,), (256,), (grad, cp.int64(n), ss))
    decay = lr * cfg.weight_decay if cfg.name != "adam" else 0.0
    l2 = cfg.weight_decay if cfg.name == "adam" else 0.0
    c1 = 1 - cfg.beta1 ** t
    c2 = 1 - cfg.beta2 ** t if cfg.name != "rmsprop" or cfg.bias_correction else 1.0
    m, v = slots.get("m", params), slots.get("v", params)   # unused by the rules without them
    loss = cp.asarray(loss_sum, params.dtype)
    mod.get_function("update")(
        (blocks,), (256,),
        (params, grad, m, v, cp.int64(n), ss, loss, T(z), T(cfg.clip), T(lr), T(decay), T(l2),
         T(cfg.beta1), T(1 - cfg.beta1), T(cfg.beta2), T(1 - cfg.beta2), T(c1), T(c2),
         T(cfg.eps), stats))
    return stats


def embedding_backward(dst: Any, tokens: Any, src: Any) -> bool:
    """dst[tokens] += src with per-block shared-memory sums; False if (V, D) does not fit."""
    v, d = dst.shape
    if v * d * dst.itemsize > 48 * 1024 or src.dtype != dst.dtype or tokens.dtype != cp.int64:
        return False
    n = src.shape[0]
    if n:
        fn = _module(_EMBEDDING, T=_ctype(dst.dtype)).get_function("embed_bwd")
        blocks = min(_blocks(n * d, 256), 2 * _sm_count())
        fn((blocks,), (256,), (tokens, src, cp.int64(n), cp.int32(v), cp.int32(d), dst),
           shared_mem=v * d * dst.itemsize)
    return True


def xent_counts(logits: Any, row: Any, token: Any, coef: Any, row_coef: Any):
    """(loss as a 0-d array, dlogits) of count targets: two kernels and two sums instead of
    ~10 CuPy operations."""
    m, v = logits.shape
    k = len(row)
    d = cp.empty_like(logits)
    lt = cp.empty((m,), dtype=logits.dtype)
    tt = cp.empty((k,), dtype=logits.dtype)
    mod = _module(_XENT, T=_ctype(logits.dtype))
    if m:
        mod.get_function("xent_rows")((_blocks(m * 32, 256),), (256,),
                                      (logits, row_coef, cp.int64(m), cp.int32(v), d, lt))
    if k:
        mod.get_function("xent_targets")((_blocks(k, 256),), (256,),
                                         (logits, row, token, coef, cp.int64(k), cp.int32(v),
                                          d, tt))
    return lt.sum() - tt.sum(), d


@functools.cache
def _sm_count() -> int:
    return int(cp.cuda.Device().attributes["MultiProcessorCount"])


@functools.cache
def _smem_per_sm() -> int:
    return int(cp.cuda.Device().attributes["MaxSharedMemoryPerMultiprocessor"])

"""CUDA kernels of the CuPy backend, each the GPU version of one NumPy reference method.

| kernel                    | reference (agpt/backend/reference.py)        |
| ------------------------- | -------------------------------------------- |
| `tree_attention`          | `NumpyBackend.tree_attention`                |
| `tree_attention_backward` | `NumpyBackend.tree_attention_backward`       |
| `layernorm`               | `NumpyBackend.layernorm`                     |
| `layernorm_backward`      | `NumpyBackend.layernorm_backward`            |
| `rope`                    | `NumpyBackend.rope`                          |
| `embedding_backward`      | `NumpyBackend.scatter_add` (token rows)      |
| `bias_relu`, `relu_backward` | `NumpyBackend.bias_relu`, `.relu_backward` |
| `qkv_heads`, `qkv_heads_backward` | `NumpyBackend.qkv_heads`, `.qkv_heads_backward` |
| `xent_counts`             | `NumpyBackend.xent_counts`                   |
| `check_preorder`          | `agpt.model.layout.tree_layout` (validation) |

Scoped attention never gathers ancestors: the thread of (row i, head h) walks i's parent
pointers, so the rows of a trie chunk need only `parent` and `depth` on the device. A warp is
32 consecutive rows of one head. In depth-first preorder the depth-(j+1) ancestors of
consecutive rows form contiguous runs (a subtree is a contiguous range), so in the backward
each warp first sums the K/V gradient contributions of equal ancestors with a segmented
shuffle reduction, and only the first lane of each run adds to global memory: a shallow
ancestor shared by a million rows receives one atomic per warp, not one per row. The
accumulators are float64, so the order of those atomics changes nothing at fp32 precision.
Kernels are compiled per (H, E, D, element type) on first use (float32 or float64).
"""

from __future__ import annotations

import functools
from typing import Any

import cupy as cp

_WARPS = 4          # warps per block (128 threads)

_ATTENTION = r"""
#define FULL 0xffffffffu

// one head's E values of a row, in registers (16-byte loads where the type allows)
__device__ __forceinline__ void load_row(const T* __restrict__ p, T* r) {
#if VEC4
#pragma unroll
    for (int e = 0; e < E; e += 4) {
        const float4 t = __ldg(reinterpret_cast<const float4*>(p) + e / 4);
        r[e] = t.x; r[e + 1] = t.y; r[e + 2] = t.z; r[e + 3] = t.w;
    }
#else
#pragma unroll
    for (int e = 0; e < E; ++e) r[e] = __ldg(p + e);
#endif
}

__device__ __forceinline__ int warp_max(int x) {
    for (int o = 16; o > 0; o >>= 1) x = max(x, __shfl_xor_sync(FULL, x, o));
    return x;
}

// o[i,h] = softmax over i's ancestors r (and i) of (q_i . k_r) * scale, applied to v_r;
// lse[i,h] = the log of the softmax denominator (what the backward needs, with o).
extern "C" __global__ void tree_attn_fwd(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const int* __restrict__ parent, const int* __restrict__ depth, const int n,
    const T scale, T* __restrict__ o, T* __restrict__ lse)
{
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int h = (int)(w % H);
    const long long i = (w / H) * 32 + (threadIdx.x & 31);
    if (i >= n) return;
    T qr[E], acc[E], kr[E], vr[E];
    load_row(q + (i * H + h) * E, qr);
#pragma unroll
    for (int e = 0; e < E; ++e) { qr[e] *= scale; acc[e] = (T)0; }
    T m = (T)-1e30, l = (T)0;       // exp(m - s) underflows to 0 at the first ancestor
    int r = (int)i;
    for (int d = depth[i]; d >= 1; --d) {
        const int up = d > 1 ? __ldg(parent + r) : r;     // in flight while r is used
        load_row(k + ((long long)r * H + h) * E, kr);
        load_row(v + ((long long)r * H + h) * E, vr);
        T s = (T)0;
#pragma unroll
        for (int e = 0; e < E; ++e) s += qr[e] * kr[e];
        const T mn = fmax(m, s), c = exp(m - mn), p = exp(s - mn);
        l = l * c + p;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = acc[e] * c + p * vr[e];
        m = mn;
        r = up;
    }
    const T inv = (T)1 / l;
    T* oi = o + (i * H + h) * E;
#pragma unroll
    for (int e = 0; e < E; ++e) oi[e] = acc[e] * inv;
    lse[i * H + h] = m + log(l);
}

// dq (written) and dk, dv (float64, added into zeroed buffers). Row i's contribution to its
// ancestor r: dk_r += ds_ir * scale * q_i, dv_r += p_ir * do_i; with `truncated`, only r = i.
extern "C" __global__ void tree_attn_bwd(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    const T* __restrict__ o, const T* __restrict__ dout, const T* __restrict__ lse,
    const int* __restrict__ parent, const int* __restrict__ depth, const int n,
    const T scale, const int truncated,
    T* __restrict__ dq, double* __restrict__ dk, double* __restrict__ dv)
{
    const long long w = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    const int h = (int)(w % H);
    const long long i = (w / H) * 32 + lane;
    const bool ok = i < n;
    const long long ii = ok ? i : 0;
    const int dep = ok ? depth[ii] : 0;
    T qr[E], dor[E], dqa[E], kr[E], vr[E];
    T di = (T)0;
    load_row(q + (ii * H + h) * E, qr);
    load_row(dout + (ii * H + h) * E, dor);
    load_row(o + (ii * H + h) * E, kr);
#pragma unroll
    for (int e = 0; e < E; ++e) { dqa[e] = (T)0; di += dor[e] * kr[e]; }
    const T L = lse[ii * H + h];
    const int top = warp_max(dep);          // uniform over the warp: every lane runs each j
    int r = (int)ii;
    for (int j = top - 1; j >= 0; --j) {
        const bool act = j < dep;
        if (act && j < dep - 1) r = __ldg(parent + r);     // i's ancestor at depth j + 1
        T ck[E], cv[E];
        int key = -1;
#pragma unroll
        for (int e = 0; e < E; ++e) { ck[e] = (T)0; cv[e] = (T)0; }
        if (act) {
            load_row(k + ((long long)r * H + h) * E, kr);
            load_row(v + ((long long)r * H + h) * E, vr);
            T s = (T)0, dp = (T)0;
#pragma unroll
            for (int e = 0; e < E; ++e) { s += qr[e] * kr[e]; dp += dor[e] * vr[e]; }
            const T p = exp(s * scale - L);
            const T ds = p * (dp - di);
#pragma unroll
            for (int e = 0; e < E; ++e) dqa[e] += ds * kr[e];
            if (!truncated || j == dep - 1) {
                key = r;
#pragma unroll
                for (int e = 0; e < E; ++e) { ck[e] = ds * scale * qr[e]; cv[e] = p * dor[e]; }
            }
        }
        // runs of equal keys are contiguous: suffix-sum each run into its first lane
        const int nxt = __shfl_down_sync(FULL, key, 1);
        if (__any_sync(FULL, lane < 31 && key >= 0 && nxt == key)) {
#pragma unroll
            for (int off = 1; off < 32; off <<= 1) {
                const int ku = __shfl_down_sync(FULL, key, off);
                const bool take = lane + off < 32 && ku == key;
#pragma unroll
                for (int e = 0; e < E; ++e) {
                    const T a = __shfl_down_sync(FULL, ck[e], off);
                    const T b = __shfl_down_sync(FULL, cv[e], off);
                    if (take) { ck[e] += a; cv[e] += b; }
                }
            }
        }
        const int prv = __shfl_up_sync(FULL, key, 1);
        if (key >= 0 && (lane == 0 || prv != key)) {
            double* dkr = dk + ((long long)key * H + h) * E;
            double* dvr = dv + ((long long)key * H + h) * E;
#pragma unroll
            for (int e = 0; e < E; ++e) {
                atomicAdd(dkr + e, (double)ck[e]);
                atomicAdd(dvr + e, (double)cv[e]);
            }
        }
    }
    if (ok) {
        T* dqi = dq + (i * H + h) * E;
#pragma unroll
        for (int e = 0; e < E; ++e) dqi[e] = dqa[e] * scale;
    }
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


_PREORDER = r"""
// bad[0] = 1 if the rows are not a forest in depth-first preorder: a depth-1 row has parent
// -1; otherwise parent[i] < i has depth[i] - 1, and it is i - 1 or the parent of i - 1's
// ancestor at depth[i] (i's previous sibling), which is what "subtrees are contiguous" means.
extern "C" __global__ void check_preorder(
    const int* __restrict__ parent, const int* __restrict__ depth, const int n,
    int* __restrict__ bad)
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int d = depth[i], p = parent[i];
    bool okk;
    if (d < 1) okk = false;
    else if (d == 1) okk = p == -1;
    else if (p < 0 || p >= i || depth[p] != d - 1) okk = false;
    else if (p == i - 1) okk = true;
    else {
        int s = i - 1;                       // walk up to i's previous sibling
        while (s >= 0 && depth[s] > d) {
            const int ps = parent[s];
            s = (ps < s) ? ps : -1;          // a bad parent of s is reported by s's thread
        }
        okk = s >= 0 && depth[s] == d && parent[s] == p;
    }
    if (!okk) atomicOr(bad, 1);
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


def _attention_module(dtype: Any, h: int, e: int) -> cp.RawModule:
    return _module(_ATTENTION, H=h, E=e, T=_ctype(dtype),
                   VEC4=int(dtype == cp.float32 and e % 4 == 0))


def _blocks(threads: int, per_block: int) -> int:
    return max(1, (threads + per_block - 1) // per_block)


def tree_attention(q: Any, k: Any, v: Any, parent: Any, depth: Any):
    """(o, lse) of attention over each row's ancestors; q, k, v (N, H, E) contiguous."""
    n, h, e = q.shape
    o = cp.empty_like(q)
    lse = cp.empty((n, h), dtype=q.dtype)
    if n:
        threads = ((n + 31) // 32) * 32 * h
        fn = _attention_module(q.dtype, h, e).get_function("tree_attn_fwd")
        fn((_blocks(threads, 32 * _WARPS),), (32 * _WARPS,),
           (q, k, v, parent, depth, cp.int32(n), q.dtype.type(e ** -0.5), o, lse))
    return o, lse


def tree_attention_backward(do: Any, q: Any, k: Any, v: Any, o: Any, lse: Any, parent: Any,
                            depth: Any, truncated: bool):
    """(dq, dk, dv); dk/dv sum every descendant's contribution (or only the row's own)."""
    n, h, e = q.shape
    dq = cp.empty_like(q)
    dk = cp.zeros(q.shape, dtype=cp.float64)
    dv = cp.zeros(q.shape, dtype=cp.float64)
    if n:
        threads = ((n + 31) // 32) * 32 * h
        fn = _attention_module(q.dtype, h, e).get_function("tree_attn_bwd")
        fn((_blocks(threads, 32 * _WARPS),), (32 * _WARPS,),
           (q, k, v, o, do, lse, parent, depth, cp.int32(n), q.dtype.type(e ** -0.5),
            cp.int32(int(truncated)), dq, dk, dv))
    return dq, dk.astype(q.dtype, copy=False), dv.astype(q.dtype, copy=False)


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


bias_relu = cp.ElementwiseKernel("T f, T b", "T r", "r = f + b > (T)0 ? f + b : (T)0",
                                 "agpt_bias_relu")
_relu_back = cp.ElementwiseKernel("T d, T r", "T g", "g = r > (T)0 ? d : (T)0", "agpt_relu_back")


def relu_backward(dr: Any, r: Any) -> Any:
    return _relu_back(dr, r, dr)      # in place: dr is a temporary of the caller


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


def check_preorder(parent: Any, depth: Any) -> Any:
    """A device flag, nonzero if (parent, depth) are not a forest in depth-first preorder."""
    n = len(depth)
    bad = cp.zeros((1,), dtype=cp.int32)
    if n:
        fn = _module(_PREORDER).get_function("check_preorder")
        fn((_blocks(n, 256),), (256,), (parent, depth, cp.int32(n), bad))
    return bad


@functools.cache
def _sm_count() -> int:
    return int(cp.cuda.Device().attributes["MultiProcessorCount"])

// Decode GEMV / small-batch GEMM for GRACE's symmetric group-wise int4 / int8 weights.
//
// Compiled at run time by NVRTC (grace_qat/kernels/cuda_gemv.py), no headers: every instruction
// that needs a type the compiler does not know natively is inline PTX. The Python module defines
// the 16-bit constants (GQ_*) on the command line, computed with torch, so none is typed by hand.
//
// y[m, n] = sum_k x[m, k] * (u[n, k] - Z) * step[n, k / G]     (Z = 8 for int4, 128 for int8)
//
// Work split. Output features come in tiles of 16 rows; input features in chunks of CK (64 for
// int4, 32 for int8), one 512-byte block of packed codes per (tile, chunk): lane l's 16 bytes are
// the A fragments of STEPS (4 / 2) mma.m16n8k16 steps, arranged by the packer so that the
// magic-number conversion yields the fragment registers in order (see cuda_gemv.py: the layout).
// A block owns NT tiles and a range of chunks (blockIdx.y: in-kernel split-K); its warps take
// every W-th chunk of that range. Products run on the tensor cores (fp32 accumulation) with the
// activations as the mma's 8-column B operand (MT of them: M <= 8 * MT); the step of each group
// scales the fp32 partial sum of a chunk (a chunk lies inside one group). Warps add up through
// shared memory; split-K blocks through an fp32 workspace, the last block to finish (a counter
// per tile group, reset by that block) adding the slices in a fixed order, so results do not
// depend on timing.
//
// PDL: the weights and steps of the first batch are requested before griddepcontrol.wait, so the
// weight stream starts while the previous kernel finishes (launch attribute set from Python; the
// instructions are no-ops without it). Activations, workspace, counters and the output are
// touched only after the wait.

typedef unsigned int u32;
typedef unsigned short u16;

struct __align__(16) U4 { u32 x, y, z, w; };

__device__ __forceinline__ U4 ld_weights(const U4* p) {
  U4 r;
  // read once per GEMM: keep it out of L1
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ float f32_of_16(u32 bits16, bool bf) {
  if (bf) return __uint_as_float(bits16 << 16);
  float f;
  unsigned short h = (unsigned short)bits16;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ u16 f16_of_f32(float v, bool bf) {
  unsigned short h;
  if (bf) asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  else asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
}

__device__ __forceinline__ u32 fma2(u32 a, u32 b, u32 c, bool bf) {
  u32 d;
  if (bf) asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  else asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ u32 and_or(u32 a, u32 b, u32 c) {     // (a & b) | c in one LOP3
  u32 d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

// The four A registers of one mma step from the packed words of that step.
// int4: one word; nibble r and nibble r + 4 become register r (low, high half): OR-ing the nibble
// into the mantissa of a 16-bit float of magic value V gives V + u exactly, and one packed FMA
// takes V + Z off (exact: small integers).
// int8: two words, bytes (0, 1) -> register 0 / 2, bytes (2, 3) -> register 1 / 3. fp16: the byte
// into the mantissa of 1024 (as for int4). bf16 has 8 significand bits, too few for 128 + u with
// u up to 255, so each byte becomes 2^23 + u in fp32 (exact), minus 2^23 + 128, packed to bf16x2
// by one rounding conversion that is exact (|q| <= 128).
template <int BITS, bool BF>
__device__ __forceinline__ void codes_to_a(const u32* w, u32 (&a)[4]) {
  if (BITS == 4) {
    const u32 magic = BF ? GQ_BF16_MAGIC2 : GQ_F16_MAGIC2;
    const u32 neg = BF ? GQ_BF16_NEG_I4 : GQ_F16_NEG_I4;
    const u32 one = BF ? GQ_BF16_ONE2 : GQ_F16_ONE2;
#pragma unroll
    for (int r = 0; r < 4; ++r) a[r] = fma2(and_or(w[0] >> (4 * r), 0x000F000Fu, magic), one, neg, BF);
  } else if (!BF) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      a[2 * h] = fma2(prmt(w[h], 0x64646464u, 0x4140u), GQ_F16_ONE2, GQ_F16_NEG_I8, false);
      a[2 * h + 1] = fma2(prmt(w[h], 0x64646464u, 0x4342u), GQ_F16_ONE2, GQ_F16_NEG_I8, false);
    }
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        float lo = __uint_as_float(prmt(w[h], 0x4B000000u, 0x7540u + 2 * p)) - 8388736.0f;
        float hi = __uint_as_float(prmt(w[h], 0x4B000000u, 0x7541u + 2 * p)) - 8388736.0f;
        u32 d;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
        a[2 * h + p] = d;
      }
    }
  }
}

template <bool BF>
__device__ __forceinline__ void mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
  if (BF)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_dependents_launch() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// BITS: 4 or 8. BF: bf16 (else fp16) activations, steps and output. MT: 8-token column tiles of the
// mma (M <= 8 * MT). NT: 16-row output tiles per block. U: chunks per warp per pipeline stage.
template <int BITS, bool BF, int MT, int NT, int U>
__global__ void __launch_bounds__(256) grace_gemv(
    // Only the weights and steps are __restrict__: a load through a restrict pointer may be moved
    // above griddepcontrol.wait (the compiler may assume no other code touches that memory), and
    // the activations, workspace, counters and output must not be touched before it.
    const U4* __restrict__ wq,          // (tiles, C, 32 lanes) x 16 bytes
    const u32* __restrict__ steps,      // (tiles, groups, 8) pairs: rows g and g + 8 of the tile
    const u16* x,                       // (M, K), row stride ldx elements, 16-byte aligned rows
    const u16* bias,                    // (N) or null
    u16* y,                             // (M, N), row stride ldy
    float* ws,                          // (split, M, tiles * 16) fp32 when gridDim.y > 1
    int* counters,                      // (gridDim.x) zeros, left zero
    int M, int N, int tiles, int C, int groups, int group_shift, int ldx, int ldy,
    int chunks_per_split) {
  constexpr int CK = BITS == 4 ? 64 : 32;      // input features per chunk
  constexpr int STEPS = BITS == 4 ? 4 : 2;     // mma steps per chunk
  constexpr int WPS = BITS == 4 ? 1 : 2;       // packed words per step
  constexpr int XV = CK / 32;                  // 16-byte activation loads per lane per chunk (CK / 4 features)
  constexpr int ACC = NT * MT * 4;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile0 = blockIdx.x * NT;
  const int c_lo = blockIdx.y * chunks_per_split;
  const int c_hi = min(C, c_lo + chunks_per_split);
  const int mine = c_hi - c_lo > warp ? (c_hi - c_lo - warp + nwarps - 1) / nwarps : 0;
  const int batches = (mine + U - 1) / U;

  int tile_of[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) tile_of[nt] = min(tile0 + nt, tiles - 1);   // rows past N: not stored

  float acc[NT][MT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[nt][mt][r] = 0.f;

  U4 a_cur[U][NT], a_nxt[U][NT];
  u32 s_cur[U][NT], s_nxt[U][NT];
  U4 x_cur[U][MT][XV], x_nxt[U][MT][XV];

  // Chunk i of this warp is c_lo + warp + nwarps * i. Past its last chunk a batch repeats that
  // chunk (an L2 hit) with the step set to zero: no branch in the loop.
  auto chunk_of = [&](int i) { return c_lo + warp + nwarps * min(i, mine - 1); };
  auto load_w = [&](int b, U4 (&a)[U][NT], u32 (&s)[U][NT]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = chunk_of(b * U + u);
      const bool ok = b * U + u < mine;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        a[u][nt] = ld_weights(wq + ((size_t)tile_of[nt] * C + c) * 32 + lane);
        const u32 st = steps[((size_t)tile_of[nt] * groups + ((c * CK) >> group_shift)) * 8 + g];
        s[u][nt] = ok ? st : 0u;
      }
    }
  };
  auto load_x = [&](int b, U4 (&xv)[U][MT][XV]) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = chunk_of(b * U + u);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int m = mt * 8 + g;
        const U4* p = reinterpret_cast<const U4*>(x + (size_t)min(m, M - 1) * ldx + c * CK + (CK / 4) * t);
#pragma unroll
        for (int v = 0; v < XV; ++v) {
          xv[u][mt][v] = p[v];
          if (m >= M) xv[u][mt][v] = U4{0u, 0u, 0u, 0u};
        }
      }
    }
  };

  if (batches > 0) load_w(0, a_cur, s_cur);
  grid_dependency_wait();
  if (batches > 0) load_x(0, x_cur);

  for (int b = 0; b < batches; ++b) {
    const int bn = min(b + 1, batches - 1);    // the last batch loads itself again (L2), unused
    load_w(bn, a_nxt, s_nxt);
    load_x(bn, x_nxt);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const u32* xw[MT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) xw[mt] = reinterpret_cast<const u32*>(&x_cur[u][mt][0]);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const u32* w = reinterpret_cast<const u32*>(&a_cur[u][nt]);
        float part[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int r = 0; r < 4; ++r) part[mt][r] = 0.f;
#pragma unroll
        for (int s = 0; s < STEPS; ++s) {
          u32 a[4];
          codes_to_a<BITS, BF>(w + s * WPS, a);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma<BF>(part[mt], a, xw[mt][2 * s], xw[mt][2 * s + 1]);
        }
        const float s0 = f32_of_16(s_cur[u][nt] & 0xFFFFu, BF), s1 = f32_of_16(s_cur[u][nt] >> 16, BF);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          acc[nt][mt][0] += part[mt][0] * s0;
          acc[nt][mt][1] += part[mt][1] * s0;
          acc[nt][mt][2] += part[mt][2] * s1;
          acc[nt][mt][3] += part[mt][3] * s1;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) { a_cur[u][nt] = a_nxt[u][nt]; s_cur[u][nt] = s_nxt[u][nt]; }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int v = 0; v < XV; ++v) x_cur[u][mt][v] = x_nxt[u][mt][v];
    }
  }
  grid_dependents_launch();

  // warps 1.. hand their sums to warp 0
  extern __shared__ float red[];               // (nwarps - 1) * ACC * 32
  if (warp > 0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r) red[((warp - 1) * ACC + (nt * MT + mt) * 4 + r) * 32 + lane] = acc[nt][mt][r];
  }
  __syncthreads();
  if (warp == 0) {
    for (int w = 1; w < nwarps; ++w)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[nt][mt][r] += red[((w - 1) * ACC + (nt * MT + mt) * 4 + r) * 32 + lane];
  }

  // warp 0's sums as an (m, n) tile in shared memory; then the whole block writes them out
  constexpr int NB = NT * 16;
  __shared__ float tile[MT * 8 * NB];
  if (warp == 0) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          tile[(mt * 8 + 2 * t + (r & 1)) * NB + nt * 16 + g + 8 * (r >> 1)] = acc[nt][mt][r];
  }
  __syncthreads();
  const int n0 = tile0 * 16, npad = tiles * 16, count = M * NB;
  if (gridDim.y > 1) {
    // every split stores its slice; the last block to arrive adds them in split order
    __shared__ int is_last;
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
      const int m = e / NB, n = n0 + e % NB;
      if (n < npad) ws[((size_t)blockIdx.y * M + m) * npad + n] = tile[m * NB + e % NB];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(&counters[blockIdx.x], 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    for (int e = threadIdx.x; e < count; e += blockDim.x) {
      const int m = e / NB, n = n0 + e % NB;
      float v = 0.f;
      if (n < npad)
        for (int sp = 0; sp < (int)gridDim.y; ++sp) v += __ldcg(ws + ((size_t)sp * M + m) * npad + n);
      tile[m * NB + e % NB] = v;
    }
    if (threadIdx.x == 0) counters[blockIdx.x] = 0;
  }
  for (int e = threadIdx.x; e < count; e += blockDim.x) {
    const int m = e / NB, n = n0 + e % NB;
    if (n < N) {
      float v = tile[m * NB + e % NB];
      if (bias != nullptr) v += f32_of_16(bias[n], BF);
      y[(size_t)m * ldy + n] = f16_of_f32(v, BF);
    }
  }
}

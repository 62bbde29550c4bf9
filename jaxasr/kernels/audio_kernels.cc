// Host-side audio kernels for the data pipeline (plain C ABI, called through ctypes; no JAX).
//
// jaxasr_log_mel: Whisper's log-mel of one clip. The STFT runs a SIMD register's worth of frames
// at a time (16 with AVX-512, 8 with AVX2), one frame per lane: the frames' samples are laid out
// [sample][lane], so every step of the FFT, the power spectrum and the mel filters is one vector
// instruction per operation. The 400-point real FFT is a 200-point complex FFT
// of the even/odd samples (Stockham, radices 4, 2, 5, 5) plus the usual split into 201 bins.
//
// jaxasr_resample: windowed-sinc interpolation at a rational ratio (speed perturbation): each
// output is `taps` input samples weighted by one of `up` precomputed filter phases.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

// Two-vector shuffles with constant indices: __builtin_shufflevector (clang, GCC >= 12), else
// GCC's own __builtin_shuffle.
#ifndef JAXASR_HAS_SHUFFLEVECTOR
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define JAXASR_HAS_SHUFFLEVECTOR 1
#endif
#endif
#endif
#ifndef JAXASR_HAS_SHUFFLEVECTOR
#define JAXASR_HAS_SHUFFLEVECTOR 0
#endif

namespace {

constexpr int kFft = 400;
constexpr int kHop = 160;
constexpr int kPad = kFft / 2;
constexpr int kHalf = kFft / 2;  // the complex FFT's length
constexpr int kBins = kFft / 2 + 1;
// Frames per block: one native SIMD register of float32 (a wider vector type than the hardware's
// is split badly by GCC: scalar broadcasts through the stack).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
constexpr double kPi = 3.14159265358979323846;

// kLanes floats as one value: GCC's vector extension emits one instruction per operation, where
// auto-vectorizing the same loops over a float[kLanes] produced shuffles and gathers.
typedef float Lanes __attribute__((vector_size(4 * kLanes)));

// One Stockham stage: radix r over a span ns (the product of the radices before it).
struct Stage {
  int radix, ns;
  std::vector<float> tw_re, tw_im;  // [N / radix][radix]: twiddle of element r of butterfly j
};

struct Plan {
  std::vector<Stage> stages;
  float window[kFft];                 // periodic Hann
  float split_re[kBins], split_im[kBins];  // e^{-2 pi i k / kFft}, for the real-FFT split
};

const Plan& plan() {
  static const Plan p = [] {
    Plan p;
    int ns = 1;
    for (int radix : {4, 2, 5, 5}) {
      Stage s{radix, ns, {}, {}};
      const int groups = kHalf / radix;
      s.tw_re.resize(groups * radix);
      s.tw_im.resize(groups * radix);
      for (int j = 0; j < groups; ++j)
        for (int r = 0; r < radix; ++r) {
          const double angle = -2.0 * kPi * (j % ns) * r / (ns * radix);
          s.tw_re[j * radix + r] = static_cast<float>(std::cos(angle));
          s.tw_im[j * radix + r] = static_cast<float>(std::sin(angle));
        }
      p.stages.push_back(std::move(s));
      ns *= radix;
    }
    for (int i = 0; i < kFft; ++i) p.window[i] = static_cast<float>(0.5 - 0.5 * std::cos(2.0 * kPi * i / kFft));
    for (int k = 0; k < kBins; ++k) {
      p.split_re[k] = static_cast<float>(std::cos(-2.0 * kPi * k / kFft));
      p.split_im[k] = static_cast<float>(std::sin(-2.0 * kPi * k / kFft));
    }
    return p;
  }();
  return p;
}

// Small DFT of `R` lane vectors in place (out[k] = sum_r v[r] e^{-2 pi i k r / R}).
template <int R>
inline void dft(Lanes* re, Lanes* im);

// Radix 5 by its symmetric pairs (inputs 1 and 4, 2 and 3): half the multiplications of the
// direct sum.
template <>
inline void dft<5>(Lanes* re, Lanes* im) {
  const float c1 = static_cast<float>(std::cos(2.0 * kPi / 5)), c2 = static_cast<float>(std::cos(4.0 * kPi / 5));
  const float s1 = static_cast<float>(std::sin(2.0 * kPi / 5)), s2 = static_cast<float>(std::sin(4.0 * kPi / 5));
  const Lanes t1r = re[1] + re[4], t1i = im[1] + im[4], t3r = re[1] - re[4], t3i = im[1] - im[4];
  const Lanes t2r = re[2] + re[3], t2i = im[2] + im[3], t4r = re[2] - re[3], t4i = im[2] - im[3];
  const Lanes a1r = re[0] + c1 * t1r + c2 * t2r, a1i = im[0] + c1 * t1i + c2 * t2i;
  const Lanes a2r = re[0] + c2 * t1r + c1 * t2r, a2i = im[0] + c2 * t1i + c1 * t2i;
  const Lanes b1r = s1 * t3r + s2 * t4r, b1i = s1 * t3i + s2 * t4i;
  const Lanes b2r = s2 * t3r - s1 * t4r, b2i = s2 * t3i - s1 * t4i;
  re[0] += t1r + t2r;
  im[0] += t1i + t2i;
  re[1] = a1r + b1i; im[1] = a1i - b1r;  // a1 - i b1
  re[4] = a1r - b1i; im[4] = a1i + b1r;  // a1 + i b1
  re[2] = a2r + b2i; im[2] = a2i - b2r;  // a2 - i b2
  re[3] = a2r - b2i; im[3] = a2i + b2r;  // a2 + i b2
}

template <>
inline void dft<2>(Lanes* re, Lanes* im) {
  const Lanes ar = re[0], ai = im[0];
  re[0] = ar + re[1]; im[0] = ai + im[1];
  re[1] = ar - re[1]; im[1] = ai - im[1];
}

template <>
inline void dft<4>(Lanes* re, Lanes* im) {
  const Lanes s0r = re[0] + re[2], s0i = im[0] + im[2], d0r = re[0] - re[2], d0i = im[0] - im[2];
  const Lanes s1r = re[1] + re[3], s1i = im[1] + im[3], d1r = re[1] - re[3], d1i = im[1] - im[3];
  re[0] = s0r + s1r; im[0] = s0i + s1i;
  re[2] = s0r - s1r; im[2] = s0i - s1i;
  re[1] = d0r + d1i; im[1] = d0i - d1r;  // d0 - i d1
  re[3] = d0r - d1i; im[3] = d0i + d1r;  // d0 + i d1
}

template <int R>
void stage(const Stage& s, const Lanes* xr, const Lanes* xi, Lanes* yr, Lanes* yi) {
  constexpr int n = kHalf;
  const int groups = n / R, ns = s.ns;
  for (int j = 0; j < groups; ++j) {
    Lanes vr[R], vi[R];
    vr[0] = xr[j];  // element 0's twiddle is 1, and so are all of the first stage's
    vi[0] = xi[j];
    for (int r = 1; r < R; ++r) {
      const Lanes a = xr[j + r * groups], b = xi[j + r * groups];
      if (ns == 1) {
        vr[r] = a;
        vi[r] = b;
        continue;
      }
      const float c = s.tw_re[j * R + r], sn = s.tw_im[j * R + r];
      vr[r] = a * c - b * sn;
      vi[r] = a * sn + b * c;
    }
    dft<R>(vr, vi);
    const int base = (j / ns) * ns * R + (j % ns);
    for (int r = 0; r < R; ++r) {
      yr[base + r * ns] = vr[r];
      yi[base + r * ns] = vi[r];
    }
  }
}

// The 200-point complex FFT of (re, im), in place; `tr`, `ti` are scratch of the same size.
void fft_half(Lanes* re, Lanes* im, Lanes* tr, Lanes* ti) {
  const Plan& p = plan();
  Lanes *xr = re, *xi = im, *yr = tr, *yi = ti;
  for (const Stage& s : p.stages) {
    switch (s.radix) {
      case 2: stage<2>(s, xr, xi, yr, yi); break;
      case 4: stage<4>(s, xr, xi, yr, yi); break;
      default: stage<5>(s, xr, xi, yr, yi); break;
    }
    std::swap(xr, yr);
    std::swap(xi, yi);
  }
  if (xr != re) {  // an odd number of stages ends in the scratch
    std::memcpy(re, xr, sizeof(Lanes) * kHalf);
    std::memcpy(im, xi, sizeof(Lanes) * kHalf);
  }
}

// Transpose of a kLanes x kLanes tile held as kLanes vectors (v[i][p] -> v[p][i]): log2(kLanes)
// rounds of two-vector shuffles, each swapping the off-diagonal h x h blocks of every 2h x 2h
// block.
constexpr int block_swap_index(int h, bool high, int p) {
  // Index into the concatenation (a, b): below kLanes picks a[i], else b[i - kLanes].
  return high ? ((p & h) ? kLanes + p : p + h) : ((p & h) ? kLanes + p - h : p);
}

template <int H, bool High, int... P>
inline Lanes block_swap(Lanes a, Lanes b, std::integer_sequence<int, P...>) {
#if JAXASR_HAS_SHUFFLEVECTOR
  return __builtin_shufflevector(a, b, block_swap_index(H, High, P)...);
#else
  typedef int LaneIndex __attribute__((vector_size(4 * kLanes)));
  return __builtin_shuffle(a, b, LaneIndex{block_swap_index(H, High, P)...});
#endif
}

template <int H>
inline void transpose_round(Lanes* v) {
  constexpr auto lanes = std::make_integer_sequence<int, kLanes>{};
  for (int i = 0; i < kLanes; ++i) {
    if (i & H) continue;
    const Lanes a = v[i], b = v[i + H];
    v[i] = block_swap<H, false>(a, b, lanes);
    v[i + H] = block_swap<H, true>(a, b, lanes);
  }
  if constexpr (H > 1) transpose_round<H / 2>(v);
}

inline void transpose(Lanes* v) { transpose_round<kLanes / 2>(v); }
static_assert(kFft % kLanes == 0, "a frame is a whole number of tiles");

// Sample p of the signal the STFT frames: `audio` (n samples, n <= padding) zero-padded to
// `padding` samples, reflect-padded by kPad on each side as torch.stft(center=True) does.
inline float padded_sample(const float* audio, int64_t n, int64_t padding, int64_t p) {
  if (p < 0) p = -p;
  if (p >= padding) p = 2 * (padding - 1) - p;
  return p < n ? audio[p] : 0.0f;
}

}  // namespace

extern "C" {

// Log-mel features of one clip into out[n_mels, n_out] (row-major), as
// transformers.WhisperFeatureExtractor computes them for the clip zero-padded to `padding`
// samples; `filters` is the mel filter bank [n_mels, 201]. Only the first `n_active` frames can
// hold audio; the others are written as the padding's value without being computed.
// Returns 0, or -1 on bad arguments.
int jaxasr_log_mel(const float* audio, int64_t n, int64_t padding, const float* filters, int n_mels,
                   float* out, int64_t n_out, int64_t n_active) {
  if (n < 0 || padding <= kPad || n_mels <= 0 || n_active < 0 || n_active > n_out) return -1;
  n = std::min(n, padding);
  const Plan& p = plan();

  // Each filter's nonzero bins (Slaney triangles: a contiguous range).
  std::vector<int> lo(n_mels), hi(n_mels);
  for (int m = 0; m < n_mels; ++m) {
    const float* w = filters + m * kBins;
    int a = 0, b = kBins;
    while (a < kBins && w[a] == 0.0f) ++a;
    while (b > a && w[b - 1] == 0.0f) --b;
    lo[m] = a;
    hi[m] = b;
  }

  // Frame t covers samples [t kHop - kPad, t kHop + kPad) of the padded signal: read straight from
  // `audio` where a block's frames lie inside it, else from `edge`, filled sample by sample.
  const int64_t blocks = (n_active + kLanes - 1) / kLanes;
  constexpr int kSpan = (kLanes - 1) * kHop + kFft;
  std::vector<float> edge(kSpan);
  std::vector<Lanes> buf(4 * kHalf + kBins);
  Lanes *re = buf.data(), *im = re + kHalf, *tr = im + kHalf, *ti = tr + kHalf, *power = ti + kHalf;
  float peak = 0.0f;
  Lanes peaks = {};  // powers are >= 0
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t f0 = block * kLanes;
    // z[j] = x[2j] + i x[2j + 1], windowed, lane l = frame f0 + l.
    const int64_t first = f0 * kHop - kPad;  // the block's first sample
    const float* span = audio + first;
    if (first < 0 || first + kSpan > n) {
      for (int i = 0; i < kSpan; ++i) edge[i] = padded_sample(audio, n, padding, first + i);
      span = edge.data();
    }
    // Frames are rows of `span` (kHop apart); a tile of kLanes samples of every frame, transposed,
    // gives one vector per sample with a frame in each lane. (Filling the lanes one scalar at a
    // time cost a third of the kernel, and its stores stalled the vector reads after them.)
    for (int c = 0; c < kFft; c += kLanes) {
      Lanes tile[kLanes];
      for (int l = 0; l < kLanes; ++l) std::memcpy(&tile[l], span + l * kHop + c, sizeof(Lanes));
      transpose(tile);
      for (int s = 0; s < kLanes; s += 2) {  // kLanes is even: s and c + s have the same parity
        re[(c + s) / 2] = tile[s] * p.window[c + s];
        im[(c + s) / 2] = tile[s + 1] * p.window[c + s + 1];
      }
    }
    fft_half(re, im, tr, ti);
    // X[k] = (Z[k] + conj Z[N-k]) / 2 - i e^{-2 pi i k / 400} (Z[k] - conj Z[N-k]) / 2.
    for (int k = 0; k < kBins; ++k) {
      const Lanes ar = re[k % kHalf], ai = im[k % kHalf];
      const Lanes br = re[(kHalf - k) % kHalf], bi = im[(kHalf - k) % kHalf];
      const float c = p.split_re[k], s = p.split_im[k];
      const Lanes er = 0.5f * (ar + br), ei = 0.5f * (ai - bi);
      const Lanes or_ = 0.5f * (ai + bi), oi = -0.5f * (ar - br);
      const Lanes xr = er + c * or_ - s * oi, xi = ei + c * oi + s * or_;
      power[k] = xr * xr + xi * xi;
    }
    const int lanes = static_cast<int>(std::min<int64_t>(kLanes, n_active - f0));
    for (int m = 0; m < n_mels; ++m) {
      const float* w = filters + m * kBins;
      Lanes acc = {};
      for (int k = lo[m]; k < hi[m]; ++k) acc += w[k] * power[k];
      float* row = out + m * n_out + f0;
      if (lanes == kLanes) {  // a row's kLanes frames are contiguous: one vector store
        std::memcpy(row, &acc, sizeof(Lanes));
        peaks = acc > peaks ? acc : peaks;
        continue;
      }
      for (int l = 0; l < lanes; ++l) {
        row[l] = acc[l];
        peak = std::max(peak, acc[l]);
      }
    }
  }
  for (int l = 0; l < kLanes; ++l) peak = std::max(peak, peaks[l]);

  // Floor at the clip's maximum minus 8 (in log10), taken in the power domain; then (x + 4) / 4.
  const float clamp = std::max(peak * 1e-8f, 1e-10f);
  for (int m = 0; m < n_mels; ++m) {
    float* row = out + m * n_out;
    for (int64_t t = 0; t < n_active; ++t) row[t] = (std::log10(std::max(row[t], clamp)) + 4.0f) * 0.25f;
    const float fill = (std::log10(clamp) + 4.0f) * 0.25f;
    for (int64_t t = n_active; t < n_out; ++t) row[t] = fill;
  }
  return 0;
}

// y[j] = sum_k phases[p_j][k] x[b_j - taps / 2 + 1 + k] for j < n_out, where t_j = j * down / up
// is output j's position in input samples, b_j = floor(t_j) and p_j = (j * down) mod up its
// phase; samples outside x are zero. `phases` is [up][taps]. Returns 0, or -1 on bad arguments.
//
// Outputs j, j + up, j + 2 up, ... share a phase and lie `down` inputs apart, so x is split into
// `down` interleaved streams (stream r holds x[r], x[r + down], ...): then each tap of a phase
// multiplies a contiguous run of one stream into a contiguous run of outputs, kBlock at a time
// in registers. One dot product per output instead cost a horizontal sum each (4x slower).
int jaxasr_resample(const float* x, int64_t n, int up, int down, const float* phases, int taps,
                    float* y, int64_t n_out) {
  if (n < 0 || up <= 0 || down <= 0 || taps <= 0 || n_out < 0) return -1;
  constexpr int kAcc = 8, kBlock = kAcc * kLanes;  // 8 accumulators hide the FMA latency
  const int64_t half = taps / 2 - 1;
  const int64_t per_phase = (n_out + up - 1) / up;
  // Stream positions reach (taps + n_out * down / up + taps) / down + per_phase; zeros around x.
  const int64_t stream_len = (2 * taps + n + 2) / down + per_phase + kBlock + 2;
  std::vector<float> streams(static_cast<size_t>(down) * stream_len, 0.0f);
  // x shifted by `taps` positions, so that no index is negative: position pos = i + taps holds x[i].
  for (int r = 0; r < down; ++r) {
    float* stream = streams.data() + r * stream_len;
    int64_t s = (taps - r + down - 1) / down;  // the first s with r + s * down >= taps
    for (int64_t pos = r + s * down; pos < n + taps; pos += down) stream[s++] = x[pos - taps];
  }
  // Per phase class `first` (outputs first, first + up, ...): its filter and, per tap, where
  // its inputs start. The loop runs block by block over all classes, so the streams' few
  // active cache lines stay in L1 (class by class over whole streams spilled out of L2).
  const int classes = static_cast<int>(std::min<int64_t>(up, n_out));
  std::vector<const float*> src(static_cast<size_t>(classes) * taps);
  std::vector<const float*> filter(classes);
  std::vector<int64_t> count(classes);
  for (int first = 0; first < classes; ++first) {
    const int64_t t = static_cast<int64_t>(first) * down;
    filter[first] = phases + (t % up) * static_cast<int64_t>(taps);
    const int64_t start = t / up - half + taps;  // in shifted positions; output q adds q * down
    for (int k = 0; k < taps; ++k)
      src[first * taps + k] = streams.data() + ((start + k) % down) * stream_len + (start + k) / down;
    count[first] = (n_out - first + up - 1) / up;
  }
  for (int64_t q0 = 0; q0 < per_phase; q0 += kBlock) {
    for (int first = 0; first < classes; ++first) {
      if (q0 >= count[first]) continue;
      const float* h = filter[first];
      const float* const* in = src.data() + first * taps;
      Lanes acc[kAcc] = {};
      for (int k = 0; k < taps; ++k) {
        const float* s = in[k] + q0;
        for (int v = 0; v < kAcc; ++v) {
          Lanes x;
          std::memcpy(&x, s + v * kLanes, sizeof(Lanes));
          acc[v] += h[k] * x;
        }
      }
      const int64_t m = std::min<int64_t>(kBlock, count[first] - q0);
      for (int64_t i = 0; i < m; ++i) y[first + (q0 + i) * up] = acc[i / kLanes][i % kLanes];
    }
  }
  return 0;
}

}  // extern "C"

// Standalone check of the CUDA kernels against the CPU kernel's code (roi_align_cpu.h), without
// TensorFlow. Build: make -C custom_ops standalone; run: custom_ops/roi_align/standalone_test.
//
// Random FPN-like inputs (4 levels, boxes partly outside the maps, tiny and empty boxes), several
// output sizes / sampling ratios (adaptive included) / aligned, float32 maps and, for two cases,
// float16 and bfloat16 maps. Prints, per case, the max abs error of the GPU forward and backward
// against the CPU, and the time of each. Exit status: 0 all within tolerance, 1 a mismatch, 2 no
// usable CUDA device.
//
//   standalone_test [--boxes N] [--channels C] [--image SIZE] [--batch B] [--dump DIR]
//
// (defaults 512 boxes, 64 channels, 256 x 256 image (maps 64..8), batch 2).
//
// --dump DIR writes the float32 inputs, the GPU outputs and the GPU gradients of every float32 case
// as raw little-endian files plus DIR/cases.txt, for compare_torchvision_cuda.py (torchvision's own
// CUDA roi_align as an independent reference).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <random>
#include <vector>

#include "roi_align_common.h"
#include "roi_align_cpu.h"
#include "roi_align_gpu.h"

namespace ra = kmrcnn_roi_align;

#define CHECK_CUDA(call)                                                                      \
  do {                                                                                        \
    cudaError_t err_ = (call);                                                                \
    if (err_ != cudaSuccess) {                                                                \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)

struct Case {
  int pooled;
  int sampling_ratio;
  bool aligned;
};

struct Problem {
  int batch = 2, channels = 64, image = 256, num_levels = 4, num_boxes = 512;
  std::vector<std::vector<float>> features;  // per level, [batch, h, w, channels]
  std::vector<int> height, width;
  std::vector<float> boxes;
  std::vector<int> box_indices, levels;
};

Problem make_problem(unsigned seed, Problem p) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int l = 0; l < p.num_levels; ++l) {
    const int size = p.image >> (l + 2);
    p.height.push_back(size);
    p.width.push_back(size);
    std::vector<float> f(static_cast<size_t>(p.batch) * size * size * p.channels);
    for (float& v : f) v = normal(rng);
    p.features.push_back(f);
  }
  const float image = static_cast<float>(p.image);
  for (int k = 0; k < p.num_boxes; ++k) {
    float w, h;
    const float kind = uniform(rng);
    if (kind < 0.1f) {
      w = h = 0.0f;  // empty
    } else if (kind < 0.2f) {
      w = 0.5f * uniform(rng);  // tiny: under one pixel
      h = 0.5f * uniform(rng);
    } else {
      const float side = std::exp(std::log(8.0f) + uniform(rng) * (std::log(image) - std::log(8.0f)));
      const float aspect = std::exp((uniform(rng) - 0.5f) * 1.4f);
      w = side * std::sqrt(aspect);
      h = side / std::sqrt(aspect);
    }
    // Centres up to a quarter image outside: boxes partly or wholly outside the maps.
    const float cx = (uniform(rng) * 1.5f - 0.25f) * image;
    const float cy = (uniform(rng) * 1.5f - 0.25f) * image;
    const float box[4] = {cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2};
    p.boxes.insert(p.boxes.end(), box, box + 4);
    p.box_indices.push_back(static_cast<int>(uniform(rng) * p.batch) % p.batch);
    // FPN rule (canonical 224 at level 4, levels 2..5), as indices 0..3.
    const float area = (box[2] - box[0]) * (box[3] - box[1]);
    float level = std::floor(4.0f + std::log2(std::sqrt(std::max(area, 0.0f)) / 224.0f) + 1e-6f);
    level = std::min(std::max(level, 2.0f), 5.0f);
    p.levels.push_back(static_cast<int>(level) - 2);
  }
  return p;
}

ra::Args make_args(const Problem& p, const Case& c) {
  ra::Args a = ra::Args();
  a.num_levels = p.num_levels;
  for (int l = 0; l < p.num_levels; ++l) {
    a.height[l] = p.height[l];
    a.width[l] = p.width[l];
    a.spatial_scale[l] = 1.0f / static_cast<float>(4 << l);
  }
  a.batch = p.batch;
  a.channels = p.channels;
  a.pooled_h = a.pooled_w = c.pooled;
  a.sampling_ratio = c.sampling_ratio;
  a.aligned = c.aligned;
  a.num_boxes = p.num_boxes;
  return a;
}

template <typename F>
double seconds(F&& f) {
  const auto start = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void write_file(const std::string& path, const void* data, size_t bytes) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(data, 1, bytes, f) != bytes) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(f);
}

// Map storage type of each DType, and the float value a T holds (the CPU reference reads that).
template <ra::DType D> struct Storage;
template <> struct Storage<ra::kFloat32> { using T = float; static const char* name() { return "float32"; } };
template <> struct Storage<ra::kFloat16> { using T = __half; static const char* name() { return "float16"; } };
template <> struct Storage<ra::kBFloat16> { using T = __nv_bfloat16; static const char* name() { return "bfloat16"; } };

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_float(float v);
template <> float from_float<float>(float v) { return v; }
template <> __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Relative rounding unit of T's significand (0 for float32: same float32 operations on both sides).
template <typename T> double unit_roundoff() { return 0.0; }
template <> double unit_roundoff<__half>() { return std::ldexp(1.0, -11); }
template <> double unit_roundoff<__nv_bfloat16>() { return std::ldexp(1.0, -8); }

struct Outcome {
  double fwd_err, bwd_err, cpu_fwd_ms, gpu_fwd_ms, cpu_bwd_ms, gpu_bwd_ms;
  bool ok;
};

// One case in storage type T: the CPU reference runs in float32 on the values T holds (the inputs
// rounded to T), exactly what the GPU kernels read; the GPU result is T, the reference float32.
template <ra::DType D>
Outcome run_case(const Problem& p, const Case& c, int case_index, const char* dump_dir) {
  using T = typename Storage<D>::T;
  ra::Args host = make_args(p, c), dev = make_args(p, c);
  // Inputs rounded to T, on the host as floats (reference) and on the device as T.
  std::vector<std::vector<float>> rounded(p.num_levels);
  std::vector<T*> d_features(p.num_levels);
  std::vector<float*> d_accum_v(p.num_levels);
  std::vector<T*> d_grads(p.num_levels);
  for (int l = 0; l < p.num_levels; ++l) {
    const size_t n = p.features[l].size();
    std::vector<T> t(n);
    rounded[l].resize(n);
    for (size_t i = 0; i < n; ++i) {
      t[i] = from_float<T>(p.features[l][i]);
      rounded[l][i] = to_float(t[i]);
    }
    CHECK_CUDA(cudaMalloc(&d_features[l], n * sizeof(T)));
    CHECK_CUDA(cudaMemcpy(d_features[l], t.data(), n * sizeof(T), cudaMemcpyHostToDevice));
    CHECK_CUDA(cudaMalloc(&d_accum_v[l], n * sizeof(float)));
    if (D == ra::kFloat32) {
      d_grads[l] = reinterpret_cast<T*>(d_accum_v[l]);  // float32: the kernel's accumulator is the output
    } else {
      CHECK_CUDA(cudaMalloc(&d_grads[l], n * sizeof(T)));
    }
    host.features[l] = rounded[l].data();
    dev.features[l] = d_features[l];
  }
  float* d_boxes;
  int *d_indices, *d_levels;
  CHECK_CUDA(cudaMalloc(&d_boxes, p.boxes.size() * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&d_indices, p.num_boxes * sizeof(int)));
  CHECK_CUDA(cudaMalloc(&d_levels, p.num_boxes * sizeof(int)));
  CHECK_CUDA(cudaMemcpy(d_boxes, p.boxes.data(), p.boxes.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_indices, p.box_indices.data(), p.num_boxes * sizeof(int), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_levels, p.levels.data(), p.num_boxes * sizeof(int), cudaMemcpyHostToDevice));
  host.boxes = p.boxes.data();
  host.box_indices = p.box_indices.data();
  host.levels = p.levels.data();
  dev.boxes = d_boxes;
  dev.box_indices = d_indices;
  dev.levels = d_levels;

  const size_t out_n = static_cast<size_t>(p.num_boxes) * c.pooled * c.pooled * p.channels;
  std::vector<float> cpu_out(out_n), grad(out_n);
  std::vector<T> grad_t(out_n), gpu_out(out_n);
  std::mt19937 rng(c.pooled * 10 + c.sampling_ratio);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < out_n; ++i) {
    grad_t[i] = from_float<T>(normal(rng));
    grad[i] = to_float(grad_t[i]);
  }

  Outcome o;
  // CPU: the TensorFlow CPU kernel's code, one thread, float32 on the rounded values.
  o.cpu_fwd_ms = 1e3 * seconds([&] { ra::forward_cpu<float>(host, cpu_out.data(), 0, p.num_boxes); });
  std::vector<std::vector<float>> cpu_grads(p.num_levels);
  float* accum[ra::kMaxLevels] = {};
  for (int l = 0; l < p.num_levels; ++l) {
    cpu_grads[l].resize(p.features[l].size());
    accum[l] = cpu_grads[l].data();
  }
  o.cpu_bwd_ms = 1e3 * seconds([&] { ra::backward_cpu<float>(host, grad.data(), accum, 0, p.channels); });

  // GPU.
  T *d_out, *d_grad_out;
  CHECK_CUDA(cudaMalloc(&d_out, out_n * sizeof(T)));
  CHECK_CUDA(cudaMalloc(&d_grad_out, out_n * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(d_grad_out, grad_t.data(), out_n * sizeof(T), cudaMemcpyHostToDevice));
  float* d_accum[ra::kMaxLevels] = {};
  void* d_outs[ra::kMaxLevels] = {};
  for (int l = 0; l < p.num_levels; ++l) d_accum[l] = d_accum_v[l], d_outs[l] = d_grads[l];
  auto check = [](const char* e) {
    if (e) {
      std::fprintf(stderr, "kernel launch failed: %s\n", e);
      std::exit(1);
    }
  };
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  const int reps = 20;
  float ms = 0;
  check(ra::LaunchForward(dev, D, d_out, nullptr));  // warm-up
  CHECK_CUDA(cudaEventRecord(start));
  for (int r = 0; r < reps; ++r) check(ra::LaunchForward(dev, D, d_out, nullptr));
  CHECK_CUDA(cudaEventRecord(stop));
  CHECK_CUDA(cudaEventSynchronize(stop));
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  o.gpu_fwd_ms = ms / reps;
  check(ra::LaunchBackward(dev, D, d_grad_out, d_accum, d_outs, nullptr));
  CHECK_CUDA(cudaEventRecord(start));
  for (int r = 0; r < reps; ++r) check(ra::LaunchBackward(dev, D, d_grad_out, d_accum, d_outs, nullptr));
  CHECK_CUDA(cudaEventRecord(stop));
  CHECK_CUDA(cudaEventSynchronize(stop));
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  o.gpu_bwd_ms = ms / reps;
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaMemcpy(gpu_out.data(), d_out, out_n * sizeof(T), cudaMemcpyDeviceToHost));

  // Forward: the same float32 operations in the same order on both sides (no FMA contraction), then
  // one rounding to T on the GPU: |gpu - cpu| <= 1e-5 + u |cpu| (u: T's unit roundoff, 0 for float32;
  // 1e-5 is the earlier float32 bound, kept as slack; the printed error is what was measured).
  // Backward: atomics sum in another order, so float32 rounding of sums of O(100) terms (1e-4), plus
  // the rounding to T.
  const double u = unit_roundoff<T>();
  bool ok = true;
  o.fwd_err = 0;
  for (size_t i = 0; i < out_n; ++i) {
    const double ref = cpu_out[i], err = std::fabs(to_float(gpu_out[i]) - ref);
    o.fwd_err = std::max(o.fwd_err, err);
    ok = ok && err <= 1e-5 + u * std::fabs(ref);
  }
  o.bwd_err = 0;
  std::vector<std::vector<float>> gpu_grads(p.num_levels);
  for (int l = 0; l < p.num_levels; ++l) {
    std::vector<T> g(p.features[l].size());
    CHECK_CUDA(cudaMemcpy(g.data(), d_grads[l], g.size() * sizeof(T), cudaMemcpyDeviceToHost));
    gpu_grads[l].resize(g.size());
    for (size_t i = 0; i < g.size(); ++i) {
      gpu_grads[l][i] = to_float(g[i]);
      const double ref = cpu_grads[l][i], err = std::fabs(gpu_grads[l][i] - ref);
      o.bwd_err = std::max(o.bwd_err, err);
      ok = ok && err <= 1e-4 + u * std::fabs(ref);
    }
  }
  o.ok = ok;

  if (dump_dir && D == ra::kFloat32) {
    const std::string prefix = std::string(dump_dir) + "/case" + std::to_string(case_index);
    write_file(prefix + "_out.f32", gpu_out.data(), out_n * sizeof(float));
    write_file(prefix + "_grad.f32", grad.data(), out_n * sizeof(float));
    for (int l = 0; l < p.num_levels; ++l) {
      write_file(prefix + "_dfeatures" + std::to_string(l) + ".f32", gpu_grads[l].data(), gpu_grads[l].size() * sizeof(float));
    }
  }

  for (int l = 0; l < p.num_levels; ++l) {
    CHECK_CUDA(cudaFree(d_features[l]));
    CHECK_CUDA(cudaFree(d_accum_v[l]));
    if (D != ra::kFloat32) CHECK_CUDA(cudaFree(d_grads[l]));
  }
  CHECK_CUDA(cudaFree(d_boxes));
  CHECK_CUDA(cudaFree(d_indices));
  CHECK_CUDA(cudaFree(d_levels));
  CHECK_CUDA(cudaFree(d_out));
  CHECK_CUDA(cudaFree(d_grad_out));
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  return o;
}

int main(int argc, char** argv) {
  Problem shape;
  const char* dump_dir = nullptr;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--boxes") && i + 1 < argc) {
      shape.num_boxes = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--channels") && i + 1 < argc) {
      shape.channels = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--image") && i + 1 < argc) {
      shape.image = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--batch") && i + 1 < argc) {
      shape.batch = std::atoi(argv[++i]);
    } else if (!std::strcmp(argv[i], "--dump") && i + 1 < argc) {
      dump_dir = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--boxes N] [--channels C] [--image SIZE] [--batch B] [--dump DIR]\n", argv[0]);
      return 1;
    }
  }
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    std::printf("no usable CUDA device (%s): nothing to compare\n", err != cudaSuccess ? cudaGetErrorString(err) : "0 devices");
    return 2;
  }
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  if (shape.num_boxes < 0 || shape.channels < 1 || shape.image < 32 || shape.batch < 1) {
    std::fprintf(stderr, "bad sizes\n");
    return 1;
  }
  const Problem p = make_problem(2024, shape);
  std::printf("device: %s (sm_%d%d); %d images, %d levels (%dx%d .. %dx%d), %d channels, %d boxes\n", prop.name,
              prop.major, prop.minor, p.batch, p.num_levels, p.height[0], p.width[0], p.height[3], p.width[3],
              p.channels, p.num_boxes);

  const Case cases[] = {{7, 2, false}, {14, 2, false}, {7, 2, true}, {7, 0, false}, {14, 0, true}, {3, 1, false}};
  const int num_cases = static_cast<int>(sizeof(cases) / sizeof(cases[0]));
  if (dump_dir) {
    for (int l = 0; l < p.num_levels; ++l) {
      write_file(std::string(dump_dir) + "/features" + std::to_string(l) + ".f32", p.features[l].data(),
                 p.features[l].size() * sizeof(float));
    }
    write_file(std::string(dump_dir) + "/boxes.f32", p.boxes.data(), p.boxes.size() * sizeof(float));
    write_file(std::string(dump_dir) + "/box_indices.i32", p.box_indices.data(), p.box_indices.size() * sizeof(int));
    write_file(std::string(dump_dir) + "/levels.i32", p.levels.data(), p.levels.size() * sizeof(int));
    std::string meta = "batch " + std::to_string(p.batch) + "\nchannels " + std::to_string(p.channels) + "\n";
    for (int l = 0; l < p.num_levels; ++l) {
      meta += "level " + std::to_string(p.height[l]) + " " + std::to_string(p.width[l]) + " " +
              std::to_string(1.0f / static_cast<float>(4 << l)) + "\n";
    }
    for (int i = 0; i < num_cases; ++i) {
      meta += "case " + std::to_string(cases[i].pooled) + " " + std::to_string(cases[i].sampling_ratio) + " " +
              std::to_string(cases[i].aligned ? 1 : 0) + "\n";
    }
    write_file(std::string(dump_dir) + "/cases.txt", meta.data(), meta.size());
  }

  bool ok = true;
  std::printf("%-32s %12s %12s %10s %10s %10s %10s\n", "case", "fwd max err", "bwd max err", "cpu fwd ms", "gpu fwd ms",
              "cpu bwd ms", "gpu bwd ms");
  auto report = [&](const Case& c, const char* dtype, const Outcome& o) {
    ok = ok && o.ok;
    char name[96];
    std::snprintf(name, sizeof(name), "%dx%d ratio %d%s %s%s", c.pooled, c.pooled, c.sampling_ratio,
                  c.aligned ? " aligned" : "", dtype, o.ok ? "" : " FAIL");
    std::printf("%-32s %12.3g %12.3g %10.2f %10.3f %10.2f %10.3f\n", name, o.fwd_err, o.bwd_err, o.cpu_fwd_ms,
                o.gpu_fwd_ms, o.cpu_bwd_ms, o.gpu_bwd_ms);
  };
  for (int i = 0; i < num_cases; ++i) report(cases[i], "float32", run_case<ra::kFloat32>(p, cases[i], i, dump_dir));
  // Half types: the mixed-precision training paths (7x7 box head, 14x14 mask head).
  for (int i = 0; i < 2; ++i) {
    report(cases[i], "float16", run_case<ra::kFloat16>(p, cases[i], i, nullptr));
    report(cases[i], "bfloat16", run_case<ra::kBFloat16>(p, cases[i], i, nullptr));
  }
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}

// GPTQ solve benchmark on the CPU backend (docs/design.md section 9).
#include "src/bench_gptq.hpp"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "base/timing.hpp"
#include "kernels/backend.hpp"
#include "src/quant.hpp"

namespace pipequant {

namespace {

using kernels::Backend;
using kernels::Buffer;
using kernels::Trans;

struct Shape {
  int64_t out = 0;  // N, rows of W
  int64_t in = 0;   // K, columns of W and the Hessian's size
};

Shape parse_shape(const std::string& text) {
  const size_t x = text.find('x');
  Shape s;
  try {
    size_t used_out = 0, used_in = 0;
    PQ_REQUIRE(x != std::string::npos, "");
    s.out = std::stoll(text.substr(0, x), &used_out);
    s.in = std::stoll(text.substr(x + 1), &used_in);
    PQ_REQUIRE(used_out == x && used_in == text.size() - x - 1, "");
  } catch (const std::exception&) {
    fail("bench gptq: shape '", text, "' is not OUTxIN (e.g. 4096x11008)");
  }
  PQ_REQUIRE(s.out > 0 && s.in > 0, "bench gptq: shape '", text, "' must have positive sizes");
  return s;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

// GFLOP/s of a 2048^3 sgemm through the backend (cblas_sgemm on the cpu backend), median of 3 after a warm-up.
double sgemm_rate(Backend& backend) {
  const int64_t n = 2048;
  std::vector<float> host(static_cast<size_t>(n * n));
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (auto& v : host) v = u(rng);
  Buffer<float> a(backend, n * n), b(backend, n * n), c(backend, n * n);
  backend.upload(a.data(), host.data(), host.size() * sizeof(float));
  backend.upload(b.data(), host.data(), host.size() * sizeof(float));
  std::vector<double> times;
  for (int rep = 0; rep < 4; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    backend.gemm(Trans::kNo, Trans::kNo, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    backend.synchronize();
    if (rep > 0) times.push_back(seconds_since(t0));
  }
  return 2.0 * static_cast<double>(n * n * n) / median(times) / 1e9;
}

// A Hessian with the structure of real ones: strongly correlated inputs (a low-rank part), a noise floor, and
// channel scales spread over two orders of magnitude (outlier channels), H = S (A A^T / r + 0.1 I) S with
// A [K, r] Gaussian and S = diag(exp(N(0, 1))). Costs 2 K^2 r flops instead of the 2 K^2 T of sum x x^T.
std::vector<float> correlated_hessian(Backend& device, int64_t k, uint64_t seed) {
  const int64_t rank = std::min<int64_t>(k, 256);
  // H [k, k] is built where it fits: at k = 53248 it is 11.3 GB
  const size_t need = sizeof(float) * static_cast<size_t>(k * k + k * rank);
  const bool fits = need <= device.free_budget_bytes();
  Backend& backend = fits || device.host_fallback() == nullptr ? device : *device.host_fallback();
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> a(static_cast<size_t>(k * rank));
  for (auto& v : a) v = normal(rng);
  std::vector<float> s(static_cast<size_t>(k));
  for (auto& v : s) v = std::exp(normal(rng));
  Buffer<float> ab(backend, k * rank), hb(backend, k * k);
  backend.upload(ab.data(), a.data(), a.size() * sizeof(float));
  backend.gemm(Trans::kNo, Trans::kYes, k, k, rank, 1.0f / static_cast<float>(rank), ab.data(), rank, ab.data(), rank,
               0.0f, hb.data(), k);
  std::vector<float> h(static_cast<size_t>(k * k));
  backend.download(h.data(), hb.data(), h.size() * sizeof(float));
  for (int64_t i = 0; i < k; ++i) {
    h[static_cast<size_t>(i * k + i)] += 0.1f;
    for (int64_t j = 0; j < k; ++j)
      h[static_cast<size_t>(i * k + j)] *= s[static_cast<size_t>(i)] * s[static_cast<size_t>(j)];
  }
  return h;
}

// Weights W [out, in] ~ N(0, 0.02^2), one generator per seed.
std::vector<float> random_weights(const Shape& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<float> w(static_cast<size_t>(s.out * s.in));
  for (auto& v : w) v = normal(rng);
  return w;
}

bool identical(const QuantizedLinear& a, const QuantizedLinear& b) {
  return a.q == b.q && a.scales == b.scales && a.zeros == b.zeros && a.g_idx == b.g_idx && a.damp_used == b.damp_used &&
         a.fallback == b.fallback && a.relative_error == b.relative_error && a.log == b.log;
}

// --group: the shapes are the linears of one group and share one Hessian. Times them as one gptq_quantize each
// (H factored per linear, as before the factor was shared) and as one factor_hessian with a gptq_solve each,
// alternating the two in every repetition. Returns whether both gave identical finite results without a damping
// or RTN fallback.
bool bench_group(Backend& backend, const std::vector<Shape>& shapes, int reps, const QuantConfig& config,
                 std::ostream& os) {
  const int64_t k = shapes.front().in;
  int64_t max_rows = 0;
  std::string name;
  std::vector<std::vector<float>> ws;
  uint64_t seed = 1;
  for (const Shape& s : shapes) {
    PQ_ASSERT(s.in == k, "bench_group: shapes of different IN");
    ws.push_back(random_weights(s, seed++));
    max_rows = std::max(max_rows, s.out);
    if (!name.empty()) name += '+';
    name += std::to_string(s.out);
  }
  name += 'x';
  name += std::to_string(k);
  const std::vector<float> h = correlated_hessian(backend, k, seed);

  os << "# group: the " << shapes.size() << " shapes share one H [K, K] (the linears of a group, e.g. q, k, v); "
     << "1 warm-up, then " << reps << " timed, both ways in each repetition\n"
     << "# separate = one gptq_quantize per linear (each factors H: damping, reverse Cholesky, K^3/3 flops)\n"
     << "# shared = factor_hessian once, then gptq_solve per linear; whole calls; separate includes its error checks (4*N*K^2 each), shared\n"
        "#   has its errors from the solve's own accounting\n"
     << "# saved = median over the repetitions of 1 - shared / separate (paired: the two run back to back); "
        "factor = factor_hessian's own time (GptqFactor::seconds)\n"
     << "# valid = both ways bit-identical (codes, scales, zeros, g_idx, damp, fallback, error, log), errors finite, "
        "no damping or RTN fallback\n";
  char line[512];
  std::snprintf(line, sizeof(line), "%28s %5s %15s %15s %13s %13s %13s %7s %11s %6s\n", "group", "reps",
                "separate_med(s)", "separate_min(s)", "shared_med(s)", "shared_min(s)", "factor_med(s)", "saved",
                "max_rel_err", "valid");
  os << line << std::flush;

  const size_t n = shapes.size();
  std::vector<QuantizedLinear> alone(n), together(n);
  std::vector<double> separate, shared, factor, saved;
  for (int rep = 0; rep <= reps; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < n; ++i)
      alone[i] = gptq_quantize(backend, ws[i].data(), shapes[i].out, k, h.data(), config, "bench");
    const double t_separate = seconds_since(t0);
    t0 = std::chrono::steady_clock::now();
    double t_factor = 0.0;
    {
      const GptqFactor f = factor_hessian(backend, h, k, max_rows, config);
      for (size_t i = 0; i < n; ++i) together[i] = gptq_solve(f, ws[i].data(), shapes[i].out, "bench");
      t_factor = f.seconds;
    }
    const double t_shared = seconds_since(t0);
    if (rep == 0) continue;  // warm-up
    separate.push_back(t_separate);
    shared.push_back(t_shared);
    factor.push_back(t_factor);
    saved.push_back(1.0 - t_shared / t_separate);
  }
  bool valid = true;
  double max_err = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const QuantizedLinear& q = together[i];
    valid = valid && identical(alone[i], q) && std::isfinite(alone[i].relative_error) &&
            (q.fallback == Fallback::kNone || q.fallback == Fallback::kCpu);
    max_err = std::max(max_err, alone[i].relative_error);
  }
  std::snprintf(line, sizeof(line), "%28s %5d %15.3f %15.3f %13.3f %13.3f %13.3f %6.1f%% %11.3e %6s\n", name.c_str(),
                reps, median(separate), *std::min_element(separate.begin(), separate.end()), median(shared),
                *std::min_element(shared.begin(), shared.end()), median(factor), 100.0 * median(saved), max_err,
                valid ? "yes" : "NO");
  os << line << std::flush;
  return valid;
}

}  // namespace

int run_bench_hessian(Backend& backend, const std::vector<int64_t>& widths, int64_t tokens, int reps,
                      std::ostream& os) {
  PQ_REQUIRE(reps > 0, "bench hessian: --reps must be positive, got ", reps);
  PQ_REQUIRE(tokens > 0, "bench hessian: --tokens must be positive, got ", tokens);
  PQ_REQUIRE(!widths.empty(), "bench hessian: no widths given");
  for (int64_t k : widths) PQ_REQUIRE(k > 0, "bench hessian: width ", k, " must be positive");
  char line[512];
  const double sgemm = sgemm_rate(backend);
  std::snprintf(line, sizeof(line), "# pipequant bench hessian: backend %s, %d threads, %lld tokens per call\n",
                backend.name().c_str(), omp_get_max_threads(), static_cast<long long>(tokens));
  os << line;
  std::snprintf(line, sizeof(line),
                "# sgemm 2048x2048x2048 through the backend: %.1f GFLOP/s (median of 3, 2*n^3 flops)\n", sgemm);
  os << line;
  os << "# H [K, K] += X^T X for X [tokens, K] (hessian_accumulate: fp32, fixed order, full matrix written); "
     << "1 warm-up, then " << reps << " timed\n"
     << "# eff_GFLOP/s = 2*tokens*K^2 / median time, the flops of the GEMM X^T X; a SYRK does about half of them, so "
        "of_sgemm (eff_GFLOP/s / sgemm rate) can pass 100%\n";
  std::snprintf(line, sizeof(line), "%8s %8s %12s %12s %12s %9s\n", "K", "tokens", "median(s)", "min(s)", "eff_GFLOP/s",
                "of_sgemm");
  os << line << std::flush;
  for (int64_t k : widths) {
    std::vector<float> x(static_cast<size_t>(tokens * k));
    std::mt19937 rng(static_cast<uint32_t>(k));
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (auto& v : x) v = u(rng);
    Buffer<float> xb(backend, tokens * k), hb(backend, k * k);
    backend.upload(xb.data(), x.data(), x.size() * sizeof(float));
    const std::vector<float> zero(static_cast<size_t>(k * k), 0.0f);
    backend.upload(hb.data(), zero.data(), zero.size() * sizeof(float));
    std::vector<double> times;
    for (int rep = 0; rep <= reps; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      backend.hessian_accumulate(xb.data(), tokens, k, hb.data());
      backend.synchronize();
      if (rep > 0) times.push_back(seconds_since(t0));
    }
    // a check that the work was done: H[0, 0] = (reps + 1) * sum_t x[t, 0]^2
    float h00 = 0.0f;
    backend.download(&h00, hb.data(), sizeof(float));
    double want = 0.0;
    for (int64_t t = 0; t < tokens; ++t)
      want += static_cast<double>(x[static_cast<size_t>(t * k)]) * x[static_cast<size_t>(t * k)];
    want *= reps + 1;
    PQ_REQUIRE(std::abs(h00 - want) <= 1e-3 * want, "bench hessian: H[0, 0] = ", h00, ", expected ", want);
    const double rate =
        2.0 * static_cast<double>(tokens) * static_cast<double>(k) * static_cast<double>(k) / median(times) / 1e9;
    std::snprintf(line, sizeof(line), "%8lld %8lld %12.4f %12.4f %12.1f %8.0f%%\n", static_cast<long long>(k),
                  static_cast<long long>(tokens), median(times), *std::min_element(times.begin(), times.end()), rate,
                  100.0 * rate / sgemm);
    os << line << std::flush;
  }
  return 0;
}

int run_bench_gptq(Backend& backend_ref, const std::vector<std::string>& shapes, int reps, int bits, int64_t group_size,
                   bool group, std::ostream& os) {
  PQ_REQUIRE(reps > 0, "bench gptq: reps must be positive, got ", reps);
  QuantConfig config;
  config.bits = bits;
  config.group_size = group_size;
  validate(config);
  std::vector<Shape> parsed;
  for (const auto& text : shapes) parsed.push_back(parse_shape(text));
  PQ_REQUIRE(!parsed.empty(), "bench gptq: no shapes given");
  for (const Shape& s : parsed)
    PQ_REQUIRE(!group || s.in == parsed.front().in,
               "bench gptq --group: the linears of a group share one Hessian, "
               "so every shape needs the same IN; got ",
               s.in, " and ", parsed.front().in);

  Backend* backend = &backend_ref;
  char line[512];
  std::snprintf(line, sizeof(line),
                "# pipequant bench gptq: backend %s, %d threads, bits %d, group size %lld, %s, block %lld, damp %g\n",
                backend->name().c_str(), omp_get_max_threads(), bits, static_cast<long long>(group_size),
                config.sym ? "sym" : "asym", static_cast<long long>(config.block_size), config.damp);
  os << line;
  std::snprintf(line, sizeof(line),
                "# sgemm 2048x2048x2048 through the backend: %.1f GFLOP/s (median of 3, 2*n^3 flops)\n",
                sgemm_rate(*backend));
  os << line;
  if (group) return bench_group(*backend, parsed, reps, config, os) ? 0 : 1;
  os << "# W [N = out, K = in], H [K, K] = S (A A^T / 256 + 0.1 I) S (correlated, outlier channels); 1 warm-up, then "
     << reps << " timed\n"
     << "# solve = damping + reverse Cholesky + column loop with lazy updates (QuantizedLinear::solve_seconds)\n"
     << "# GFLOP/s = (K^3/3 + 2*N*K^2) / median solve (nominal count: the lazy updates do about N*K^2)\n"
     << "# call = whole gptq_quantize: host copies, solve, and the relative-error check (4*N*K^2 flops)\n"
     << "# solved_on = the backend that ran the solve (a Hessian over the --gpu-mem budget is solved on the host)\n"
     << "# valid = relative error finite, no damping or RTN fallback, and below round-to-nearest's\n";
  std::snprintf(line, sizeof(line), "%12s %5s %12s %12s %12s %9s %11s %11s %11s %9s %6s\n", "shape", "reps",
                "solve_med(s)", "solve_min(s)", "solve_max(s)", "GFLOP/s", "call_med(s)", "rel_err", "rtn_err",
                "solved_on", "valid");
  os << line << std::flush;

  bool all_valid = true;
  uint64_t seed = 1;
  for (const Shape& s : parsed) {
    const int64_t n = s.out, k = s.in;
    const std::vector<float> w = random_weights(s, seed++);
    const std::vector<float> h = correlated_hessian(*backend, k, seed++);

    std::vector<double> solve, call;
    QuantizedLinear ql;
    for (int rep = 0; rep <= reps; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      ql = gptq_quantize(*backend, w.data(), n, k, h.data(), config, "bench");
      const double t = seconds_since(t0);
      if (rep == 0) continue;  // warm-up
      solve.push_back(ql.solve_seconds);
      call.push_back(t);
    }
    const double rtn = rtn_quantize(*backend, w.data(), n, k, h.data(), config).relative_error;
    const bool moved = ql.fallback == Fallback::kCpu;
    const bool valid =
        std::isfinite(ql.relative_error) && (ql.fallback == Fallback::kNone || moved) && ql.relative_error < rtn;
    const std::string solved_on = moved ? backend->host_fallback()->name() : backend->name();
    all_valid = all_valid && valid;
    const double kd = static_cast<double>(k), nd = static_cast<double>(n);
    const double flops = kd * kd * kd / 3.0 + 2.0 * nd * kd * kd;
    const std::string name = std::to_string(n) + "x" + std::to_string(k);
    std::snprintf(line, sizeof(line), "%12s %5d %12.3f %12.3f %12.3f %9.1f %11.3f %11.3e %11.3e %9s %6s\n",
                  name.c_str(), reps, median(solve), *std::min_element(solve.begin(), solve.end()),
                  *std::max_element(solve.begin(), solve.end()), flops / median(solve) / 1e9, median(call),
                  ql.relative_error, rtn, solved_on.c_str(), valid ? "yes" : "NO");
    os << line << std::flush;
  }
  return all_valid ? 0 : 1;
}

}  // namespace pipequant

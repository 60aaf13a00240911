// The quantize command line: the resume fingerprint holds exactly the options that change the output (and the
// same bytes as before the options declared their roles), options of layout, performance and output location
// leave it alone, and each enum option accepts its spellings and names them when given a bad one.
#include <gtest/gtest.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "base/error.hpp"
#include "src/cli.hpp"

namespace pipequant {
namespace {

using Args = std::vector<std::string>;

// A valid quantize command line with `extra` options; --out o unless extra gives one.
Args quantize_args(const Args& extra = {}) {
  Args a = {"--model", "/models/m", "--calib", "/data/c.npy", "--seq-len", "128"};
  a.insert(a.end(), extra.begin(), extra.end());
  if (std::find(extra.begin(), extra.end(), "--out") == extra.end()) a.insert(a.end(), {"--out", "o"});
  return a;
}

QuantizeOptions parse(const Args& args) {
  const auto o = parse_quantize_options(args);
  EXPECT_TRUE(o.has_value());
  return o.value_or(QuantizeOptions{});
}

std::string error_of(const Args& args) {
  try {
    parse_quantize_options(args);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

std::set<std::string> keys(const std::string& json) {
  const nlohmann::json j = nlohmann::json::parse(json);
  std::set<std::string> k;
  for (const auto& [key, value] : j.items()) k.insert(key);
  return k;
}

const std::set<std::string> kResultOptions = {
    "act-order", "bits",     "block-size",  "compute-dtype", "damp",          "damp-retries", "group-size",
    "method",    "nsamples", "propagation", "seq-len",       "static-groups", "sym"};

TEST(Cli, FingerprintHasExactlyTheResultOptions) {
  const QuantizeOptions o = parse(quantize_args({"--threads", "2", "--metrics", "m.jsonl", "--backend", "cpu"}));
  EXPECT_EQ(keys(o.fingerprint_args_json), kResultOptions);
  std::set<std::string> recorded = kResultOptions;
  recorded.insert({"model", "calib"});
  EXPECT_EQ(keys(o.args_json), recorded);
}

TEST(Cli, ArgumentsAreTheBytesWrittenBeforeTheRoles) {
  // what model.h5 of `pipequant quantize` recorded for this command line before the options had roles: outputs
  // written then must still resume
  const QuantizeOptions o = parse({"--model", "/work/shared/testdata/stories260K", "--calib",
                                   "/work/shared/testdata/text/tinystories_calib.tok512.npy", "--seq-len", "128",
                                   "--nsamples", "8", "--bits", "4", "--group-size", "32", "--out", "q"});
  EXPECT_EQ(o.args_json,
            R"({"act-order":false,"bits":4,"block-size":128,"calib":"/work/shared/testdata/text/)"
            R"(tinystories_calib.tok512.npy","compute-dtype":"auto","damp":0.01,"damp-retries":4,"group-size":32,)"
            R"("method":"gptq","model":"/work/shared/testdata/stories260K","nsamples":8,"propagation":"quantized",)"
            R"("seq-len":128,"static-groups":false,"sym":false})");
  EXPECT_EQ(o.fingerprint_args_json,
            R"({"act-order":false,"bits":4,"block-size":128,"compute-dtype":"auto","damp":0.01,"damp-retries":4,)"
            R"("group-size":32,"method":"gptq","nsamples":8,"propagation":"quantized","seq-len":128,)"
            R"("static-groups":false,"sym":false})");
}

TEST(Cli, RunOptionsAndInputPathsLeaveTheFingerprintAlone) {
  const QuantizeOptions base = parse(quantize_args());
  const std::vector<Args> changes = {{"--threads", "3"},
                                     {"--out", "elsewhere"},
                                     {"--micro-batch", "2"},
                                     {"--ranks-per-stage", "2"},
                                     {"--blocks-per-stage", "2"},
                                     {"--backend", "cpu"},
                                     {"--gpu-mem", "1.5"},
                                     {"--metrics", "m.jsonl"},
                                     {"--overwrite"},
                                     {"--dry-run"},
                                     {"--fp-resident-gb", "1"},
                                     {"--host-mem", "64"}};
  for (const Args& change : changes) {
    const QuantizeOptions o = parse(quantize_args(change));
    EXPECT_EQ(o.fingerprint_args_json, base.fingerprint_args_json) << change[0];
    EXPECT_EQ(o.args_json, base.args_json) << change[0];
  }
  Args other_model = quantize_args();
  other_model[1] = "/models/other";  // the checkpoint's content is fingerprinted, not its path
  const QuantizeOptions o = parse(other_model);
  EXPECT_EQ(o.fingerprint_args_json, base.fingerprint_args_json);
  EXPECT_NE(o.args_json, base.args_json);
}

TEST(Cli, ResultOptionsChangeTheFingerprint) {
  const std::string base = parse(quantize_args()).fingerprint_args_json;
  const std::vector<Args> changes = {
      {"--bits", "3"},      {"--method", "rtn"},     {"--group-size", "64"},     {"--sym"},
      {"--act-order"},      {"--damp", "0.1"},       {"--damp-retries", "1"},    {"--block-size", "64"},
      {"--nsamples", "16"}, {"--propagation", "fp"}, {"--compute-dtype", "bf16"}};
  for (const Args& change : changes) EXPECT_NE(parse(quantize_args(change)).fingerprint_args_json, base) << change[0];
  EXPECT_NE(parse(quantize_args({"--act-order", "--static-groups"})).fingerprint_args_json,
            parse(quantize_args({"--act-order"})).fingerprint_args_json);
}

TEST(Cli, TypedOptions) {
  const QuantizeOptions o = parse(quantize_args({"--bits", "3", "--threads", "5", "--fp-resident-gb", "2", "--sym"}));
  EXPECT_EQ(o.model_dir, "/models/m");
  EXPECT_EQ(o.calib_path, "/data/c.npy");
  EXPECT_EQ(o.out_dir, "o");
  EXPECT_EQ(o.seq_len, 128);
  EXPECT_EQ(o.quant.bits, 3);
  EXPECT_TRUE(o.quant.sym);
  EXPECT_EQ(o.run.threads, 5);
  EXPECT_EQ(o.fp_resident_bytes, uint64_t{2000000000});
  EXPECT_EQ(o.host_mem_gb, 0.0) << "not checked unless given";
  EXPECT_EQ(parse(quantize_args({"--host-mem", "96.5"})).host_mem_gb, 96.5);
  EXPECT_FALSE(parse_quantize_options({"--help"}).has_value());  // help: nothing to run, no option required
}

TEST(Cli, MoeOptions) {
  const QuantizeOptions d = parse(quantize_args());
  EXPECT_EQ(d.moe_calibration, MoeCalibration::kRouted);
  EXPECT_EQ(d.moe_min_tokens, kDefaultMoeMinTokens);
  const QuantizeOptions o = parse(quantize_args({"--moe-calibration", "all", "--moe-min-tokens", "7"}));
  EXPECT_EQ(o.moe_calibration, MoeCalibration::kAll);
  EXPECT_EQ(o.moe_min_tokens, 7);
  EXPECT_NE(o.fingerprint_args_json, d.fingerprint_args_json) << "they change the result";
  EXPECT_THROW(parse(quantize_args({"--moe-min-tokens", "0"})), UserError);
  EXPECT_THROW(parse(quantize_args({"--moe-calibration", "some"})), UserError);
}

TEST(Cli, EnumOptionsAcceptEachSpelling) {
  for (const auto& [s, m] : {std::pair{"gptq", Method::kGptq}, {"rtn", Method::kRtn}, {"awq", Method::kAwq}})
    EXPECT_EQ(parse(quantize_args({"--method", s})).quant.method, m) << s;
  for (const auto& [s, p] : {std::pair{"quantized", Propagation::kQuantized}, {"fp", Propagation::kFp}})
    EXPECT_EQ(parse(quantize_args({"--propagation", s})).propagation, p) << s;
  for (const auto& [s, b] :
       {std::pair{"auto", BackendKind::kAuto}, {"cpu", BackendKind::kCpu}, {"cuda", BackendKind::kCuda}})
    EXPECT_EQ(parse(quantize_args({"--backend", s})).run.backend, b) << s;
  for (const auto& [s, d] : {std::pair{"auto", ComputeDtype::kAuto},
                             {"fp32", ComputeDtype::kFp32},
                             {"bf16", ComputeDtype::kBf16},
                             {"fp16", ComputeDtype::kFp16}})
    EXPECT_EQ(parse(quantize_args({"--compute-dtype", s})).run.compute_dtype, d) << s;
}

TEST(Cli, EnumOptionsNameTheirSpellingsWhenGivenABadOne) {
  EXPECT_EQ(error_of(quantize_args({"--backend", "x"})), "--backend: expected auto, cpu or cuda, got 'x'");
  EXPECT_EQ(error_of(quantize_args({"--method", "gptq2"})), "--method: expected gptq, rtn or awq, got 'gptq2'");
  EXPECT_EQ(error_of(quantize_args({"--propagation", "bf16"})), "--propagation: expected quantized or fp, got 'bf16'");
  EXPECT_EQ(error_of(quantize_args({"--compute-dtype", "fp8"})),
            "--compute-dtype: expected auto, fp32, bf16 or fp16, got 'fp8'");
  EXPECT_EQ(parse_enum("--backend", "cuda", kBackendKinds), BackendKind::kCuda);
}

TEST(Cli, TransportIsAutoUnlessGivenAndDoesNotChangeTheResult) {
  EXPECT_EQ(parse(quantize_args()).run.transport, comm::TransportKind::kAuto);
  EXPECT_EQ(parse(quantize_args({"--transport", "mpi"})).run.transport, comm::TransportKind::kMpi);
  EXPECT_EQ(parse(quantize_args({"--transport", "nccl"})).run.transport, comm::TransportKind::kNccl);
  // the same bits either way: not part of the run's fingerprint
  EXPECT_EQ(parse(quantize_args({"--transport", "mpi"})).fingerprint_args_json, parse(quantize_args()).fingerprint_args_json);
}

TEST(Cli, OtherBadOptionsSayWhatWasExpected) {
  EXPECT_NE(error_of(quantize_args({"--bits", "5"})).find("--bits"), std::string::npos);
  EXPECT_NE(error_of(quantize_args({"--threads", "-1"})).find("--threads must be >= 0"), std::string::npos);
  EXPECT_NE(error_of({"--model", "m", "--calib", "c", "--out", "o"}).find("'--seq-len' is required"),
            std::string::npos);
  EXPECT_EQ(error_of(quantize_args({"--transport", "ucx"})), "--transport must be auto, nccl or mpi, got 'ucx'");
  EXPECT_NE(error_of(quantize_args({"--host-mem", "-1"})).find("--host-mem must be >= 0"), std::string::npos);
}

std::string plan_error_of(const Args& args) {
  try {
    parse_plan_options(args);
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

TEST(Cli, PlanOptions) {
  const auto o = parse_plan_options(
      {"--model",    "/models/m", "--world",       "64", "--ranks-per-stage", "2",   "--seq-len",        "2048",
       "--nsamples", "256",       "--micro-batch", "2",  "--propagation",     "fp",  "--fp-resident-gb", "8",
       "--backend",  "cuda",      "--gpu-mem",     "80", "--host-mem",        "512", "--json",           "--verbose"});
  ASSERT_TRUE(o.has_value());
  EXPECT_EQ(o->model_dir, "/models/m");
  EXPECT_EQ(o->world, 64);
  EXPECT_EQ(o->ranks_per_stage, 2);
  EXPECT_EQ(o->seq_len, 2048);
  EXPECT_EQ(o->nsamples, 256);
  EXPECT_EQ(o->run.micro_batch, 2);
  EXPECT_EQ(o->propagation, Propagation::kFp);
  EXPECT_EQ(o->fp_resident_bytes, uint64_t{8000000000});
  EXPECT_EQ(o->run.backend, BackendKind::kCuda);
  EXPECT_EQ(o->run.gpu_mem_gb, 80.0);
  EXPECT_EQ(o->host_mem_gb, 512.0);
  EXPECT_TRUE(o->json);
  EXPECT_TRUE(o->verbose);
  // the defaults: the ranks running it (1 here), quantize's 128 samples at most, no budget, the table
  const auto d = parse_plan_options({"--model", "m", "--seq-len", "128"});
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(d->world, 1);
  EXPECT_EQ(d->nsamples, 128);
  EXPECT_EQ(d->host_mem_gb, 0.0);
  EXPECT_FALSE(d->json);
  EXPECT_FALSE(parse_plan_options({"--help"}).has_value());
  EXPECT_NE(plan_error_of({"--model", "m"}).find("'--seq-len' is required"), std::string::npos);
  EXPECT_NE(plan_error_of({"--seq-len", "8"}).find("'--model' is required"), std::string::npos);
  EXPECT_NE(plan_error_of({"--model", "m", "--seq-len", "8", "--world", "0"}).find("--world must be positive"),
            std::string::npos);
  EXPECT_EQ(plan_error_of({"--model", "m", "--seq-len", "8", "--backend", "tpu"}),
            "--backend: expected auto, cpu or cuda, got 'tpu'");
}

}  // namespace
}  // namespace pipequant

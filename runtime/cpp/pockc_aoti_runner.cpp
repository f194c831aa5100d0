// pockc_aoti_runner: train with a pockc AOTInductor package, no Python.
//
//   pockc_aoti_runner PACKAGE.pt2 BATCHES.pt OUT.pt [--steps N] [--lr LR] [--start-step K] [--quiet]
//
// PACKAGE.pt2  a step exported with step.export(path, target="aoti") (runtime/aoti.py).
// BATCHES.pt   torch.save of a list of batches, each a list of the batch's tensors in the step's
//              order (pockc.runtime.aoti.write_batches writes it); step i uses batch i % count.
// OUT.pt       written at the end (torch.load reads it; pockc.runtime.aoti.read_runner_output):
//              a dict {"tensor/<key>": trained tensor, ..., "losses": float64 [N],
//              "step_count": int64 []}, where <key> is a trained parameter's name,
//              "buffer/<name>" or "optimizer/<param>/<state>".
// --steps N       steps to run (default: one per batch)
// --lr LR         learning rate (default: the exported optimizer's)
// --start-step K  step count of the first step (default: the package's; sets AdamW's bias
//                 corrections and SGD dampening's first step)
//
// The package's compiled library holds no weights: its tensors are the record pockc/state.pt of
// the .pt2 archive, loaded here as user-managed constants, so the runtime trains them in place and
// this program writes them out. The per-step scalars are computed as runtime/optim.py computes
// them (Optimizer.scalars), in double precision.
//
// Build (runtime/cpp/README.md; or python -m pockc.runtime.aoti build-runner DIR):
//   TORCH=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -std=c++17 -O2 -D_GLIBCXX_USE_CXX11_ABI=1 pockc_aoti_runner.cpp -o pockc_aoti_runner \
//       -I$TORCH/include -I$TORCH/include/torch/csrc/api/include \
//       -L$TORCH/lib -Wl,-rpath,$TORCH/lib -ltorch -ltorch_cpu -lc10

#include <ATen/ATen.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using Metadata = std::unordered_map<std::string, std::string>;

[[noreturn]] void fail(const std::string& msg) {
  throw std::runtime_error(msg);
}

std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path + ": cannot open");
  return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_file_atomic(const std::string& path, const std::vector<char>& data) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) fail(tmp + ": cannot write");
    f.write(data.data(), static_cast<std::streamsize>(data.size()));
    f.flush();
    if (!f) fail(tmp + ": write failed");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(path + ": cannot rename " + tmp + " over it");
}

const std::string& meta(const Metadata& m, const std::string& key) {
  auto it = m.find(key);
  if (it == m.end()) fail("the package's metadata lacks " + key + " (not exported by pockc?)");
  return it->second;
}

double meta_double(const Metadata& m, const std::string& key, double fallback) {
  auto it = m.find(key);
  return it == m.end() ? fallback : std::stod(it->second);
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) {
    if (!cur.empty()) out.push_back(cur);
  }
  return out;
}

// The optimizer's per-step scalars, as runtime/optim.py's scalars(step_count) computes them.
struct Scalars {
  std::string type;
  double lr, momentum, dampening, weight_decay, beta1, beta2;

  explicit Scalars(const Metadata& m)
      : type(meta(m, "pockc.optimizer")),
        lr(meta_double(m, "pockc.opt.lr", 1e-3)),
        momentum(meta_double(m, "pockc.opt.momentum", 0.0)),
        dampening(meta_double(m, "pockc.opt.dampening", 0.0)),
        weight_decay(meta_double(m, "pockc.opt.weight_decay", 0.0)),
        beta1(meta_double(m, "pockc.opt.beta1", 0.9)),
        beta2(meta_double(m, "pockc.opt.beta2", 0.999)) {
    if (type != "SGD" && type != "AdamW") fail("unknown optimizer " + type + " in the package");
  }

  double value(const std::string& name, int64_t step_count) const {
    if (type == "SGD") {
      if (name == "neg_lr") return -lr;
      // torch.optim starts the momentum buffer at the raw gradient; pockc's starts at zero.
      if (name == "grad_scale") return step_count == 0 ? 1.0 : 1.0 - dampening;
    } else {
      const double step = static_cast<double>(step_count + 1);  // torch.optim counts from 1
      if (name == "decay") return 1 - lr * weight_decay;
      if (name == "neg_step_size") return -lr / (1 - std::pow(beta1, step));
      if (name == "bias_correction2_sqrt") return std::sqrt(1 - std::pow(beta2, step));
    }
    fail("unknown per-step scalar " + name + " for " + type);
  }
};

// {name: tensor} from a torch.save'd / pickle_save'd dict of str -> Tensor.
std::unordered_map<std::string, at::Tensor> tensor_dict(const c10::IValue& v, const std::string& what) {
  if (!v.isGenericDict()) fail(what + ": not a dict of tensors");
  std::unordered_map<std::string, at::Tensor> out;
  for (const auto& item : v.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor()) fail(what + ": not a dict of str -> tensor");
    out.emplace(item.key().toStringRef(), item.value().toTensor());
  }
  return out;
}

std::vector<std::vector<at::Tensor>> read_batches(const std::string& path) {
  c10::IValue v = torch::jit::pickle_load(read_file(path));
  if (!v.isList() && !v.isTuple()) fail(path + ": not a list of batches");
  std::vector<std::vector<at::Tensor>> out;
  auto elems = v.isList() ? v.toListRef().vec() : v.toTupleRef().elements().vec();
  for (const auto& b : elems) {
    std::vector<at::Tensor> batch;
    if (b.isTensor()) {
      batch.push_back(b.toTensor());
    } else if (b.isList() || b.isTuple()) {
      for (const auto& t : (b.isList() ? b.toListRef().vec() : b.toTupleRef().elements().vec())) {
        if (!t.isTensor()) fail(path + ": a batch holds something other than tensors");
        batch.push_back(t.toTensor().contiguous());
      }
    } else {
      fail(path + ": a batch must be a list of tensors");
    }
    out.push_back(std::move(batch));
  }
  if (out.empty()) fail(path + ": no batches");
  return out;
}

struct Args {
  std::string package, batches, out;
  int64_t steps = -1, start_step = -1;
  double lr = std::nan("");
  bool quiet = false;
};

Args parse(int argc, char** argv) {
  Args a;
  std::vector<std::string> pos;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) fail(s + " needs a value");
      return argv[++i];
    };
    if (s == "--steps") a.steps = std::stoll(next());
    else if (s == "--lr") a.lr = std::stod(next());
    else if (s == "--start-step") a.start_step = std::stoll(next());
    else if (s == "--quiet") a.quiet = true;
    else if (s == "-h" || s == "--help") fail("usage");
    else pos.push_back(s);
  }
  if (pos.size() != 3) fail("usage");
  a.package = pos[0];
  a.batches = pos[1];
  a.out = pos[2];
  return a;
}

int run(const Args& a) {
  torch::inductor::AOTIModelPackageLoader loader(a.package, "model");
  const Metadata m = loader.get_metadata();
  Scalars opt(m);
  if (!std::isnan(a.lr)) opt.lr = a.lr;
  const auto scalar_names = split(meta(m, "pockc.scalars"), ' ');
  const int64_t n_batch = std::stoll(meta(m, "pockc.batch_tensors"));
  int64_t step_count = a.start_step >= 0 ? a.start_step : std::stoll(meta(m, "pockc.step_count"));

  // The step's tensors: the archive's record pockc/state.pt, handed over as user-managed
  // constants (the runtime reads and writes these tensors; they must outlive the loader's use).
  caffe2::serialize::PyTorchStreamReader archive(a.package);
  auto record = archive.getRecord(meta(m, "pockc.state_record"));
  const char* p = static_cast<const char*>(std::get<0>(record).get());
  auto stored = tensor_dict(torch::jit::pickle_load(std::vector<char>(p, p + std::get<1>(record))),
                            a.package + ":" + meta(m, "pockc.state_record"));
  std::unordered_map<std::string, at::Tensor> constants;
  for (const auto& fqn : loader.get_constant_fqns()) {
    auto it = stored.find(fqn);
    if (it == stored.end()) fail(a.package + ": lacks the tensor of constant " + fqn);
    constants.emplace(fqn, it->second);
  }
  loader.load_constants(constants, /*use_inactive=*/false, /*check_full_update=*/true, /*user_managed=*/true);

  const auto batches = read_batches(a.batches);
  for (const auto& b : batches) {
    if (static_cast<int64_t>(b.size()) != n_batch)
      fail(a.batches + ": a batch has " + std::to_string(b.size()) + " tensors, the step takes " +
           std::to_string(n_batch));
  }
  const int64_t steps = a.steps >= 0 ? a.steps : static_cast<int64_t>(batches.size());
  std::vector<double> losses;
  for (int64_t i = 0; i < steps; ++i, ++step_count) {
    std::vector<at::Tensor> inputs;
    for (const auto& name : scalar_names)
      inputs.push_back(at::scalar_tensor(opt.value(name, step_count), at::kDouble));
    for (const auto& t : batches[i % batches.size()]) inputs.push_back(t);
    auto out = loader.run(inputs);
    if (out.empty()) fail("the step returned nothing");
    losses.push_back(out[0].item<double>());
    if (!a.quiet) std::cout << "step " << step_count << " loss " << losses.back() << "\n";
  }

  c10::Dict<std::string, at::Tensor> result;
  for (const auto& entry : split(meta(m, "pockc.outputs"), ';')) {
    const auto parts = split(entry, ' ');
    if (parts.size() != 2) fail("malformed pockc.outputs entry: " + entry);
    result.insert("tensor/" + parts[1], constants.at(parts[0]));
  }
  result.insert("losses", at::tensor(losses, at::kDouble));
  result.insert("step_count", at::scalar_tensor(static_cast<double>(step_count), at::kLong));
  write_file_atomic(a.out, torch::jit::pickle_save(c10::IValue(result)));
  if (!a.quiet) std::cout << "wrote " << a.out << " after " << steps << " steps\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (msg == "usage") {
      std::cerr << "usage: pockc_aoti_runner PACKAGE.pt2 BATCHES.pt OUT.pt [--steps N] [--lr LR] "
                   "[--start-step K] [--quiet]\n";
      return 2;
    }
    std::cerr << "error: " << msg.substr(0, msg.find('\n')) << "\n";
    return 1;
  }
}

// Every decoder layer of a step of decodes (and short draft trees) in one native call.
//
// At batch 1 the int8 weights stream in ~5 ms, yet the eager step took ~15: each
// layer ran ~20 small ops around its matmuls (norms, RoPE, the KV write, views,
// residual adds) at ~5-10 us of Python and dispatch apiece. Here the layers run
// from C++: the float linear as an aten op, the native kernels for the rest
// (layer_ops.cpp's RMSNorm and SiLU * up, the w8a8 linear with the residual add
// folded in, decode attention), plus one loop that rotates q and k and stores k
// and v in the pool. Steps with prompt chunks keep the module path (llama.py),
// which calls the same native ops, so a decode row gets the same bits on either.
#include "kernels.h"

#include <torch/extension.h>   // pybind11

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Linear {
  // float: weight [out, in]. w8a8: int8 [out, in] with per-output-channel `scales`. gguf 4-bit: blocks uint8
  // (q4_linear.cpp's layout) with their block scales. Weight-only int8 / 4-bit: panels of 16 columns
  // (weight_only_linear.cpp), with per-column scales / group scales and `offsets`.
  enum class Kind { Float, W8A8, Q4, Int8Weight, Int4Weight };
  Kind kind = Kind::Float;
  torch::Tensor weight;
  torch::Tensor scales;   // undefined for a float weight
  torch::Tensor offsets;  // 4-bit weight-only only
  c10::optional<torch::Tensor> bias;
  int64_t n_out = 0;      // the layer's outputs (4-bit groups and panels are padded)

  torch::Tensor operator()(const torch::Tensor& x) const {
    switch (kind) {
      case Kind::Q4: return q4_linear(x, weight, scales, n_out, bias);
      case Kind::W8A8: return w8a8_linear(x, weight.t(), scales, bias);
      case Kind::Int8Weight: return int8_weight_linear(x, weight, scales, n_out, bias);
      case Kind::Int4Weight:
        return int4_weight_linear(x, weight, scales, offsets, weight.size(1) / scales.size(1), n_out, bias);
      default: return at::linear(x, weight, bias);
    }
  }

  // this(x), written into `buffer` (a contiguous float [M, n_out]) where the kernel can: a 4-bit linear. The other
  // kinds return a tensor of their own.
  torch::Tensor into(const torch::Tensor& x, torch::Tensor& buffer) const {
    if (kind != Kind::Q4) return (*this)(x);
    q4_linear_into(x, weight, scales, n_out, bias, buffer, false);
    return buffer;
  }

  // h += this(x): for the integer kernels inside the linear's own output loop (one op less per call)
  void add_into(const torch::Tensor& x, torch::Tensor& h) const {
    if (kind == Kind::Q4) q4_linear(x, weight, scales, n_out, bias, h);
    else if (kind == Kind::W8A8) w8a8_linear(x, weight.t(), scales, bias, h);
    else h.add_((*this)(x));
  }
};

struct Layer {
  torch::Tensor input_norm, post_norm, q_norm, k_norm;   // q/k norms undefined unless the model has them (Qwen3)
  Linear qkv, o, gate_up, down;
  torch::Tensor k_pool, v_pool;                          // [blocks, kv_heads, block_size, head_dim] float32/16 or int8
  // int8 pools (kvloom/kv/int8_kv_cache.py): key scales [blocks, kv_heads, head_dim] (set when a block is
  // sealed, in Python), value scales [blocks, kv_heads, block_size], float key staging [slots, kv_heads, bs, d]
  torch::Tensor k_scale, v_scale, k_stage;
  // LoRA adapter slots (kvloom/lora/tables.py) of qkv, o, gate_up, down: a [S, R, in], b_t [S, R, out]; undefined
  // until set_lora.
  torch::Tensor lora_a[4], lora_b[4], lora_spans[4];
  bool int8() const { return k_pool.scalar_type() == torch::kChar; }
  bool half() const { return k_pool.scalar_type() == torch::kHalf; }
};

// A value row to int8 with one scale, as int8_kv_cache.quantize_rows does it in PyTorch (the module path
// writes prompt chunks' values that way): scale = max(absmax, 1e-8) / 127, round half to even, clamp.
inline void quantize_value_row(const float* x, int8_t* q, float* scale, int64_t d) {
  float amax = 0.f;
  for (int64_t i = 0; i < d; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = std::max(amax, 1e-8f) / 127.f;
  for (int64_t i = 0; i < d; ++i) q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] / s))));
  *scale = s;
}

// x * cos + rotate_half(x) * sin over one head, as llama.py's apply_rope computes it (sin's first half
// negated, so rotate_half is a roll). Three roundings, no fused multiply-add: the same bits as the
// module path, which still computes the K/V of prompt chunks.
__attribute__((optimize("fp-contract=off")))
inline void rotate(const float* x, const float* cos, const float* sin, float* out, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + x[i + half] * sin[i];
  for (int64_t i = half; i < d; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// A step's activations, made once a step and reused by every layer. Each layer had made its own (norms, the
// q/k/v and gate/up products, rotated queries, attention, SiLU * up): ~270 tensors a batch-1 step of the default
// model, each a dispatch and an allocation on the engine thread while the other core waited.
struct Workspace {
  torch::Tensor normed;     // [M, hidden]: either norm's output
  torch::Tensor qkv;        // [M, (H + 2 KVH) D]
  torch::Tensor q;          // [M, H, D]: rotated queries
  torch::Tensor attn;       // [M, H, D]: the attention's output
  torch::Tensor attn_rows;  // the same as [M, H D]: the o projection's input
  torch::Tensor gate_up;    // [M, 2 I]
  torch::Tensor act;        // [M, I]
};

}  // namespace

class DecodeStack {
 public:
  DecodeStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate_size, double eps,
              double scale)
      : H_(num_heads), KVH_(num_kv_heads), D_(head_dim), I_(intermediate_size), eps_(eps), scale_(scale) {}

  // One linear is (weight, scales or None, bias or None).
  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, c10::optional<torch::Tensor> q_norm,
                 c10::optional<torch::Tensor> k_norm, std::vector<c10::optional<torch::Tensor>> qkv,
                 std::vector<c10::optional<torch::Tensor>> o, std::vector<c10::optional<torch::Tensor>> gate_up,
                 std::vector<c10::optional<torch::Tensor>> down, torch::Tensor k_pool, torch::Tensor v_pool) {
    const auto kind = k_pool.scalar_type();
    TORCH_CHECK((kind == torch::kFloat || kind == torch::kHalf || kind == torch::kChar) &&
                v_pool.scalar_type() == kind && k_pool.is_contiguous() && v_pool.is_contiguous(),
                "float32, float16 or int8 KV pools");
    Layer l;
    l.input_norm = input_norm;
    l.post_norm = post_norm;
    if (q_norm) l.q_norm = *q_norm;
    if (k_norm) l.k_norm = *k_norm;
    const int64_t hidden = input_norm.size(0);
    l.qkv = linear(qkv, (H_ + 2 * KVH_) * D_);
    l.o = linear(o, hidden);
    l.gate_up = linear(gate_up, 2 * I_);
    l.down = linear(down, hidden);
    l.k_pool = k_pool;
    l.v_pool = v_pool;
    layers_.push_back(std::move(l));
  }

  // The int8 pools' scales and key staging, one entry a layer; again whenever the staging grows (the
  // cache then holds new tensors).
  void set_int8_kv(std::vector<torch::Tensor> k_scales, std::vector<torch::Tensor> v_scales,
                   std::vector<torch::Tensor> k_stages) {
    TORCH_CHECK(k_scales.size() == layers_.size() && v_scales.size() == layers_.size() &&
                k_stages.size() == layers_.size(), "one scale and staging tensor a layer");
    for (size_t i = 0; i < layers_.size(); ++i) {
      TORCH_CHECK(layers_[i].int8(), "set_int8_kv on float pools");
      TORCH_CHECK(k_scales[i].scalar_type() == torch::kFloat && v_scales[i].scalar_type() == torch::kFloat &&
                  k_stages[i].scalar_type() == torch::kFloat && v_scales[i].is_contiguous() && k_stages[i].is_contiguous(),
                  "float32 contiguous scales and staging");
      layers_[i].k_scale = k_scales[i];
      layers_[i].v_scale = v_scales[i];
      layers_[i].k_stage = k_stages[i];
    }
  }

  // The LoRA slot tables, one entry a layer: (a, b_t, spans) of qkv, o, gate_up and down, in that order. The tables are
  // written in place when an adapter takes a slot, so this is called once.
  void set_lora(std::vector<std::vector<torch::Tensor>> tables) {
    TORCH_CHECK(tables.size() == layers_.size(), "one LoRA table set a layer");
    for (size_t i = 0; i < layers_.size(); ++i) {
      TORCH_CHECK(tables[i].size() == 12, "LoRA tables: (a, b_t, spans) of qkv, o, gate_up, down");
      for (int j = 0; j < 4; ++j) {
        layers_[i].lora_a[j] = tables[i][3 * j];
        layers_[i].lora_b[j] = tables[i][3 * j + 1];
        layers_[i].lora_spans[j] = tables[i][3 * j + 2];
      }
    }
  }

  // h [M, hidden] float, one row per query token, updated in place through every layer. A row is a decode,
  // or one token of a short chunk (a prompt's tail, a draft tree) seeing its own prefix.
  // cos, sin [M, head_dim] (llama.py's tables); write_blocks, write_offsets [M]: where each row's K/V goes;
  // tables [M, W], lens [M]: each row's blocks and context length including itself; masks [M] (optional):
  // which of the last 64 positions a row sees (paged_decode_attention.cpp). Every row's K/V is stored
  // before any row attends, so a chunk's rows see each other. int8 pools: write_slots [M], the staging slot
  // each row's key goes to, and slots [M, W], each table entry's slot (-1: sealed).
  torch::Tensor forward(torch::Tensor h, torch::Tensor cos, torch::Tensor sin, torch::Tensor write_blocks,
                        torch::Tensor write_offsets, torch::Tensor tables, torch::Tensor lens,
                        c10::optional<torch::Tensor> masks, c10::optional<torch::Tensor> write_slots,
                        c10::optional<torch::Tensor> slots, c10::optional<torch::Tensor> lora_slots) {
    TORCH_CHECK(h.dim() == 2 && h.scalar_type() == torch::kFloat && h.is_contiguous(), "h: contiguous float [M, hidden]");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(-1) == D_, "cos/sin: contiguous [M, head_dim]");
    const int64_t M = h.size(0);
    const bool int8 = !layers_.empty() && layers_[0].int8();
    if (int8)
      TORCH_CHECK(write_slots.has_value() && slots.has_value() && layers_[0].k_stage.defined() &&
                  write_slots->scalar_type() == torch::kLong && write_slots->numel() == M,
                  "int8 pools: set_int8_kv first, and write_slots [M] and slots [M, W] each step");
    // lora_slots [M]: each row's adapter slot (-1: none); the deltas are added as llama.py adds them: onto
    // each linear's own output, before the residual add.
    const bool lora = lora_slots.has_value() && !layers_.empty() && layers_[0].lora_a[0].defined();
    auto with_lora = [&](const Layer& l, int j, const Linear& lin, const torch::Tensor& x) {
      auto y = lin(x);
      if (lora) lora_add(x, y, l.lora_a[j], l.lora_b[j], *lora_slots, l.lora_spans[j]);
      return y;
    };
    const auto f32 = h.options();
    Workspace ws;
    ws.normed = torch::empty({M, h.size(1)}, f32);
    ws.qkv = torch::empty({M, (H_ + 2 * KVH_) * D_}, f32);
    ws.q = torch::empty({M, H_, D_}, f32);
    ws.attn = torch::empty({M, H_, D_}, f32);
    ws.attn_rows = ws.attn.view({M, H_ * D_});
    ws.gate_up = torch::empty({M, 2 * I_}, f32);
    ws.act = torch::empty({M, I_}, f32);
    for (const Layer& l : layers_) {
      rms_norm_into(h, l.input_norm, eps_, ws.normed);
      torch::Tensor qkv = l.qkv.into(ws.normed, ws.qkv);
      if (lora) lora_add(ws.normed, qkv, l.lora_a[0], l.lora_b[0], *lora_slots, l.lora_spans[0]);
      attention_inputs(l, qkv, cos, sin, write_blocks, write_offsets, int8 ? write_slots->data_ptr<int64_t>() : nullptr,
                       ws.q);
      if (int8)
        decode_attention_i8_into(ws.q, l.k_pool, l.k_scale, l.v_pool, l.v_scale, l.k_stage, tables, *slots, lens, scale_,
                                 masks, ws.attn);
      else
        decode_attention_f32_into(ws.q, l.k_pool, l.v_pool, tables, lens, scale_, masks, 0, ws.attn);
      if (lora) {
        h.add_(with_lora(l, 1, l.o, ws.attn_rows));
        rms_norm_into(h, l.post_norm, eps_, ws.normed);
        torch::Tensor gate_up = l.gate_up.into(ws.normed, ws.gate_up);
        lora_add(ws.normed, gate_up, l.lora_a[2], l.lora_b[2], *lora_slots, l.lora_spans[2]);
        silu_mul_into(gate_up, ws.act);
        h.add_(with_lora(l, 3, l.down, ws.act));
      } else {
        l.o.add_into(ws.attn_rows, h);
        rms_norm_into(h, l.post_norm, eps_, ws.normed);
        silu_mul_into(l.gate_up.into(ws.normed, ws.gate_up), ws.act);
        l.down.add_into(ws.act, h);
      }
    }
    return h;
  }

 private:
  static Linear linear(const std::vector<c10::optional<torch::Tensor>>& parts, int64_t n_out) {
    TORCH_CHECK((parts.size() == 3 || parts.size() == 4) && parts[0].has_value(),
                "a linear is (weight, scales or None, bias or None[, offsets])");
    Linear lin;
    lin.weight = *parts[0];
    lin.n_out = n_out;
    if (parts[1]) lin.scales = *parts[1];
    lin.bias = parts[2];
    const bool panels = lin.weight.dim() == 3;
    if (parts.size() == 4 && parts[3]) {
      TORCH_CHECK(panels && lin.weight.scalar_type() == torch::kUInt8, "offsets come with 4-bit weight panels");
      lin.kind = Linear::Kind::Int4Weight;
      lin.offsets = *parts[3];
    } else if (lin.weight.scalar_type() == torch::kUInt8) {
      lin.kind = Linear::Kind::Q4;
    } else if (lin.weight.scalar_type() == torch::kChar) {
      lin.kind = panels ? Linear::Kind::Int8Weight : Linear::Kind::W8A8;
    }
    TORCH_CHECK(lin.kind == Linear::Kind::Float || lin.scales.defined(), "integer weights need their scales");
    return lin;
  }

  // q (rotated) as a contiguous [M, H, D] for the attention kernel; k (rotated) and v stored in the pool
  // (int8 pools: k in float staging at write_slots, v quantized per row; float16 pools: both rounded to
  // nearest even, as the module path's tensor store rounds them).
  void attention_inputs(const Layer& l, const torch::Tensor& qkv, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& write_blocks, const torch::Tensor& write_offsets,
                        const int64_t* write_slots, torch::Tensor& q) const {
    const int64_t M = qkv.size(0), H = H_, KVH = KVH_, D = D_;
    TORCH_CHECK(qkv.is_contiguous(), "the q/k/v product: contiguous");
    // q and k in place in the fused product (row stride (H + 2 KVH) D, head stride D), or normed copies (Qwen3)
    const float *qp = qkv.data_ptr<float>(), *kp = qp + H * D, *vp = qp + (H + KVH) * D;
    int64_t qs0 = qkv.stride(0), qs1 = D, ks0 = qs0, ks1 = D;
    torch::Tensor q_normed, k_normed;
    if (l.q_norm.defined()) {
      auto heads = qkv.view({M, H + 2 * KVH, D});
      q_normed = rms_norm(heads.narrow(1, 0, H), l.q_norm, eps_);
      k_normed = rms_norm(heads.narrow(1, H, KVH), l.k_norm, eps_);
      qp = q_normed.data_ptr<float>(), kp = k_normed.data_ptr<float>();
      qs0 = H * D, ks0 = KVH * D;
    }
    const int64_t BS = l.k_pool.size(2);
    const int64_t vs0 = qkv.stride(0);
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    const int64_t *bp = write_blocks.data_ptr<int64_t>(), *op = write_offsets.data_ptr<int64_t>();
    float* qo = q.data_ptr<float>();
    const bool int8 = l.int8(), half = l.half();
    float* kpool = int8 ? l.k_stage.data_ptr<float>() : half ? nullptr : l.k_pool.data_ptr<float>();
    float* vpool = int8 || half ? nullptr : l.v_pool.data_ptr<float>();
    c10::Half* kpool16 = half ? l.k_pool.data_ptr<c10::Half>() : nullptr;
    c10::Half* vpool16 = half ? l.v_pool.data_ptr<c10::Half>() : nullptr;
    int8_t* vq = int8 ? l.v_pool.data_ptr<int8_t>() : nullptr;
    float* vscale = int8 ? l.v_scale.data_ptr<float>() : nullptr;
    at::parallel_for(0, M, 8, [&](int64_t b, int64_t e) {
      std::vector<float> rotated(half ? D : 0);
      for (int64_t m = b; m < e; ++m) {
        const float *c = cp + m * D, *s = sp + m * D;
        for (int64_t head = 0; head < H; ++head) rotate(qp + m * qs0 + head * qs1, c, s, qo + (m * H + head) * D, D);
        for (int64_t head = 0; head < KVH; ++head) {
          const int64_t row = (bp[m] * KVH + head) * BS + op[m];
          const float* v = vp + m * vs0 + head * D;
          if (int8) {
            rotate(kp + m * ks0 + head * ks1, c, s, kpool + ((write_slots[m] * KVH + head) * BS + op[m]) * D, D);
            quantize_value_row(v, vq + row * D, vscale + row, D);
          } else if (half) {
            rotate(kp + m * ks0 + head * ks1, c, s, rotated.data(), D);
            std::copy(rotated.begin(), rotated.end(), kpool16 + row * D);   // c10::Half rounds to nearest even
            std::copy(v, v + D, vpool16 + row * D);
          } else {
            rotate(kp + m * ks0 + head * ks1, c, s, kpool + row * D, D);
            std::copy(v, v + D, vpool + row * D);
          }
        }
      }
    });
  }

  int64_t H_, KVH_, D_, I_;
  double eps_, scale_;
  std::vector<Layer> layers_;
};

void register_decode_stack(pybind11::module_& m) {
  // module_local: builds for two ISA classes can be loaded in one process (the tests do) without the second
  // one's registration of the same C++ type failing.
  pybind11::class_<DecodeStack>(m, "DecodeStack", pybind11::module_local())
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("set_int8_kv", &DecodeStack::set_int8_kv)
      .def("set_lora", &DecodeStack::set_lora)
      // The GIL is released for the whole stack: the server's event loop keeps going meanwhile.
      .def("forward", &DecodeStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}

// CPU implementation of the block-diffusion union mask (t3s_kernels.block_diffusion), registered as the torch
// op `torch.ops.t3s.union_mask`. Same semantics and the same Philox stream as the Triton kernel
// (t3s_kernels/block_diffusion/kernels.py): the uniform of token g is Triton's tl.rand(seed, step * 2^32 + g),
// i.e. Philox4x32-10 with key (seed lo32, seed hi32), counter (g lo32, step, 0, 0), first word, converted by
// Triton's uint_to_uniform_float. Built on first use by t3s_kernels/block_diffusion/cpu.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace {

inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
}

// triton/language/random.py: philox_impl (uint32 branch), 10 rounds; returns the first output word.
inline uint32_t philox_first_word(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint32_t _c0 = c0, _c2 = c2;
    c0 = mulhi32(0xCD9E8D57u, _c2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, _c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * _c2;
    c3 = 0xD2511F53u * _c0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// triton/language/random.py: uint_to_uniform_float (32-bit branch).
inline float uint_to_uniform_float(uint32_t x) {
  int32_t v = static_cast<int32_t>(x);
  if (v < 0) v = ~v;
  volatile float f = static_cast<float>(v);  // no fused/contracted arithmetic: one rounding, then one multiply
  return f * 4.6566127342e-10f;
}

template <typename id_t>
void run(const id_t* ids, const uint8_t* maskable, const uint8_t* valid, const uint8_t* target,
         const int64_t* doc_start, const int64_t* doc_len, const int64_t* blk_ptr, const float* p_blk,
         const float* wr_blk, const float* wt_blk, const float* wrc_blk, const float* wtc_blk, id_t* noisy,
         float* weight, uint8_t* code, int32_t* cnt, id_t* noisy_c, float* weight_c, uint8_t* code_c,
         int32_t* cnt_c, int64_t n_docs, uint64_t seed, uint64_t step, int64_t token_offset, int64_t mask_id,
         int64_t bs, bool comp) {
  const uint32_t k0 = static_cast<uint32_t>(seed & 0xFFFFFFFFull);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t c1 = static_cast<uint32_t>(step & 0xFFFFFFFFull);
  int64_t n_tok = 0;
  for (int64_t d = 0; d < n_docs; ++d) n_tok += doc_len[d];
  const int64_t grain = std::max<int64_t>(1, n_tok > 0 ? (16384 * n_docs) / n_tok : n_docs);  // ~16K tokens a task
  at::parallel_for(0, n_docs, grain, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) {
      const int64_t s = doc_start[d], n = doc_len[d];
      for (int64_t b = blk_ptr[d]; b < blk_ptr[d + 1]; ++b) {
        const int64_t k = b - blk_ptr[d];
        const int64_t a = s + k * bs, e = std::min(s + (k + 1) * bs, s + n);
        int32_t c[5] = {0, 0, 0, 0, 0}, cc[5] = {0, 0, 0, 0, 0};
        for (int64_t i = a; i < e; ++i) {
          const bool real = valid == nullptr || valid[i] != 0;
          const bool r = real && maskable[i] != 0;
          const bool tg = r && target != nullptr && target[i] != 0;
          const uint32_t g = static_cast<uint32_t>(static_cast<uint64_t>(token_offset + i) & 0xFFFFFFFFull);
          const float u = uint_to_uniform_float(philox_first_word(g, c1, 0u, 0u, k0, k1));
          const bool m = r && (u < p_blk[b]);
          const bool un = m || tg;
          noisy[i] = un ? static_cast<id_t>(mask_id) : ids[i];
          weight[i] = tg ? wt_blk[b] : (m ? wr_blk[b] : 0.0f);
          code[i] = !real ? 5 : (!r ? 4 : (tg ? (m ? 2 : 3) : (m ? 1 : 0)));
          c[0] += r; c[1] += m; c[2] += un; c[3] += tg; c[4] += tg && !m;
          if (comp) {
            const bool mc = r && !m;
            const bool unc = mc || tg;
            noisy_c[i] = unc ? static_cast<id_t>(mask_id) : ids[i];
            weight_c[i] = tg ? wtc_blk[b] : (mc ? wrc_blk[b] : 0.0f);
            code_c[i] = !real ? 5 : (!r ? 4 : (tg ? (mc ? 2 : 3) : (mc ? 1 : 0)));
            cc[0] += r; cc[1] += mc; cc[2] += unc; cc[3] += tg; cc[4] += tg && !mc;
          }
        }
        for (int j = 0; j < 5; ++j) {
          cnt[b * 5 + j] = c[j];
          if (comp) cnt_c[b * 5 + j] = cc[j];
        }
      }
    }
  });
}

// Writes into the preallocated outputs (the caller allocates and handles tokens outside every document).
void union_mask(const at::Tensor& ids, const at::Tensor& maskable, const c10::optional<at::Tensor>& valid,
                const c10::optional<at::Tensor>& target, const at::Tensor& doc_start, const at::Tensor& doc_len,
                const at::Tensor& blk_ptr, const at::Tensor& p_blk, const at::Tensor& wr_blk,
                const at::Tensor& wt_blk, const c10::optional<at::Tensor>& wrc_blk,
                const c10::optional<at::Tensor>& wtc_blk, at::Tensor noisy, at::Tensor weight, at::Tensor code,
                at::Tensor counts, const c10::optional<at::Tensor>& noisy_c, const c10::optional<at::Tensor>& weight_c,
                const c10::optional<at::Tensor>& code_c, const c10::optional<at::Tensor>& counts_c, int64_t seed,
                int64_t step, int64_t token_offset, int64_t mask_token_id, int64_t block_size) {
  TORCH_CHECK(ids.device().is_cpu() && ids.is_contiguous(), "union_mask: ids must be a contiguous CPU tensor");
  TORCH_CHECK(maskable.scalar_type() == at::kByte, "union_mask: maskable must be uint8");
  TORCH_CHECK(block_size > 0, "union_mask: block_size must be positive");
  // The Python API validates mask_token_id first; this guards direct callers of the op against a silent cast.
  const int64_t id_max = ids.scalar_type() == at::kLong ? std::numeric_limits<int64_t>::max()
                                                        : static_cast<int64_t>(std::numeric_limits<int32_t>::max());
  TORCH_CHECK(mask_token_id >= 0 && mask_token_id <= id_max, "union_mask: mask_token_id=", mask_token_id,
              " must be a token id in [0, ", id_max, "] for ", ids.scalar_type(), " ids");
  const bool comp = noisy_c.has_value();
  auto ptr_u8 = [](const c10::optional<at::Tensor>& t) -> const uint8_t* {
    return t.has_value() ? t->data_ptr<uint8_t>() : nullptr;
  };
  auto ptr_f = [](const c10::optional<at::Tensor>& t) -> const float* {
    return t.has_value() ? t->data_ptr<float>() : nullptr;
  };
#define T3S_RUN(ID_T)                                                                                            \
  run<ID_T>(ids.data_ptr<ID_T>(), maskable.data_ptr<uint8_t>(), ptr_u8(valid), ptr_u8(target),                   \
            doc_start.data_ptr<int64_t>(), doc_len.data_ptr<int64_t>(), blk_ptr.data_ptr<int64_t>(),             \
            p_blk.data_ptr<float>(), wr_blk.data_ptr<float>(), wt_blk.data_ptr<float>(), ptr_f(wrc_blk),          \
            ptr_f(wtc_blk), noisy.data_ptr<ID_T>(), weight.data_ptr<float>(), code.data_ptr<uint8_t>(),          \
            counts.data_ptr<int32_t>(), comp ? noisy_c->data_ptr<ID_T>() : nullptr,                              \
            comp ? weight_c->data_ptr<float>() : nullptr, comp ? code_c->data_ptr<uint8_t>() : nullptr,          \
            comp ? counts_c->data_ptr<int32_t>() : nullptr, doc_start.numel(), static_cast<uint64_t>(seed),       \
            static_cast<uint64_t>(step), token_offset, mask_token_id, block_size, comp)
  if (ids.scalar_type() == at::kLong) {
    T3S_RUN(int64_t);
  } else {
    TORCH_CHECK(ids.scalar_type() == at::kInt, "union_mask: ids must be int32 or int64");
    T3S_RUN(int32_t);
  }
#undef T3S_RUN
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(t3s, m) {
  m.def(
      "union_mask(Tensor ids, Tensor maskable, Tensor? valid, Tensor? target, Tensor doc_start, Tensor doc_len, "
      "Tensor blk_ptr, Tensor p_blk, Tensor wr_blk, Tensor wt_blk, Tensor? wrc_blk, Tensor? wtc_blk, "
      "Tensor(a!) noisy, Tensor(b!) weight, Tensor(c!) code, Tensor(d!) counts, Tensor(e!)? noisy_c, "
      "Tensor(f!)? weight_c, Tensor(g!)? code_c, Tensor(h!)? counts_c, int seed, int step, int token_offset, "
      "int mask_token_id, int block_size) -> ()");
}

TORCH_LIBRARY_IMPL(t3s, CPU, m) { m.impl("union_mask", &union_mask); }

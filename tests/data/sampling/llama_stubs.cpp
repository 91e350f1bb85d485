// Link stubs: llama-sampler.cpp / llama-vocab.cpp reference these llama-context and model-loader
// functions; the sampler chain on a plain token array never calls them (abort if it did).
#include <cstdlib>
#include <cstdint>
#include <vector>
#include <string>
#include "llama.h"
#include "llama-arch.h"
#include "llama-model-loader.h"
#include "llama-mmap.h"
[[noreturn]] static void stub() { abort(); }
std::string LLM_KV::operator()(llm_kv) const { stub(); }
template<> bool llama_model_loader::get_key<bool>(enum llm_kv, bool&, bool) { stub(); }
template<> bool llama_model_loader::get_key<std::string>(enum llm_kv, std::string&, bool) { stub(); }
template<> bool llama_model_loader::get_key<uint32_t>(enum llm_kv, uint32_t&, bool) { stub(); }
void llama_prefetch(std::vector<llama_memory_range>) { stub(); }
extern "C" {
const llama_vocab * llama_model_get_vocab(const llama_model *) { stub(); }
llama_token llama_get_sampled_token_ith(llama_context *, int32_t) { stub(); }
float * llama_get_sampled_probs_ith(llama_context *, int32_t) { stub(); }
uint32_t llama_get_sampled_probs_count_ith(llama_context *, int32_t) { stub(); }
float * llama_get_sampled_logits_ith(llama_context *, int32_t) { stub(); }
uint32_t llama_get_sampled_logits_count_ith(llama_context *, int32_t) { stub(); }
llama_token * llama_get_sampled_candidates_ith(llama_context *, int32_t) { stub(); }
const llama_model * llama_get_model(const llama_context *) { stub(); }
float * llama_get_logits_ith(llama_context *, int32_t) { stub(); }
}

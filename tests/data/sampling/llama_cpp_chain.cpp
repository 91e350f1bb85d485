// llama.cpp's sampler chain on given logits, for tests/test_sampling.py's golden tokens.
// The chain is common_sampler's default (common/sampling.cpp, common/common.h) restricted to
// the stages quantref has: penalties, top_k, top_p, min_p, temp_ext, dist(seed); the others of
// the default chain (dry, top_n_sigma, typical, xtc) are no-ops at their default settings.
// It links llama.cpp's own src/llama-sampler.cpp (see make_golden.py).
//
// stdin, one case per line:
//   seed steps temp top_k top_p min_p repeat last_n freq presence n_hist hist... n_vocab logits...
// stdout, one line per case: the `steps` sampled tokens. Each step applies the chain to the
// same logits, then accepts the sampled token (so the penalties see it), as llama.cpp's
// generation loop does; the history tokens are accepted first, as llama-cli accepts the prompt.
#include <cstdio>
#include <vector>

#include "llama.h"

int main() {
    unsigned seed;
    int steps, top_k, last_n, n_hist, n_vocab;
    float temp, top_p, min_p, rp, freq, presence;
    while (scanf("%u %d %f %d %f %f %f %d %f %f %d", &seed, &steps, &temp, &top_k, &top_p, &min_p,
                 &rp, &last_n, &freq, &presence, &n_hist) == 11) {
        std::vector<llama_token> hist(n_hist);
        for (auto & t : hist) scanf("%d", &t);
        scanf("%d", &n_vocab);
        std::vector<float> logits(n_vocab);
        for (auto & l : logits) scanf("%f", &l);

        llama_sampler * chain = llama_sampler_chain_init(llama_sampler_chain_params{/*.no_perf =*/ true});
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(
            n_vocab, last_n == -1 ? 65536 : last_n, rp, freq, presence));  // -1: the context, as common_sampler
        llama_sampler_chain_add(chain, llama_sampler_init_top_k(top_k));
        llama_sampler_chain_add(chain, llama_sampler_init_top_p(top_p, 0));
        llama_sampler_chain_add(chain, llama_sampler_init_min_p(min_p, 0));
        llama_sampler_chain_add(chain, llama_sampler_init_temp_ext(temp, 0.0f, 1.0f));
        llama_sampler_chain_add(chain, llama_sampler_init_dist(seed));
        for (llama_token t : hist) llama_sampler_accept(chain, t);

        std::vector<llama_token_data> cur(n_vocab);
        for (int s = 0; s < steps; ++s) {
            for (int i = 0; i < n_vocab; ++i) cur[i] = llama_token_data{i, logits[i], 0.0f};
            llama_token_data_array arr = {cur.data(), cur.size(), -1, false};
            llama_sampler_apply(chain, &arr);
            const llama_token id = arr.data[arr.selected].id;
            llama_sampler_accept(chain, id);
            printf(s ? " %d" : "%d", id);
        }
        printf("\n");
        llama_sampler_free(chain);
    }
    return 0;
}

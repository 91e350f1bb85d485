// Golden draws for quantref.generate.SamplerRNG (tests/test_sampling.py).
// llama.cpp's dist sampler (src/llama-sampler.cpp, llama_sampler_dist_apply) draws one
// std::uniform_real_distribution<double>(0.0f, 1.0f) value per token from a std::mt19937
// seeded with the sampling seed. This prints the first draws for a few seeds with the
// host's C++ standard library (libstdc++ here, as llama.cpp's Linux builds use).
// Build and run: g++ -O2 -o /tmp/llama_rng llama_rng.cpp && /tmp/llama_rng
#include <cstdio>
#include <random>

int main() {
    const unsigned seeds[] = {0u, 1u, 42u, 1234u, 4294967294u};
    for (unsigned s : seeds) {
        std::mt19937 rng(s);
        std::uniform_real_distribution<double> dist(0.0f, 1.0f);
        printf("%u:", s);
        for (int i = 0; i < 5; ++i) printf(" %.17g", dist(rng));
        printf("\n");
    }
}

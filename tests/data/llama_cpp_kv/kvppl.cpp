// Perplexity of fixed windows through llama.cpp, every token after a window's first scored
// (what issue 10's llama-cpp-python figures are). Inputs: token ids (int32) and optionally the
// input embeddings (float32 [n, n_embd], e.g. the token embeddings times 1 +- ulps).
// usage: kvppl MODEL IDS TYPE(f32|f16|q8_0|q4_0) CTX THREADS UBATCH [EMB|-] [DUMPDIR DUMPNAMES]
#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static std::string g_dumpdir, g_names;
static int g_window = 0;

static bool cb(struct ggml_tensor * t, bool ask, void *) {
    if (g_dumpdir.empty() || g_window != 0) return false;
    std::string n = t->name;
    bool want = false;
    size_t pos = 0;
    while (pos <= g_names.size()) {
        size_t e = g_names.find(',', pos);
        if (e == std::string::npos) e = g_names.size();
        std::string p = g_names.substr(pos, e - pos);
        if (!p.empty() && n == p) want = true;
        pos = e + 1;
    }
    if (ask) return want;
    if (!want) return true;
    size_t nb = ggml_nbytes(t);
    std::vector<char> buf(nb);
    ggml_backend_tensor_get(t, buf.data(), 0, nb);
    std::string fn = g_dumpdir + "/" + n + "__" + ggml_type_name(t->type) + "__" +
        std::to_string(t->ne[0]) + "x" + std::to_string(t->ne[1]) + "x" + std::to_string(t->ne[2]) +
        "x" + std::to_string(t->ne[3]) + "__" + std::to_string(t->nb[1]) + "_" + std::to_string(t->nb[2]) +
        "_" + std::to_string(t->nb[3]) + ".bin";
    FILE * f = fopen(fn.c_str(), "wb");
    fwrite(buf.data(), 1, nb, f);
    fclose(f);
    return true;
}

static std::vector<char> slurp(const char * fn) {
    FILE * f = fopen(fn, "rb");
    if (!f) { fprintf(stderr, "cannot open %s\n", fn); exit(1); }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    std::vector<char> b(n);
    if (fread(b.data(), 1, n, f) != (size_t) n) exit(1);
    fclose(f);
    return b;
}

int main(int argc, char ** argv) {
    if (argc < 7) { fprintf(stderr, "usage\n"); return 2; }
    const char * model_path = argv[1];
    std::vector<char> idb = slurp(argv[2]);
    std::string type = argv[3];
    int ctx = atoi(argv[4]), threads = atoi(argv[5]), ubatch = atoi(argv[6]);
    std::vector<char> embb;
    if (argc > 7 && strcmp(argv[7], "-") != 0) embb = slurp(argv[7]);
    if (argc > 9) { g_dumpdir = argv[8]; g_names = argv[9]; }
    const int32_t * ids = (const int32_t *) idb.data();
    int n = idb.size() / 4;

    llama_backend_init();
    llama_log_set([](enum ggml_log_level, const char *, void *) {}, nullptr);
    auto mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(model_path, mp);
    auto cp = llama_context_default_params();
    cp.n_ctx = ctx; cp.n_batch = ctx; cp.n_ubatch = ubatch;
    cp.n_threads = threads; cp.n_threads_batch = threads;
    ggml_type t = type == "f32" ? GGML_TYPE_F32 : type == "f16" ? GGML_TYPE_F16 :
                  type == "q8_0" ? GGML_TYPE_Q8_0 : GGML_TYPE_Q4_0;
    cp.type_k = t; cp.type_v = t;
    const char * fa = getenv("KVPPL_FA");
    cp.flash_attn_type = fa ? (llama_flash_attn_type) atoi(fa) : LLAMA_FLASH_ATTN_TYPE_AUTO;
    cp.cb_eval = cb;
    llama_context * lctx = llama_init_from_model(model, cp);
    if (!lctx) { fprintf(stderr, "no context\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    const int n_embd = llama_model_n_embd(model);
    const float * emb = embb.empty() ? nullptr : (const float *) embb.data();

    double nll = 0; long cnt = 0;
    for (int w = 0; w + ctx <= n; w += ctx, ++g_window) {
        llama_memory_clear(llama_get_memory(lctx), true);
        llama_batch b = llama_batch_init(ctx, emb ? n_embd : 0, 1);
        for (int i = 0; i < ctx; ++i) {
            if (emb) memcpy(b.embd + (size_t) i * n_embd, emb + (size_t) (w + i) * n_embd, n_embd * 4);
            else b.token[i] = ids[w + i];
            b.pos[i] = i; b.n_seq_id[i] = 1; b.seq_id[i][0] = 0; b.logits[i] = 1;
        }
        b.n_tokens = ctx;
        if (llama_decode(lctx, b)) { fprintf(stderr, "decode failed\n"); return 1; }
        double wnll = 0;
        for (int i = 0; i + 1 < ctx; ++i) {
            const float * lg = llama_get_logits_ith(lctx, i);
            double mx = -1e30;
            for (int v = 0; v < n_vocab; ++v) mx = lg[v] > mx ? lg[v] : mx;
            double s = 0;
            for (int v = 0; v < n_vocab; ++v) s += exp(lg[v] - mx);
            wnll += -(lg[ids[w + i + 1]] - mx - log(s));
            ++cnt;
        }
        nll += wnll;
        llama_batch_free(b);
    }
    printf("%s ppl %.4f scored %ld\n", type.c_str(), exp(nll / cnt), cnt);
    llama_free(lctx);
    llama_model_free(model);
    return 0;
}

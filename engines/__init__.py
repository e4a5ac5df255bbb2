"""Small real inference engines (Llama family, torch) that publish KV to kvstore and fetch it.

    model.py        the Llama decoder over a paged KV cache (paged_cache.py), and the CUDA
                    graphs of its forwards (cuda_graphs.py)
    presets.py      named models and `load_model` (GGUF: gguf_file.py, tokenizer.py;
                    Hugging Face directories: checkpoint.py)
    prefill.py      PrefillEngine: compute a prompt's KV, publish it to the store
    decode.py       DecodeEngine: fetch cached KV, compute the rest, decode (batched)
    kv_io.py        the store side of an engine: keys, fetch, publish (uva_copy.py on a GPU)
    conductor.py    routing across engines by cached prefix and a fitted cost model
                    (cost_model.py), engines on worker threads (workers.py)
    demo.py         `kvstore demo` (plugged into the CLI by demo_command.py; its
                    arguments, light for --help, in demo_args.py)

Data flows one way: engines -> kvstore's public API (an embedded Store or a daemon client).
"""

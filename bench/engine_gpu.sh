#!/usr/bin/env bash
# The GPU runs behind docs/engine-speed.md (issue 6) and the topology records (issue 7), as stages.
#
#   OUT=results bash bench/engine_gpu.sh check short     # correctness gate; 128/128 + 2048/128 + baseline
#   OUT=results bash bench/engine_gpu.sh long            # 128/2048, both modes
#   OUT=results bash bench/engine_gpu.sh topology        # kiln topology-agent --once --dry-run
#   OUT=results bash bench/engine_gpu.sh tp              # TP=2 tokens vs TP=1, and TP=2 throughput
#   OUT=results bash bench/engine_gpu.sh breakdown       # batch-1 decode: GEMVs, graph, host
#                                 (BREAKDOWN_ARGS=--no-linears skips the per-shape GEMV table)
#   OUT=results bash bench/engine_gpu.sh serve           # kiln-engine build + serve on the GPU, over HTTP
#   OUT=results bash bench/engine_gpu.sh trtllm-gate trtllm-a   # issue 18: TensorRT-LLM's perf-overview
#   OUT=results bash bench/engine_gpu.sh trtllm-b        #   method, fp8 weights + fp8 KV: the gate, then
#   OUT=results bash bench/engine_gpu.sh trtllm-c        #   its 5 rows in processes that each fit a 600 s
#   OUT=results bash bench/engine_gpu.sh trtllm-d        #   call (a: 128/128 + 2048/128, b: 128/2048,
#                                                        #   c: 500/2000, d: 1000/1000); every row file
#                                                        #   carries the gate (--gate-file; TRTLLM_GATE names one
#                                                        #   from an earlier call); TRTLLM_ARGS adds options
#   OUT=results bash bench/engine_gpu.sh so-8b           # issue 20: structured outputs at the Llama-3-8B shape
#   OUT=results bash bench/engine_gpu.sh lora            # issue 19: 8 rank-16 adapters mixed vs the base model
#   OUT=results bash bench/engine_gpu.sh eagle           #   tiny-chat with its trained EAGLE head vs plain, n-gram
#   OUT=results bash bench/engine_gpu.sh lora-ops        #   and one 8B layer's LoRA delta: kernels vs masked form
#   OUT=results bash bench/engine_gpu.sh weight-only     # issue 18: AWQ/GPTQ int4, int8 kernels vs dense refs, bf16
#   OUT=results bash bench/engine_gpu.sh moe-check moe-qwen3 moe-mixtral   # issue 22: MoE gate, then rows
#   OUT=results bash bench/engine_gpu.sh moe-check moe-gptoss   # gpt-oss-20b-shaped rows (1k/1k first)
#   OUT=results bash bench/engine_gpu.sh moe-check moe-mxfp4    #   the same with its MXFP4 experts packed
#                                 (MOE_ARGS adds options, MOE_CHECK_ARGS the gate's, e.g. --models gpt-oss-20b,mixtral-8x7b;
#                                 the transformers baseline is Qwen3's alone:
#                                 bf16 Mixtral does not fit beside anything on one H100)
#   OUT=results bash bench/engine_gpu.sh moe-check moe-targets  # issue 22's two target rows on one
#                                 GPU: Mixtral-8x7B fp8 128/128 x3072 and gpt-oss-20b fp8 1k/1k x1024,
#                                 1,024 sequences at once (each file also times the bf16/fp8/MXFP4
#                                 expert layer at 1 and 4,096 tokens; MOE_ARGS="--kv-cache-dtype fp8" runs
#                                 them with the fp8 KV cache, as TensorRT-LLM's FP8 rows are measured;
#                                 moe-target-mixtral and moe-target-gptoss run one row each)
#   OUT=results bash bench/engine_gpu.sh moe-mixtral-bf16  # issue 22's bf16 Mixtral-8x7B (93 GB: an H200)
#                                 at 128/128 and 2048/128 against transformers in the same process
#   OUT=results bash bench/engine_gpu.sh so-profile       # issue 20: where a constrained step's time
#                                 goes at the 8B shape (host parts, device busy vs wall)
#   OUT=results bash bench/engine_gpu.sh moe-tune moe-probe   # the expert GEMMs' tile sweep; which
#                                 kernel moves the tiny Qwen3-MoE off float32's tokens
#
# Runs from the repository root with the machine's python3 (torch, triton, transformers). The
# topology and serve stages need packages the machine lacks (pydantic, nvidia-ml-py, fastapi,
# uvicorn, xgrammar): wheels in .whl/ (made by bench/device_wheels.sh, passed in `carry`) are
# installed to /tmp/site first.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=engine-image:operator
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
B=bench/engine_throughput.py

install_wheels() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 \
      | grep -v 'already exists' || true
  fi
}

for stage in "$@"; do
  case $stage in
    env)
      nvidia-smi -L
      nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv
      $PY -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)'
      ;;
    check)
      timeout 170 $PY $B --check --out "$OUT/check.json" 2>&1 | grep -v Loading | tee "$OUT/check.log" | tail -30
      ;;
    short)
      timeout 380 $PY $B --modes bf16,fp8 --workloads 128/128,2048/128 --profile --out "$OUT/short.json" 2>&1 \
        | tee "$OUT/short.log" | grep -v -E '^-{5}|^ *$' | tail -100
      ;;
    trtllm-gate)
      timeout 300 $PY $B --method trtllm --check ${TRTLLM_ARGS:-} --out "$OUT/trtllm-gate.json" 2>&1 \
        | tee "$OUT/trtllm-gate.log" | tail -40
      ;;
    trtllm-a|trtllm-b|trtllm-c|trtllm-d)
      case $stage in
        trtllm-a) rows=128/128,2048/128 ;; trtllm-b) rows=128/2048 ;;
        trtllm-c) rows=500/2000 ;; trtllm-d) rows=1000/1000 ;;
      esac
      timeout "${TRTLLM_TIMEOUT:-540}" $PY $B --method trtllm --rows $rows --gate-file "${TRTLLM_GATE:-$OUT/trtllm-gate.json}" \
        ${TRTLLM_ARGS:-} --out "$OUT/$stage.json" 2>&1 | tee "$OUT/$stage.log" | grep -v -E '^ |^[{}]' | tail -30
      ;;
    so-8b)
      install_wheels
      PYTHONPATH=engine-image:/tmp/site timeout "${SO_TIMEOUT:-400}" $PY bench/structured_outputs.py --device cuda \
        --model llama3-8b-shape --samples 4 --reps 2 --out "$OUT/so-8b.json" 2>&1 | tee "$OUT/so-8b.log" | tail -30
      ;;
    lora)
      install_wheels
      PYTHONPATH=engine-image:/tmp/site timeout "${LORA_TIMEOUT:-240}" $PY bench/lora.py --device cuda --adapters 8 \
        --rank 16 --hidden 4096 --layers 8 --batch 64 --out "$OUT/lora.json" 2>&1 | tee "$OUT/lora.log" | tail -30
      ;;
    eagle)
      install_wheels
      PYTHONPATH=engine-image:/tmp/site timeout "${EAGLE_TIMEOUT:-240}" $PY bench/eagle.py --out "$OUT/eagle.json" 2>&1 \
        | grep -v Loading | tee "$OUT/eagle.log" | tail -12
      ;;
    lora-ops)
      timeout "${LORA_OPS_TIMEOUT:-120}" $PY bench/lora_kernels.py --out "$OUT/lora-ops.json" 2>&1 | tee "$OUT/lora-ops.log" | tail -30
      ;;
    weight-only)
      timeout "${WEIGHT_ONLY_TIMEOUT:-300}" $PY bench/weight_only_gemm.py --out "$OUT/weight-only-gemm.json" 2>&1 \
        | tee "$OUT/weight-only-gemm.log" | tail -60
      ;;
    moe-check)
      install_wheels  # the gate builds its tiny models through kiln_engine.build (pydantic)
      PYTHONPATH=engine-image:/tmp/site timeout "${MOE_CHECK_TIMEOUT:-200}" $PY bench/moe_throughput.py --check ${MOE_CHECK_ARGS:-} --out "$OUT/moe-check.json" 2>&1 | tee "$OUT/moe-check.log" \
        | grep -E '"(ok|same_tokens|fast_as_close_as_reference)"|T=' | head -40
      ;;
    moe-qwen3)
      timeout "${MOE_TIMEOUT:-420}" $PY bench/moe_throughput.py --models qwen3-30b-a3b --modes fp8 \
        --workloads 128/128,2048/128,1000/1000 --num-requests 1024 --max-num-seqs 1024 --no-baseline ${MOE_ARGS:-} \
        --out "$OUT/moe-qwen3.json" 2>&1 | tee "$OUT/moe-qwen3.log" | grep -v -E '^ |^[{}]' | tail -30
      timeout "${MOE_BASELINE_TIMEOUT:-200}" $PY bench/moe_throughput.py --models qwen3-30b-a3b --modes bf16 \
        --workloads 128/128,2048/128 ${MOE_ARGS:-} --out "$OUT/moe-qwen3-bf16.json" 2>&1 \
        | tee "$OUT/moe-qwen3-bf16.log" | grep -v -E '^ |^[{}]' | tail -30
      ;;
    moe-mixtral)
      timeout "${MOE_TIMEOUT:-420}" $PY bench/moe_throughput.py --models mixtral-8x7b --modes fp8 \
        --workloads 128/128,2048/128 --num-requests 1024 --max-num-seqs 1024 --no-baseline ${MOE_ARGS:-} \
        --out "$OUT/moe-mixtral.json" 2>&1 | tee "$OUT/moe-mixtral.log" | grep -v -E '^ |^[{}]' | tail -30
      ;;
    moe-gptoss)
      timeout "${MOE_TIMEOUT:-420}" $PY bench/moe_throughput.py --models gpt-oss-20b --modes fp8,bf16 \
        --workloads 1000/1000,128/128 --num-requests 1024 --max-num-seqs 1024 --no-baseline ${MOE_ARGS:-} \
        --out "$OUT/moe-gptoss.json" 2>&1 | tee "$OUT/moe-gptoss.log" | grep -v -E '^ |^[{}]' | tail -30
      ;;
    moe-mxfp4)
      timeout "${MOE_TIMEOUT:-420}" $PY bench/moe_throughput.py --models gpt-oss-20b --modes mxfp4,bf16 \
        --workloads 1000/1000,128/128 --num-requests 1024 --max-num-seqs 1024 --no-baseline ${MOE_ARGS:-} \
        --out "$OUT/moe-mxfp4.json" 2>&1 | tee "$OUT/moe-mxfp4.log" | grep -v -E '^ |^[{}]' | tail -30
      ;;
    moe-mixtral-bf16)  # 93 GB of bf16 weights: an H200 only; engine vs transformers in one process
      timeout "${MOE_BF16_TIMEOUT:-330}" $PY bench/moe_throughput.py --models mixtral-8x7b --modes bf16 \
        --workloads 128/128,2048/128 --num-requests 1024 --max-num-seqs 1024 ${MOE_ARGS:-} \
        --out "$OUT/moe-mixtral-bf16.json" 2>&1 | tee "$OUT/moe-mixtral-bf16.log" | grep -v -E '^ |^[{}]' | tail -14
      ;;
    moe-targets) OUT=$OUT bash "$0" moe-target-mixtral moe-target-gptoss ;;
    moe-target-mixtral)
      timeout "${MOE_TIMEOUT:-190}" $PY bench/moe_throughput.py --models mixtral-8x7b --modes fp8 --workloads 128/128 \
        --num-requests 3072 --max-num-seqs 1024 --no-baseline ${MOE_ARGS:-} --out "$OUT/moe-mixtral-fp8.json" 2>&1 \
        | tee "$OUT/moe-mixtral-fp8.log" | grep -v -E '^ |^[{}]' | tail -12
      ;;
    moe-target-gptoss)
      timeout "${MOE_TIMEOUT:-215}" $PY bench/moe_throughput.py --models gpt-oss-20b --modes fp8 --workloads 1000/1000 \
        --num-requests 4096 --max-num-seqs 1024 --no-baseline ${MOE_ARGS:-} --out "$OUT/moe-gptoss-fp8.json" 2>&1 \
        | tee "$OUT/moe-gptoss-fp8.log" | grep -v -E '^ |^[{}]' | tail -12
      ;;
    so-profile)
      install_wheels
      PYTHONPATH=engine-image:bench:/tmp/site timeout "${SO_TIMEOUT:-300}" $PY bench/structured_outputs_profile.py \
        --model llama3-8b-shape 2>&1 | tee "$OUT/so-profile.log" | grep -v -E 'Loading|Warning' | tail -30
      ;;
    moe-tune)
      timeout "${MOE_TUNE_TIMEOUT:-560}" $PY bench/moe_tune.py --deadline 480 ${MOE_TUNE_ARGS:-} \
        --out "$OUT/moe-tune.json" 2>&1 | tee "$OUT/moe-tune.log" | tail -30
      ;;
    moe-probe)
      timeout 150 $PY bench/moe_gate_probe.py --out "$OUT/moe-gate-probe.json" 2>&1 | grep 'agreeing'
      ;;
    long)
      timeout 420 $PY $B --modes bf16,fp8 --workloads 128/2048 --no-baseline --out "$OUT/long.json" 2>&1 \
        | tee "$OUT/long.log" | tail -30
      ;;
    breakdown)
      timeout "${BREAKDOWN_TIMEOUT:-330}" $PY bench/decode_breakdown.py ${BREAKDOWN_ARGS:-} --out "$OUT/breakdown.json" 2>&1 | tee "$OUT/breakdown.log" \
        | grep -v -E '^-{5}|^ *$' | tail -150
      ;;
    serve)
      install_wheels
      art=/tmp/kiln-tiny-fp8
      rm -rf "$art"
      PYTHONPATH=engine-image:/tmp/site timeout 150 $PY -m kiln_engine.cli build --model examples/tiny-chat \
        --output "$art" --quantization fp8 --capacity-budget-seconds 20 --no-progress-bar \
        --result-file "$OUT/serve-build-result.json" 2>&1 | tail -5
      cat "$OUT/serve-build-result.json"; echo
      PYTHONPATH=engine-image:/tmp/site $PY -m kiln_engine.cli serve --artifact "$art" --host 127.0.0.1 \
        --port 8011 >"$OUT/serve.log" 2>&1 &
      pid=$!
      for _ in $(seq 120); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
      body='{"model":"kiln-tiny-fp8","messages":[{"role":"user","content":"What is Kiln?"}],"max_tokens":32,"temperature":0}'
      curl -s localhost:8011/v1/chat/completions -H 'content-type: application/json' -d "$body"; echo
      for i in $(seq 32); do
        curl -s -o /dev/null -w '%{http_code}\n' localhost:8011/v1/chat/completions \
          -H 'content-type: application/json' -d "$body" &
      done | sort | uniq -c
      curl -s localhost:8011/metrics \
        | grep -E '^kiln_engine_(requests_total|generation_tokens_total|(time_to_first_token|inter_token_latency)_seconds_(sum|count))'
      kill -TERM $pid; wait $pid; echo "serve exited $?"
      grep -i -E 'kiln-engine:|error|traceback' "$OUT/serve.log" | head -20
      ;;
    topology)
      install_wheels
      name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
      n=$(nvidia-smi -L | wc -l)
      PYTHONPATH=operator:/tmp/site timeout 60 $PY -c \
        'from kiln.topology.agent import topology_agent; topology_agent(["--once", "--dry-run"])' \
        >"$OUT/topology-${n}x${name}.json" 2>"$OUT/topology-${n}x${name}.err"
      echo "topology rc=$?"
      head -c 3000 "$OUT/topology-${n}x${name}.json"
      tail -3 "$OUT/topology-${n}x${name}.err"
      ;;
    tp)
      tiny=examples/tiny-chat
      $PY -m kiln_engine.testing.tp_worker $tiny "$OUT/tp1-tokens.json" cuda
      timeout 120 torchrun --nproc-per-node 2 -m kiln_engine.testing.tp_worker $tiny "$OUT/tp2-tokens.json" cuda
      cmp "$OUT/tp1-tokens.json" "$OUT/tp2-tokens.json" && echo "TP=2 tokens == TP=1 tokens"
      timeout 400 $PY $B --tp 2 --modes bf16,fp8 --workloads 128/128 --out "$OUT/tp2.json" 2>&1 \
        | tee "$OUT/tp2.log" | tail -20
      ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done

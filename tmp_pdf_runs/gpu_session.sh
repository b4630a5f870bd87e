#!/usr/bin/env bash
# GPU-machine steps (see tmp_pdf_runs/GPU_NOTES.md). Run from the repo root on the GPU machine after
# ../shared/gpu/gpu_setup.sh; writes logs under $OUT. Usage: bash tmp_pdf_runs/gpu_session.sh STEP...
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
M=.gpu_carry/models
# The project is not pip-installed here (PYTHONPATH): give vLLM our plugin entry point by hand, so
# that its spawned engine core loads our model subclasses too (runner/vllm_plugin/__init__.py).
EP=/tmp/site/deepseek_ocr_pipeline_src-0.0.0.dist-info
if [ -d /tmp/site ] && [ ! -f $EP/entry_points.txt ]; then
  mkdir -p $EP && printf 'Metadata-Version: 2.1\nName: deepseek-ocr-pipeline-src\nVersion: 0.0.0\n' > $EP/METADATA
  printf '[vllm.general_plugins]\ndeepseek_ocr_pipeline = runner.vllm_plugin:register_all\n' > $EP/entry_points.txt
fi
log() { echo "=== $(date -u +%T) $*"; }
smoke() {  # model mode [extra CLI flags]
  local m=$1 mode=$2; shift 2; local o=/tmp/smoke_${m}_${mode}
  log "smoke $m $mode $*"
  timeout -k 10 ${SMOKE_TO:-230} python3 run_pdf_ocr_vllm.py --input-dir .gpu_carry/smoke_in --output-dir $o --engine vllm --model $M/$m \
    --load-format dummy --mode $mode --max-tokens ${SMOKE_TOKENS:-200} --max-num-seqs 64 --progress log \
    --log-file $o.log "$@" > $o.out 2>&1; echo "rc=$?"; tail -12 $o.out
  python3 tmp_pdf_runs/smoke_check.py .gpu_carry/smoke_in $o | tee -a "$OUT/smoke.jsonl"
}
restart_test() {  # kill the engine core mid-run; the CLI must restart it and account for every page (issue 6)
  log "restart_test (GPU ${RT_GPU:-0})"
  rm -rf /tmp/rt.log /tmp/rt.out /tmp/rt_out /tmp/rt_in  # a log left by an earlier run must not be read as this one's "ready"
  python3 -c "import sys; sys.path.insert(0,'.'); from tools.bench import make_pdfs; from pathlib import Path; make_pdfs(Path('/tmp/rt_in'), ${RT_PAGES:-96}, 24)"
  CUDA_VISIBLE_DEVICES=${RT_GPU:-0} timeout -k 10 ${RT_TO:-330} python3 run_pdf_ocr_vllm.py --input-dir /tmp/rt_in --output-dir /tmp/rt_out --engine vllm --model $M/deepseek-ocr \
    --load-format dummy --ignore-eos --max-tokens ${RT_TOKENS:-1000} --max-num-seqs 64 --retries 0 --no-large-pass --progress log \
    --log-file /tmp/rt.log > /tmp/rt.out 2>&1 &
  local cli=$!
  for i in $(seq 1 240); do grep -q "engine ready" /tmp/rt.log 2>/dev/null && break; sleep 1; done
  sleep ${RT_KILL_AFTER:-2}
  # The engine core is a grandchild (timeout -> CLI -> EngineCore): search all descendants.
  local ec=$(ps -e -o pid=,ppid=,args= | awk -v root=$cli '{pid[$1]=$2; args[$1]=$0} END {for (p in pid) {q=p; while (q in pid && q!=root) q=pid[q]; if (q==root && args[p] ~ /EngineCore/ && args[p] !~ /awk/) print p}}' | head -1)
  echo "CLI pid $cli, killing engine core pid $ec at $(date -u +%T)"; ps -e -o pid,ppid,args | grep -i "[E]ngineCore\|[r]un_pdf_ocr" | cut -c1-100
  [ -n "$ec" ] && kill -9 $ec
  wait $cli; echo "cli rc=$? at $(date -u +%T)"; grep -i "restart\|died\|resubmit\|engine ready\|started in" /tmp/rt.log | cut -c1-200 | head
  python3 tmp_pdf_runs/smoke_check.py /tmp/rt_in /tmp/rt_out | tee "$OUT/restart.json"
  cp /tmp/rt.log /tmp/rt.out "$OUT/" 2>/dev/null
}
x2() {  # RUNS TAG: tools/bench.py --scale RUNS (1, gpus, ray) on GPU_IDS, PPG pages per GPU (issues 9, 10)
  local runs=$1 tag=$2 rc
  log "x2 $runs ($tag)"
  RAY_USAGE_STATS_ENABLED=0 timeout -k 20 "${X2TO:-585}" python3 tools/bench.py --model-dir $M/${X2MODEL:-deepseek-ocr} \
    --pages-per-gpu "${PPG:-1536}" --max-num-seqs "${SEQS:-512}" --gpus "${GPU_IDS:-0,1}" --work-dir /tmp/x2 \
    --scale "$runs" --product-timeout "${PTO:-560}" --deadline-s "${X2DL:-570}" --jsonl "$OUT/benchmarks.jsonl" \
    --tag "x2-$tag" > "/tmp/x2_$tag.out" 2>&1; rc=$?; echo "bench rc=$rc"
  grep -E "^(===|SKIP|SCALE)" "/tmp/x2_$tag.out"; grep "^{" "/tmp/x2_$tag.out" | cut -c1-1500; tail -4 "/tmp/x2_$tag.out" | cut -c1-300
  if [ "$rc" != 0 ]; then  # timed out: what still holds a GPU (our bench's processes) goes, by pid
    nvidia-smi --query-compute-apps=pid --format=csv,noheader | while read -r pid; do kill -9 "$pid" 2>/dev/null; done
  fi
  case $runs in *ray*) python3 -c "import sys; from ray.scripts.scripts import main; sys.argv=['ray','stop','--force']; main()" >/dev/null 2>&1 ;; esac
  cp "/tmp/x2_$tag.out" "$OUT/"
  tar czf "$OUT/x2_${tag}_logs.tgz" -C /tmp/x2 --exclude='*.md' --exclude='*.pdf' --exclude='*.jsonl' . 2>/dev/null
  for f in /tmp/x2/scale_*/product.log; do echo "--- $f"; grep -iE "error|Traceback|merged|worker .*(ok|FAILED)|engine actor|Ray engine pool|started in" "$f" | cut -c1-250 | tail -12; done
}
for step in "$@"; do
  case "$step" in
    info) log info; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2
          python3 -c "import vllm, torch, transformers, PIL, pymupdf; print('vllm', vllm.__version__, 'torch', torch.__version__, 'tf', transformers.__version__, 'PIL', PIL.__version__, 'pymupdf', pymupdf.__version__)" ;;
    tests) log tests; PYTHONPATH=/tmp/site:$PWD timeout ${TESTTO:-330} python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_guard.py tests/test_vllm_engine.py tests/test_batched_encoder.py tests/test_sam_attention.py tests/test_memory_cap.py tests/test_encoder_mask.py} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -30 ;;
    bench1e) log bench1e; python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-512} --max-num-seqs ${SEQS:-512} --baseline-timeout ${BTO:-420} --product engine ${AB:---guard-ab} --work-dir /tmp/b1e --jsonl "$OUT/benchmarks.jsonl" --tag engine-ocr1 2>&1 | tail -3; tail -25 /tmp/b1e/engine.log; tail -5 /tmp/b1e/baseline.log ;;
    bench2e) log bench2e; python3 tools/bench.py --model-dir $M/deepseek-ocr-2 --pages ${PAGES:-512} --max-num-seqs ${SEQS:-512} --baseline-timeout ${BTO:-420} --product engine --guard-ab --work-dir /tmp/b2e --jsonl "$OUT/benchmarks.jsonl" --tag engine-ocr2 2>&1 | tail -3; tail -25 /tmp/b2e/engine.log; tail -5 /tmp/b2e/baseline.log ;;
    bench1c) log bench1c; timeout -k 20 ${B1TO:-585} python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-768} --baseline-pages ${BASE_PAGES:-256} --max-num-seqs ${SEQS:-512} --baseline-timeout ${BTO:-330} --product-timeout ${PTO:-240} --product cli --work-dir /tmp/b1c --jsonl "$OUT/benchmarks.jsonl" --tag ${B1TAG:-cli-ocr1} ${B1EXTRA:-} 2>&1 | tail -3 | cut -c1-3000; tail -25 /tmp/b1c/product.log | cut -c1-250; grep -i "batched vision encoder\|plugin" /tmp/b1c/product.log | head -3; cp /tmp/b1c/product.log "$OUT/b1c_product.log"; cp /tmp/b1c/baseline.log "$OUT/b1c_baseline.log"; tar czf "$OUT/b1c_worker_logs.tgz" -C /tmp/b1c worker_logs 2>/dev/null ;;
    bench2c) log bench2c; timeout -k 20 ${B2TO:-300} python3 tools/bench.py --model-dir $M/deepseek-ocr-2 --pages ${PAGES:-1024} --baseline ${B2BASE:-off} --baseline-pages ${BASE_PAGES:-512} --max-num-seqs ${SEQS:-512} --baseline-timeout ${BTO:-330} --product-timeout ${PTO:-280} --product cli --work-dir /tmp/b2c --jsonl "$OUT/benchmarks.jsonl" --tag ${B2TAG:-cli-ocr2} ${B2EXTRA:-} 2>&1 | tail -3 | cut -c1-3000; tail -15 /tmp/b2c/product.log | cut -c1-250; grep -i "batched vision encoder" /tmp/b2c/product.log | head -2; cp /tmp/b2c/product.log "$OUT/b2c_product.log"; tar czf "$OUT/b2c_worker_logs.tgz" -C /tmp/b2c worker_logs 2>/dev/null ;;
    ab256) log ab256; timeout -k 10 ${ABTO:-300} python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-256} --max-num-seqs 256 --baseline off --product engine --guard-plan ${PLAN:-off,device,off,device,host} --work-dir /tmp/b256 --jsonl "$OUT/benchmarks.jsonl" --tag guard-ab-256 2>&1 | tail -1 | cut -c1-2500; grep "ROUND\|STALL\|Error\|batched vision encoder" /tmp/b256/engine.log | head -12; cp /tmp/b256/engine.log "$OUT/ab256_engine.log" ;;
    smoke1) smoke deepseek-ocr clean; smoke deepseek-ocr grounded --no-large-pass ;;
    smoke2) smoke deepseek-ocr-2 clean --no-large-pass; smoke deepseek-ocr-2 grounded --no-large-pass ;;
    smoke2g) smoke deepseek-ocr-2 grounded --no-large-pass; tail -30 /tmp/smoke_deepseek-ocr-2_grounded.log | cut -c1-250 ;;
    restart) restart_test ;;
    ab1) log ab1; python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-512} --max-num-seqs ${SEQS:-512} --baseline off --product engine --guard-ab --work-dir /tmp/bab --jsonl "$OUT/benchmarks.jsonl" --tag guard-ab-ocr1 2>&1 | tail -2; grep ROUND /tmp/bab/engine.log ;;
    diag) log diag; python3 -c "import sys; sys.path.insert(0,'.'); from tools.bench import make_pdfs; from pathlib import Path; make_pdfs(Path('/tmp/dg_in'), ${DPAGES:-64}, 16)"
          PYTHONFAULTHANDLER=1 timeout -s ABRT -k 15 ${DTO:-200} python3 run_pdf_ocr_vllm.py --input-dir /tmp/dg_in --output-dir /tmp/dg_out \
            --engine vllm --model $M/${DMODEL:-deepseek-ocr} --load-format dummy --ignore-eos --max-tokens ${DTOK:-400} \
            --max-num-seqs ${SEQS:-64} --retries 0 --no-large-pass --progress log --render-workers 12 --force \
            --log-file "$OUT/diag_run.log" > "$OUT/diag.out" 2>&1; echo "diag rc=$?"; tail -40 "$OUT/diag.out" | cut -c1-300
          python3 tmp_pdf_runs/smoke_check.py /tmp/dg_in /tmp/dg_out ;;
    jitdiag) for r in 1 2; do log "jitdiag run $r (JIT compiles during the run, per-step details; run 2 has the Triton disk cache of run 1)"
          timeout -k 10 ${JDTO:-280} python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-512} --max-num-seqs ${SEQS:-512} --baseline off --product cli \
            --work-dir /tmp/jd$r --jsonl "$OUT/benchmarks.jsonl" --tag jitdiag-$r --cli-extra --vllm-arg jit_monitor_verbose=true --vllm-arg enable_logging_iteration_details=true 2>&1 | tail -1 | cut -c1-600
          echo "JIT events during the run: $(grep -c 'JIT compilation during inference' /tmp/jd$r/product.log)"; grep 'JIT compilation during inference' /tmp/jd$r/product.log | sed 's/.*inference: //' | sort | uniq -c | head
          gzip -c /tmp/jd$r/product.log > "$OUT/jitdiag_$r.log.gz"; done ;;
    prof) log "prof: CLI run with torch-profiler windows in the engine core (RUNNER_PROFILE_STEPS) and every JIT compile logged"
          rm -rf /tmp/prof; mkdir -p /tmp/prof
          RUNNER_PROFILE_DIR=/tmp/prof RUNNER_PROFILE_STEPS=${PSTEPS:-4:8,400:40,1034:40} timeout -k 10 ${PRTO:-330} python3 tools/bench.py --model-dir $M/deepseek-ocr \
            --pages ${PAGES:-768} --max-num-seqs ${SEQS:-512} --baseline off --product cli --product-timeout ${PRTO2:-300} --work-dir /tmp/pr \
            --jsonl "$OUT/benchmarks.jsonl" --tag prof --cli-extra --vllm-arg jit_monitor_verbose=true 2>&1 | tail -1 | cut -c1-900
          grep -h "profiler:\|JIT compilation during inference" /tmp/pr/product.log | cut -c1-260 | head -30
          echo "JIT events during the run: $(grep -c 'JIT compilation during inference' /tmp/pr/product.log)"
          for f in /tmp/prof/profile_*.txt; do echo "--- $f"; head -45 "$f" | cut -c1-200; tail -3 "$f"; done
          mkdir -p "$OUT/prof"; cp /tmp/prof/*.txt "$OUT/prof/" 2>/dev/null; gzip -c /tmp/pr/product.log > "$OUT/prof/product.log.gz"
          ls -la /tmp/prof; for t in /tmp/prof/*.pt.trace.json.gz; do [ -f "$t" ] && [ $(stat -c %s "$t") -lt 25000000 ] && cp "$t" "$OUT/prof/"; done ;;
    pyspy) log "pyspy: CLI run, py-spy samples of the engine core and of the CLI process during decode (where the ~20 ms of host time per decode step goes)"
          rm -rf /tmp/pyspy_site; python3 -m pip install -q --no-deps --target /tmp/pyspy_site .gpu_carry/wheels/py_spy-*.whl 2>&1 | tail -1
          SPY=$(ls /tmp/pyspy_site/bin/py-spy 2>/dev/null || find /tmp/pyspy_site -name py-spy -type f | head -1); echo "py-spy: $SPY"
          rm -rf /tmp/prof_ps; mkdir -p /tmp/prof_ps  # fallback if ptrace is not allowed: 4 decode steps with Python stacks
          RUNNER_PROFILE_DIR=/tmp/prof_ps RUNNER_PROFILE_STEPS=${PSSTEPS:-600:4} RUNNER_PROFILE_STACK=1 \
          RUNNER_SWITCH_INTERVAL_MS=${SWI:-1} timeout -k 10 ${PSTO:-300} python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-768} --max-num-seqs ${SEQS:-512} --baseline off \
            --product cli --product-timeout ${PSTO2:-280} --work-dir /tmp/ps --jsonl "$OUT/benchmarks.jsonl" --tag pyspy ${PSEXTRA:-} > /tmp/ps.out 2>&1 &
          local_bench=$!
          for i in $(seq 1 280); do grep -q "steps=[0-9]\{3,\}" /tmp/ps/product.log 2>/dev/null && break; sleep 1; done; sleep 3
          EC=$(pgrep -f "VLLM::EngineCore" | head -1); CLI=$(pgrep -f "run_pdf_ocr_vllm.py --input-dir /tmp/ps" | tail -1); echo "engine core $EC, cli $CLI at $(date -u +%T)"
          mkdir -p "$OUT/pyspy"
          $SPY record --pid $EC --duration ${SPYD:-8} --rate 250 --nonblocking --format raw -o "$OUT/pyspy/engine_core.txt" > /tmp/spy_ec.log 2>&1 & s1=$!
          $SPY record --pid $CLI --duration ${SPYD:-8} --rate 250 --nonblocking --format raw -o "$OUT/pyspy/cli.txt" > /tmp/spy_cli.log 2>&1 & s2=$!
          wait $s1 $s2; sleep 1; tail -2 /tmp/spy_ec.log /tmp/spy_cli.log
          $SPY dump --pid $EC > "$OUT/pyspy/engine_core_dump.txt" 2>&1
          wait $local_bench; tail -1 /tmp/ps.out | cut -c1-700; grep "vllm engine: pending" /tmp/ps/product.log | head -12 | cut -c1-160
          gzip -c /tmp/ps/product.log > "$OUT/pyspy/product.log.gz"; cp /tmp/prof_ps/*.txt "$OUT/pyspy/" 2>/dev/null
          for t in /tmp/prof_ps/*.pt.trace.json.gz; do [ -f "$t" ] && [ $(stat -c %s "$t") -lt 25000000 ] && cp "$t" "$OUT/pyspy/"; done; ls -la "$OUT/pyspy" ;;
    samab) log "samab: SAM encoder, upstream attention vs bias-free (one prefill step's images)"
          timeout -k 10 ${SAMTO:-240} python3 tools/bench_sam.py --pages ${SAMPAGES:-18} --variants ${SAMVARS:-upstream,bias-free} ${SAMPROF:---profile} \
            --jsonl "$OUT/benchmarks.jsonl" 2>&1 | tail -8 | cut -c1-1500 ;;
    tower) log "tower: OCR-1's vision tower (SAM + CLIP-L + projector) per SAM attention kernel"
          timeout -k 10 ${TOWTO:-200} python3 tools/bench_sam.py --tower --model-dir $M/deepseek-ocr --pages ${SAMPAGES:-18} \
            --variants ${TOWVARS:-bias-free+sdpa,bias-free+fa3} ${TOWPROF:---profile} --jsonl "$OUT/benchmarks.jsonl" 2>&1 | tail -6 | cut -c1-2500 ;;
    memtrace) log "memtrace: one engine, every encoder call's memory (RUNNER_MEMORY_TRACE=1), warm-up included"
          RUNNER_MEMORY_TRACE=1 timeout -k 10 ${MTTO:-300} python3 tools/bench.py --model-dir $M/${MTMODEL:-deepseek-ocr} --pages ${PAGES:-256} --max-num-seqs ${SEQS:-512} --baseline off \
            --product cli --product-timeout ${MTTO2:-280} --work-dir /tmp/mt --jsonl "$OUT/benchmarks.jsonl" --tag memtrace 2>&1 | tail -1 | cut -c1-800
          grep -h "memory trace" /tmp/mt/product.log | sed 's/.*memory trace: //' > "$OUT/memtrace.log"; wc -l < "$OUT/memtrace.log"
          sort -t'(' -k2 -g -r "$OUT/memtrace.log" | head -5 | cut -c1-300; grep -h "peak activation\|KV cache memory" /tmp/mt/product.log | cut -c1-300 | head -3 ;;
    epg) bash "$0" epg1 epgk ;;  # one engine vs K engines on the same GPU, same pages (one call: fits 768 pages)
    epg1) log "epg: 1 engine"; timeout -k 10 ${EPTO1:-250} python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-768} --max-num-seqs 512 --baseline off \
            --product cli --product-timeout ${EPTO1P:-240} --work-dir /tmp/ep1 --jsonl "$OUT/benchmarks.jsonl" --tag epg-1 2>&1 | tail -1 | cut -c1-1200 ;;
    epgk) log "epg: ${EPK:-2} engines on GPU 0"; timeout -k 20 ${EPTO2:-330} python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-768} --max-num-seqs ${EPSEQS:-384} --baseline off \
            --product cli --gpus 0 --product-timeout ${EPTO2P:-320} --work-dir /tmp/ep2 --jsonl "$OUT/benchmarks.jsonl" --tag epg-${EPK:-2} --cli-extra --engines-per-gpu ${EPK:-2} 2>&1 | tail -1 | cut -c1-1500
          grep -h "start-up lock\|engine ready\|waiting for another" /tmp/ep2/*.log /tmp/runner-workers-*/*.log 2>/dev/null | cut -c1-200 | head -6 ;;
    rampdiag) log "rampdiag: two engines on GPU 0, product only, stack samples of each worker's threads for ${SSDUR:-20} s after ready"
          RUNNER_STACK_SAMPLE=${SSDUR:-20}:5 timeout -k 20 ${RDTO:-420} python3 tools/bench.py --model-dir $M/${RDMODEL:-deepseek-ocr} --pages ${PAGES:-1536} \
            --max-num-seqs ${SEQS:-384} --baseline off --product cli --gpus 0 --product-timeout ${RDTO2:-400} --work-dir /tmp/rd --jsonl "$OUT/benchmarks.jsonl" \
            --tag ${RDTAG:-rampdiag} --cli-extra --engines-per-gpu 2 2>&1 | tail -1 | cut -c1-1500
          for f in /tmp/rd/worker_logs/*.log; do echo "--- $f"; grep -E "vllm engine: pending|stack samples|^thread |^  (inclusive|self)" "$f" | head -30 | cut -c1-900; done
          tar czf "$OUT/rampdiag_worker_logs.tgz" -C /tmp/rd worker_logs 2>/dev/null ;;
    corediag) log "corediag: two engines on GPU 0 (--mps), product only; stack samples of each CLI and of each engine core for ${SSDUR:-25} s after ready"
          RUNNER_STACK_SAMPLE=${SSDUR:-25}:5 RUNNER_STACK_SAMPLE_CORE=1 timeout -k 20 ${RDTO:-420} python3 tools/bench.py --model-dir $M/${RDMODEL:-deepseek-ocr} --pages ${PAGES:-1536} \
            --max-num-seqs ${SEQS:-384} --baseline off --product cli --gpus 0 --product-timeout ${RDTO2:-400} --work-dir /tmp/cd --jsonl "$OUT/benchmarks.jsonl" \
            --tag ${RDTAG:-corediag} --cli-extra --engines-per-gpu 2 ${CDEXTRA:---mps} 2>&1 | tail -1 | cut -c1-1500
          pkill -x nvidia-cuda-mps-control 2>/dev/null; pkill -x nvidia-cuda-mps-server 2>/dev/null
          for f in /tmp/cd/worker_logs/*.log; do echo "--- $f"; grep -E "vllm engine: pending|stack samples|thread |  (inclusive|self)" "$f" | head -40 | cut -c1-1600; done
          tar czf "$OUT/corediag_worker_logs.tgz" -C /tmp/cd worker_logs 2>/dev/null ;;
    pcab) for pc in false true; do log "pcab enable_prefix_caching=$pc (one engine, same pages)"   # prefix caching A/B (default: off)
          timeout -k 10 ${PCTO:-280} python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-768} --max-num-seqs ${SEQS:-512} --baseline off \
            --product cli --product-timeout ${PCTOP:-270} --work-dir /tmp/pc_$pc --jsonl "$OUT/benchmarks.jsonl" --tag prefix-caching-$pc \
            --cli-extra --vllm-arg enable_prefix_caching=$pc 2>&1 | tail -1 | cut -c1-900; done ;;
    encgraph) # vLLM 0.26's own encoder CUDA graphs for DeepSeek-OCR (compilation_config.cudagraph_mm_encoder,
          # its batched global/local paths) vs our batched encoder; one engine, same pages (issue 7)
          for v in "1 {}" "0 {\"cudagraph_mm_encoder\":true}"; do set -- $v; log "encgraph RUNNER_BATCHED_ENCODER=$1 compilation_config=$2"
          RUNNER_BATCHED_ENCODER=$1 timeout -k 10 ${EGTO:-280} python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-512} --max-num-seqs ${SEQS:-512} \
            --baseline off --product cli --product-timeout ${EGTOP:-270} --work-dir /tmp/eg$1 --jsonl "$OUT/benchmarks.jsonl" --tag encoder-graph-$1 \
            --cli-extra --vllm-arg "compilation_config=$2" 2>&1 | tail -1 | cut -c1-900; grep -h "cudagraph\|CUDA graph\|batched vision encoder" /tmp/eg$1/product.log | cut -c1-200 | head -4; done ;;
    encab) for e in 0 1; do log "encab RUNNER_BATCHED_ENCODER=$e"   # batched vision encoder A/B (two engines, same pages)
          RUNNER_BATCHED_ENCODER=$e timeout -k 10 ${EABTO:-280} python3 tools/bench.py --model-dir $M/${EMODEL:-deepseek-ocr} --pages ${PAGES:-512} --max-num-seqs ${SEQS:-512} \
            --baseline off --product engine --work-dir /tmp/benc$e --jsonl "$OUT/benchmarks.jsonl" --tag encoder-batched-$e 2>&1 | tail -1 | cut -c1-400; done ;;
    abx) log abx; timeout -k 10 ${ABTO:-560} python3 tools/bench.py --model-dir $M/deepseek-ocr --pages ${PAGES:-1024} --max-num-seqs ${SEQS:-1024} --baseline off --product engine --guard-ab --round-caps ${CAPS:-512} --work-dir /tmp/bab --jsonl "$OUT/benchmarks.jsonl" --tag guard-ab-batch 2>&1 | tail -2; grep "ROUND\|STALL\|Error" /tmp/bab/engine.log | head; cp /tmp/bab/engine.log "$OUT/abx_engine.log" ;;
    x2fault) # restart test on GPU 0 while the capped low-VRAM runs go one after the other on GPU 1
          RT_GPU=0 restart_test > /tmp/x2fault_rt.txt 2>&1 &
          CUDA_VISIBLE_DEVICES=1 bash "$0" lowvram; wait; cat /tmp/x2fault_rt.txt ;;
    lowvram) for cap in ${CAPS_GIB:-6 8}; do log "lowvram cap $cap GiB (--gpu-memory-gib: the whole run's budget; vLLM gets cap - 1.7)"
          timeout -k 10 ${LVTO:-280} python3 tools/bench.py --model-dir $M/${LVMODEL:-deepseek-ocr} --pages ${LVPAGES:-48} --max-num-seqs 512 --baseline off --product cli \
            --gpu-mem-cap-gib $cap --work-dir /tmp/lv$cap --jsonl "$OUT/benchmarks.jsonl" --tag lowvram-${cap}gib \
            --cli-extra --profile auto --gpu-memory-gib $cap 2>&1 | tail -2 | cut -c1-2500
          grep -i "profile\|engine ready\|KV cache\|Error\|memory" /tmp/lv$cap/product.log | cut -c1-220 | head -24; cp /tmp/lv$cap/product.log "$OUT/lowvram_${cap}.log"; done ;;
    hf) log hf; for m in deepseek-ocr-2 deepseek-ocr; do PYTHONPATH=$PYTHONPATH:.gpu_carry/hf_bench/pkgs timeout -k 10 ${HFTO:-240} python3 tools/bench_hf.py --model $m --pages ${HFPAGES:-4} \
          --max-tokens ${HFTOK:-512} --hf-batch-size ${HFB:-4} --shared-models .gpu_carry/hf_bench/models --jsonl "$OUT/benchmarks.jsonl" 2>&1 | tail -4; done ;;
    tf523) # Transformers 5.23 (DeepSeek-OCR v1 in the hf engine) beside the machine's 5.17, from .gpu_tf/ wheels
          [ -d /tmp/tf523/transformers ] || { mkdir -p /tmp/tf523 && for w in .gpu_tf/*.whl; do python3 -m zipfile -e $w /tmp/tf523; done; }
          PYTHONPATH=/tmp/tf523 python3 -c "import transformers as t; print('transformers', t.__version__, hasattr(t, 'UnlimitedOcrForConditionalGeneration'))" ;;
    hfv1) log "hfv1: the hf engine's DeepSeek-OCR (v1) vs vLLM's own, same random checkpoint, fp32 greedy; then its s/page"
          bash "$0" tf523; TFP=/tmp/tf523:$PWD:.gpu_carry/hf_bench/pkgs
          PYTHONPATH=$TFP timeout 120 python3 tools/check_hf_ocr1.py build --work /tmp/ck1 2>&1 | tail -2
          PYTHONPATH=/tmp/site:$PWD:.gpu_carry/hf_bench/pkgs VLLM_PLUGINS=none timeout ${CKTO:-240} python3 tools/check_hf_ocr1.py vllm --work /tmp/ck1 > /tmp/ck1/vllm.log 2>&1; tail -3 /tmp/ck1/vllm.log | cut -c1-400; cp /tmp/ck1/vllm.log "$OUT/hfv1_vllm.log"
          PYTHONPATH=$TFP timeout 120 python3 tools/check_hf_ocr1.py hf --work /tmp/ck1 --jsonl "$OUT/benchmarks.jsonl" 2>&1 | tail -2 | cut -c1-1500
          PYTHONPATH=$TFP timeout -k 10 ${HFTO:-200} python3 tools/bench_hf.py --model deepseek-ocr --pages ${HFPAGES:-4} \
            --max-tokens ${HFTOK:-512} --hf-batch-size ${HFB:-4} --shared-models .gpu_carry/hf_bench/models --jsonl "$OUT/benchmarks.jsonl" 2>&1 | tail -3 | cut -c1-1500 ;;
    x2info) log x2info; nvidia-smi -L; nproc; free -g | head -2; df -h /dev/shm | tail -1; lscpu | grep -E "^(Model name|Socket|Core|Thread|NUMA)" ; nvidia-smi topo -m | head -4
          bash tmp_pdf_runs/ray_deps_fallback.sh .stage_ray/fallback ;;
    x2one) x2 1 one ;;            # one GPU alone, PPG pages (~3-4 min)
    x2gpus) x2 gpus gpus ;;       # --gpus 0,1, 2*PPG pages (~3-4 min); scaling vs x2one's line
    x2ray) x2 ray ray ;;          # --executor ray, 2*PPG pages (~4 min); ray_vs_gpus vs x2gpus's line
    x2gr) x2 gpus,ray gr ;;       # --gpus 0,1 then Ray in one call: ray_vs_gpus from the same call (~6 min)
    x2all) x2 1,gpus all ;;       # one GPU then --gpus 0,1 in one call (~6-8 min; --deadline-s skips what cannot fit)
    pack) log pack; tar czf "$OUT/logs.tgz" /tmp/b*/*.log /tmp/smoke_*.log /tmp/smoke_*.out /tmp/rt.log /tmp/rt.out /tmp/smoke_*/_run_summary.json /tmp/smoke_deepseek-ocr_clean/*.md 2>/dev/null; ls -la "$OUT" ;;
    *) echo "unknown step $step" ;;
  esac
done

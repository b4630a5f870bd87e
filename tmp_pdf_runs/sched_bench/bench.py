"""Host-cost benchmark of vLLM 0.26 v1 (Async)Scheduler decode steps.
Usage: python bench.py --n 512 --prefix-caching 1 --steps 200 [--profile out.prof]
"""
import argparse, os, sys, time, gc, cProfile, pstats, io
from collections import deque
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = ["/tmp/vsrc", "/tmp/schedbench/site"]
os.environ["PYTHONPATH"] = "/tmp/vsrc:/tmp/schedbench/site"
import logging
import torch
# STUB: no compiled vLLM => no platform detected; use a dummy platform (device_type='cpu')
import vllm.platforms as _plat
from vllm.platforms.interface import UnspecifiedPlatform
class _BenchPlatform(UnspecifiedPlatform):
    device_type = "cpu"
    device_name = "cpu"
_plat._current_platform = _BenchPlatform()
from vllm.config import (CacheConfig, ModelConfig, SchedulerConfig, VllmConfig)
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.sampling_params import SamplingParams, RequestOutputKind
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.encoder_cache_manager import EncoderCacheManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

ap = argparse.ArgumentParser()
ap.add_argument("--n", type=int, default=512)
ap.add_argument("--prefix-caching", type=int, default=1)
ap.add_argument("--async-sched", type=int, default=1)
ap.add_argument("--mm", type=int, default=1, help="attach one image feature per request")
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--warmup", type=int, default=20)
ap.add_argument("--profile", default="")
ap.add_argument("--encode", type=int, default=1, help="also time msgpack encoding of EngineCoreOutputs")
ap.add_argument("--instrument", type=int, default=0, help="wrap selected methods with timers")
ap.add_argument("--gc-freeze", type=int, default=1)
args = ap.parse_args()

BLOCK = 16
PROMPT_LEN, IMG_LEN, MAX_TOKENS = 900, 800, 1000
MAX_BATCHED = 16384
NUM_BLOCKS = 100_000

sched_cfg = SchedulerConfig(max_num_seqs=512, max_num_batched_tokens=MAX_BATCHED,
                            max_model_len=8192, enable_chunked_prefill=True,
                            async_scheduling=bool(args.async_sched), is_encoder_decoder=False) \
    if "is_encoder_decoder" in SchedulerConfig.__dataclass_fields__ else \
    SchedulerConfig(max_num_seqs=512, max_num_batched_tokens=MAX_BATCHED, max_model_len=8192,
                    enable_chunked_prefill=True, async_scheduling=bool(args.async_sched))
model_cfg = ModelConfig(model="/tmp/schedbench/tinymodel", dtype="bfloat16", seed=0,
                        skip_tokenizer_init=True, max_model_len=8192)
cache_cfg = CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, cache_dtype="fp8",
                        enable_prefix_caching=bool(args.prefix_caching))
vcfg = VllmConfig(scheduler_config=sched_cfg, model_config=model_cfg, cache_config=cache_cfg)
kv_cfg = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[
    KVCacheGroupSpec(["model.layers.%d.self_attn.attn" % i for i in range(12)],
                     FullAttentionSpec(block_size=BLOCK, num_kv_heads=10, head_size=128,
                                       dtype=torch.float8_e4m3fn))])
cache_cfg.num_gpu_blocks = NUM_BLOCKS
cls = AsyncScheduler if args.async_sched else Scheduler
sched = cls(vllm_config=vcfg, kv_cache_config=kv_cfg,
            structured_output_manager=StructuredOutputManager(vcfg),
            block_size=BLOCK, log_stats=False)
# STUB: tiny text model => MultiModalBudget not built; emulate DeepSeek-OCR encoder budget.
sched.max_num_encoder_input_tokens = MAX_BATCHED
sched.encoder_cache_manager = EncoderCacheManager(cache_size=MAX_BATCHED)

block_hasher = None
if args.prefix_caching:
    hf = get_hash_fn_by_name(cache_cfg.prefix_caching_hash_algo)
    init_none_hash(hf)
    block_hasher = get_request_block_hasher(BLOCK, hf)

IMAGE_TOKEN = 128815
sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False,
                    output_kind=RequestOutputKind.FINAL_ONLY, temperature=0.0)
for i in range(args.n):
    prompt = [IMAGE_TOKEN] * IMG_LEN + [(i * 131 + j) % 120000 + 10 for j in range(PROMPT_LEN - IMG_LEN)] if args.mm \
        else [(i * 131 + j) % 120000 + 10 for j in range(PROMPT_LEN)]
    feats = None
    if args.mm:
        feats = [MultiModalFeatureSpec(data=None, modality="image", identifier=f"imghash{i:08d}" * 4,
                                       mm_position=PlaceholderRange(offset=0, length=IMG_LEN),
                                       mm_hash=f"imghash{i:08d}" * 4)]
    req = Request(request_id=f"req-{i}", prompt_token_ids=prompt, sampling_params=sp.clone(),
                  pooling_params=None, mm_features=feats, block_hasher=block_hasher)
    sched.add_request(req)

encoder = None
if args.encode:
    from vllm.v1.serial_utils import MsgpackEncoder
    encoder = MsgpackEncoder()

tok = [0]
def make_output(so):
    req_ids = list(so.num_scheduled_tokens.keys())
    tok[0] += 1
    t = 1000 + tok[0] % 5000
    samples = so._bench_samples
    sampled = [[t] if samples[rid] else [] for rid in req_ids]
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: k for k, r in enumerate(req_ids)},
                             sampled_token_ids=sampled)

q = deque()
QDEPTH = 2 if args.async_sched else 1
t_sched, t_upd, t_enc, n_dec = [], [], [], []
def one_step(record):
    t0 = time.perf_counter()
    so = sched.schedule()
    t1 = time.perf_counter()
    # A step samples a token for a request iff it reaches the end of the prompt
    # (partial-prefill chunks produce no token), evaluated right after schedule().
    so._bench_samples = {rid: sched.requests[rid].num_computed_tokens >= sched.requests[rid].num_prompt_tokens
                         for rid in so.num_scheduled_tokens}
    sched.get_grammar_bitmask(so)
    q.append(so)
    if len(q) < QDEPTH:
        return so, None
    old = q.popleft()
    mro = make_output(old)
    t2 = time.perf_counter()
    outs = sched.update_from_output(old, mro)
    t3 = time.perf_counter()
    te = 0.0
    if encoder is not None:
        for eco in outs.values():
            t4 = time.perf_counter(); encoder.encode(eco); te += time.perf_counter() - t4
    if record:
        t_sched.append(t1 - t0); t_upd.append(t3 - t2); t_enc.append(te)
        n_dec.append(len(so.num_scheduled_tokens))
    return so, outs

# Prefill phase: run until all requests are in pure decode.
steps = 0
while True:
    so, _ = one_step(False); steps += 1
    if all(not r.is_prefill_chunk for r in sched.running) and len(sched.running) == args.n \
       and so.total_num_scheduled_tokens == args.n:
        break
    assert steps < 500, "prefill did not finish"
print(f"prefill done after {steps} steps; running={len(sched.running)}", flush=True)
for _ in range(args.warmup):
    one_step(False)
if args.gc_freeze:
    gc.collect(); gc.freeze()   # engine core calls freeze_gc_heap() at startup
acc = {}
if args.instrument:
    import functools
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.request import Request as _R
    def wrap(obj, name, label):
        orig = getattr(obj, name)
        @functools.wraps(orig)
        def w(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + time.perf_counter() - t
        setattr(obj, name, w)
    km = sched.kv_cache_manager
    wrap(km, "allocate_slots", "schedule: kv_cache_manager.allocate_slots")
    wrap(sched, "_try_schedule_encoder_inputs", "schedule: _try_schedule_encoder_inputs")
    wrap(sched, "_make_cached_request_data", "schedule: _make_cached_request_data")
    wrap(sched, "_update_after_schedule", "schedule: (Async)_update_after_schedule")
    wrap(sched, "_update_request_with_output", "update: (Async)_update_request_with_output [incl. cache_blocks, check_stop]")
    wrap(km, "cache_blocks", "update:   kv_cache_manager.cache_blocks (async path)")
    import vllm.v1.core.sched.scheduler as _sm
    _orig_cs = _sm.check_stop
    def _cs(*a, **k):
        t = time.perf_counter()
        try: return _orig_cs(*a, **k)
        finally: acc["update:   check_stop"] = acc.get("update:   check_stop", 0.0) + time.perf_counter() - t
    _sm.check_stop = _cs
    wrap(sched, "_free_encoder_inputs", "update: _free_encoder_inputs")
prof = cProfile.Profile() if args.profile else None
if prof: prof.enable()
for _ in range(args.steps):
    one_step(True)
if prof:
    prof.disable(); prof.dump_stats(args.profile)
import statistics as st
ms = lambda xs: 1e3 * st.mean(xs)
med = lambda xs: 1e3 * st.median(xs)
print(f"n={args.n} prefix_caching={args.prefix_caching} async={args.async_sched} mm={args.mm} "
      f"profile={'on' if prof else 'off'} steps={len(t_sched)} scheduled/step={st.mean(n_dec):.0f}")
print(f"  schedule()          mean {ms(t_sched):7.3f} ms  median {med(t_sched):7.3f} ms")
print(f"  update_from_output  mean {ms(t_upd):7.3f} ms  median {med(t_upd):7.3f} ms")
if encoder is not None:
    print(f"  msgpack encode outs mean {ms(t_enc):7.3f} ms  median {med(t_enc):7.3f} ms")
print(f"  total               mean {ms(t_sched)+ms(t_upd)+ms(t_enc):7.3f} ms")
if acc:
    for k, v in sorted(acc.items()):
        print(f"    {k:75s} {1e3*v/args.steps:7.3f} ms/step")

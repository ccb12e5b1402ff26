"""Where the host waits on the GPU in one admission (prefill + load into a slot) and in scheduler steps, and the
prefill's wall vs GPU vs CPU time with the engine built once. argv: layers (default 32)."""
import sys, time, traceback, warnings, collections, torch
sys.path.insert(0, "jobs")
import bench_engine as be
from kvstream import CacheConfig
from kvstream.kvcache.cache import CompressedCache
from kvstream.kvcache.scheduler import Request

layers = int(sys.argv[1]) if len(sys.argv) > 1 else 32
model = be.build_model("llama2-7b", layers, torch.device("cuda"))
dev = torch.device("cuda")
sites = collections.Counter()
def show(message, category, filename, lineno, file=None, line=None):
    st = [f for f in traceback.extract_stack()[:-2] if "kvstream" in f.filename or "bench_engine" in f.filename]
    key = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}:{f.name}" for f in st[::-1][:4])
    sites[(str(message)[:60], key)] += 1
for name in ("keyformer0.5+kivi2", "full", "full+kivi2"):
    eng = be.kv_engine(model, name)
    ids = torch.randint(3, 32000, (1, 4096), device=dev)
    def kv():
        cache = CompressedCache(CacheConfig(**be.CONFIGS[name], max_new_tokens=256), model.config, seeds=[1])
        return eng.prefill(cache, ids)
    with torch.inference_mode():
        for _ in range(2):
            kv()
        torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        w, c = time.perf_counter(), time.process_time(); ev[0].record()
        for _ in range(3):
            kv()
        ev[1].record(); torch.cuda.synchronize()
        print(f"{name} ({layers} layers): prefill wall {1e3*(time.perf_counter()-w)/3:.1f} ms  gpu-span "
              f"{ev[0].elapsed_time(ev[1])/3:.1f} ms  cpu {1e3*(time.process_time()-c)/3:.1f} ms", flush=True)
        sites.clear()
        torch.cuda.set_sync_debug_mode(1)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            kv()
            sched = eng.scheduler(4, 4096, 16)
            for i in range(6):
                sched.add(Request(str(i), torch.randint(3, 32000, (4096 - 7 * i,)).tolist(), max_new_tokens=5 + i))
            n = 0
            while sched.has_work():
                sched.step(); n += 1
        torch.cuda.set_sync_debug_mode(0)
        print(f"  syncs in one prefill + a 6-request scheduler run ({n} steps): {sum(sites.values())}")
        for (msg, key), k in sites.most_common(25):
            print(f"   {k:4d} x {msg} @ {key}")
    del eng
    torch.cuda.empty_cache()

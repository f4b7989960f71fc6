import sys, time, asyncio, json
sys.path.insert(0, '/work/main/bench')
import erllama
from erllama.bundled import bundled_model_path
from common import model_config, prose, cache_config

async def main(fa: bool, n: int):
    cfg = erllama.EngineConfig(cache=cache_config("ram"))
    async with erllama.open_engine(cfg) as e:
        import attrs
        mc = attrs.evolve(model_config(bundled_model_path(), live=False), flash_attn=fa)
        m = await e.load_model("m", mc)
        await e.complete(m, "Warm-up.", max_tokens=2)
        out = []
        for rep in range(2):
            ids = (await e.tokenize(m, prose(f"fa-{rep}", n // 8)))[:n]
            t0 = time.perf_counter(); d = await e.complete(m, ids, max_tokens=1); cold = time.perf_counter() - t0
            await e.wait_saved()
            w = ids + list(d.token_ids)
            t0 = time.perf_counter(); d2 = await e.complete(m, w, max_tokens=1); warm = time.perf_counter() - t0
            out.append((cold, warm, d2.cache_delta.read))
        print(json.dumps({"fa": fa, "n": n, "runs": out}))

asyncio.run(main(sys.argv[1] == "1", int(sys.argv[2])))

import sys, time, asyncio, json
sys.path.insert(0, '/work/main/bench')
import erllama
from erllama.bundled import bundled_model_path
from common import model_config, prose, cache_config

async def main(fa: bool, n: int):
    cfg = erllama.EngineConfig(cache=cache_config(None))
    async with erllama.open_engine(cfg) as e:
        import attrs
        mc = attrs.evolve(model_config(bundled_model_path(), live=False), flash_attn=fa)
        m = await e.load_model("m", mc)
        await e.complete(m, "Warm-up.", max_tokens=2)
        ids = (await e.tokenize(m, prose("dec", n // 8 + 10)))[:n]
        first = last = None; count = 0
        t0 = time.perf_counter()
        async with await e.infer(m, ids, max_tokens=64) as s:
            async for ev in s:
                if isinstance(ev, erllama.Token):
                    last = time.perf_counter(); first = first or last; count += 1
        print(json.dumps({"fa": fa, "n": n, "prefill_tok_s": n / (first - t0), "decode_tok_s": (count - 1) / (last - first)}))

asyncio.run(main(sys.argv[1] == "1", int(sys.argv[2])))

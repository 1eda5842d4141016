"""Run with vLLM's Python by tools/bench_vllm.py: start vLLM one way, generate one token, and
print when each step ended (time.time(), the clock the benchmark started on) as JSON.

    --model DIR_OR_URI [--load-format F]   vLLM's own loaders (auto, runai_streamer)
    --open MODEL                          LLM(model=Model.path) of a cached model
    --prepare MODEL                       weightcache.vllm.prepare (the launcher's steps) + LLM
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser()
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model")
    g.add_argument("--open")
    g.add_argument("--prepare")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--socket-dir")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    marks: dict[str, float] = {"spawned": time.time()}
    with ExitStack() as stack:
        kwargs: dict[str, Any] = {"model": a.model, "load_format": a.load_format}
        if a.open or a.prepare:
            import weightcache

            client = stack.enter_context(weightcache.connect(a.socket_dir))
            if a.open:
                kwargs = {"model": stack.enter_context(client.open(a.open)).path}
            else:
                from weightcache.vllm import prepare

                kwargs = stack.enter_context(prepare(a.prepare, client=client)).llm_kwargs()
            marks["opened"] = time.time()
        from vllm import LLM, SamplingParams

        marks["imported"] = time.time()
        llm = LLM(**kwargs, dtype="bfloat16", max_model_len=256, max_num_seqs=2, enforce_eager=True, seed=0)
        marks["ready"] = time.time()
        out = llm.generate(["hello world"], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        marks["first_token"] = time.time()
        marks["token"] = float(out[0].outputs[0].token_ids[0])
        with open(a.out, "w") as f:
            json.dump(marks, f)  # vLLM's shutdown, which follows, is not part of the measurement


if __name__ == "__main__":
    main()

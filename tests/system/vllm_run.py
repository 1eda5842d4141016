"""Run by tests/system/test_vllm.py with vLLM's Python: one LLM, greedy token ids of one prompt.

--open MODEL reads weightcache's Model.path *before* vLLM is imported (what a script does), and
keeps the handle open to the end, as a script would."""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", help="a model directory")
    p.add_argument("--open", help="a weightcache model to open; its path is the model")
    p.add_argument("--socket-dir")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--extra", help="model_loader_extra_config (JSON)")
    p.add_argument("--single-process", action="store_true", help="engine and worker in this process")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    model = a.model
    if a.open:
        import weightcache

        handle = weightcache.connect(a.socket_dir).open(a.open)
        model = handle.path
    kwargs = {}
    if a.single_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs["distributed_executor_backend"] = "uni"
    if a.extra:
        kwargs["model_loader_extra_config"] = json.loads(a.extra)
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model, load_format=a.load_format, dtype="bfloat16", max_model_len=128, max_num_seqs=2,
        enforce_eager=True, seed=0, **kwargs,
    )  # fmt: skip
    out = llm.generate([a.prompt], SamplingParams(temperature=0, max_tokens=8))
    with open(a.out, "w") as f:
        json.dump({"ids": list(out[0].outputs[0].token_ids), "model": model, "pid": os.getpid()}, f)


if __name__ == "__main__":
    main()

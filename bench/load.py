"""Peak memory of loading GPT-2 weights: the straightforward way, the book's bonus recipe, and `load_pretrained_gpt2`.

    python bench/load.py                  # the largest GPT-2 size whose naive load fits in this machine's memory
    python bench/load.py --size gpt2-774m --dir /tmp

Writes a random checkpoint with the names and shapes of Hugging Face's `model.safetensors` for the chosen size (to a
temporary folder, deleted afterwards), then loads it in a fresh process per method and reports each process's peak
resident memory (`ru_maxrss`) as a multiple of the weights' size. Each process also runs the model once on the same
input, and the three results must agree: every method really loaded the weights.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llm_from_scratch.gpt import GPTModel
from llm_from_scratch.weights import PRETRAINED_GPT2, gpt2_config, gpt2_name_map, hf_name, load_pretrained_gpt2

METHODS = {
    "bare": "nothing loaded: Python, torch and the package",
    "naive": "GPTModel(cfg), load_file, convert, load_state_dict",
    "book": "meta device, load_file (mmap), convert, load_state_dict(assign=True)",
    "ours": "load_pretrained_gpt2 (parameters on meta, one tensor read at a time)",
}


def hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    "Tensor names and shapes of a Hugging Face GPT-2 model.safetensors for `cfg`."
    d, v = cfg["emb_dim"], cfg["vocab_size"]
    shapes = {"wte.weight": (v, d), "wpe.weight": (cfg["context_length"], d), "ln_f.weight": (d,), "ln_f.bias": (d,)}
    for i in range(cfg["n_layers"]):
        h = f"h.{i}."
        shapes |= {h + "ln_1.weight": (d,), h + "ln_1.bias": (d,), h + "ln_2.weight": (d,), h + "ln_2.bias": (d,),
                   h + "attn.c_attn.weight": (d, 3 * d), h + "attn.c_attn.bias": (3 * d,),
                   h + "attn.c_proj.weight": (d, d), h + "attn.c_proj.bias": (d,),
                   h + "mlp.c_fc.weight": (d, 4 * d), h + "mlp.c_fc.bias": (4 * d,),
                   h + "mlp.c_proj.weight": (4 * d, d), h + "mlp.c_proj.bias": (d,)}
    return shapes


def write_random_safetensors(path: Path, shapes: dict) -> int:
    "Stream random float32 tensors into a safetensors file, one at a time; return the bytes of weights."
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for shape in shapes.values():
            f.write((torch.randn(shape, generator=g) * 0.02).numpy().tobytes())
    return offset


def converted(sd: dict, cfg: dict) -> dict:
    "Hugging Face tensors under our names: split, transposed, contiguous (the copy a conversion makes)."
    out = {}
    for ours, s in gpt2_name_map(cfg["n_layers"]).items():
        t = sd[hf_name(s.name)]
        if s.part is not None:
            t = t.chunk(3, dim=-1)[s.part]
        out[ours] = (t.T if s.transpose else t).contiguous()
    return out


def child(method: str, path: Path, size: str) -> dict:
    "Load `path` one way; return peak RSS, time and a checksum of the model's output."
    from safetensors.torch import load_file
    cfg = gpt2_config(size)
    t = time.perf_counter()
    if method == "bare":
        return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": 0.0}
    if method == "naive":
        model = GPTModel(cfg)
        model.load_state_dict(converted(load_file(path), cfg), strict=False)  # strict=False: the masks are not in the file
    elif method == "book":
        with torch.device("meta"):
            model = GPTModel(cfg)
        sd = converted(load_file(path), cfg)
        sd |= {f"trf_blocks.{i}.att.mask": torch.triu(torch.ones(1024, 1024), diagonal=1) for i in range(cfg["n_layers"])}
        model.load_state_dict(sd, assign=True)
        del sd
    else:
        model, _ = load_pretrained_gpt2(path, device="cpu")
    seconds = time.perf_counter() - t
    total = sum(p.sum().item() for p in model.parameters())  # touch every weight: a memory map counts once read
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():  # after the measurement: the same output from every method
        out = model.eval()(torch.arange(16)[None]).double().sum().item()
    return {"peak_rss": peak, "seconds": seconds, "check": out, "total": total}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(PRETRAINED_GPT2), help="default: the largest whose naive load fits in memory")
    ap.add_argument("--dir", default=None, help="where to write the temporary checkpoint")
    ap.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    ap.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the table and the machine to PATH")
    a = ap.parse_args()
    if a.write:  # in a process of its own: a child inherits its parent's peak RSS, so the parent must stay small
        print(write_random_safetensors(Path(a.file), hf_shapes(gpt2_config(a.size))))
        return
    if a.child:
        print(json.dumps(child(a.child, Path(a.file), a.size)))
        return
    available = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemAvailable"))) * 1024
    sizes = {m: sum(math.prod(s) for s in hf_shapes(gpt2_config(m)).values()) * 4 for m in PRETRAINED_GPT2}
    size = a.size or max((m for m in sizes if 3.5 * sizes[m] < 0.8 * available), key=sizes.get, default="gpt2-124m")
    print(f"{size}: {sizes[size] / 1e9:.2f} GB of float32 weights; {available / 1e9:.1f} GB of memory available; "
          f"{os.cpu_count()} CPU cores; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        path = Path(d)/"model.safetensors"
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--write", "--file", str(path), "--size", size],
                           capture_output=True, text=True, check=True)
        weights = int(r.stdout.strip())
        print(f"wrote a random checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
        rows = {}
        for method in METHODS:
            r = subprocess.run([sys.executable, __file__, "--child", method, "--file", str(path), "--size", size],
                               capture_output=True, text=True, check=True)
            rows[method] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"  {method}: done", flush=True)
    checks = [r["check"] for r in rows.values() if "check" in r]
    if max(checks) - min(checks) > 1e-6 * max(1.0, abs(checks[0])):
        raise SystemExit(f"the methods disagree about the model's output: {checks}")
    bare = rows["bare"]["peak_rss"]
    print(f"\n| method | what it does | peak RSS | × weights ({weights / 1e9:.2f} GB) | above a bare process, × weights | load time |")
    print("|---|---|---:|---:|---:|---:|")
    for method, r in rows.items():
        print(f"| {method} | {METHODS[method]} | {r['peak_rss'] / 1e9:.2f} GB | {r['peak_rss'] / weights:.2f} | "
              f"{(r['peak_rss'] - bare) / weights:.2f} | {r['seconds']:.1f} s |")
    if a.json:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from common import write_json
        table = [{"method": m, "what": METHODS[m], "peak_rss_gb": r["peak_rss"] / 1e9,
                  "x_weights": r["peak_rss"] / weights, "above_bare_x_weights": (r["peak_rss"] - bare) / weights,
                  "seconds": r["seconds"]} for m, r in rows.items()]
        write_json(a.json, {"load": table}, size=size, weights_gb=weights / 1e9,
                   memory_available_gb=available / 1e9)
    ratio = rows["ours"]["peak_rss"] / weights
    print(f"\nours: {ratio:.2f} x the weights' size (target <= 1.3): {'met' if ratio <= 1.3 else 'NOT met'}")


if __name__ == "__main__":
    main()

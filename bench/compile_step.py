"""``torch.compile`` (inductor: C++ on CPU) of the chunked no-grad step
against the fused C kernels (issue 15: prefer the compiler if it comes within
1.5x of the kernels on the reference MLP and the transformer).

The per-parameter MLP metanetwork's two chunked passes -- the feature sums,
then features, network, update formula and new statistics -- are written as
plain tensor functions and compiled (static shapes: one compilation per run
length), driven run by run over the same plan as the chunked backend. The
GMN's passes (scatter sums onto nodes) are not covered.

    python bench/compile_step.py [--threads 1] [--repeats 10] [model names of bench/fast_step.py]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import l2o
from l2o import features as F_
from l2o.fast import make_backend
from l2o.fast.plan import ChunkPlan
from l2o.layout import tensor_layout
from l2o.update_rule import fold_head

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fast_step  # noqa: E402

B2 = F_.SECOND_MOMENT_BETA


def features(p, g, m, v, betas, scale, eps):
    """The feature rows (l2o.features' layout) and the new statistics of one run."""
    m_new = m * betas[:, None] + (1 - betas[:, None]) * g
    v_new = v * B2 + (1 - B2) * g * g
    sqrt_v = (v_new + F_.SQRT_EPS).sqrt()
    adam = scale * m_new[F_.ADAM_BETA1_INDEX] / (sqrt_v + eps)
    return torch.cat([p[None], g[None], m_new, adam[None], sqrt_v[None]]), m_new, v_new


def sums_pass(p, g, m, v, betas, scale, eps):
    x, _, _ = features(p, g, m, v, betas, scale, eps)
    return (x * x).sum(1)


def step_pass(p, g, m, v, betas, scale, eps, w_in, b_in, w_mid, b_mid, w_out, b_out, nominal, c):
    x, m_new, v_new = features(p, g, m, v, betas, scale, eps)
    z = F.relu(w_in @ x + b_in[:, None])
    z = F.relu(w_mid @ z + b_mid[:, None])
    out = w_out @ z + b_out
    update = (out[0] - nominal * x[F_.ROW_ADAM]) * (2 * c * torch.sigmoid(out[1]) - c).exp()   # update_rule, folded
    return update, m_new, v_new


torch._dynamo.config.recompile_limit = 64   # one compilation per run length
compiled_sums, compiled_pass = torch.compile(sums_pass, dynamic=False), torch.compile(step_pass, dynamic=False)


def compiled_step(lopt, plan, flat, grad, state):
    """The MLP metanetwork's chunked step (l2o/fast/mlp.py) through the compiled passes."""
    state["step"] = state["step"] + 1
    scale, eps = (torch.tensor(x) for x in F_.adam_bias_correction(float(state["step"])))
    betas = torch.tensor(F_.MOMENTUM_BETAS)
    sums = torch.zeros(plan.num_tensors, F_.NUM_ENTRY_FEATURES)
    for r in plan.stat_runs:
        s, e = r.start, r.stop
        sums[r.tensor] += compiled_sums(flat[s:e], grad[s:e], state["m"][:, s:e], state["v"][s:e], betas, scale, eps)
    inv_rms = 1 / (F_.rms_from_sums(sums, plan.tensor_counts) + F_.RMS_EPS)
    w_in = lopt.inp.weight.unsqueeze(0) * inv_rms.unsqueeze(1)
    b_in = lopt.inp.bias + lopt.time(F_.time_features(state["step"]))
    w_out, b_out = fold_head(lopt.out.weight, lopt.out.bias, lopt.out_scale, lopt.max_log_step)
    nominal, c = torch.tensor(lopt.nominal_weight()), torch.tensor(lopt.max_log_step)
    update = torch.empty_like(flat)
    for r in plan.stat_runs:
        s, e = r.start, r.stop
        u, m_new, v_new = compiled_pass(flat[s:e], grad[s:e], state["m"][:, s:e], state["v"][s:e], betas, scale, eps,
                                        w_in[r.tensor], b_in, lopt.mid.weight, lopt.mid.bias, w_out, b_out, nominal, c)
        update[s:e] = u
        state["m"][:, s:e] = m_new
        state["v"][s:e] = v_new
    return update, state


def run(name: str, repeats: int) -> None:
    torch.manual_seed(0)
    model, _ = fast_step.MODELS[name]()
    layout = tensor_layout([p.shape for p in model.parameters()])
    lopt = l2o.MLPLOpt().requires_grad_(False)
    flat = layout.gather([p.detach() for p in model.parameters()])
    grad = torch.randn_like(flat)
    plan = ChunkPlan(layout, 32768)     # the chunked backend's runs for this metanetwork
    steps = {impl: (lambda b=make_backend(lopt, layout, "cpu", impl), s=lopt.init_state(flat): b.step_flat(flat, grad, s))
             for impl in ("fused", "chunked")}
    compiled_state = lopt.init_state(flat)
    steps["compiled"] = lambda: compiled_step(lopt, plan, flat, grad, compiled_state)
    with torch.no_grad():
        t0 = time.perf_counter()
        steps["compiled"]()
        print(f"{name}: first compiled step {time.perf_counter() - t0:.1f} s (compiles)", flush=True)
        ref, _ = make_backend(lopt, layout, "cpu", "forward").step_flat(flat, grad, lopt.init_state(flat))
        got, _ = compiled_step(lopt, plan, flat, grad, lopt.init_state(flat))
        print(f"  max |compiled - forward| / max |forward| = {float((got - ref).abs().max() / ref.abs().max()):.1e}")
        times = {k: [] for k in steps}
        for r in range(repeats + 2):
            for k in list(steps)[::1 if r % 2 else -1]:
                t0 = time.perf_counter()
                steps[k]()
                if r >= 2:
                    times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"  fused {med['fused']:.1f} ms, chunked (torch ops) {med['chunked']:.1f} ms, compiled {med['compiled']:.1f} ms:"
          f" compiled / fused {med['compiled'] / med['fused']:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("models", nargs="*", default=["reference MLP 784-1024-1024-10", "transformer d256 x3 + vocab 1000"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        run(name, args.repeats)


if __name__ == "__main__":
    main()

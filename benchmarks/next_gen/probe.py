#!/usr/bin/env python3
"""Probe DeepEP V2 (ElasticBuffer) or HybridEP (HybridEPBuffer) intranode dispatch/combine on real GPUs.

One process per GPU, e.g. (after `source benchmarks/next_gen/env.sh v2|hybrid`):
    ng_with_v2_nccl torchrun --standalone --nproc_per_node 2 benchmarks/next_gen/probe.py --backend v2 --out $OUT
    torchrun --standalone --nproc_per_node 2 benchmarks/next_gen/probe.py --backend hybrid --out $OUT

For every config: the first call of each API is timed on the host (that is where JIT compiles happen), then
`--warmup` untimed and `--iters` timed iterations (CUDA events on the compute stream, a 256 MB L2 flush before
each timed iteration, fixed counts on all ranks). Per-rank mean/median/min are reduced with MAX over ranks on a
gloo group that lives beside the NCCL group the buffer uses. Dispatch output is checked row by row (rank-stamped
inputs: col0 = source rank, col1 + 256*col2 = source token, the rest 1.0); combine output must equal the input
times the number of distinct ranks each token went to. A failing config is caught, printed and skipped while
the CUDA context is alive; a dead context ends the probe (results so far are still written).
"""
import argparse
import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist


def log(msg, all_ranks=False):
    if all_ranks or dist.get_rank() == 0:
        print(f'[probe r{dist.get_rank()}] {msg}', flush=True)


class Ctx:
    def __init__(self, args):
        self.args = args
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        torch.cuda.set_device(self.local_rank)
        dist.init_process_group('nccl', device_id=torch.device('cuda', self.local_rank))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # NCCL group for the buffer (V2 reuses its communicator; HybridEP all_gathers CUDA tensors on it)
        self.group = dist.new_group(list(range(self.world)))
        # gloo group for the probe's own control collectives (CPU tensors), beside the NCCL one
        self.gloo = dist.new_group(list(range(self.world)), backend='gloo')
        self.flush_buf = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device='cuda')
        self.t_start = time.time()
        self.dead = False

    # --- control collectives (gloo) ---
    def allmax(self, values):
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.gloo)
        return t.tolist()

    def all_ok(self, ok):
        return self.allmax([0.0 if ok else 1.0])[0] == 0.0

    def go(self, label):
        """Collective decision (rank 0's clock) whether another config fits into the budget."""
        left = self.args.budget_s - (time.time() - self.t_start)
        ok = self.allmax([0.0 if left > 0 else 1.0])[0] == 0.0
        if not ok:
            log(f'budget exhausted, skipping {label}')
        return ok

    def alive(self):
        try:
            torch.cuda.synchronize()
            torch.zeros(1, device='cuda').add_(1).item()
            return True
        except Exception as e:  # sticky CUDA error: context is dead
            log(f'CUDA context dead: {e}', all_ranks=True)
            self.dead = True
            return False

    # --- timing ---
    def first_call(self, fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = fn()
        torch.cuda.synchronize()
        return r, time.perf_counter() - t0

    def bench(self, fn):
        a = self.args
        for _ in range(a.warmup):
            fn()
        torch.cuda.synchronize()
        dist.barrier(group=self.gloo)
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(a.iters)]
        for s, e in ev:
            self.flush_buf.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        ts = sorted(s.elapsed_time(e) * 1e3 for s, e in ev)  # us
        mean, med, mn = sum(ts) / len(ts), ts[len(ts) // 2], ts[0]
        mx = self.allmax([mean, med, mn])
        return {'mean_us': round(mx[0], 1), 'median_us': round(mx[1], 1), 'min_us': round(mx[2], 1),
                'rank_mean_us': round(mean, 1)}


def make_inputs(ctx, T, H, E, K):
    """Rank-stamped bf16 tokens and balanced random top-k; returns everything needed for the checks."""
    g = torch.Generator(device='cuda').manual_seed(1234 + ctx.rank)
    t = torch.arange(T, device='cuda')
    x = torch.ones(T, H, dtype=torch.bfloat16, device='cuda')
    x[:, 0] = ctx.rank
    x[:, 1] = (t % 256).to(torch.bfloat16)
    x[:, 2] = (t // 256).to(torch.bfloat16)
    scores = torch.rand(T, E, device='cuda', generator=g) + 0.01
    topk_idx = torch.topk(scores, K, dim=-1, sorted=False).indices.to(torch.int64)
    topk_w = torch.ones(T, K, dtype=torch.float32, device='cuda')
    # all ranks' routing, gathered on gloo
    all_idx = [torch.empty(T, K, dtype=torch.int64) for _ in range(ctx.world)]
    dist.all_gather(all_idx, topk_idx.cpu(), group=ctx.gloo)
    epr = E // ctx.world
    # expected received global ids (src_rank*T + t), ordered by (src rank, token)
    exp_ids = []
    for s in range(ctx.world):
        hit = ((all_idx[s] // epr) == ctx.rank).any(dim=1)
        exp_ids.append(torch.nonzero(hit).flatten() + s * T)
    exp_ids = torch.cat(exp_ids).cuda()
    # distinct destination ranks per local token -> expected combine multiplier
    dst = topk_idx // epr
    k = torch.zeros(T, ctx.world, dtype=torch.bool, device='cuda')
    k.scatter_(1, dst, True)
    mult = k.sum(1).float()
    return x, topk_idx, topk_w, exp_ids, mult


def rows_for_ids(ids, T, H):
    r = torch.ones(ids.numel(), H, dtype=torch.bfloat16, device='cuda')
    r[:, 0] = (ids // T).to(torch.bfloat16)
    tok = ids % T
    r[:, 1] = (tok % 256).to(torch.bfloat16)
    r[:, 2] = (tok // 256).to(torch.bfloat16)
    return r


def decode_ids(rows, T):
    f = rows[:, :3].float()
    return (f[:, 0] * T + f[:, 1] + 256 * f[:, 2]).round().long()


def check_combine(out, x, mult):
    exp = x.float() * mult[:, None]
    ok = torch.allclose(out.float(), exp, rtol=1e-2, atol=1e-2)
    return bool(ok), float((out.float() - exp).abs().max())


# ----------------------------------------------------------------------------------------------------------
def run_v2(ctx, res):
    import deep_ep
    from deep_ep.utils.envs import get_nvlink_gbs
    a = ctx.args
    T, H, E, K = a.tokens, a.hidden, a.experts, a.topk
    res['deep_ep_version'] = getattr(deep_ep, '__version__', '?')
    res['topk_idx_t'] = str(deep_ep.topk_idx_t)
    t0 = time.perf_counter()
    buf = deep_ep.ElasticBuffer(ctx.group, num_max_tokens_per_rank=T, hidden=H, num_topk=K,
                                use_fp8_dispatch=False, prefer_overlap_with_compute=True,
                                explicitly_destroy=True,
                                num_gpu_timeout_secs=a.gpu_timeout_s, num_cpu_timeout_secs=a.gpu_timeout_s)
    res['buffer_init_s'] = round(time.perf_counter() - t0, 2)
    res['buffer_num_bytes'] = buf.num_bytes
    res['logical_domain'] = list(buf.get_logical_domain_size())
    res['physical_domain'] = list(buf.get_physical_domain_size())
    res['num_allocated_qps'] = buf.num_allocated_qps
    nvl = get_nvlink_gbs()
    th_true = buf.get_theoretical_num_sms(E, K)
    buf.prefer_overlap_with_compute = False   # only the Python-side estimate reads this attribute
    th_false = buf.get_theoretical_num_sms(E, K, nvlink_gbs=nvl)  # different args -> not the cached value
    buf.prefer_overlap_with_compute = True
    res['nvlink_gbs_x0.9'] = nvl
    res['device_sms'] = torch.cuda.get_device_properties(0).multi_processor_count
    res['theoretical_num_sms'] = {'prefer_overlap_with_compute=True': th_true,
                                  'prefer_overlap_with_compute=False': th_false}
    log(f'V2 buffer {buf.num_bytes/2**20:.0f} MiB in {res["buffer_init_s"]} s; nvlink_gbs*0.9={nvl}; '
        f'theoretical num_sms overlap=True -> {th_true}, overlap=False -> {th_false}')

    x, topk_idx, topk_w, exp_ids, mult = make_inputs(ctx, T, H, E, K)
    topk_idx = topk_idx.to(deep_ep.topk_idx_t)
    exp_sorted = torch.sort(exp_ids).values

    sms_list = []
    for s in [th_true, 24, th_false, 8] + [int(v) for v in a.v2_sms.split(',') if v]:
        if s not in sms_list and 0 < s <= res['device_sms']:
            sms_list.append(s)
    handles = {}
    for n in sms_list:
        label = f'v2 num_sms={n}'
        if ctx.dead or not ctx.go(label):
            break
        rec = {'backend': 'v2', 'label': label, 'num_sms': n}
        try:
            (rx, _, _, h, _), rec['first_dispatch_s'] = ctx.first_call(
                lambda: buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w, num_experts=E, num_sms=n))
            nrecv = rx.shape[0]
            src = h.recv_src_metadata[:nrecv, 0].long()
            ok_meta = bool(torch.equal(torch.sort(src).values, exp_sorted))
            ok_rows = bool(torch.equal(decode_ids(rx, T), src)) and bool((rx[:, 3:] == 1).all())
            (crx, _, _, _, _), rec['first_cached_dispatch_s'] = ctx.first_call(
                lambda: buf.dispatch(x, handle=h, num_sms=n))
            ok_cached = bool(torch.equal(crx, rx))
            (cx, _, _), rec['first_combine_s'] = ctx.first_call(lambda: buf.combine(rx, handle=h))
            ok_comb, err = check_combine(cx, x, mult)
            rec.update(num_recv_tokens=nrecv, handle_num_sms=h.num_sms, check_dispatch=ok_meta and ok_rows,
                       check_cached_dispatch=ok_cached, check_combine=ok_comb, combine_max_abs_err=err)
            rec['dispatch_cached'] = ctx.bench(lambda: buf.dispatch(x, handle=h, num_sms=n))
            rec['dispatch_noncached'] = ctx.bench(
                lambda: buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w, num_experts=E, num_sms=n))
            rec['combine'] = ctx.bench(lambda: buf.combine(rx, handle=h, num_sms=n))
            handles[n] = (h, rx)
            rec['ok'] = ctx.all_ok(rec['check_dispatch'] and rec['check_cached_dispatch'] and ok_comb)
        except Exception as e:
            rec['error'] = f'{type(e).__name__}: {e}'[:500]
            log(f'{label} FAILED: {rec["error"]}', all_ranks=True)
            traceback.print_exc()
            ctx.alive()
        res['configs'].append(rec)
        log(json.dumps(rec))

    # combine with a num_sms different from the handle's
    if len(handles) >= 2 and not ctx.dead and ctx.go('v2 cross-sms combine'):
        (n1, (h1, rx1)), (n2, _) = list(handles.items())[:2]
        rec = {'backend': 'v2', 'label': f'v2 combine num_sms={n2} on handle num_sms={n1}'}
        try:
            cx, _, _ = buf.combine(rx1, handle=h1, num_sms=n2)
            torch.cuda.synchronize()
            rec['check_combine'], rec['combine_max_abs_err'] = check_combine(cx, x, mult)
            (crx, _, _, _, _) = buf.dispatch(x, handle=h1, num_sms=n2)
            torch.cuda.synchronize()
            rec['check_cached_dispatch_other_sms'] = bool(torch.equal(crx, rx1))
        except Exception as e:
            rec['error'] = f'{type(e).__name__}: {e}'[:500]
            ctx.alive()
        res['configs'].append(rec)
        log(json.dumps(rec))

    # invalid num_sms: above the device SM count (host assert expected, before any launch)
    if not ctx.dead and ctx.go('v2 invalid num_sms'):
        rec = {'backend': 'v2', 'label': 'v2 num_sms=device_sms+2 (invalid)'}
        try:
            buf.dispatch(x, topk_idx=topk_idx, topk_weights=topk_w, num_experts=E, num_sms=res['device_sms'] + 2)
            torch.cuda.synchronize()
            rec['result'] = 'no error'
        except Exception as e:
            rec['result'] = f'{type(e).__name__}: {str(e)[:300]}'
        rec['context_alive_after'] = ctx.alive()
        res['configs'].append(rec)
        log(json.dumps(rec))
    if not ctx.dead:
        dist.barrier(group=ctx.gloo)
        buf.destroy()


# ----------------------------------------------------------------------------------------------------------
CHUNK_ENVS = ('NUM_OF_TOKENS_PER_CHUNK_DISPATCH_API', 'NUM_OF_TOKENS_PER_CHUNK_COMBINE_API',
              'NUM_OF_TOKENS_PER_CHUNK_PREPROCESSING_API')


def run_hybrid(ctx, res):
    import deep_ep
    a = ctx.args
    T, H, E, K = a.tokens, a.hidden, a.experts, a.topk
    epr = E // ctx.world
    t0 = time.perf_counter()
    buf = deep_ep.HybridEPBuffer(group=ctx.group, hidden_dim=H, max_num_of_tokens_per_rank=T,
                                 num_local_experts=epr, use_fp8=False)
    res['buffer_init_s'] = round(time.perf_counter() - t0, 2)
    bc = buf.configurer.buffer_config
    res['buffer_config_default'] = repr(bc)
    res['ranks_per_nvlink_domain'] = buf.num_of_hybrid_ep_ranks_per_nvlink_domain
    log(f'HybridEP buffer in {res["buffer_init_s"]} s; {repr(bc)}')
    x, topk_idx, _, exp_ids, mult = make_inputs(ctx, T, H, E, K)
    exp_rows = rows_for_ids(exp_ids, T, H)

    configs = [('default 24/24 chunk64', 24, 24, None, {}),
               ('16/16 chunk64', 16, 16, None, {}),
               ('32/32 chunk64', 32, 32, None, {}),
               ('24/24 chunk128', 24, 24, 128, {}),
               ('24/24 chunk64 stages_dispatch=6', 24, 24, None, {'NUM_OF_STAGES_DISPATCH_API': '6'})]
    for label, sd, sc, chunk, extra in configs:
        label = 'hybrid ' + label
        if ctx.dead or not ctx.go(label):
            break
        rec = {'backend': 'hybrid', 'label': label, 'num_sms_dispatch': sd, 'num_sms_combine': sc,
               'chunk': chunk or 64, 'env': extra}
        for k in CHUNK_ENVS + ('NUM_OF_STAGES_DISPATCH_API',):
            os.environ.pop(k, None)
        if chunk:
            for k in CHUNK_ENVS:
                os.environ[k] = str(chunk)
        os.environ.update(extra)
        try:
            # per-buffer SM knobs live in configurer.buffer_config and are copied into every new handle's config
            c = buf.configurer.buffer_config
            c.num_of_blocks_dispatch_api = sd
            c.num_of_blocks_combine_api = sc
            buf.configurer.buffer_config = c
            (dx, _, _, h), rec['first_dispatch_s'] = ctx.first_call(
                lambda: buf.dispatch(hidden=x, topk_idx=topk_idx, num_of_experts=E))
            cfg = h[6]
            rec['handle_config'] = {k: getattr(cfg, k) for k in (
                'num_of_blocks_dispatch_api', 'num_of_blocks_combine_api', 'num_of_blocks_preprocessing_api',
                'num_of_tokens_per_chunk_dispatch_api', 'num_of_tokens_per_chunk_combine_api',
                'num_of_stages_dispatch_api', 'num_of_in_flight_s2g_dispatch_api',
                'num_of_stages_g2s_combine_api', 'num_of_stages_s2g_combine_api', 'max_num_of_tokens_per_rank')}
            ndisp = int(h[3].item()) if h[3].numel() == 1 else int(h[3].flatten()[0].item())
            rec['num_dispatched_tokens'] = ndisp
            rec['dispatch_out_rows'] = dx.shape[0]
            rec['check_dispatch'] = bool(dx.shape[0] >= ndisp == exp_rows.shape[0] and torch.equal(dx[:ndisp], exp_rows))
            if not rec['check_dispatch'] and dx.shape[0] >= ndisp:  # order-free fallback
                rec['check_dispatch_unordered'] = bool(torch.equal(torch.sort(decode_ids(dx[:ndisp], T)).values,
                                                                   torch.sort(exp_ids).values))
            (cdx, _, _, _), rec['first_cached_dispatch_s'] = ctx.first_call(
                lambda: buf.dispatch(hidden=x, num_of_experts=E, handle=h, num_dispatched_tokens=ndisp))
            rec['check_cached_dispatch'] = bool(torch.equal(cdx[:ndisp], dx[:ndisp]))
            (cx, _), rec['first_combine_s'] = ctx.first_call(lambda: buf.combine(hidden=dx, handle=h))
            rec['check_combine'], rec['combine_max_abs_err'] = check_combine(cx, x, mult)
            rec['dispatch_cached'] = ctx.bench(
                lambda: buf.dispatch(hidden=x, num_of_experts=E, handle=h, num_dispatched_tokens=ndisp))
            rec['dispatch_noncached'] = ctx.bench(lambda: buf.dispatch(hidden=x, topk_idx=topk_idx, num_of_experts=E))
            rec['combine'] = ctx.bench(lambda: buf.combine(hidden=dx, handle=h))
            rec['ok'] = ctx.all_ok(rec['check_dispatch'] and rec['check_cached_dispatch'] and rec['check_combine'])
        except Exception as e:
            rec['error'] = f'{type(e).__name__}: {e}'[:500]
            log(f'{label} FAILED: {rec["error"]}', all_ranks=True)
            traceback.print_exc()
            ctx.alive()
        res['configs'].append(rec)
        log(json.dumps(rec))
    try:
        jd = os.environ.get('HYBRID_EP_CACHE_DIR', os.path.expanduser('~')) + '/.deepep/hybrid_ep/jit'
        res['jit_dir'] = jd
        res['jit_dir_entries'] = sum(len(f) for _, _, f in os.walk(jd)) if os.path.isdir(jd) else 0
    except Exception:
        pass


# ----------------------------------------------------------------------------------------------------------
def table(res):
    lines = [f"{'config':44s} {'1st disp s':>10s} {'1st cdisp s':>11s} {'1st comb s':>10s} "
             f"{'disp(cached) us':>15s} {'disp(full) us':>13s} {'combine us':>10s}  ok"]
    for r in res['configs']:
        if 'dispatch_cached' not in r:
            lines.append(f"{r['label']:44s} {r.get('error', r.get('result', ''))[:90]}")
            continue
        lines.append(f"{r['label']:44s} {r['first_dispatch_s']:10.2f} {r['first_cached_dispatch_s']:11.2f} "
                     f"{r['first_combine_s']:10.2f} {r['dispatch_cached']['mean_us']:15.1f} "
                     f"{r['dispatch_noncached']['mean_us']:13.1f} {r['combine']['mean_us']:10.1f}  {r.get('ok')}")
    return '\n'.join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--backend', choices=['v2', 'hybrid'], required=True)
    p.add_argument('--out', default=os.environ.get('OUT', '.'))
    p.add_argument('--tokens', type=int, default=4096)
    p.add_argument('--hidden', type=int, default=7168)
    p.add_argument('--topk', type=int, default=8)
    p.add_argument('--experts', type=int, default=256)
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--v2-sms', default='64', help='extra num_sms values (comma list) after theoretical, 24, 8')
    p.add_argument('--budget-s', type=float, default=180, help='start no new config after this many seconds')
    p.add_argument('--gpu-timeout-s', type=int, default=60)
    args = p.parse_args()
    ctx = Ctx(args)
    res = {'backend': args.backend, 'world': ctx.world, 'device': torch.cuda.get_device_name(),
           'torch': torch.__version__, 'nccl_torch': '.'.join(map(str, torch.cuda.nccl.version())),
           'shape': dict(tokens=args.tokens, hidden=args.hidden, topk=args.topk, experts=args.experts),
           'iters': args.iters, 'warmup': args.warmup, 'configs': []}
    log(f"{res['device']} x{ctx.world}, torch {res['torch']}, torch NCCL {res['nccl_torch']}")
    try:
        (run_v2 if args.backend == 'v2' else run_hybrid)(ctx, res)
    except Exception as e:
        res['fatal'] = f'{type(e).__name__}: {e}'[:1000]
        log(f'FATAL: {res["fatal"]}', all_ranks=True)
        traceback.print_exc()
    res['elapsed_s'] = round(time.time() - ctx.t_start, 1)
    if ctx.rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f'probe_{args.backend}.json'), 'w') as f:
            json.dump(res, f, indent=1, default=str)
        print('\n' + table(res), flush=True)
        if 'theoretical_num_sms' in res:
            print('theoretical num_sms:', res['theoretical_num_sms'], flush=True)
    if not ctx.dead:
        try:
            dist.barrier(group=ctx.gloo)
            dist.destroy_process_group()
        except Exception:
            pass
    sys.stdout.flush()
    os._exit(0 if not ctx.dead and 'fatal' not in res else 1)


if __name__ == '__main__':
    main()

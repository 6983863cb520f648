"""Issue 13 on CUDA: the paged forward and Runner.run with CUDA graphs of decode buckets.
Skipped without a CUDA device (run tests/gpu/run.sh on a GPU host)."""
import pytest
import torch

NO_CUDA = "no CUDA device on this machine (run tests/gpu/run.sh on a GPU host)"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)


def tiny(dtype=torch.float32):
    from llmosd.models.llama import Llama, LlamaConfig
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
                      eos_token_id=None)
    m = Llama(cfg)
    m.init_weights(seed=3, std=0.3)
    return m.eval().to(dtype)


class Tok:
    def eos_ids(self):
        return set()


def greedy(run, prompts, n_new):
    """Greedy tokens of ``prompts`` stepped together through ``run.run`` (prefill whole,
    then batched decodes), blocks handed out in a scrambled order."""
    from llmosd.serve.request import SamplingParams
    from llmosd.serve.runner import SeqWork
    sp = SamplingParams(temperature=0.0)
    free = list(range(run.num_blocks))[::-1][1::2] + list(range(run.num_blocks))[::-1][0::2]
    tables = [[] for _ in prompts]
    toks = [list(p) for p in prompts]
    done = [0] * len(prompts)
    with run.session():
        for _ in range(n_new):
            work = []
            for i, t in enumerate(toks):
                while len(tables[i]) * run.block_size < len(t):
                    tables[i].append(free.pop())
                work.append(SeqWork(i, t[done[i]:], done[i], tables[i], sampling=sp, history=t))
                done[i] = len(t)
            for t, got in zip(toks, run.run(work)):
                t.append(got.token)
    return [t[len(p):] for t, p in zip(toks, prompts)]


@needs_cuda
def test_i13_3_cuda_paged_forward_equals_contiguous():
    from llmosd.models.llama import KVCache, PagedKV, paged_batch
    m = tiny().cuda()
    x = torch.randint(1, 97, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    cuts = [(0, 9), (9, 10), (10, 27)] + [(i, i + 1) for i in range(27, 40)]
    with torch.no_grad():
        cache = KVCache(m.config, 64, device="cuda")
        ref = torch.cat([m(torch.tensor([x[a:b]], device="cuda"), cache, a)[0] for a, b in cuts])
        kv = PagedKV(m.config, 20, 4, "cuda")
        table = [19, 3, 7, 0, 12, 5, 8, 1, 16, 2]
        got = torch.cat([m.forward_paged(paged_batch([(x[a:b], a, table)], 4, "cuda")[0], kv)
                         for a, b in cuts])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@needs_cuda
def test_i13_3_cuda_graph_buckets_give_the_eager_tokens():
    """Decode batches of 3 and 5 (padded to buckets 4 and 8) replayed from CUDA graphs choose
    the same greedy tokens as eager CUDA and as the CPU (float32); the graphs were captured."""
    from llmosd.serve.runner import Runner
    prompts = [torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 17, 9, 30, 5)]
    cpu = Runner(tiny(), Tok(), torch.device("cpu"), num_blocks=64, block_size=4)
    want = greedy(cpu, prompts, 20)
    eager = Runner(tiny().cuda(), Tok(), torch.device("cuda"), num_blocks=64, block_size=4, compile="off")
    graphs = Runner(tiny().cuda(), Tok(), torch.device("cuda"), num_blocks=64, block_size=4, compile="on")
    assert greedy(eager, prompts, 20) == want and not eager._graphs
    assert greedy(graphs, prompts, 20) == want
    assert graphs.graphs_enabled and {b for b, _ in graphs._graphs} == {8}
    assert greedy(graphs, prompts[:3], 20) == [w for w in want[:3]]
    assert {b for b, _ in graphs._graphs} == {4, 8}
    graphs.close()


@needs_cuda
def test_i13_3_cuda_bf16_batched_runs():
    """bf16 (the CUDA default) through graphs: runs, and each sequence's first greedy token
    equals its own solo run's."""
    from llmosd.serve.runner import Runner
    prompts = [torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (4, 11, 6)]
    run = Runner(tiny(torch.bfloat16).cuda(), Tok(), torch.device("cuda"), num_blocks=64, block_size=8,
                 compile="auto")
    assert run.kv.k.dtype is torch.bfloat16
    together = greedy(run, prompts, 6)
    assert [greedy(run, [p], 1)[0] for p in prompts] == [t[:1] for t in together]
